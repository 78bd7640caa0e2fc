"""Describe a checkpoint without torch and without reading tensor data: the library
behind ``zeroload inspect`` (:func:`inspect_checkpoint`, :func:`format_inspect`), and the
torch-free view of a checkpoint's tensors (:class:`TensorRef`) that ``convert`` uses too.

Everything here works from the tables the Rust core parses (storages, tensors and the
object graph), so ``zeroload inspect`` starts in a fraction of ``import torch``'s time
and costs O(number of tensors): one pass over the tensor table, never a per-tensor rebuild
of a name set or of the table itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from zeroload import _core, _shards
from zeroload._layout import is_contiguous
from zeroload._units import format_bytes, plural

__all__ = [
    "DTYPE_ITEMSIZE",
    "TensorRef",
    "checkpoint_tensors",
    "format_inspect",
    "inspect_checkpoint",
]

#: Bytes per element of each dtype the core reads, named as attributes of ``torch``
#: (the core's table: ``_core.dtypes()``).
DTYPE_ITEMSIZE: Dict[str, int] = {name: size for name, size, _, _ in _core.dtypes()}

#: Non-tensor entries the table shows (``--json`` lists them all).
_MAX_ENTRIES = 40


class TensorRef:
    """A tensor of a parsed checkpoint, described without torch: where its bytes are.

    ``storage`` indexes the file's storage table; ``shape``, ``stride`` and
    ``storage_offset`` are in elements, as torch has them.
    """

    __slots__ = ("ckpt", "dtype", "index", "shape", "storage", "storage_offset", "stride")

    def __init__(self, ckpt: _core.Checkpoint, index: int, row: Sequence[Any]) -> None:
        self.ckpt = ckpt
        self.index = index
        self.storage: int = row[0]
        self.dtype: str = row[1]
        self.shape: Tuple[int, ...] = tuple(row[2])
        self.stride: Tuple[int, ...] = tuple(row[3])
        self.storage_offset: int = row[4]

    @property
    def itemsize(self) -> int:
        try:
            return DTYPE_ITEMSIZE[self.dtype]
        except KeyError:
            raise _core.CheckpointError(
                f"{self.ckpt.path}: tensor #{self.index} has dtype {self.dtype!r}, "
                "which torch cannot hold"
            ) from None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        if self.dtype not in DTYPE_ITEMSIZE:
            # A type torch cannot hold (safetensors F6_*): its whole byte range.
            return int(self.ckpt.storage(self.storage)[2])
        return self.numel * self.itemsize

    def is_contiguous(self) -> bool:
        """Row-major dense (see :func:`is_contiguous`)."""
        return is_contiguous(self.shape, self.stride)

    def __repr__(self) -> str:
        return f"TensorRef(#{self.index}, {self.dtype}, shape={list(self.shape)})"


class _Builder:
    """What ``Checkpoint.build`` asks for, without torch: tensors stay ``TensorRef``s,
    sizes become tuples, devices and dtypes strings; containers keep their types."""

    def __init__(self, ckpt: _core.Checkpoint) -> None:
        self.tensors = [TensorRef(ckpt, i, row) for i, row in enumerate(ckpt.tensors())]

    @staticmethod
    def storage(i: int) -> str:
        return f"<storage #{i}>"

    @staticmethod
    def parameter(tensor: Any, requires_grad: bool) -> Any:
        return tensor

    @staticmethod
    def size(dims: tuple) -> tuple:
        return tuple(dims)

    @staticmethod
    def device(name: str) -> str:
        return name

    @staticmethod
    def dtype(name: str) -> str:
        return name


def checkpoint_objects(ckpt: _core.Checkpoint) -> Any:
    """The object ``torch.load`` would return, with ``TensorRef``s in place of tensors."""
    return ckpt.build(_Builder(ckpt))


def named_tensor_refs(obj: Any) -> Iterator[Tuple[str, TensorRef]]:
    """Every ``TensorRef`` in nested dicts, lists and tuples, as (dotted path, ref), depth
    first in container order. Each container is walked once (a container shared under two
    paths is listed under the first), so a hostile file of nested shared lists cannot make
    this exponential; it is iterative, so deep nesting cannot overflow the stack."""
    seen = set()
    stack: List[Tuple[str, Any]] = [("", obj)]
    while stack:
        prefix, o = stack.pop()
        if isinstance(o, TensorRef):
            yield prefix, o
            continue
        if isinstance(o, dict):
            items: Any = o.items()
        elif isinstance(o, (list, tuple)):
            items = enumerate(o)
        else:
            continue
        if id(o) in seen:
            continue
        seen.add(id(o))
        children = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in items]
        stack.extend(reversed(children))


def named_other_entries(obj: Any) -> Iterator[Tuple[str, Any]]:
    """Every leaf of nested dicts, lists and tuples that is not a tensor (``epoch``,
    ``optimizer.param_groups.0.lr``...), as (dotted path, value), in container order; an
    empty container is a leaf too. Walked as :func:`named_tensor_refs` walks (each
    container once, iteratively)."""
    seen = set()
    stack: List[Tuple[str, Any]] = [("", obj)]
    while stack:
        prefix, o = stack.pop()
        if isinstance(o, TensorRef):
            continue
        if isinstance(o, dict):
            items: Any = o.items()
        elif isinstance(o, (list, tuple)):
            items = enumerate(o)
        else:
            yield prefix, o
            continue
        if id(o) in seen:
            continue
        seen.add(id(o))
        children = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in items]
        if not children and prefix:
            yield prefix, o
        stack.extend(reversed(children))


def _entry(name: str, value: Any) -> Dict[str, Any]:
    """One non-tensor entry as ``inspect`` reports it: its type and a short repr."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return {"name": name, "type": type(value).__name__, "value": text}


