"""`load_into` for DTensor parameters and buffers (tensor parallel, FSDP2): each rank reads
only its local rectangle of each tensor, with no collective communication.

- Placements follow DTensor's own semantics (`compute_local_shape_and_global_offset`):
  mesh dimensions are applied left to right; `Shard(d)` splits the current extent of
  dimension `d` as `torch.chunk` does (uneven shards, trailing ranks possibly empty);
  `_StridedShard(d, split_factor=s)` (FSDP2 on top of TP) splits it into `s` pieces and
  takes this rank's chunk of each, so a rank may hold several ranges of one dimension;
  `Replicate()` keeps everything. `Partial` tensors cannot be loaded from a checkpoint and
  are refused.
- Materialised DTensors are filled in place (their local tensor keeps its storage; FSDP2's
  padded buffers stay where they are). Meta-device DTensors get new local tensors, on the
  mesh's device, wrapped with `DTensor.from_local(..., run_check=False)` with the
  DTensor's global shape and stride, and are assigned (`load_state_dict(assign=True)`,
  so FSDP2's post-load hooks run). On the CPU, a local shard that is one contiguous block
  of the file (`Shard(0)`, `Replicate`, of a row-major tensor, no dtype cast) is a
  zero-copy view of the file's copy-on-write mapping, as `zeroload.load`'s CPU tensors
  are (and read into the page cache in the background, as `load` does); the others are
  read into memory of their own.
- Nothing here communicates: a rank that fails raises (naming the rank, file and tensor)
  and the others finish their loads.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from zeroload import _slices, _torch
from zeroload._core import CheckpointError
from zeroload._layout import is_contiguous

Ranges = list[list[tuple[int, int]]]


def _take(segments: Sequence[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int]]:
    """Positions `start..stop` of the concatenation of `segments`, as ranges."""
    out: list[tuple[int, int]] = []
    at = 0
    for a, b in segments:
        n = b - a
        lo, hi = max(start - at, 0), min(stop - at, n)
        if lo < hi:
            out.append((a + lo, a + hi))
        at += n
        if at >= stop:
            break
    return out


def _chunk(length: int, chunks: int, index: int) -> tuple[int, int]:
    """The `index`-th of `chunks` pieces of `length` as `torch.chunk` cuts them (ceil-sized
    pieces, trailing ones short or empty)."""
    size = -(-length // chunks)
    return min(index * size, length), min((index + 1) * size, length)


def local_ranges(
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    coordinate: Sequence[int],
    placements: Sequence[Any],
    what: str = "tensor",
) -> Ranges:
    """The local rectangle of a DTensor on the rank at `coordinate` of the mesh: per
    dimension, the global index ranges it holds, in the order its local tensor holds them.

    Raises:
        ValueError: a placement that cannot come from a checkpoint (`Partial`) or that this
            function does not know.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    ranges: Ranges = [[(0, n)] for n in global_shape]
    if len(placements) != len(mesh_shape) or len(coordinate) != len(mesh_shape):
        raise ValueError(
            f"{what}: {len(placements)} placements for a mesh of shape {tuple(mesh_shape)}"
        )
    for mesh_dim, p in enumerate(placements):
        k, c = mesh_shape[mesh_dim], coordinate[mesh_dim]
        if isinstance(p, _StridedShard):
            d = _dim(p.dim, len(global_shape), what, p)
            segs = ranges[d]
            length = sum(b - a for a, b in segs)
            split = int(p.split_factor)
            out: list[tuple[int, int]] = []
            for j in range(split):
                lo, hi = _chunk(length, split, j)
                a, b = _chunk(hi - lo, k, c)
                out.extend(_take(segs, lo + a, lo + b))
            ranges[d] = _merge(out)
        elif isinstance(p, Shard):
            d = _dim(p.dim, len(global_shape), what, p)
            segs = ranges[d]
            a, b = _chunk(sum(y - x for x, y in segs), k, c)
            ranges[d] = _take(segs, a, b)
        elif isinstance(p, Replicate):
            continue
        elif p.is_partial():
            raise ValueError(
                f"{what}: placement {type(p).__name__} ({p}, a pending reduction) cannot be "
                "loaded from a checkpoint; load into Shard/Replicate placements and redistribute"
            )
        else:
            raise ValueError(f"{what}: placement {p!r} is not supported by zeroload.load_into")
    return ranges


def _dim(d: int, ndim: int, what: str, p: Any) -> int:
    dd = d + ndim if d < 0 else d
    if not 0 <= dd < ndim:
        raise ValueError(f"{what}: placement {p} shards dimension {d} of a {ndim}-d tensor")
    return dd


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif b > a:
            out.append((a, b))
    return out


def is_dtensor(t: object) -> bool:
    # No DTensor can exist before torch.distributed.tensor is imported: don't import it.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def partition(targets: Mapping[str, torch.Tensor], names: Iterable[str]) -> tuple[list, list]:
    """`(plain names, DTensor names)` of `names`."""
    plain: list[str] = []
    dtensors: list[str] = []
    for k in names:
        (dtensors if is_dtensor(targets[k]) else plain).append(k)
    return plain, dtensors


def _rank() -> str:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return f"rank {dist.get_rank()} of {dist.get_world_size()}"
    return "this rank"


