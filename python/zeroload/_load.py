"""`zeroload.load`: a drop-in for `torch.load(path, weights_only=True)`, and
`zeroload.load_bytes` for checkpoints held in memory."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import IO, Any, Union

import torch

from zeroload import _core, _shards, _torch
from zeroload._core import CheckpointError
from zeroload._cuda import DeviceLike
from zeroload._open import reads_privately
from zeroload._torch import KeysFilter, MapLocation

# What `load` takes: a path, or a binary file object (anything with `read`, as torch.load).
Source = Union[str, "os.PathLike[str]", IO[bytes]]
# What `load_bytes` takes: anything exposing the buffer protocol.
Buffer = Union[bytes, bytearray, memoryview]

# File objects and large buffers are copied into the in-memory file in pieces this big.
_CHUNK = 64 << 20


def load(
    path: Source,
    device: DeviceLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    keys: KeysFilter = None,
    progress: bool | None = None,
    map_location: MapLocation = None,
    weights_only: bool = True,
    mmap: bool | None = True,
    staging_bytes: int | None = None,
    readahead: bool | None = None,
    backend: str | None = None,
) -> Any:
    """Load a checkpoint the way `torch.load(path, weights_only=True)` would.

    Args:
        path: a `.safetensors` file, a `torch.save` file (zip or legacy: `.pt`, `.pth`, `.bin`), a
            Hugging Face shard index (`*.index.json`) or a model directory; or a binary
            file object (`io.BytesIO`, an open file), read from its current position to
            its end, as `torch.load` accepts (see `load_bytes`).
        device: "cpu" (default: tensors are copy-on-write views of the file), "cuda",
            "cuda:N" or a `torch.device` (each storage copied once to the device).
        dtype: cast floating-point tensors to this dtype (on the target device).
        keys: names, or a predicate on names, of the tensors to load (flat state dicts
            only); other tensors are never read.
        progress: show a progress bar for the bytes copied: device loads, `mmap=False`
            reads and `dtype` casts. None shows one for copies over 1 GB in interactive
            sessions. A CPU load with `mmap=True` and no cast copies nothing (the tensors
            are views of the file, read when touched), so it shows no bar.
        map_location: `torch.load`'s name for `device`; also accepts its dict form
            (saved location -> device).
        weights_only: must stay True: zeroload never executes code from a checkpoint.
        mmap: True (default): CPU tensors are copy-on-write views of the file, read when
            touched. False: they are read into memory of their own at once (as
            `torch.load(mmap=False)`), a snapshot that later changes to the file cannot
            affect; this costs the checkpoint's size in RAM. None (`torch.load`'s
            default, accepted so that its calls carry over): the same as True. Device
            loads always copy.
        staging_bytes: size of the pinned staging ring for GPU loads (default 256 MiB,
            or the ZEROLOAD_STAGING_BYTES environment variable).
        readahead: CPU loads only. The tensors come back at once as views of the file;
            their bytes are read from disk when first touched. With readahead, a
            background thread asks the kernel to read the loaded tensors' bytes into the
            page cache right away, in file order, so the first pass over the weights (a
            forward pass, a `.to("cuda")`) finds them in memory instead of faulting pages
            in from disk one at a time. Nothing is mapped into the process: the RSS stays
            where it was until tensors are touched. None (default): on while the bytes
            fit in half the memory the kernel reports available; True: always; False:
            never (e.g. when you will touch only a few of the tensors).
        backend: `zeroload.open`'s (and safe_open's) name for the same choice: "mmap" is
            `mmap=True`, "pread" is `mmap=False`. None (default): `mmap` decides.
            `backend="mmap"` with `mmap=False` is a contradiction (`ValueError`).

    Returns:
        For torch files, what `torch.load` returns (same containers, key order and
        values; tensors that shared a storage still do). For safetensors files and shard
        sets, a `dict[str, Tensor]` in `safe_open(...).keys()` order.

    Raises:
        CheckpointError: the file is malformed, truncated, hostile or unsupported, or a
            tensor asked for has a dtype torch cannot hold.
        FileNotFoundError: the path does not exist.
        CudaError: CUDA is unavailable or a CUDA call failed.
    """
    if not weights_only:
        raise _no_weights_only_false("load")
    if backend is not None:
        pread = reads_privately(backend)
        if mmap is False and not pread:
            raise ValueError("mmap=False and backend='mmap' contradict each other; pass one")
        mmap = not pread
    target = _torch.resolve_target(device, map_location)
    options: dict[str, Any] = dict(
        dtype=dtype, progress=progress, staging_bytes=staging_bytes, private=mmap is False
    )
    if _is_file_object(path):
        ckpt = _core.Checkpoint.from_memory(_chunks_of_file(path), _name_of(path))
        return _torch.load_checkpoint(ckpt, target, keys=keys, **options)
    options["readahead"] = _torch.Readahead(readahead if mmap is not False else False)
    shard_set = _shards.resolve(path)  # type: ignore[arg-type]
    if shard_set.tensor_names is not None:
        return _load_tensor_files(shard_set, target, keys, options)
    if len(shard_set.files) == 1 and shard_set.weight_map is None:
        ckpt = _core.Checkpoint.open(os.fspath(shard_set.files[0]))
        return _torch.load_checkpoint(ckpt, target, keys=keys, **options)
    return _load_shards(shard_set, target, keys, options)


def load_bytes(
    data: Buffer,
    device: DeviceLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    keys: KeysFilter = None,
    progress: bool | None = None,
    map_location: MapLocation = None,
    weights_only: bool = True,
    staging_bytes: int | None = None,
    mmap: bool | None = True,
) -> Any:
    """Load a checkpoint held in memory: `safetensors.torch.load(data)`'s job, for
    safetensors and `torch.save` files alike.

    The bytes are copied once into an anonymous in-memory file (Linux `memfd_create`;
    macOS: a temporary file unlinked as it is created),
    which is then parsed with the same validation as a file on disk; CPU tensors are
    copy-on-write views of it (a snapshot: changing `data` afterwards changes nothing),
    and the in-memory file lives as long as any of them. GPU loads stream it through the
    copy engine as they would a file. `zeroload.load(io.BytesIO(data))` does the same.

    Args:
        data: the file's bytes (`bytes`, `bytearray`, `memoryview` or any contiguous
            buffer).
        device, dtype, keys, progress, map_location, weights_only, staging_bytes: as in
            `zeroload.load`.
        mmap: True or None (default): CPU tensors are views of the in-memory file.
            False: each is read into memory of its own, and the in-memory file is freed
            once the load returns (as `zeroload.load(..., mmap=False)`).

    Returns:
        What `zeroload.load` returns for the same file.

    Raises:
        CheckpointError: the bytes are not a valid checkpoint (named `<bytes>`).
    """
    if not weights_only:
        raise _no_weights_only_false("load_bytes")
    target = _torch.resolve_target(device, map_location)
    ckpt = _core.Checkpoint.from_memory(_chunks_of_buffer(data), "<bytes>")
    return _torch.load_checkpoint(
        ckpt,
        target,
        keys=keys,
        dtype=dtype,
        progress=progress,
        staging_bytes=staging_bytes,
        private=mmap is False,
    )


def _chunks_of_buffer(data: Buffer) -> Iterator[bytes]:
    """`data` as `bytes` pieces of at most `_CHUNK` (a `bytes` object whole, uncopied)."""
    if isinstance(data, bytes):
        yield data
        return
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            f"load_bytes expects bytes or another buffer, not {type(data).__name__}"
        ) from None
    with view:
        if not view.c_contiguous:
            raise ValueError("load_bytes needs a contiguous buffer")
        flat = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        for at in range(0, len(flat), _CHUNK):
            yield bytes(flat[at : at + _CHUNK])


def _is_file_object(path: object) -> bool:
    return hasattr(path, "read") and not isinstance(path, (str, bytes, os.PathLike))


def _name_of(f: Any) -> str:
    """How errors name an in-memory source: the file object's `name` (an open file's
    path) or `<BytesIO>`."""
    name = getattr(f, "name", None)
    if isinstance(name, (str, bytes, os.PathLike)) and os.fspath(name):
        return os.fsdecode(name)
    return f"<{type(f).__name__}>"


def _chunks_of_file(f: Any) -> Iterator[bytes]:
    """The bytes of a file object from its position to its end, as `bytes` pieces of at
    most `_CHUNK`; a `BytesIO`'s buffer is read in place."""
    if isinstance(f, io.BytesIO):
        buf = f.getbuffer()
        try:
            start = f.tell()
            for at in range(start, len(buf), _CHUNK):
                yield bytes(buf[at : at + _CHUNK])
            f.seek(len(buf))
        finally:
            buf.release()
        return
    while True:
        piece = f.read(_CHUNK)
        if not piece:
            return
        if not isinstance(piece, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"{_name_of(f)}: read() returned {type(piece).__name__}, not bytes: open the "
                "file in binary mode ('rb')"
            )
        yield bytes(piece)