def checkpoint_tensors(
    ckpt: _core.Checkpoint, flat: List[Tuple[str, int]] | None = None
) -> Tuple[List[Tuple[str, TensorRef]], bool]:
    """The named tensors of one file and whether it is a flat dict of tensors.

    Flat state dicts are named from the tensor table; other checkpoints (a training
    checkpoint holding ``model``, ``optimizer``, ...) by their dotted path
    (``optimizer.state.0.exp_avg``). ``flat``: the file's ``(name, tensor index)`` pairs
    when the caller knows them (a file of a per-tensor directory, named by its file).
    """
    if flat is None:
        flat = ckpt.flat_tensors()
    if flat is not None:
        rows = _tensor_rows(ckpt)
        return [(name, TensorRef(ckpt, i, rows[i])) for name, i in flat], True
    return list(named_tensor_refs(checkpoint_objects(ckpt))), False


def _tensor_rows(ckpt: _core.Checkpoint) -> List[Sequence[Any]]:
    """The tensor table, with rows for tensors torch cannot hold too (a safetensors ``F6``
    tensor: listed under its safetensors dtype and shape, sized by its byte range), so
    ``inspect`` describes every tensor a file holds."""
    try:
        return list(ckpt.tensors())
    except _core.CheckpointError:
        pass
    storage_at = {ckpt.storage(j)[1]: j for j in range(ckpt.num_storages)}
    rows: List[Sequence[Any]] = []
    for i in range(ckpt.num_tensors):
        if ckpt.loadable(i):
            rows.append(ckpt.tensor(i))
            continue
        dtype, shape, offset = ckpt.describe(i)
        storage = storage_at[offset]
        stride = []
        step = 1
        for d in reversed(shape):
            stride.append(step)
            step *= d
        rows.append((storage, dtype, tuple(shape), tuple(reversed(stride)), 0, False))
    return rows