def load(
    module: torch.nn.Module,
    targets: Mapping[str, torch.Tensor],
    entries: Mapping[str, Any],
    names: Sequence[str],
    *,
    device: Any,
    dtype: torch.dtype | None,
) -> None:
    """Loads the DTensor targets `names` of `module` from `entries` (name -> object with
    `.file`, `.ckpt` and `.tensor`, the checkpoint's tensor index). Any failure is raised
    again with the rank in front of its message (file and tensor are already named)."""
    try:
        _load(module, targets, entries, names, device=device, dtype=dtype)
    except Exception as e:
        raise _with_rank(e) from e


def _with_rank(e: Exception) -> Exception:
    msg = f"{_rank()}: {e}"
    try:
        return type(e)(msg)
    except Exception:
        return RuntimeError(msg)


def _local_device(mesh: Any, device: Any) -> torch.device:
    from zeroload._cuda import parse_device

    kind = mesh.device_type
    if device is not None:
        dev = parse_device(device)
        if dev.type != kind:
            raise ValueError(
                f"device={dev} does not match the DTensor's mesh, which lives on {kind!r}"
            )
        return dev
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


_CPU = torch.device("cpu")


def _file_view(
    e: Any, row: tuple, ranges: Ranges, local: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """This rank's shard of tensor `e` (`row`: its `ckpt.tensor()` entry) as a zero-copy
    view of the file's copy-on-write mapping, as `zeroload.load` returns CPU tensors, and
    the byte range of the file it covers, where the shard is one contiguous block of the
    file laid out as the meta local tensor is (a `Shard(0)` or `Replicate` of a row-major
    tensor); None where it is not (a `Shard(1)`, strided pieces), which is then read into
    memory of its own. Nothing is read here: pages come in when the shard is touched (or
    read ahead)."""
    if local.numel() == 0 or not local.is_contiguous() or any(len(r) != 1 for r in ranges):
        return None
    storage, _dtype, shape, stride, offset, _rg = row
    if not is_contiguous(shape, stride):
        return None
    full = _torch.tensor_on(e.ckpt, e.tensor, _CPU).detach()
    shard = full[tuple(slice(a, b) for ((a, b),) in ranges)]
    if not shard.is_contiguous():
        return None
    start = e.ckpt.storage(storage)[1] + offset * full.element_size()
    start += shard.data_ptr() - full.data_ptr()
    return shard, (start, shard.numel() * shard.element_size())


def _load(
    module: torch.nn.Module,
    targets: Mapping[str, torch.Tensor],
    entries: Mapping[str, Any],
    names: Sequence[str],
    *,
    device: Any,
    dtype: torch.dtype | None,
) -> None:
    from torch.distributed.tensor import DTensor

    # Tied targets (one DTensor under several names) are loaded once, from the last name,
    # as the last copy_ wins in load_state_dict.
    by_target: dict[int, list[str]] = {}
    for k in names:
        by_target.setdefault(id(targets[k]), []).append(k)

    reads: list[_slices.SliceRead] = []
    assign: dict[str, torch.Tensor] = {}
    # The file ranges of shards that are views, to read ahead as zeroload.load does.
    mapped: dict[int, tuple[Any, list[tuple[int, int]]]] = {}
    for group in by_target.values():
        k = group[-1]
        t = targets[k]
        assert isinstance(t, DTensor)
        e = entries[k]
        what = f"{e.file}: tensor {k!r}"
        mesh = t.device_mesh
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            continue  # this rank is not part of the tensor's mesh: it holds nothing
        ranges = local_ranges(t.shape, mesh.shape, coordinate, t.placements, what)
        local = t._local_tensor
        if list(local.shape) != _slices.rect_shape(ranges):
            raise ValueError(
                f"{what}: the local shard has shape {list(local.shape)}, but placements "
                f"{t.placements} on mesh {tuple(mesh.shape)} give {_slices.rect_shape(ranges)} "
                "at this rank"
            )
        if local.is_meta:
            row = e.ckpt.tensor(e.tensor)
            file_dtype = getattr(torch, row[1])
            want = dtype if dtype is not None and file_dtype.is_floating_point else file_dtype
            where = _local_device(mesh, device)
            as_is = (where, want) == (_CPU, file_dtype)
            view = _file_view(e, row, ranges, local) if as_is else None
            if view is not None:
                new_local = view[0]
                mapped.setdefault(id(e.ckpt), (e.ckpt, []))[1].append(view[1])
            else:
                # Same local shape and strides as the meta local tensor had.
                new_local = torch.empty_like(local, dtype=want, device=where)
                reads.append(_slices.SliceRead(k, e.ckpt, e.tensor, ranges, new_local, dtype))
            new = DTensor.from_local(
                new_local,
                mesh,
                t.placements,
                run_check=False,
                shape=t.shape,
                stride=t.stride(),
            )
            value: torch.Tensor = (
                torch.nn.Parameter(new, requires_grad=t.requires_grad)
                if isinstance(t, torch.nn.Parameter)
                else new
            )
            for name in group:
                assign[name] = value
        else:
            reads.append(_slices.SliceRead(k, e.ckpt, e.tensor, ranges, local, dtype))

    readahead = _torch.Readahead(None)
    for ckpt, spans in mapped.values():
        readahead.start_ranges(ckpt, spans)
    with torch.no_grad():
        _slices.read(reads)
    if assign:
        result = module.load_state_dict(assign, strict=False, assign=True)
        if result.unexpected_keys:
            raise CheckpointError(f"could not assign {result.unexpected_keys}")
