"""Device handling and the GPU path: storages allocated by PyTorch's caching allocator,
filled from the file by the Rust copy engine (pread -> pinned staging ring -> async HtoD).

Everything this module asks of PyTorch's CUDA support goes through `backend` (a
`CudaBackend`): which devices exist, allocating destination storage, synchronising
before a copy, exporting destinations through DLPack. The real backend is `TorchCuda`.
Tests without a GPU swap in one that allocates memory of a fake CUDA driver
(tests/fakecuda) and hands the bytes back as CPU tensors, so that everything else on the
path (the copy engine, view building, tied storages, dtype casts, progress,
cancellation) runs for real.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ContextManager, Protocol, Union

import torch

from zeroload import _core

DeviceLike = Union[str, int, torch.device]

Progress = Callable[[int, int], None]


class CudaBackend(Protocol):
    """What the GPU path needs from PyTorch's CUDA support."""

    def unavailable(self) -> str | None:
        """Why CUDA cannot be used (None: it can)."""

    def device_count(self) -> int: ...

    def current_device(self) -> int: ...

    def empty(self, nbytes: int, device: torch.device) -> Any:
        """A destination of `nbytes` bytes on `device` that exports DLPack."""

    def synchronize(self, device: torch.device, *, all_streams: bool) -> None:
        """Waits for work that may still use memory about to be written: the current
        stream's (fresh allocations), or every stream's (existing parameters)."""

    def exporting(self, device: torch.device) -> ContextManager[object]:
        """The context in which destinations on `device` export DLPack."""

    def finish(self, destination: Any) -> torch.Tensor:
        """The tensor to hand out for a filled destination."""


class TorchCuda:
    """The real backend: PyTorch's CUDA caching allocator and streams."""

    def unavailable(self) -> str | None:
        if torch.cuda.is_available():
            return None
        if torch.version.cuda is None:
            return "this PyTorch build has no CUDA support"
        return "no CUDA driver or device is available (torch.cuda.is_available() is False)"

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def empty(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def synchronize(self, device: torch.device, *, all_streams: bool) -> None:
        if all_streams:
            torch.cuda.synchronize(device)
        else:
            # The caching allocator may hand out blocks freed by work still queued on the
            # current stream; our copies run on their own stream.
            torch.cuda.current_stream(device).synchronize()

    def exporting(self, device: torch.device) -> ContextManager[object]:
        # torch exports CUDA tensors through DLPack only on the current device.
        return torch.cuda.device(device)

    def finish(self, destination: torch.Tensor) -> torch.Tensor:
        return destination


backend: CudaBackend = TorchCuda()


@contextlib.contextmanager
def using_backend(b: CudaBackend) -> Iterator[CudaBackend]:
    """Uses `b` for the GPU path inside the block (a test seam)."""
    global backend
    previous, backend = backend, b
    try:
        yield b
    finally:
        backend = previous


def parse_device(device: DeviceLike | None) -> torch.device:
    """A `torch.device` from "cpu", "cuda", "cuda:1", an int (a CUDA index) or a device.

    "cuda" without an index stays index-less here; `cuda_device` resolves it.
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool):
        raise TypeError(f"not a device: {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"not a device: {device!r} (CUDA device indices are >= 0)")
        return torch.device("cuda", device)
    if isinstance(device, str):
        try:
            return torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"not a device: {device!r} ({e})") from None
    raise TypeError(f"not a device: {device!r} (expected a str, int or torch.device)")


def cuda_device(device: DeviceLike) -> torch.device:
    """Validates a CUDA device and gives it an explicit index.

    Raises `zeroload.CudaError` when CUDA is unavailable (no driver, no device, or a torch
    build without CUDA) and `ValueError` for an index that does not exist.
    """
    dev = parse_device(device)
    if dev.type != "cuda":
        raise ValueError(f"not a CUDA device: {dev}")
    reason = backend.unavailable()
    if reason is not None:
        raise _core.CudaError(f"cannot load to {dev}: {reason}")
    count = backend.device_count()
    index = backend.current_device() if dev.index is None else dev.index
    if not 0 <= index < count:
        raise ValueError(
            f"cannot load to cuda:{index}: there {'is' if count == 1 else 'are'} {count} "
            f"CUDA device{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})"
        )
    if not _core.cuda_available():
        raise _core.CudaError(
            f"cannot load to cuda:{index}: PyTorch sees CUDA but zeroload could not load the "
            "CUDA driver library (libcuda.so, nvcuda.dll on Windows)"
        )
    return torch.device("cuda", index)


def storage_tensors(
    ckpt: _core.Checkpoint,
    storages: Sequence[int],
    device: torch.device,
    *,
    progress: Progress | None,
    budget: int | None,
) -> list[torch.Tensor]:
    """One 1-D uint8 tensor per requested storage, on `device`, holding its bytes.

    Each storage gets its own allocation from PyTorch's caching allocator (so every tensor
    owns its memory and `torch.cuda.memory_allocated()` sees it); a storage index listed
    twice gets the same tensor (copied once). The bytes travel file -> pinned staging ring
    (`budget` bytes, default `ZEROLOAD_STAGING_BYTES` or 256 MiB) -> device, with the GIL
    released. `progress(bytes_done, bytes_total)` is called from this thread; an exception
    it raises stops the copy and propagates.
    """
    dev = cuda_device(device)
    if budget is not None and budget <= 0:
        raise ValueError(f"budget must be a positive number of bytes, not {budget!r}")
    by_index: dict[int, Any] = {}
    destinations: list[Any] = []
    requests: list[tuple[int, int, int, int]] = []
    for i in storages:
        if i in by_index:
            continue
        _key, offset, nbytes, _location = ckpt.storage(i)
        t = backend.empty(nbytes, dev)
        by_index[i] = t
        if nbytes:
            requests.append((offset, nbytes, len(destinations), 0))
            destinations.append(t)
    if requests:
        backend.synchronize(dev, all_streams=False)
        with backend.exporting(dev):
            _core.copy_to_cuda(ckpt, destinations, requests, dev.index, budget, progress)
    finished = {i: backend.finish(t) for i, t in by_index.items()}
    return [finished[i] for i in storages]


def copy_into(
    ckpt: _core.Checkpoint,
    destinations: Sequence[Any],
    requests: Sequence[tuple[int, int, int, int]],
    device: torch.device,
    *,
    progress: Progress | None = None,
) -> None:
    """Copies file bytes straight into existing CUDA tensors (`load_into` on a model whose
    parameters live on the GPU): `requests` are `(file_offset, nbytes, destination index,
    byte offset in it)`; `progress(bytes_done, bytes_total)` as for `storage_tensors`."""
    dev = cuda_device(device)
    # The parameters may be in use by queued kernels on any stream.
    backend.synchronize(dev, all_streams=True)
    with backend.exporting(dev):
        _core.copy_to_cuda(ckpt, list(destinations), list(requests), dev.index, None, progress)


def release_staging() -> bool:
    """Free the pinned host memory (and the CUDA stream, events and reader threads) that
    GPU loads keep between calls.

    GPU loads stage file bytes through a ring of pinned host buffers (`staging_bytes`,
    default 256 MiB) that is allocated on the first load and reused by the next ones,
    because pinning memory is slow. Call this when you are done loading to give that
    memory back; the next GPU load allocates it again. Waits for a load running in another
    thread. Returns True if there was anything to free.
    """
    return _core.release_staging()
