"""The copy engine's Python surface on a machine without CUDA: host copies are exact,
asking for CUDA fails with a clear, catchable exception."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import ProgressRecorder, TinyNet

import zeroload
from zeroload import _core, _cuda


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    g = torch.Generator().manual_seed(5)
    raw = torch.randint(0, 256, (3 * (1 << 20) + 77,), dtype=torch.uint8, generator=g)
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file({"x": raw}, path)
    return path, path.read_bytes()


def host_copy(
    ckpt: _core.Checkpoint, ranges: list[tuple[int, int]], **kw: object
) -> list[torch.Tensor]:
    bufs = [torch.zeros(n, dtype=torch.uint8) for _, n in ranges]
    reqs = [(off, n, j, 0) for j, (off, n) in enumerate(ranges) if n]
    _core.copy_to_host(ckpt, bufs, reqs, **kw)  # type: ignore[arg-type]
    return bufs


def test_cuda_availability_functions_do_not_raise() -> None:
    assert isinstance(_core.cuda_available(), bool)
    assert isinstance(_core.cuda_device_count(), int)
    assert _core.cuda_available() == (_core.cuda_device_count() > 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_no_cuda_here() -> None:
    assert _core.cuda_available() is False
    assert _core.cuda_device_count() == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", torch.device("cuda", 1), 0])
def test_asking_for_cuda_raises_a_clear_exception(
    data_file: tuple[Path, bytes], device: object
) -> None:
    path, _ = data_file
    with pytest.raises(zeroload.CudaError) as e:
        zeroload.load(path, device=device)  # type: ignore[arg-type]
    assert isinstance(e.value, RuntimeError)  # a normal Exception, not a PanicException
    assert "CUDA" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_core_copy_to_cuda_without_cuda_is_an_exception_not_a_panic(
    data_file: tuple[Path, bytes],
) -> None:
    path, _ = data_file
    ckpt = _core.Checkpoint.open(str(path))
    with pytest.raises(zeroload.CudaError, match="not available"):
        _core.copy_to_cuda(ckpt, [], [], 0, None, None)
    with pytest.raises(zeroload.CudaError):
        _core.copy_to_cuda(ckpt, [], [], 0, 1 << 20, None, direct=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_release_staging_without_cuda_frees_nothing_and_does_not_raise() -> None:
    assert zeroload.release_staging() is False
    assert _core.cuda_staging_allocated() is None
    assert "release_staging" in zeroload.__all__


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_load_into_cuda_without_cuda_is_a_cuda_error_and_changes_nothing(
    model_file: Path, device: str
) -> None:
    with torch.device("meta"):
        model = TinyNet()
    with pytest.raises(zeroload.CudaError, match="CUDA"):
        zeroload.load_into(model, model_file, device=device)
    assert all(t.is_meta for t in model.state_dict().values()), "nothing was assigned"
    # Without a device nothing needs CUDA: the same call loads onto the CPU.
    zeroload.load_into(model, model_file)
    ref = torch.load(model_file, weights_only=True)
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, ref[k]), k


def test_device_parsing() -> None:
    assert _cuda.parse_device(None) == torch.device("cpu")
    assert _cuda.parse_device("cuda:1") == torch.device("cuda", 1)
    assert _cuda.parse_device(2) == torch.device("cuda", 2)
    assert _cuda.parse_device(torch.device("cuda")) == torch.device("cuda")
    with pytest.raises(ValueError, match="not a device"):
        _cuda.parse_device("gpu7")
    with pytest.raises(ValueError):
        _cuda.parse_device(-1)
    with pytest.raises(TypeError):
        _cuda.parse_device(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a CUDA device"):
        _cuda.cuda_device("cpu")


@pytest.mark.parametrize("threads", [None, 1, 2, 5])
def test_copy_to_host_matches_file_bytes(
    data_file: tuple[Path, bytes], threads: int | None
) -> None:
    path, raw = data_file
    ckpt = _core.Checkpoint.open(str(path))
    size = len(raw)
    ranges = [(0, 8), (8, 1000), (3, 2 << 20), (size - 100, 100), (500, 0), (1 << 20, 1 << 20)]
    bufs = host_copy(ckpt, ranges, threads=threads)
    for (off, n), b in zip(ranges, bufs):
        assert bytes(b.numpy()) == raw[off : off + n]


def test_copy_to_host_progress_totals(
    data_file: tuple[Path, bytes], progress_recorder: ProgressRecorder
) -> None:
    path, raw = data_file
    ckpt = _core.Checkpoint.open(str(path))
    ranges = [(0, len(raw) // 2), (len(raw) // 2, len(raw) - len(raw) // 2)]
    host_copy(ckpt, ranges, threads=4, progress=progress_recorder)
    progress_recorder.check(len(raw))


def test_exception_in_progress_aborts_and_propagates(data_file: tuple[Path, bytes]) -> None:
    path, raw = data_file
    ckpt = _core.Checkpoint.open(str(path))

    class Stop(Exception):
        pass

    def progress(done: int, total: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        host_copy(ckpt, [(0, len(raw))], progress=progress)

    def interrupt(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        host_copy(ckpt, [(0, len(raw))], progress=interrupt)


def test_copy_to_host_refuses_bad_requests(data_file: tuple[Path, bytes]) -> None:
    path, raw = data_file
    ckpt = _core.Checkpoint.open(str(path))
    buf = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside the file"):
        _core.copy_to_host(ckpt, [buf], [(len(raw) - 10, 20, 0, 0)])
    with pytest.raises(ValueError, match="overlap"):
        _core.copy_to_host(ckpt, [buf], [(0, 32, 0, 0), (100, 32, 0, 16)])
    with pytest.raises(OverflowError):
        _core.copy_to_host(ckpt, [buf], [(-1, 8, 0, 0)])
    assert torch.count_nonzero(buf) == 0


def test_copy_to_host_writes_only_inside_its_destinations(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    ckpt = _core.Checkpoint.open(str(path))
    backing = torch.zeros(96, dtype=torch.uint8)
    buf = backing[16:80]  # a view: writes past it would land in `backing`
    with pytest.raises(ValueError, match="past its end"):
        _core.copy_to_host(ckpt, [buf], [(0, 8, 0, 60)])
    with pytest.raises(ValueError, match="past its end"):
        _core.copy_to_host(ckpt, [buf], [(0, 65, 0, 0)])
    with pytest.raises(ValueError, match="destination #1"):
        _core.copy_to_host(ckpt, [buf], [(0, 8, 1, 0)])
    with pytest.raises(ValueError, match="not contiguous"):
        _core.copy_to_host(ckpt, [backing.view(8, 12).t()], [(0, 8, 0, 0)])
    with pytest.raises(ValueError, match="DLPack"):
        _core.copy_to_host(ckpt, [bytearray(64)], [(0, 8, 0, 0)])
    assert torch.count_nonzero(backing) == 0
    _core.copy_to_host(ckpt, [buf], [(0, 64, 0, 0)])
    assert torch.count_nonzero(backing[:16]) == 0 and torch.count_nonzero(backing[80:]) == 0


def test_staging_budget_environment_variable_is_validated(
    data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without CUDA the copy fails after the budget is read; a bad value is reported first.
    path, _ = data_file
    ckpt = _core.Checkpoint.open(str(path))
    monkeypatch.setenv("ZEROLOAD_STAGING_BYTES", "lots")
    with pytest.raises(ValueError, match="ZEROLOAD_STAGING_BYTES"):
        _core.copy_to_cuda(ckpt, [], [], 0, None, None)