def _load_shards(
    shard_set: _shards.ShardSet, target: MapLocation, keys: KeysFilter, options: dict[str, Any]
) -> dict[str, Any]:
    weight_map = shard_set.weight_map or {}
    if keys is not None and not callable(keys):
        wanted = [keys] if isinstance(keys, str) else list(keys)
        unknown = [k for k in wanted if k not in weight_map]
        if unknown:
            raise KeyError(_torch.missing_key_message(shard_set.index, unknown[0], weight_map))
        keys = set(wanted).__contains__
    merged: dict[str, Any] = {}
    seen = _shards.Names()
    for file, names in shard_set.names_by_file().items():
        expected = names if keys is None else [n for n in names if keys(n)]
        if not expected:
            continue
        here = set(expected)
        ckpt = _core.Checkpoint.open(os.fspath(file))
        part = _torch.load_checkpoint(ckpt, target, keys=here.__contains__, **options)
        for name, tensor in part.items():
            seen.add(name, file)
            merged[name] = tensor
        if len(part) != len(here):
            missing = sorted(here - part.keys())
            raise CheckpointError(
                f"{file}: the index {shard_set.index} places {missing[0]!r} here, "
                "but the shard does not hold it"
            )
    return merged


def _no_weights_only_false(name: str) -> ValueError:
    return ValueError(
        f"zeroload.{name}(weights_only=False) is not supported: zeroload never executes "
        "code from a checkpoint. Checkpoints holding only tensors, containers and plain "
        "values load with the default weights_only=True."
    )


def _load_tensor_files(
    shard_set: _shards.ShardSet, target: MapLocation, keys: KeysFilter, options: dict[str, Any]
) -> dict[str, Any]:
    """A directory of per-tensor `torch.save` files: `{name: torch.load(f"{name}.pt")}`, in
    file name order; only the files of the tensors asked for are opened."""
    names = shard_set.tensor_names or {}
    if keys is not None and not callable(keys):
        wanted = [keys] if isinstance(keys, str) else list(keys)
        have = set(names.values())
        unknown = [k for k in wanted if k not in have]
        if unknown:
            folder = shard_set.files[0].parent
            raise KeyError(_torch.missing_key_message(folder, unknown[0], names.values()))
        keys = set(wanted).__contains__
    out: dict[str, Any] = {}
    for file, name in names.items():
        if keys is not None and not keys(name):
            continue
        ckpt = _core.Checkpoint.open(os.fspath(file))
        shard_set.file_tensors(file, ckpt)  # one tensor, or a CheckpointError naming the file
        out[name] = _torch.load_checkpoint(ckpt, target, keys=None, **options)
    return out
