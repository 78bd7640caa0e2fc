"""`zeroload.open`: a lazily loading handle, like `safetensors.safe_open`."""

from __future__ import annotations

import os
from typing import Any

from zeroload import _core, _shards, _torch
from zeroload._core import CheckpointError
from zeroload._device import DeviceLike, parse_device

_FRAMEWORKS = {"pt": False, "pytorch": False, "torch": False, "np": True, "numpy": True}


class SafeOpen:
    """A lazily loading handle on a checkpoint, like `safetensors.safe_open`.

    Only the tensors asked for are read, and each call costs the same however many
    tensors the file holds. Use as a context manager::

        with zeroload.open("model.safetensors") as f:
            for name in f.keys():
                t = f.get_tensor(name)

    Works on safetensors files, torch state-dict files (`.pt`, `.pth`, `.bin`) and shard
    sets (an `*.index.json` or a model directory).
    """

    def __init__(
        self, path: str | os.PathLike, framework: str = "pt", device: DeviceLike = "cpu"
    ) -> None:
        if framework not in _FRAMEWORKS:
            hint = ""
            if isinstance(framework, str) and framework.split(":")[0] in ("cpu", "cuda"):
                hint = (
                    "; the second argument is the framework, as in safe_open(path, "
                    f"framework, device): pass device={framework!r}"
                )
            raise ValueError(f"framework must be 'pt' or 'np', not {framework!r}{hint}")
        self._numpy = _FRAMEWORKS[framework]
        self._device = parse_device(device)
        self._cpu = self._device.type == "cpu"
        if self._numpy and not self._cpu:
            raise ValueError("framework='np' gives CPU arrays; use device='cpu'")
        shard_set = _shards.resolve(path)
        self._path = os.fspath(path)
        # One file: name -> tensor index, and self._ckpt. Shard sets: name -> (checkpoint,
        # tensor index), and self._ckpt is None. Built once; every call is a dict lookup.
        self._ckpt: _core.Checkpoint | None = None
        self._index: dict[str, Any] = {}
        ckpts = [_core.Checkpoint.open(os.fspath(f)) for f in shard_set.files]
        for ckpt in ckpts:
            names = ckpt.flat_index()
            if names is None:
                raise CheckpointError(
                    f"{ckpt.path}: zeroload.open needs a flat dict of tensors (a state dict); "
                    "use zeroload.load for other checkpoints"
                )
            if len(ckpts) == 1:
                self._ckpt, self._index = ckpt, names
                break
            for name, i in names.items():
                if name in self._index:
                    raise CheckpointError(
                        f"{ckpt.path}: tensor {name!r} also appears in {self._index[name][0].path}"
                    )
                self._index[name] = (ckpt, i)
        self._metadata = ckpts[0].metadata if len(ckpts) == 1 else None
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
        self._ckpt = None
        self._index = {}

    def keys(self) -> list[str]:
        """Tensor names, in `safe_open(...).keys()` order (sorted, for safetensors files);
        the state dict's order for torch files."""
        self._check_open()
        return list(self._index)

    def offset_keys(self) -> list[str]:
        """Tensor names in the order their data lies in the file(s)."""
        self._check_open()
        names = list(self._index)
        return sorted(names, key=lambda n: self._storage_of(n)[1:3])

    def metadata(self) -> dict[str, str] | None:
        """The safetensors `__metadata__` (a shard index's `metadata`), or None."""
        self._check_open()
        return self._metadata

    def get_tensor(self, name: str) -> Any:
        """One tensor (or numpy array with framework='np'), reading only its bytes.

        On the CPU it is a copy-on-write view of the file (nothing is read until
        touched); on a GPU it owns its memory."""
        ckpt, i = self._lookup(name)
        if self._numpy:
            return _numpy_view(ckpt, i, name)
        if self._cpu:
            t = ckpt.export_tensor(i, _torch.from_capsule)
            if t is not None:
                return t
        return _torch.tensor_on(ckpt, i, self._device)

    def get_slice(self, name: str) -> _Slice:
        """A lazy slice handle: `f.get_slice(name)[:, :128]` reads only those elements."""
        ckpt, i = self._lookup(name)
        return _Slice(self, ckpt, i, name)

    def _lookup(self, name: str) -> tuple[_core.Checkpoint, int]:
        try:
            entry = self._index[name]
        except KeyError:
            self._check_open()
            raise KeyError(_torch.missing_key_message(self._path, name, self._index)) from None
        if self._ckpt is not None:
            return self._ckpt, entry
        return entry

    def _storage_of(self, name: str) -> tuple[str, int, int, str]:
        ckpt, i = self._lookup(name)
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
        part = _torch.tensor_on(self._ckpt, self._index, _torch.CPU)[item]
        device = self._handle._device
        return part.to(device, copy=True) if device.type != "cpu" else part.clone()


def _numpy_view(ckpt: _core.Checkpoint, i: int, name: str) -> Any:
    import numpy as np

    try:
        return np.from_dlpack(ckpt.tensor_view(i))
    except (BufferError, TypeError, ValueError, RuntimeError) as e:
        dtype_name = ckpt.tensor(i)[1]
        raise TypeError(
            f"{ckpt.path}: tensor {name!r} has dtype torch.{dtype_name}, which numpy cannot "
            f"hold ({e}); use framework='pt'"
        ) from None


def open(path: str | os.PathLike, framework: str = "pt", device: DeviceLike = "cpu") -> SafeOpen:
    """Open a checkpoint lazily, like `safetensors.safe_open(path, framework, device)`.

    Args:
        path: a `.safetensors` file, a torch state-dict file, a shard index or a model
            directory.
        framework: "pt" (torch tensors, default) or "np" (zero-copy numpy arrays; dtypes
            numpy lacks, such as bfloat16 and float8, raise a `TypeError`).
        device: where `get_tensor` puts tensors: "cpu" (copy-on-write views of the file,
            read when touched), "cuda", "cuda:N" or a `torch.device`.

    Returns:
        A `SafeOpen` handle (a context manager) with `keys()`, `metadata()`,
        `get_tensor(name)`, `get_slice(name)` and `offset_keys()`. Each call costs the
        same however many tensors the checkpoint holds.
    """
    return SafeOpen(path, framework, device)
