"""Write a ``.safetensors`` file from a checkpoint: :func:`convert`, the library behind
``zeroload convert``.

Torch-free: tensor layouts come from the Rust core's tables (see ``zeroload._inspect``),
and the file is written by the writer ``zeroload.save`` uses (``zeroload._writer``):
contiguous tensors go straight from the source's read-only use of its mapping to the new
file with parallel positional writes (nothing is copied into anonymous memory), into a
temporary file that is fsynced and renamed over the destination. Only non-contiguous
tensors (transposed or strided views) are gathered in memory first, with numpy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

from zeroload import _core, _pread, _shards
from zeroload._inspect import TensorRef, checkpoint_objects, checkpoint_tensors
from zeroload._writer import write_file

__all__ = ["ConvertError", "SAFETENSORS_DTYPES", "convert"]

#: torch dtype name -> safetensors dtype, for every dtype the safetensors format has (the
#: core's table: ``_core.dtypes()``).
SAFETENSORS_DTYPES: Dict[str, str] = {name: st for name, _, st, _ in _core.dtypes() if st}
#: Values per torch element in safetensors shapes (2 for the packed float4: a safetensors
#: header counts 4-bit values, torch counts bytes of two).
_VALUES_PER_ELEMENT: Dict[str, int] = {name: n for name, _, _, n in _core.dtypes()}


class ConvertError(ValueError):
    """The checkpoint cannot be converted as asked (not a dict of tensors, a dtype
    safetensors lacks, an output name that is not ``.safetensors``...)."""


def _select(obj: Any, key: str | None, src: Path) -> Dict[str, TensorRef]:
    if key:
        parts = [key] if isinstance(obj, dict) and key in obj else key.split(".")
        for part in parts:
            if not isinstance(obj, dict) or part not in obj:
                have = ", ".join(map(repr, list(obj)[:10])) if isinstance(obj, dict) else "-"
                raise ConvertError(f"{src}: no key {key!r} (top-level keys: {have})")
            obj = obj[part]
    if not isinstance(obj, dict):
        raise ConvertError(f"{src}: holds a {type(obj).__name__}, not a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, TensorRef) or not isinstance(k, str)]
    if bad:
        dicts = [k for k, v in obj.items() if isinstance(v, dict)]
        hint = f"; pick a state dict with --key (e.g. --key {dicts[0]})" if dicts else ""
        raise ConvertError(
            f"{src}: not a flat dict of tensors (entries that are not tensors: "
            f"{', '.join(map(repr, bad[:5]))}){hint}"
        )
    return obj


def _source_tensors(src: Path, key: str | None) -> Tuple[List[Path], List[Tuple[str, TensorRef]]]:
    """The source's files, and (name, tensor) of every tensor to write, in checkpoint
    order."""
    shard_set = _shards.resolve(src)
    if key is not None and len(shard_set.files) > 1:
        raise ConvertError(f"{src}: --key selects inside one file, not in a shard set")
    out: List[Tuple[str, TensorRef]] = []
    seen = _shards.Names()
    for f in shard_set.files:
        ckpt = _core.Checkpoint.open(os.fspath(f))
        if key is None:
            named, flat = checkpoint_tensors(ckpt, shard_set.file_tensors(f, ckpt))
            if not flat:
                # Name what is there and how to pick a state dict.
                _select(checkpoint_objects(ckpt), None, f)
        else:
            named = list(_select(checkpoint_objects(ckpt), key, f).items())
        for name, t in named:
            seen.add(name, f)
            out.append((name, t))
    return shard_set.files, out


def _file_offset(t: TensorRef) -> int:
    """Where tensor `t`'s first element lies in its file."""
    return int(t.ckpt.storage(t.storage)[1]) + t.storage_offset * t.itemsize


def _gather(t: TensorRef) -> Any:
    """A strided view's elements, contiguous, as a numpy byte array: the span it covers is
    read with `pread` (strides are >= 0, checked by the core, and the span lies inside the
    storage), then gathered."""
    import numpy as np

    itemsize = t.itemsize
    span = (sum((d - 1) * s for d, s in zip(t.shape, t.stride)) + 1) * itemsize
    src_bytes = np.empty(span, dtype=np.uint8)
    _pread.read_into(t.ckpt, _file_offset(t), span, src_bytes)
    view = np.lib.stride_tricks.as_strided(
        src_bytes,
        shape=(*t.shape, itemsize),
        strides=(*(s * itemsize for s in t.stride), 1),
        writeable=False,
    )
    return np.ascontiguousarray(view).reshape(-1)


def _copy_tensors(fd: int, dst: Path, placed: List[Tuple[TensorRef, int]]) -> List[int]:
    """Copies each contiguous tensor's bytes from its file to byte `at` of the new file:
    read with `pread` into a bounce buffer of at most 64 MiB, never through the mapping
    (a source truncated meanwhile raises `CheckpointError`, not SIGBUS), and written with
    the core's parallel positional writes."""
    import numpy as np

    if not placed:
        return []
    bounce = np.empty(max(_pread.bounce_size(t.nbytes, 1) for t, _ in placed), dtype=np.uint8)
    path = os.fspath(dst)
    for t, at in placed:

        def write(start: int, length: int, at: int = at) -> None:
            _core.write_host(fd, path, [bounce], [(0, 0, length, at + start)], None, False)

        _pread.read_pieces(t.ckpt, _file_offset(t), t.nbytes, 1, bounce, write)
    return []


