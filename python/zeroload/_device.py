"""Device handling and the GPU path: storages allocated by PyTorch's caching allocator,
filled from the file by the Rust copy engine (pread -> pinned staging ring -> async HtoD).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch

from zeroload import _core

DeviceLike = Union[str, int, torch.device]

Progress = Callable[[int, int], None]


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
    if not torch.cuda.is_available():
        reason = (
            "this PyTorch build has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA driver or device is available (torch.cuda.is_available() is False)"
        )
        raise _core.CudaError(f"cannot load to {dev}: {reason}")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < count:
        raise ValueError(
            f"cannot load to cuda:{index}: there {'is' if count == 1 else 'are'} {count} "
            f"CUDA device{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})"
        )
    if not _core.cuda_available():
        raise _core.CudaError(
            f"cannot load to cuda:{index}: PyTorch sees CUDA but zeroload could not load the "
            "CUDA driver library (libcuda.so)"
        )
    return torch.device("cuda", index)


def materialize_storages(
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
    by_index: dict[int, torch.Tensor] = {}
    destinations: list[torch.Tensor] = []
    requests: list[tuple[int, int, int, int]] = []
    for i in storages:
        if i in by_index:
            continue
        _key, offset, nbytes, _location = ckpt.storage(i)
        t = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        by_index[i] = t
        if nbytes:
            requests.append((offset, nbytes, len(destinations), 0))
            destinations.append(t)
    if requests:
        # The caching allocator may hand out blocks freed by work still queued on the
        # current stream; our copies run on their own stream, so let that work finish.
        torch.cuda.current_stream(dev).synchronize()
        # torch exports CUDA tensors through DLPack only on the current device.
        with torch.cuda.device(dev):
            _core.copy_to_cuda(ckpt, destinations, requests, dev.index, budget, progress)
    return [by_index[i] for i in storages]
