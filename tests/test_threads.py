"""Threads: CPU loads, `open()` handles shared between threads, `load_into` from several
threads and `release_staging()` during other threads' loads, 8 threads x 200 mixed
operations, each result equal to the single-threaded one; a watchdog dumps every
thread's stack (faulthandler) and fails the test if they do not finish."""

from __future__ import annotations

import faulthandler
import random
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import zeroload

THREADS, OPS = 8, 200
WATCHDOG_S = 240  # a deadlock, not slowness: the whole run takes seconds


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(32, 64)
        self.b = torch.nn.Linear(64, 16)
        self.register_buffer("steps", torch.tensor(0))


def _files(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    sd = {f"t{i}": torch.randn(17 + i, 33) for i in range(24)}
    sd["ints"] = torch.arange(1000, dtype=torch.int64)
    st, pth, model = tmp_path / "m.safetensors", tmp_path / "m.pth", tmp_path / "net.pth"
    save_file(sd, st)
    torch.save({**sd, "view": sd["t3"].t()}, pth)
    torch.save(Net().state_dict(), model)
    return {"st": st, "pth": pth, "model": model}


def _ops(files: dict[str, Path], handle: zeroload.SafeOpen) -> dict[str, Callable[[], Any]]:
    """Each operation, returning something comparable with `_same`."""

    def load_into_live() -> Any:
        m = Net()
        zeroload.load_into(m, files["model"])
        return m.state_dict()

    def load_into_meta() -> Any:
        with torch.device("meta"):
            m = Net()
        zeroload.load_into(m, files["model"])
        return m.state_dict()

    def load_into_cast() -> Any:
        m = Net()
        zeroload.load_into(m, files["model"], dtype=torch.bfloat16)
        return m.state_dict()

    return {
        "load_st": lambda: zeroload.load(files["st"]),
        "load_pth": lambda: zeroload.load(files["pth"]),
        "load_cast": lambda: zeroload.load(files["pth"], dtype=torch.float16),
        "load_private": lambda: zeroload.load(files["st"], mmap=False),
        "load_bytes": lambda: zeroload.load_bytes(files["pth"].read_bytes()),
        "keys": lambda: zeroload.load(files["st"], keys=["t5", "ints"]),
        "get_tensor": lambda: handle.get_tensor("t7"),
        "get_slice": lambda: handle.get_slice("t9")[3:11, 5:],
        "get_tensors": handle.get_tensors,
        "load_into_live": load_into_live,
        "load_into_meta": load_into_meta,
        "load_into_cast": load_into_cast,
        "release_staging": lambda: zeroload.release_staging(),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def test_eight_threads_of_mixed_operations_equal_one_thread(tmp_path: Path) -> None:
    files = _files(tmp_path)
    with zeroload.open(files["st"]) as handle:
        ops = _ops(files, handle)
        reference = {name: op() for name, op in ops.items()}
        names = sorted(ops)
        failures: list[str] = []
        start = threading.Barrier(THREADS)

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            start.wait()
            for _ in range(OPS):
                name = rng.choice(names)
                try:
                    got = ops[name]()
                except BaseException as e:  # recorded, not lost in the thread
                    failures.append(f"thread {seed}: {name} raised {e!r}")
                    return
                if not _same(got, reference[name]):
                    failures.append(f"thread {seed}: {name} differs from one thread's result")
                    return

        threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WATCHDOG_S)
        if any(t.is_alive() for t in threads):
            with tempfile.TemporaryFile("w+") as stacks:
                faulthandler.dump_traceback(stacks, all_threads=True)
                stacks.seek(0)
                pytest.fail(f"threads still running after {WATCHDOG_S} s:\n{stacks.read()}")
    assert not failures, "\n".join(failures[:10])
