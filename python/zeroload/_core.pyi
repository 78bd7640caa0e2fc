"""Typed stub of the native module `zeroload._core` (built from src/py/)."""

import pickle
from collections.abc import Callable, Iterable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar, final

_T = TypeVar("_T")

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CudaError",
    "DLPackView",
    "copy_slices_to_cuda",
    "copy_slices_to_host",
    "ForbiddenGlobalError",
    "copy_to_cuda",
    "copy_to_host",
    "cuda_available",
    "cuda_device_count",
    "cuda_staging_allocated",
    "dtypes",
    "release_staging",
    "safetensors_dtype_name",
    "write_from_cuda",
    "write_host",
]

class CheckpointError(ValueError):
    """A checkpoint file is malformed, truncated, hostile or unsupported."""

class ForbiddenGlobalError(CheckpointError, pickle.UnpicklingError):
    """The pickle asks for a global outside the allow-list; nothing was executed."""

class CudaError(RuntimeError):
    """A CUDA driver call failed, or CUDA is not available."""

# (storage index, torch dtype name, shape, element strides, storage offset, requires_grad)
_TensorTuple = tuple[int, str, list[int], list[int], int, bool]

@final
class DLPackView:
    """A zero-copy CPU view of mapped memory implementing the DLPack protocol."""

    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: tuple[int, int] | None = None,
        dl_device: tuple[int, int] | None = None,
        copy: bool | None = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...

@final
class Checkpoint:
    """An open, parsed checkpoint file (the mapping lives while any view of it does)."""

    @staticmethod
    def open(path: str | PathLike[str]) -> Checkpoint: ...
    @staticmethod
    def from_memory(chunks: Iterable[bytes], name: str | PathLike[str]) -> Checkpoint: ...
    @property
    def path(self) -> Path: ...
    @property
    def format(self) -> str: ...
    @property
    def file_size(self) -> int: ...
    @property
    def metadata(self) -> dict[str, str] | None: ...
    @property
    def num_storages(self) -> int: ...
    @property
    def num_tensors(self) -> int: ...
    def storage(self, i: int) -> tuple[str, int, int, str]: ...
    def tensor(self, i: int) -> _TensorTuple: ...
    def tensors(self) -> list[_TensorTuple]: ...
    def describe(self, i: int) -> tuple[str, list[int], int]: ...
    def loadable(self, i: int) -> bool: ...
    def flat_tensors(self) -> list[tuple[str, int]] | None: ...
    def flat_index(self) -> dict[str, int] | None: ...
    def single_tensor(self) -> int | None: ...
    def export_tensor(self, i: int, make: Callable[[Any], _T]) -> _T | None: ...
    def export_tensors(
        self, indices: Sequence[int] | None, make: Callable[[Any], _T]
    ) -> list[_T | None]: ...
    def readahead(
        self, storages: Sequence[int] | None = None, max_bytes: int | None = None
    ) -> int: ...
    def readahead_ranges(
        self, ranges: Sequence[tuple[int, int]], max_bytes: int | None = None
    ) -> int: ...
    def storage_view(self, i: int) -> DLPackView: ...
    def unaligned_storages(self) -> list[int]: ...
    def tensor_view(self, i: int) -> DLPackView: ...
    def build(self, builder: Any) -> Any: ...

def safetensors_dtype_name(torch_name: str) -> str: ...
def dtypes() -> list[tuple[str, int, str | None, int]]: ...
def cuda_available() -> bool: ...
def cuda_device_count() -> int: ...
def cuda_staging_allocated() -> tuple[int, int] | None: ...
def release_staging() -> bool: ...
def copy_to_cuda(
    ckpt: Checkpoint,
    destinations: Sequence[Any],
    requests: Sequence[tuple[int, int, int, int]],
    device_index: int,
    budget: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    direct: bool = False,
    readers: int | None = None,
) -> None: ...
def write_from_cuda(
    fd: int,
    sources: Sequence[tuple[int, int]],
    requests: Sequence[tuple[int, int, int, int]],
    device: int,
    budget: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[int]: ...
def copy_to_host(
    ckpt: Checkpoint,
    destinations: Sequence[Any],
    requests: Sequence[tuple[int, int, int, int]],
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None: ...

# (name, destination index, destination byte offset, destination element strides or None
# for dense, file offset of element 0, bytes per element, shape, element strides in the
# file, per-dimension lists of (start, stop) index ranges)
_SliceTuple = tuple[
    str,
    int,
    int,
    Sequence[int] | None,
    int,
    int,
    Sequence[int],
    Sequence[int],
    Sequence[Sequence[tuple[int, int]]],
]

def copy_slices_to_host(
    ckpt: Checkpoint,
    destinations: Sequence[Any],
    slices: Sequence[_SliceTuple],
    threads: int | None = None,
    max_gap: int | None = None,
) -> tuple[int, int]: ...
def copy_slices_to_cuda(
    ckpt: Checkpoint,
    destinations: Sequence[Any],
    slices: Sequence[_SliceTuple],
    device_index: int,
    budget: int | None = None,
) -> int: ...

# zeroload.save: (source index, byte offset in the source, nbytes, file offset)
def write_host(
    fd: int,
    path: str | PathLike[str],
    sources: Sequence[Any],
    requests: Sequence[tuple[int, int, int, int]],
    progress: Callable[[int, int], Any] | None = None,
    crc: bool = True,
    threads: int | None = None,
) -> list[int]: ...
