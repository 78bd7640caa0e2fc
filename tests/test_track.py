"""zeroload.track(): peak memory of a block, as a context manager and a decorator."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import pytest
import torch

from zeroload._track import TrackResult, track

MiB = 1 << 20


def _transient_zeroload_threads() -> list[str]:
    """zeroload's short-lived native threads (readahead, unmapping a dropped checkpoint),
    by their kernel names (Linux; none found elsewhere)."""
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue  # the thread ended meanwhile
        if name.startswith(("zeroload-readah", "zeroload-drop")):
            names.append(name)
    return names


@pytest.fixture(autouse=True)
def quiet_process() -> None:
    """These tests measure this process's RSS: start each once what earlier tests left
    behind has settled (garbage collected; zeroload's readahead and unmapping threads
    done), so that memory freed or faulted in meanwhile is not counted."""
    gc.collect()
    deadline = time.monotonic() + 10
    while _transient_zeroload_threads() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_context_manager_sees_an_allocation() -> None:
    with track("alloc") as t:
        x = torch.ones(64 * MiB // 4)  # 64 MiB, touched
        del x
    assert isinstance(t, TrackResult)
    assert t.done
    assert t.cpu_peak >= 60 * MiB
    assert t.cpu_peak < 512 * MiB
    assert t.wall_s > 0
    assert t.samples >= 1
    assert "alloc" in repr(t) and "peak CPU RSS" in repr(t)
    assert "<table" in t._repr_html_()
    assert str(t) == repr(t)


def test_running_repr() -> None:
    with track("x") as t:
        assert "running" in repr(t)
    assert "running" not in repr(t)


def test_hwm_catches_what_sampling_misses() -> None:
    with track(interval=60.0) as t:  # one sample at the start, none during the spike
        for _ in range(3):
            y = torch.ones(48 * MiB // 4)
            del y
    if t.cpu_hwm_peak is None:
        pytest.skip("VmHWM cannot be reset here (/proc/self/clear_refs)")
    assert t.cpu_hwm_peak >= 40 * MiB
    # The sampler (one sample before, one after) saw no spike: cpu_peak is the kernel's.
    assert t.cpu_sampled_peak < 40 * MiB
    assert t.cpu_peak == t.cpu_hwm_peak


def test_decorator_prints_and_keeps_the_result(capsys: pytest.CaptureFixture) -> None:
    @track
    def make(n: int) -> float:
        return float(torch.ones(n).sum())

    assert make(32 * MiB // 4) == 32 * MiB // 4
    assert "make" in capsys.readouterr().out
    assert make.last_track.cpu_peak >= 28 * MiB

    @track("named", report=False)
    def noop() -> int:
        return 1

    assert noop() == 1
    assert capsys.readouterr().out == ""
    assert noop.last_track.label == "named"


def test_nested_outer_sees_inner_peak() -> None:
    with track("outer") as outer:
        with track("inner") as inner:
            z = torch.ones(64 * MiB // 4)
            del z
    assert inner.cpu_peak >= 60 * MiB
    assert outer.cpu_peak >= inner.cpu_peak - 4 * MiB


def test_exception_propagates_and_result_is_filled() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with track() as t:
            raise RuntimeError("boom")
    assert t.done


def test_zeroload_load_does_not_read_the_file(tmp_path: Path) -> None:
    """CPU loads are mmap-backed: nothing is resident until touched (contract)."""
    import zeroload

    p = tmp_path / "big.pth"
    torch.save({"w": torch.randn(64 * MiB // 4)}, p)
    with track() as plain:
        sd = torch.load(p, weights_only=True)
    del sd
    with track() as zl:
        sd = zeroload.load(p)
    assert plain.cpu_peak >= 60 * MiB
    assert zl.cpu_peak < 16 * MiB
    assert torch.equal(sd["w"], torch.load(p, weights_only=True)["w"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_peak() -> None:
    torch.zeros(1, device="cuda")
    with track() as t:
        x = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
        del x
    assert t.gpu_peak_allocated is not None and t.gpu_peak_allocated >= 256 * MiB
    assert t.gpu_peak_used is not None
    assert "GPU" in repr(t)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_no_gpu_fields_without_cuda() -> None:
    with track() as t:
        pass
    assert t.gpu_peak_allocated is None and t.gpu_peak_used is None
    assert "GPU" not in repr(t)
