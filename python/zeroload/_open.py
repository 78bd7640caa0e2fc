"""`zeroload.open`: a lazily loading handle, like `safetensors.safe_open`."""

from __future__ import annotations

import os
import warnings
from typing import Any, overload

import torch

from zeroload import _core, _shards, _slices, _torch
from zeroload._core import CheckpointError
from zeroload._cuda import DeviceLike, parse_device

_FRAMEWORKS = {"pt": False, "pytorch": False, "torch": False, "np": True, "numpy": True}
_BACKENDS = ("mmap", "pread")


def reads_privately(backend: str) -> bool:
    """Whether `backend` (safe_open's: "mmap" or "pread") reads CPU tensors into memory of
    their own; anything else is a `ValueError`."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'mmap' or 'pread', not {backend!r}")
    return backend == "pread"


def _path_or_filename(
    path: str | os.PathLike[str] | None, filename: str | os.PathLike[str] | None
) -> str | os.PathLike[str]:
    """The one path given as `path` or as `filename` (safe_open's name for it)."""
    if filename is None:
        if path is None:
            raise TypeError("zeroload.open() needs a path (or filename=, as safe_open names it)")
        return path
    if path is not None:
        raise TypeError(
            "zeroload.open() got both path and filename (safe_open's name for it); pass one"
        )
    return filename


class CheckpointIndexError(CheckpointError, IndexError):
    """An index outside a tensor (or too many indices): what torch raises as an
    `IndexError`, so `except IndexError` clauses keep working."""


class CheckpointTypeError(CheckpointError, TypeError):
    """An index of a type torch refuses with a `TypeError`."""


class ClosedHandleError(CheckpointError, RuntimeError):
    """A call on a handle after `close()` (or after its `with` block)."""


def _as_checkpoint_error(e: Exception, where: str) -> CheckpointError:
    """`e` (raised by torch or numpy for an index) as a `CheckpointError` naming the file
    and tensor, still an instance of the built-in class torch raised."""
    message = f"{where}: {e}"
    if isinstance(e, IndexError):
        return CheckpointIndexError(message)
    if isinstance(e, TypeError):
        return CheckpointTypeError(message)
    return CheckpointError(message)


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
        self,
        path: str | os.PathLike[str] | None = None,
        framework: str = "pt",
        device: DeviceLike = "cpu",
        *,
        backend: str = "mmap",
        filename: str | os.PathLike[str] | None = None,
    ) -> None:
        path = _path_or_filename(path, filename)
        if framework not in _FRAMEWORKS:
            hint = ""
            if isinstance(framework, str) and framework.split(":")[0] in ("cpu", "cuda"):
                hint = (
                    "; the second argument is the framework, as in safe_open(path, "
                    f"framework, device): pass device={framework!r}"
                )
            raise ValueError(f"framework must be 'pt' or 'np', not {framework!r}{hint}")
        pread = reads_privately(backend)
        self._numpy = _FRAMEWORKS[framework]
        self._device = parse_device(device)
        self._cpu = self._device.type == "cpu"
        self._pread = pread
        if self._numpy and not self._cpu:
            raise ValueError("framework='np' gives CPU arrays; use device='cpu'")
        shard_set = _shards.resolve(path)
        self._path = os.fspath(path)
        # Name -> (file number, tensor index), built once: every call is a dict lookup.
        index = _shards.tensor_index(
            shard_set,
            "zeroload.open needs a flat dict of tensors (a state dict); use zeroload.load "
            "for other checkpoints",
        )
        self._ckpts = index.ckpts
        self._index: dict[str, tuple[int, int]] = index.where()
        single = len(self._ckpts) == 1 and shard_set.tensor_names is None
        self._metadata = self._ckpts[0].metadata if single else None
        if self._metadata is None and shard_set.metadata:
            self._metadata = {str(k): str(v) for k, v in shard_set.metadata.items()}
        self._open = True

    def __enter__(self) -> SafeOpen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drops this handle's references to the files. Tensors and slice handles it gave
        out stay valid; calls on the handle raise `CheckpointError`."""
        # In this order, which `_lookup` reads in reverse: a lookup racing this either
        # sees the old index and the old files (and succeeds), or finds its name gone.
        self._open = False
        self._index = {}
        self._ckpts = []

    def keys(self) -> list[str]:
        """Tensor names, in `safe_open(...).keys()` order (sorted, for safetensors files);
        the state dict's order for torch files."""
        self._check_open()
        return list(self._index)

    def offset_keys(self) -> list[str]:
        """Tensor names in the order their data lies in the file(s)."""
        ckpts, index = self._ckpts, self._index  # in this order: see close()
        self._check_open()  # after the reads: open now, so both were the open handle's

        def place(name: str) -> tuple[int, int]:  # (file number, byte offset of its data)
            n, i = index[name]
            return n, ckpts[n].describe(i)[2]

        return sorted(index, key=place)

    def metadata(self) -> dict[str, str] | None:
        """The safetensors `__metadata__` (a shard index's `metadata`), or None."""
        self._check_open()
        return self._metadata

    def get_tensor(self, name: str) -> Any:
        """One tensor (or numpy array with framework='np'), reading only its bytes.

        On the CPU it is a copy-on-write view of the file (nothing is read until
        touched; with `backend="pread"`, a copy read at once); on a GPU it owns its
        memory. A tensor whose dtype torch cannot hold raises `CheckpointError` naming it.
        """
        ckpt, i = self._lookup(name)
        if self._numpy:
            return _numpy_view(ckpt, i, name)
        if self._cpu and not self._pread:
            t = ckpt.export_tensor(i, _torch.from_capsule)
            if t is not None:
                return t
            return _torch.tensor_on(ckpt, i, self._device)
        storage = ckpt.tensor(i)[0]
        storages = _torch.materialize_storages(
            ckpt, [storage], lambda _s: self._device, progress=False, private=True
        )
        return _torch.view(ckpt, i, storages[storage])

    def get_tensors(self) -> dict[str, Any]:
        """Every tensor, as `{name: tensor}`: in file order for safetensors files (as
        `safe_open(...).get_tensors()` and `safetensors.torch.load_file` give them), the
        state dict's order for torch files. One load per file: GPU copies go through the
        copy engine together, and tensors that share a storage in a torch file share it."""
        ckpts, index = self._ckpts, self._index  # in this order: see close()
        self._check_open()  # after the reads: open now, so both were the open handle's
        by_file: list[list[str]] = [[] for _ in ckpts]
        for k, (n, _i) in index.items():
            by_file[n].append(k)
        out: dict[str, Any] = {}
        for ckpt, names in zip(ckpts, by_file):
            if ckpt.format == "safetensors":
                offsets = {k: ckpt.describe(index[k][1])[2] for k in names}
                names.sort(key=offsets.__getitem__)
            if self._numpy:
                for k in names:
                    out[k] = _numpy_view(ckpt, index[k][1], k)
                continue
            # Every tensor of the file is in the index (flat files only), so load it whole.
            loaded = _torch.load_checkpoint(
                ckpt, self._device, dtype=None, keys=None, progress=None, private=self._pread
            )
            for k in names:
                out[k] = loaded[k]
        return out

    def get_slice(self, name: str) -> _Slice:
        """A lazy slice handle: `f.get_slice(name)[:, :128]` reads only those elements.

        `get_shape()` and `get_dtype()` describe the tensor as safetensors does (even
        one whose dtype torch cannot hold)."""
        ckpt, i = self._lookup(name)
        return _Slice(self._numpy, self._device, ckpt, i, name)

    def _lookup(self, name: str) -> tuple[_core.Checkpoint, int]:
        ckpts = self._ckpts  # before the index: see close()
        try:
            n, i = self._index[name]
        except KeyError:
            self._check_open()
            raise KeyError(_torch.missing_key_message(self._path, name, self._index)) from None
        return ckpts[n], i

    def _check_open(self) -> None:
        if not self._open:
            raise self._closed()

    def _closed(self) -> ClosedHandleError:
        return ClosedHandleError(
            f"{self._path}: the handle is closed (by close() or at the end of its "
            "`with` block); tensors it gave out stay valid"
        )


