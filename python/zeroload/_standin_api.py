"""STAND-IN for the issue-10 restructuring (drop at merge): the body of the old
`zeroload/__init__.py`, moved here so that `import zeroload` imports no torch.

zeroload: load PyTorch checkpoints straight into CPU or GPU tensors.

`zeroload.load` replaces `torch.load` for `.safetensors` files, `torch.save` zip files
(`.pt`, `.pth`, `.bin`) and Hugging Face shard sets. On the CPU, tensors are zero-copy,
copy-on-write views of the file (nothing is read until touched; writing never changes
the file). On a GPU, each storage is copied once, file -> pinned staging -> device, into
memory from PyTorch's caching allocator, with host memory bounded by a small budget.

    sd = zeroload.load("model.pth", device="cuda")
    model.load_state_dict(sd, assign=True)
"""

from __future__ import annotations

import os
from typing import Any

import torch

from zeroload import _core, _shards, _torch
from zeroload._core import CheckpointError
from zeroload._device import DeviceLike, parse_device
from zeroload._torch import KeysFilter, MapLocation

__all__ = ["SafeOpen", "load", "open"]


def load(
    path: str | os.PathLike,
    device: DeviceLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    keys: KeysFilter = None,
    progress: bool | None = None,
    map_location: MapLocation = None,
    weights_only: bool = True,
    mmap: bool | None = True,
    staging_bytes: int | None = None,
) -> Any:
    """Load a checkpoint the way `torch.load(path, weights_only=True)` would.

    Args:
        path: a `.safetensors` file, a `torch.save` zip file (`.pt`, `.pth`, `.bin`), a
            Hugging Face shard index (`*.index.json`) or a model directory.
        device: "cpu" (default: tensors are copy-on-write views of the file), "cuda",
            "cuda:N" or a `torch.device` (each storage copied once to the device).
        dtype: cast floating-point tensors to this dtype (on the target device).
        keys: names, or a predicate on names, of the tensors to load (flat state dicts
            only); other tensors are never read.
        progress: show a progress bar; None shows one for big device loads in
            interactive sessions.
        map_location: `torch.load`'s name for `device`; also accepts its dict form
            (saved location -> device).
        weights_only: must stay True: zeroload never executes code from a checkpoint.
        mmap: accepted for drop-in use; CPU loads are always memory-mapped.
        staging_bytes: size of the pinned staging ring for GPU loads (default 256 MiB,
            or the ZEROLOAD_STAGING_BYTES environment variable).

    Returns:
        For torch files, what `torch.load` returns (same containers, key order and
        values; tensors that shared a storage still do). For safetensors files and shard
        sets, a `dict[str, Tensor]` in `safe_open(...).keys()` order.

    Raises:
        CheckpointError: the file is malformed, truncated, hostile or unsupported.
        FileNotFoundError: the path does not exist.
        CudaError: CUDA is unavailable or a CUDA call failed.
    """
    if not weights_only:
        raise ValueError(
            "zeroload.load(weights_only=False) is not supported: zeroload never executes "
            "code from a checkpoint. Checkpoints holding only tensors, containers and plain "
            "values load with the default weights_only=True."
        )
    del mmap  # CPU tensors are always views of a private mapping.
    target = _torch.resolve_target(device, map_location)
    shard_set = _shards.resolve(path)
    options: dict[str, Any] = dict(
        dtype=dtype, keys=keys, progress=progress, staging_bytes=staging_bytes
    )
    if len(shard_set.files) == 1 and shard_set.weight_map is None:
        return _torch.load_file(shard_set.files[0], target, **options)
    return _load_shards(shard_set, target, options)


def _load_shards(shard_set: _shards.ShardSet, target: MapLocation, options: dict) -> dict:
    keys = options.pop("keys")
    weight_map = shard_set.weight_map or {}
    if keys is not None and not callable(keys):
        wanted = [keys] if isinstance(keys, str) else list(keys)
        unknown = [k for k in wanted if k not in weight_map]
        if unknown:
            raise KeyError(_torch.missing_key_message(shard_set.index, unknown[0], weight_map))
        wanted_set = set(wanted)
        keys = wanted_set.__contains__
    merged: dict[str, Any] = {}
    for file in shard_set.files:
        in_this_shard = {k for k, f in weight_map.items() if shard_set.index.parent / f == file}

        def pick(name: str, _here: set = in_this_shard) -> bool:
            return name in _here and (keys is None or keys(name))

        part = _torch.load_file(file, target, keys=pick, **options)
        for name, tensor in part.items():
            if name in merged:
                raise CheckpointError(f"{file}: tensor {name!r} also appears in another shard")
            merged[name] = tensor
        missing = {k for k in in_this_shard if keys is None or keys(k)} - part.keys()
        if missing:
            raise CheckpointError(
                f"{file}: the index {shard_set.index} places {sorted(missing)[0]!r} here, "
                "but the shard does not hold it"
            )
    return merged