def inspect_checkpoint(path: os.PathLike | str) -> Dict[str, Any]:
    """Describe a checkpoint (file, shard index or directory) without reading tensor data.

    Needs neither torch nor the tensor bytes: only the header (safetensors) or the zip
    directory and pickle (torch files) are read.

    Returns a dict with ``files`` (format, size, metadata, counts per file), ``metadata``
    (the shard index's), ``tensors`` (name, dtype, shape, bytes, file; dtypes named as
    attributes of ``torch``), ``entries`` (what a checkpoint that is not a flat dict of
    tensors holds besides tensors, such as ``epoch`` or an optimizer's ``lr``: name, type,
    a short repr, file) and ``totals`` (tensors, elements, bytes, file bytes, and the
    same per dtype). Tensors of nested checkpoints are named by their dotted path.

    Raises:
        CheckpointError: a file is malformed, truncated, hostile or unsupported.
        FileNotFoundError: the path, or a shard its index names, does not exist.
    """
    shard_set = _shards.resolve(path)
    index_meta: Dict[str, Any] | None = shard_set.metadata if shard_set.index is not None else None
    out_files = []
    tensors: List[Dict[str, Any]] = []
    entries: List[Dict[str, Any]] = []
    by_dtype: Dict[str, Dict[str, int]] = {}
    for f in shard_set.files:
        ck = _core.Checkpoint.open(os.fspath(f))
        fname = Path(f).name
        flat_list = shard_set.file_tensors(f, ck)
        flat = flat_list is not None
        if flat_list is not None:  # as checkpoint_tensors names them
            rows = _tensor_rows(ck)
            named = [(name, TensorRef(ck, i, rows[i])) for name, i in flat_list]
        else:  # one build of the object graph for its tensors and its other entries
            obj = checkpoint_objects(ck)
            named = list(named_tensor_refs(obj))
            entries.extend({**_entry(n, v), "file": fname} for n, v in named_other_entries(obj))
        storage_bytes = sum(ck.storage(i)[2] for i in range(ck.num_storages))
        out_files.append(
            {
                "path": str(f),
                "format": ck.format,
                "file_size": ck.file_size,
                "metadata": ck.metadata,
                # Names, as listed below (a tied tensor saved under two names counts twice).
                "num_tensors": len(named),
                "num_storages": ck.num_storages,
                "storage_bytes": storage_bytes,
                "flat": flat,
            }
        )
        for name, t in named:
            numel = t.numel
            nbytes = t.nbytes
            tensors.append(
                {
                    "name": name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "bytes": nbytes,
                    "file": fname,
                }
            )
            d = by_dtype.get(t.dtype)
            if d is None:
                d = by_dtype[t.dtype] = {"tensors": 0, "elements": 0, "bytes": 0}
            d["tensors"] += 1
            d["elements"] += numel
            d["bytes"] += nbytes
    return {
        "path": str(path),
        "files": out_files,
        "metadata": index_meta,
        "tensors": tensors,
        "entries": entries,
        "totals": {
            "tensors": len(tensors),
            "elements": sum(d["elements"] for d in by_dtype.values()),
            "bytes": sum(d["bytes"] for d in by_dtype.values()),
            "file_bytes": sum(f["file_size"] for f in out_files),
            "by_dtype": by_dtype,
        },
    }


def format_inspect(info: Dict[str, Any]) -> str:
    """:func:`inspect_checkpoint`'s result as ``zeroload inspect`` prints it: a line per
    file, a table of tensors (name, dtype, shape, bytes; and file, for shard sets) and the
    totals per dtype."""
    lines = []
    for f in info["files"]:
        lines.append(
            f"{f['path']}: {f['format']}, {format_bytes(f['file_size'])}, "
            f"{plural(f['num_tensors'], 'tensor')} in {plural(f['num_storages'], 'storage')}"
        )
        if f["metadata"]:
            lines.append(f"  metadata: {json.dumps(f['metadata'], sort_keys=True)}")
    if info["metadata"]:
        lines.append(f"index metadata: {json.dumps(info['metadata'], sort_keys=True)}")
    rows: List[Tuple[Any, ...]] = [
        (
            t["name"],
            t["dtype"],
            "[" + ", ".join(map(str, t["shape"])) + "]",
            format_bytes(t["bytes"]),
        )
        for t in info["tensors"]
    ]
    multi = len(info["files"]) > 1
    if multi:
        rows = [(*r, t["file"]) for r, t in zip(rows, info["tensors"])]
    headers = ("name", "dtype", "shape", "bytes") + (("file",) if multi else ())
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines += ["", "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    entries = info.get("entries") or []
    if entries:
        lines += ["", f"other entries ({len(entries)}, not tensors):"]
        shown = entries[:_MAX_ENTRIES]
        width = max(len(e["name"]) for e in shown)
        for e in shown:
            lines.append(f"  {e['name']:<{width}}  {e['type']:<8} {e['value']}".rstrip())
        if len(entries) > len(shown):
            lines.append(f"  ... and {len(entries) - len(shown)} more (--json lists all)")
    tot = info["totals"]
    lines += ["", "totals by dtype:"]
    for dtype, d in sorted(tot["by_dtype"].items(), key=lambda kv: -kv[1]["bytes"]):
        count = plural(d["tensors"], "tensor")
        lines.append(
            f"  {dtype:<14} {count:>15}  {plural(d['elements'], 'element', ','):>24}  "
            f"{format_bytes(d['bytes']):>10}"
        )
    lines.append(
        f"total: {plural(tot['tensors'], 'tensor')}, {plural(tot['elements'], 'element', ',')}, "
        f"{format_bytes(tot['bytes'])} of tensor data "
        f"({format_bytes(tot['file_bytes'])} on disk)"
    )
    return "\n".join(lines) + "\n"