class _Slice:
    """`get_slice(name)`: the tensor's shape and dtype, and `[index]` to read part of it."""

    def __init__(
        self, numpy: bool, device: torch.device, ckpt: _core.Checkpoint, index: int, name: str
    ) -> None:
        self._numpy = numpy
        self._device = device
        self._ckpt = ckpt
        self._index = index
        self._name = name

    def get_shape(self) -> list[int]:
        """The shape as safetensors gives it (for the packed 4-bit float `F4`, the number
        of 4-bit values: twice torch's last dimension)."""
        return list(self._ckpt.describe(self._index)[1])

    def get_dtype(self) -> str:
        """The dtype as safetensors names it ("F32", "BF16", "F4", ...); torch's name for
        types safetensors lacks ("complex32", "bits8")."""
        return self._ckpt.describe(self._index)[0]

    def __getitem__(self, item: Any) -> Any:
        """The selected part, in memory of its own, read straight from the file.

        With framework="pt", indices are torch's: ints, slices (steps > 0), `...`, `None`
        read only the selected bytes (on a CUDA handle, straight to the device); lists,
        tensors and masks index the whole tensor, read first. With framework="np", numpy's
        basic indices (ints, slices, `...`, `None`); lists and arrays are refused, as
        safetensors refuses them. Errors are `CheckpointError`s naming the tensor, and
        also the `IndexError`/`TypeError` torch raises for the same index."""
        ckpt, i, where = self._ckpt, self._index, f"{self._ckpt.path}: tensor {self._name!r}"
        dtype_name, shape = ckpt.describe(i)[:2]
        if not ckpt.loadable(i):
            ckpt.tensor(i)  # raises, naming the tensor and its dtype
        if self._numpy:
            _numpy_dtype(ckpt, i, self._name)
        parts = _slices.components(item)
        if parts is None:
            if self._numpy:
                try:  # numpy's own refusals (two ellipses, a float) first
                    _slices.check_index(item, (), shape, numpy=True)
                except (IndexError, TypeError, ValueError) as e:
                    raise _as_checkpoint_error(e, where) from None
                raise CheckpointIndexError(
                    f"{where}: index {item!r} is not supported with framework='np': use "
                    "ints, slices, ... and None (safetensors refuses lists too)"
                )
            if dtype_name == "F4":
                raise CheckpointIndexError(
                    f"{where}: advanced indices (lists, tensors, masks) cannot select from "
                    "the packed 4-bit float F4; use ints and slices"
                )
            try:  # refuse a bad index before reading anything
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch warns again below
                    _slices.dummy(shape)[item]
            except (IndexError, TypeError, ValueError) as e:
                raise _as_checkpoint_error(e, where) from None
            except Exception:
                pass  # an index on another device: torch checks it below
            whole = _torch.tensor_on(ckpt, i, self._device)
            try:
                part = whole[item]
            except (IndexError, TypeError, ValueError, RuntimeError) as e:
                raise _as_checkpoint_error(e, where) from None
            # Index tensors copy; a bool alone gives a view, which must not keep (or, on
            # the CPU, be) the whole tensor's mapping.
            same = part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            return part.clone() if same and part.numel() else part
        try:
            _slices.check_index(item, parts, shape, numpy=self._numpy)
        except (IndexError, TypeError, ValueError) as e:
            raise _as_checkpoint_error(e, where) from None
        sel = _slices.select(parts, shape)
        if dtype_name == "F4" and shape:
            packed = _slices.pack_last(sel, parts, 2)
            if isinstance(packed, str):
                raise CheckpointIndexError(f"{where} (F4, two 4-bit values per byte): {packed}")
            sel = packed
        device = torch.device("cpu") if self._numpy else self._device
        out = _slices.read_selection(ckpt, i, self._name, sel, device)
        return out.numpy() if self._numpy else out