def convert(
    src: os.PathLike | str,
    dst: os.PathLike | str,
    *,
    key: str | None = None,
    force: bool = False,
    dedupe: bool = False,
    metadata: Dict[str, str] | None = None,
) -> Dict[str, Any]:
    """Write a ``.safetensors`` file from a checkpoint.

    ``src`` is a torch file (``.pt``, ``.pth``, ``.bin``) holding a flat dict of tensors
    (or one inside it, chosen with ``key``: ``"state_dict"`` or a dotted path such as
    ``"model.state_dict"``), a safetensors file, or a shard set (index or directory),
    which becomes one file. Needs no torch: layouts come from the parsed checkpoint and
    bytes go straight from the source's mapping to the new file (``zeroload.save``'s
    writer: parallel positional writes), so the model is never copied into anonymous
    memory; only non-contiguous tensors are gathered in memory (with numpy) first.

    safetensors stores no aliasing, so tensors that share storage (tied weights) are
    written as separate copies, or, with ``dedupe=True``, exact aliases (same storage,
    offset, dtype, shape and strides) are written once and the later names dropped (as
    ``safetensors.torch.save_model`` does). Tensors are ordered by element size, largest
    first, so every tensor is aligned. The header's ``__metadata__`` is
    ``{"format": "pt"}`` updated with ``metadata``. The file is written beside ``dst``
    under a temporary name, fsynced and renamed over it when complete; on any failure
    ``dst`` is left as it was and the temporary file removed.

    Returns a summary dict (``src``, ``dst``, ``tensors``, ``bytes``, ``shared`` groups,
    ``dropped`` names).

    Raises:
        FileExistsError: ``dst`` exists and ``force`` is false.
        ConvertError: ``dst`` does not end in ``.safetensors`` (unless ``force``), or the
            source is not a dict of tensors, or holds a dtype safetensors lacks.
        CheckpointError: the source is malformed, truncated or unsupported.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors" and not force:
        raise ConvertError(
            f"{dst}: the output is a safetensors file, but its name does not end in "
            ".safetensors; loaders choose the format by that suffix (torch.load would fail "
            "on it). Rename it, or pass --force (force=True) to keep the name."
        )
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
    files, named = _source_tensors(src, key)
    if dst.exists() and any(dst.resolve() == f.resolve() for f in files):
        raise ConvertError(f"{dst}: is the source itself; write to another file")

    # Group tensors by the memory they view: same file and storage -> shared; same
    # storage, offset, dtype, shape and strides -> exact aliases.
    by_storage: Dict[Tuple[Path, int], List[str]] = {}
    aliases: Dict[Tuple[Any, ...], List[str]] = {}
    for name, t in named:
        if t.numel == 0:
            continue
        where = (t.ckpt.path, t.storage)
        by_storage.setdefault(where, []).append(name)
        aliases.setdefault((*where, t.storage_offset, t.dtype, t.shape, t.stride), []).append(name)
    shared = [names for names in by_storage.values() if len(names) > 1]
    dropped: List[str] = []
    if dedupe:
        for names in aliases.values():
            dropped.extend(names[1:])
    drop = set(dropped)
    keep = [(n, t) for n, t in named if n not in drop]

    order = sorted(keep, key=lambda nt: -nt[1].itemsize)  # stable: checkpoint order within
    header: Dict[str, Any] = {}
    offset = 0
    for name, t in order:
        st_dtype = SAFETENSORS_DTYPES.get(t.dtype)
        if st_dtype is None:
            raise ConvertError(
                f"{src}: tensor {name!r} has dtype {t.dtype}, which safetensors lacks"
            )
        shape = list(t.shape)
        packed = _VALUES_PER_ELEMENT.get(t.dtype, 1)
        if packed != 1:
            if not shape:
                raise ConvertError(
                    f"{src}: tensor {name!r} is a 0-d {t.dtype}, which a safetensors shape "
                    f"cannot express ({packed} values per element)"
                )
            shape[-1] *= packed
        nbytes = t.nbytes
        header[name] = {
            "dtype": st_dtype,
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    meta = {"format": "pt"}
    meta.update(metadata or {})
    header["__metadata__"] = meta
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    # The writer zeroload.save uses (torch-free): a temporary file beside dst, fsynced and
    # renamed over it, removed on any failure. The header goes first; tensor bytes are read
    # from the source files with pread (`_copy_tensors`), strided views gathered.
    start = 8 + len(raw)
    sources: List[Any] = [len(raw).to_bytes(8, "little") + raw]
    requests: List[Tuple[int, int, int, int]] = [(0, 0, len(sources[0]), 0)]
    placed: List[Tuple[TensorRef, int]] = []
    for name, t in order:
        at = start + header[name]["data_offsets"][0]
        if t.nbytes == 0:
            continue
        if not t.is_contiguous():
            sources.append(_gather(t))
            requests.append((len(sources) - 1, 0, t.nbytes, at))
        else:
            placed.append((t, at))
    write_file(
        dst, start + offset, sources, requests, extra=lambda fd: _copy_tensors(fd, dst, placed)
    )
    return {
        "src": str(src),
        "dst": str(dst),
        "tensors": len(order),
        "bytes": offset,
        "shared": shared,
        "dropped": dropped,
    }