class SafeOpen:
    """A lazily loading handle on a checkpoint, like `safetensors.safe_open`.

    Only the tensors asked for are read. Use as a context manager::

        with zeroload.open("model.safetensors", device="cuda") as f:
            for name in f.keys():
                t = f.get_tensor(name)
    """

    def __init__(
        self, path: str | os.PathLike, device: DeviceLike = "cpu", framework: str = "pt"
    ) -> None:
        if framework not in ("pt", "pytorch", "torch", "np", "numpy"):
            raise ValueError(f"framework must be 'pt' or 'np', not {framework!r}")
        self._numpy = framework in ("np", "numpy")
        self._device = parse_device(device)
        if self._numpy and self._device.type != "cpu":
            raise ValueError("framework='np' gives CPU arrays; use device='cpu'")
        shard_set = _shards.resolve(path)
        self._path = os.fspath(path)
        self._ckpts = [_core.Checkpoint.open(os.fspath(f)) for f in shard_set.files]
        self._index: dict[str, tuple[_core.Checkpoint, int]] = {}
        for ckpt in self._ckpts:
            flat = ckpt.flat_tensors()
            if flat is None:
                raise CheckpointError(
                    f"{ckpt.path}: zeroload.open needs a flat dict of tensors (a state dict); "
                    "use zeroload.load for other checkpoints"
                )
            for name, i in flat:
                self._index[name] = (ckpt, i)
        self._metadata = self._ckpts[0].metadata if len(self._ckpts) == 1 else None
        if self._metadata is None and shard_set.metadata:
            self._metadata = {str(k): str(v) for k, v in shard_set.metadata.items()}
        self._open = True

    def __enter__(self) -> SafeOpen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drops this handle's references to the files (tensors already returned stay valid)."""
        self._open = False
        self._ckpts = []
        self._index = {}

    def keys(self) -> list[str]:
        """Tensor names, in `safe_open(...).keys()` order (checkpoint order for torch files)."""
        self._check_open()
        return list(self._index)

    def offset_keys(self) -> list[str]:
        """Tensor names in the order their data lies in the file."""
        self._check_open()
        return sorted(self._index, key=lambda n: self._storage_of(n)[1])

    def metadata(self) -> dict[str, str] | None:
        """The safetensors `__metadata__`, or None."""
        self._check_open()
        return self._metadata

    def get_tensor(self, name: str) -> Any:
        """One tensor (or numpy array with framework='np'), reading only its bytes."""
        ckpt, i = self._lookup(name)
        if self._numpy:
            return _numpy_view(ckpt, i, name)
        storage_index = ckpt.tensor(i)[0]
        devices = [self._device] * ckpt.num_storages
        storages = _torch.materialize_storages(ckpt, [storage_index], devices, progress=False)
        t = _torch.make_tensors(ckpt, storages, [i])[i]
        assert t is not None
        return t

    def get_slice(self, name: str) -> _Slice:
        """A lazy slice handle: `f.get_slice(name)[:, :128]` reads only those elements."""
        ckpt, i = self._lookup(name)
        return _Slice(self, ckpt, i, name)

    def _lookup(self, name: str) -> tuple[_core.Checkpoint, int]:
        self._check_open()
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(_torch.missing_key_message(self._path, name, self._index)) from None

    def _storage_of(self, name: str) -> tuple[str, int, int, str]:
        ckpt, i = self._index[name]
        return ckpt.storage(ckpt.tensor(i)[0])

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError(f"{self._path}: the handle is closed")


class _Slice:
    def __init__(self, handle: SafeOpen, ckpt: _core.Checkpoint, index: int, name: str) -> None:
        self._handle = handle
        self._ckpt = ckpt
        self._index = index
        self._name = name

    def get_shape(self) -> list[int]:
        return list(self._ckpt.tensor(self._index)[2])

    def get_dtype(self) -> str:
        """The dtype as safetensors names it ("F32", "BF16", ...)."""
        return _core.safetensors_dtype_name(self._ckpt.tensor(self._index)[1])

    def __getitem__(self, item: Any) -> Any:
        # Index the zero-copy CPU view (only the selected pages are read), then copy the
        # selection out so the result owns its memory, as safetensors' slices do.
        if self._handle._numpy:
            return _numpy_view(self._ckpt, self._index, self._name)[item].copy()
        devices = [torch.device("cpu")] * self._ckpt.num_storages
        storage_index = self._ckpt.tensor(self._index)[0]
        storages = _torch.materialize_storages(self._ckpt, [storage_index], devices, progress=False)
        view = _torch.make_tensors(self._ckpt, storages, [self._index])[self._index]
        assert view is not None
        part = view[item]
        device = self._handle._device
        return part.to(device, copy=True) if device.type != "cpu" else part.clone()


def _numpy_view(ckpt: _core.Checkpoint, i: int, name: str) -> Any:
    import numpy as np

    dtype_name = ckpt.tensor(i)[1]
    try:
        return np.from_dlpack(ckpt.tensor_view(i))
    except (BufferError, TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            f"{ckpt.path}: tensor {name!r} has dtype torch.{dtype_name}, which numpy cannot "
            f"hold ({e}); use framework='pt'"
        ) from None


def open(path: str | os.PathLike, device: DeviceLike = "cpu", framework: str = "pt") -> SafeOpen:
    """Open a checkpoint lazily, like `safetensors.safe_open` (see `SafeOpen`)."""
    return SafeOpen(path, device=device, framework=framework)
