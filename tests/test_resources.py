"""Resources: a failed `load`/`load_bytes`/`open`/`load_into` (each kind of error) leaves no
file descriptor, mapping, thread or temp file behind; and a soak of 2,000 loads in one
process keeps RSS, descriptors and mappings flat. (Linux: reads /proc/self.)"""

from __future__ import annotations

import collections
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import zeroload

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


class Custom:  # a global no checkpoint may name
    pass


def _fds() -> set[str]:
    return {f"{fd} -> {_target(fd)}" for fd in os.listdir("/proc/self/fd")}


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"  # the descriptor listdir itself used, closed since


def _maps(marker: str) -> list[str]:
    """Mappings of files under `marker` and of zeroload's anonymous files."""
    with open("/proc/self/maps") as f:
        return [ln.strip() for ln in f if marker in ln or "memfd:zeroload" in ln]


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _temp_files() -> list[str]:
    return sorted(n for n in os.listdir(tempfile.gettempdir()) if n.startswith("zeroload-"))


def _state(marker: str) -> dict[str, Any]:
    gc.collect()
    return {
        "fds": _fds() - {"?"},
        "maps": _maps(marker),
        "threads": _threads(),
        "temp": _temp_files(),
    }


def _settled(marker: str, before: dict[str, Any]) -> dict[str, Any]:
    """The state once background readahead threads (which end on their own) are gone."""
    deadline = time.monotonic() + 30
    now = _state(marker)
    while now != before and time.monotonic() < deadline:
        time.sleep(0.05)
        now = _state(marker)
    return now


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("resources")
    sd = {f"t{i}": torch.randn(64, 64) for i in range(8)}
    out = {
        "st": d / "ok.safetensors",
        "pth": d / "ok.pth",
        "truncated_st": d / "truncated.safetensors",
        "truncated_pth": d / "truncated.pth",
        "garbage": d / "garbage.pth",
        "forbidden": d / "forbidden.pth",
        "nested": d / "nested.pth",
    }
    save_file(sd, out["st"])
    torch.save(sd, out["pth"])
    for ok, bad in (("st", "truncated_st"), ("pth", "truncated_pth")):
        data = out[ok].read_bytes()
        bad_data = data[: len(data) // 2] if ok == "pth" else data[: len(data) - 100]
        out[bad].write_bytes(bad_data)
    out["garbage"].write_bytes(b"PK\x03\x04" + os.urandom(5000))
    torch.save({"w": torch.ones(2), "obj": Custom()}, out["forbidden"])
    torch.save({"model": sd, "step": 3}, out["nested"])
    return out


class Net(torch.nn.Module):
    def __init__(self, n: int = 64) -> None:
        super().__init__()
        for i in range(8):
            self.register_buffer(f"t{i}", torch.zeros(n, 64))


def _failures(files: dict[str, Path]) -> dict[str, tuple[Callable[[], Any], type]]:
    def handle_then_fail() -> None:
        with zeroload.open(files["st"]) as f:
            f.get_tensor("nope")

    return {
        "load missing": (lambda: zeroload.load(files["st"].with_name("none.pth")), OSError),
        "load truncated st": (lambda: zeroload.load(files["truncated_st"]), ValueError),
        "load truncated pth": (lambda: zeroload.load(files["truncated_pth"]), ValueError),
        "load garbage": (lambda: zeroload.load(files["garbage"]), ValueError),
        "load forbidden": (lambda: zeroload.load(files["forbidden"]), ValueError),
        "load keys": (lambda: zeroload.load(files["st"], keys=["nope"]), KeyError),
        "load bad dtype": (lambda: zeroload.load(files["st"], dtype="half"), TypeError),
        "load_bytes truncated": (
            lambda: zeroload.load_bytes(files["truncated_pth"].read_bytes()),
            ValueError,
        ),
        "load_bytes garbage": (
            lambda: zeroload.load_bytes(files["garbage"].read_bytes()),
            ValueError,
        ),
        "open garbage": (lambda: zeroload.open(files["garbage"]), ValueError),
        "open nested": (lambda: zeroload.open(files["nested"]), ValueError),
        "open missing key": (handle_then_fail, KeyError),
        "load_into size": (lambda: zeroload.load_into(Net(32), files["pth"]), RuntimeError),
        "load_into nested": (lambda: zeroload.load_into(Net(), files["nested"]), ValueError),
        "load_into truncated": (
            lambda: zeroload.load_into(Net(), files["truncated_st"]),
            ValueError,
        ),
    }


def test_failures_leave_nothing_behind(files: dict[str, Path]) -> None:
    marker = str(files["st"].parent)
    failures = _failures(files)
    for call, error in failures.values():  # warm up: torch's own one-time state
        with pytest.raises(error):
            call()
    before = _state(marker)
    assert before["maps"] == [], before["maps"]
    for name, (call, error) in failures.items():
        for _ in range(5):
            with pytest.raises(error):
                call()
        after = _settled(marker, before)
        assert after == before, f"{name} left behind: " + str(
            {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        )


SOAK = 2000
RSS_BOUND = 32 << 20  # growth allowed between the end of the warm-up and the end


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_soak_of_2000_loads_keeps_rss_fds_and_maps_flat(files: dict[str, Path]) -> None:
    marker = str(files["st"].parent)
    data = files["pth"].read_bytes()
    ref = torch.load(files["pth"], weights_only=True)

    def via_open() -> dict[str, torch.Tensor]:
        with zeroload.open(files["st"]) as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def via_load_into() -> dict[str, torch.Tensor]:
        m = Net()
        zeroload.load_into(m, files["st"])
        return dict(m.state_dict())

    loads = [
        lambda: zeroload.load(files["st"]),
        lambda: zeroload.load(files["pth"]),
        lambda: zeroload.load(files["pth"], mmap=False),
        lambda: zeroload.load(files["st"], dtype=torch.float16),
        lambda: zeroload.load_bytes(data),
        via_open,
        via_load_into,
    ]
    counts: collections.Counter[int] = collections.Counter()
    warm = 200
    for i in range(SOAK):
        if i == warm:
            before, rss0 = _state(marker), _rss()
        j = i % len(loads)
        got = loads[j]()
        counts[j] += 1
        if i % 97 == 0:
            want = {k: v.half() for k, v in ref.items()} if j == 3 else ref
            assert all(torch.equal(got[k], want[k]) for k in want), j
        del got
    after = _settled(marker, before)
    grown = _rss() - rss0
    assert after == before
    assert grown < RSS_BOUND, f"RSS grew by {grown / 2**20:.1f} MiB over {SOAK - warm} loads"
    assert sum(counts.values()) == SOAK