def _numpy_dtype(ckpt: _core.Checkpoint, i: int, name: str) -> None:
    """Raises the `TypeError` `_numpy_view` would for a dtype numpy lacks."""
    _numpy_view(ckpt, i, name)


def _numpy_view(ckpt: _core.Checkpoint, i: int, name: str) -> Any:
    import numpy as np

    if not ckpt.loadable(i):
        ckpt.tensor(i)  # raises a CheckpointError naming the tensor and its dtype
    try:
        return np.from_dlpack(ckpt.tensor_view(i))
    except (BufferError, TypeError, ValueError, RuntimeError) as e:
        dtype_name = ckpt.tensor(i)[1]
        raise TypeError(
            f"{ckpt.path}: tensor {name!r} has dtype torch.{dtype_name}, which numpy cannot "
            f"hold ({e}); use framework='pt'"
        ) from None


@overload
def open(
    path: str | os.PathLike[str],
    framework: str = "pt",
    device: DeviceLike = "cpu",
    *,
    backend: str = "mmap",
) -> SafeOpen: ...


@overload
def open(
    path: None = None,
    framework: str = "pt",
    device: DeviceLike = "cpu",
    *,
    backend: str = "mmap",
    filename: str | os.PathLike[str],
) -> SafeOpen: ...


def open(
    path: str | os.PathLike[str] | None = None,
    framework: str = "pt",
    device: DeviceLike = "cpu",
    *,
    backend: str = "mmap",
    filename: str | os.PathLike[str] | None = None,
) -> SafeOpen:
    """Open a checkpoint lazily, like `safetensors.safe_open(path, framework, device)`.

    Args:
        path: a `.safetensors` file, a torch state-dict file, a shard index or a model
            directory.
        filename: the same, by safe_open's keyword (`open(filename=p, framework="pt")`);
            pass `path` or `filename`, not both.
        framework: "pt" (torch tensors, default) or "np" (zero-copy numpy arrays; dtypes
            numpy lacks, such as bfloat16 and float8, raise a `TypeError`).
        device: where `get_tensor` puts tensors: "cpu" (copy-on-write views of the file,
            read when touched), "cuda", "cuda:N" or a `torch.device`.
        backend: as in safe_open: "mmap" (default) or "pread", with which CPU tensors
            are read into memory of their own at once instead of being views of the file.

    Returns:
        A `SafeOpen` handle (a context manager) with `keys()`, `offset_keys()`,
        `metadata()`, `get_tensor(name)`, `get_tensors()` and `get_slice(name)`. Each
        call costs the same however many tensors the checkpoint holds.
    """
    return SafeOpen(path, framework, device, backend=backend, filename=filename)
