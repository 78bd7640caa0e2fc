"""Rectangles of checkpoint tensors, read straight into destination tensors.

The planner behind DTensor loading, `zeroload.distributed.StorageReader` and (later)
`open().get_slice`: a rectangle is, per dimension, a list of index ranges taken in order
(`[[(0, 4096)], [(2048, 4096)]]` is a `Shard(1)` over two ranks of a `[4096, 4096]`
weight). The Rust core turns each rectangle into contiguous byte runs (one per row for a
`Shard(1)`), coalesces them into reads that read at most twice the selected bytes, and
scatters them into the destination: host memory with `preadv`, CUDA memory through the
pinned staging ring. One Python tuple per tensor, whatever the number of runs.

A destination that cannot take the file's bytes as they are (another dtype, a device other
than CPU/CUDA, overlapping strides, a source laid out non-contiguously in the file) gets
them through a temporary tensor of the rectangle, one tensor at a time, and `copy_`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zeroload import _core

# Per dimension, the (start, stop) index ranges selected, concatenated in order.
Ranges = Sequence[Sequence[tuple[int, int]]]


@dataclass
class SliceRead:
    """Read `ranges` of tensor #`tensor` of `ckpt` into `out` (shaped like the rectangle).

    `via`: cast floating-point data to this dtype first (then to `out`'s dtype, as `copy_`
    does), the `dtype=` of `load_into`.
    """

    name: str
    ckpt: _core.Checkpoint
    tensor: int
    ranges: Ranges
    out: torch.Tensor
    via: torch.dtype | None = None


@dataclass
class Stats:
    """What a batch of sliced reads cost: bytes delivered and bytes read from files (host
    reads; CUDA reads are planned by the staging ring and not counted here)."""

    delivered: int = 0
    read: int = 0


def rect_shape(ranges: Ranges) -> list[int]:
    return [sum(b - a for a, b in rs) for rs in ranges]


def full_ranges(shape: Sequence[int]) -> list[list[tuple[int, int]]]:
    return [[(0, n)] for n in shape]


def is_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    expected = 1
    for n, st in zip(reversed(shape), reversed(stride)):
        if n != 1 and st != expected:
            return False
        expected *= n
    return True


def _non_overlapping(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """No two elements share memory (the same test the Rust planner applies)."""
    reach = 1
    for st, n in sorted((st, n) for n, st in zip(shape, stride) if n > 1):
        if st < reach:
            return False
        reach += st * (n - 1)
    return True


def _direct_target(out: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, ...] | None] | None:
    """`(DLPack-able dense buffer, byte offset, element strides or None)` for writing into
    `out` in place, or None if the copy engine cannot write it."""
    if (
        out.device.type not in ("cpu", "cuda")
        or out.layout != torch.strided
        or out.is_conj()
        or out.is_neg()
        or out.numel() == 0
    ):
        return None
    t = out.detach()
    if t.is_contiguous():
        return t, 0, None
    if any(st < 0 for st in t.stride()) or not _non_overlapping(t.shape, t.stride()):
        return None
    # The whole storage as a dense byte tensor; the rectangle lands at the view's offset
    # with the view's strides.
    base = torch.empty(0, dtype=torch.uint8, device=t.device)
    base.set_(t.untyped_storage())
    return base, t.storage_offset() * t.element_size(), tuple(t.stride())


def _file_dtype(ckpt: _core.Checkpoint, i: int) -> torch.dtype:
    return getattr(torch, ckpt.tensor(i)[1])


def _source(ckpt: _core.Checkpoint, i: int) -> tuple[int, int, list[int], list[int]] | None:
    """`(file offset of element 0, itemsize, shape, strides)` if the copy engine reads the
    tensor as it lies in the file (non-negative strides, contiguous), else None."""
    storage, dtype_name, shape, stride, storage_offset, _rg = ckpt.tensor(i)
    if not is_contiguous(shape, stride) or any(st < 0 for st in stride):
        return None
    itemsize = torch.empty((), dtype=getattr(torch, dtype_name)).element_size()
    _key, offset, _nbytes, _loc = ckpt.storage(storage)
    return offset + storage_offset * itemsize, itemsize, list(shape), list(stride)


def check_ranges(name: str, ckpt: _core.Checkpoint, i: int, ranges: Ranges) -> None:
    shape = ckpt.tensor(i)[2]
    if len(ranges) != len(shape):
        raise ValueError(
            f"{ckpt.path}: tensor {name!r} has {len(shape)} dimensions, the selection {len(ranges)}"
        )
    for d, (rs, n) in enumerate(zip(ranges, shape)):
        for a, b in rs:
            if not 0 <= a <= b <= n:
                raise ValueError(
                    f"{ckpt.path}: tensor {name!r}: range {a}..{b} of dimension {d} is outside "
                    f"0..{n}"
                )


def host_threads() -> int | None:
    """Reader threads for host copies: this rank's share of the cores when several ranks
    share the machine (torchrun's LOCAL_WORLD_SIZE), else None (the core's default)."""
    try:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ""))
    except ValueError:
        return None
    if local_ranks <= 1:
        return None
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return max(1, cores // local_ranks)


def read(reads: Sequence[SliceRead], *, threads: int | None = None) -> Stats:
    """Carries out `reads`: one planned copy per (file, device) for the reads the copy
    engine can write in place, a temporary and `copy_` for the others. `threads`: host
    reader threads (default: `host_threads()`).

    Raises:
        ValueError: a selection outside its tensor, or `out` shaped unlike the selection.
        CheckpointError: the file is broken, or shrank while being read (naming the tensor).
    """
    if threads is None:
        threads = host_threads()
    stats = Stats()
    direct: dict[tuple[int, torch.device], list[tuple[SliceRead, tuple]]] = {}
    ckpts: dict[int, _core.Checkpoint] = {}
    indirect: list[SliceRead] = []
    for r in reads:
        check_ranges(r.name, r.ckpt, r.tensor, r.ranges)
        shape = rect_shape(r.ranges)
        if list(r.out.shape) != shape:
            raise ValueError(
                f"{r.ckpt.path}: tensor {r.name!r}: the selection has shape {shape}, the "
                f"destination {list(r.out.shape)}"
            )
        if math.prod(shape) == 0:
            continue
        file_dtype = _file_dtype(r.ckpt, r.tensor)
        src = _source(r.ckpt, r.tensor)
        target = _direct_target(r.out)
        cast = r.via is not None and file_dtype.is_floating_point and r.via != file_dtype
        if src is None or target is None or r.out.dtype != file_dtype or cast:
            indirect.append(r)
            continue
        buf, dst_offset, dst_strides = target
        offset, itemsize, fshape, fstride = src
        key = (id(r.ckpt), buf.device)
        ckpts[id(r.ckpt)] = r.ckpt
        direct.setdefault(key, []).append(
            (r, (buf, dst_offset, dst_strides, offset, itemsize, fshape, fstride))
        )
    for (ck_id, device), group in direct.items():
        ckpt = ckpts[ck_id]
        dests: list[torch.Tensor] = []
        slot: dict[tuple[int, int], int] = {}
        tuples = []
        for r, (buf, dst_offset, dst_strides, offset, itemsize, fshape, fstride) in group:
            k = (buf.data_ptr(), buf.numel() * buf.element_size())
            if k not in slot:
                slot[k] = len(dests)
                dests.append(buf)
            ranges = [list(rs) for rs in r.ranges]
            tuples.append(
                (
                    r.name,
                    slot[k],
                    dst_offset,
                    dst_strides,
                    offset,
                    itemsize,
                    fshape,
                    fstride,
                    ranges,
                )
            )
        d, n = _copy(ckpt, device, dests, tuples, threads)
        stats.delivered += d
        stats.read += n
    for r in indirect:
        d, n = _read_via_temporary(r, threads)
        stats.delivered += d
        stats.read += n
    return stats


def _copy(
    ckpt: _core.Checkpoint,
    device: torch.device,
    dests: list[torch.Tensor],
    tuples: list,
    threads: int | None,
) -> tuple[int, int]:
    if device.type == "cpu":
        return _core.copy_slices_to_host(ckpt, dests, tuples, threads)
    from zeroload import _device

    dev = _device.cuda_device(device)
    # The destinations may be in use by queued kernels on any stream, and torch exports
    # CUDA tensors through DLPack only on the current device.
    torch.cuda.synchronize(dev)
    with torch.cuda.device(dev):
        delivered = _core.copy_slices_to_cuda(ckpt, dests, tuples, dev.index, None)
    return delivered, 0


def _read_via_temporary(r: SliceRead, threads: int | None) -> tuple[int, int]:
    file_dtype = _file_dtype(r.ckpt, r.tensor)
    shape = rect_shape(r.ranges)
    src = _source(r.ckpt, r.tensor)
    if src is None:
        # Laid out non-contiguously in the file (rare: torch.save of a transposed view).
        # Gather from the copy-on-write view of the file: only the pages holding the
        # selection are touched.
        view = torch.from_dlpack(r.ckpt.tensor_view(r.tensor))
        part = view
        for d, rs in enumerate(r.ranges):
            idx = torch.cat([torch.arange(a, b) for a, b in rs]) if rs else torch.empty(0)
            part = part.index_select(d, idx.to(torch.long))
        tmp = part
        delivered, read_bytes = tmp.numel() * tmp.element_size(), 0
    else:
        dev = r.out.device if r.out.device.type in ("cpu", "cuda") else torch.device("cpu")
        tmp = torch.empty(shape, dtype=file_dtype, device=dev)
        offset, itemsize, fshape, fstride = src
        ranges = [list(rs) for rs in r.ranges]
        one = [(r.name, 0, 0, None, offset, itemsize, fshape, fstride, ranges)]
        delivered, read_bytes = _copy(r.ckpt, dev, [tmp], one, threads)
    if r.via not in (None, file_dtype, r.out.dtype) and file_dtype.is_floating_point:
        tmp = tmp.to(r.via)  # then copy_ casts to out's dtype
    with torch.no_grad():
        r.out.copy_(tmp)
    return delivered, read_bytes
