"""Rectangles of checkpoint tensors, read straight into destination tensors.

The planner behind DTensor loading, `zeroload.distributed.StorageReader` and
`open().get_slice` (whose index expressions become rectangles here too): a rectangle is,
per dimension, a list of index ranges taken in order
(`[[(0, 4096)], [(2048, 4096)]]` is a `Shard(1)` over two ranks of a `[4096, 4096]`
weight). The Rust core turns each rectangle into contiguous byte runs (one per row for a
`Shard(1)`), coalesces them into reads that read at most twice the selected bytes, and
scatters them into the destination: host memory with `preadv`, CUDA memory through the
pinned staging ring. One Python tuple per tensor, whatever the number of runs.

A destination that cannot take the file's bytes as they are (another dtype, a device other
than CPU/CUDA, overlapping strides, a source laid out non-contiguously in the file) gets
them through a temporary tensor of the rectangle, one tensor at a time, and `copy_`. No
path reads through the mapping: a file truncated under a read is a `CheckpointError`.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zeroload import _core, _torch
from zeroload._layout import is_contiguous

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
    return base, int(t.storage_offset()) * t.element_size(), tuple(t.stride())


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
    from zeroload import _cuda

    dev = _cuda.cuda_device(device)
    # The destinations may be in use by queued kernels on any stream, and torch exports
    # CUDA tensors through DLPack only on the current device.
    _cuda.backend.synchronize(dev, all_streams=True)
    with _cuda.backend.exporting(dev):
        delivered = _core.copy_slices_to_cuda(ckpt, dests, tuples, dev.index, None)
    return delivered, 0


def _read_via_temporary(r: SliceRead, threads: int | None) -> tuple[int, int]:
    file_dtype = _file_dtype(r.ckpt, r.tensor)
    shape = rect_shape(r.ranges)
    src = _source(r.ckpt, r.tensor)
    if src is None:
        # Laid out non-contiguously in the file (rare: torch.save of a transposed view).
        # Gather from a pread copy of the bytes the tensor spans (never the mapping: a
        # file truncated meanwhile is a CheckpointError, not a SIGBUS).
        view = _torch.read_span(r.ckpt, r.tensor)
        part = view
        for d, rs in enumerate(r.ranges):
            idx = torch.cat([torch.arange(a, b) for a, b in rs]) if rs else torch.empty(0)
            part = part.index_select(d, idx.to(torch.long))
        tmp = part
        read_bytes = view.untyped_storage().nbytes()
        delivered = tmp.numel() * tmp.element_size()
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


# -- `open().get_slice(name)[index]`: an index expression -> a rectangle -> a read --------


@dataclass
class Selection:
    """What a basic index selects: `ranges` per dimension of the tensor as torch holds
    it (the rectangle to read), and `shape`, the result's shape (dimensions indexed by an
    int dropped, `None` adding ones)."""

    ranges: list[list[tuple[int, int]]]
    shape: list[int]


def _is_int(x: object) -> bool:
    """An index that selects one position: Python and numpy integers, 0-dim integer
    tensors (which torch treats as ints). Not bools, which torch and numpy treat as masks."""
    if isinstance(x, bool) or x is None:
        return False
    if isinstance(x, torch.Tensor):
        return (
            x.dim() == 0
            and not x.is_floating_point()
            and not x.is_complex()
            and (x.dtype != torch.bool)
        )
    if type(x).__module__ == "numpy" and getattr(x, "ndim", 0) != 0:
        return False  # arrays
    if isinstance(x, (str, bytes, float, complex, list, tuple, dict, set)):
        return False
    return hasattr(type(x), "__index__")


def _is_slice_bound(x: object) -> bool:
    return x is None or _is_int(x)


def components(item: object) -> tuple[object, ...] | None:
    """The index as a tuple of basic components (ints, slices, `None`, `...`), or None if
    it holds anything else (lists, tensors, arrays, bools: advanced indexing). An empty
    list selects nothing along the first dimension (as in safetensors, torch and numpy)."""
    if isinstance(item, list) and not item:
        return (slice(0, 0),)
    parts = item if isinstance(item, tuple) else (item,)
    if sum(1 for p in parts if p is Ellipsis) > 1:
        return None  # torch accepts several; let torch say what they mean
    for p in parts:
        if p is None or p is Ellipsis or _is_int(p):
            continue
        if isinstance(p, slice) and all(_is_slice_bound(b) for b in (p.start, p.stop, p.step)):
            continue
        return None
    return parts


def dummy(shape: Sequence[int]) -> torch.Tensor:
    """A CPU tensor of `shape` holding one byte (all strides 0): indexing it raises what
    indexing the real tensor would, with the same messages, without reading anything."""
    return torch.zeros((), dtype=torch.uint8).expand(tuple(shape))


def check_index(
    item: object, parts: tuple[object, ...], shape: Sequence[int], *, numpy: bool
) -> None:
    """Raises what torch (or numpy) raises for index `item` (made of `parts`) on a tensor
    of `shape`, with the same type and message: the index is applied to a tensor that
    holds no data (see `dummy`; a zero-stride numpy view). Negative steps are refused for
    numpy too (as safetensors' numpy slices refuse them)."""
    for p in parts:
        if isinstance(p, slice) and p.step is not None:
            step = operator.index(p.step)
            if step == 0:
                raise ValueError("slice step cannot be zero")
            if step < 0:
                raise ValueError("step must be greater than zero")
    if numpy:
        import numpy as np

        np.broadcast_to(np.empty((), dtype=np.uint8), tuple(shape))[item]  # type: ignore[call-overload]
    else:
        dummy(shape)[item]  # type: ignore[index]


def select(parts: tuple[object, ...], shape: Sequence[int]) -> Selection:
    """The rectangle and result shape of a basic index that `check_basic` accepted."""
    ndim = len(shape)
    consumed = sum(1 for p in parts if p is not None and p is not Ellipsis)
    expanded: list[object] = []
    for p in parts:
        if p is Ellipsis:
            expanded.extend([slice(None)] * (ndim - consumed))
        else:
            expanded.append(p)
    if Ellipsis not in parts:
        expanded.extend([slice(None)] * (ndim - consumed))
    ranges: list[list[tuple[int, int]]] = []
    out: list[int] = []
    for p in expanded:
        if p is None:
            out.append(1)
            continue
        n = shape[len(ranges)]
        if isinstance(p, slice):
            start, stop, step = p.indices(n)
            if step == 1:
                ranges.append([(start, max(start, stop))])
                out.append(max(0, stop - start))
            else:
                picked = range(start, stop, step)
                ranges.append([(j, j + 1) for j in picked])
                out.append(len(picked))
        else:
            i = operator.index(p)  # type: ignore[arg-type]
            i = i + n if i < 0 else i
            ranges.append([(i, i + 1)])
    return Selection(ranges, out)


def pack_last(sel: Selection, parts: tuple[object, ...], per: int) -> Selection | str:
    """A selection on a packed dtype's logical grid (`per` values per element along the
    last dimension, safetensors' F4 shape) as whole elements of torch's tensor; a reason
    if it splits an element."""
    last = sel.ranges[-1]
    if any(a % per or b % per for a, b in last) or len(last) != 1:
        return (
            f"the selection along the last dimension must take whole bytes ({per} values "
            f"each): start and stop multiples of {per}, step 1"
        )
    # Which result dimension is the last tensor dimension (absent if an int took it).
    int_on_last = _last_is_int(parts, len(sel.ranges))
    if int_on_last:
        return f"an int index on the last dimension would split a byte of {per} values"
    (a, b) = last[0]
    ranges = [*sel.ranges[:-1], [(a // per, b // per)]]
    out = list(sel.shape)
    pos = _result_position_of_last(parts, len(sel.ranges))
    out[pos] //= per
    return Selection(ranges, out)


def _expanded(parts: tuple[object, ...], ndim: int) -> list[object]:
    consumed = sum(1 for p in parts if p is not None and p is not Ellipsis)
    out: list[object] = []
    for p in parts:
        out.extend([slice(None)] * (ndim - consumed) if p is Ellipsis else [p])
    if Ellipsis not in parts:
        out.extend([slice(None)] * (ndim - consumed))
    return out


def _last_is_int(parts: tuple[object, ...], ndim: int) -> bool:
    dims = [p for p in _expanded(parts, ndim) if p is not None]
    return not isinstance(dims[-1], slice)


def _result_position_of_last(parts: tuple[object, ...], ndim: int) -> int:
    pos = -1
    seen = 0
    for p in _expanded(parts, ndim):
        if p is None:
            pos += 1
            continue
        if isinstance(p, slice):
            pos += 1
        seen += 1
        if seen == ndim:
            return pos
    raise AssertionError("unreachable: the last dimension is a slice")


# A dtype of each element size that every torch operation used here supports: bytes are
# read as these, then viewed as the tensor's dtype (bits types and bcomplex32 cannot
# travel through DLPack or `index_select`).
_CARRIERS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


def read_selection(
    ckpt: _core.Checkpoint, i: int, name: str, sel: Selection, device: torch.device
) -> torch.Tensor:
    """Tensor #`i`'s rectangle `sel.ranges`, shaped `sel.shape`, in fresh memory on
    `device`, reading only the selected bytes (within 2x, coalescing small gaps) with the
    copy engine: preads into host memory, or file -> pinned staging -> the GPU."""
    dtype = _file_dtype(ckpt, i)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(rect_shape(sel.ranges)) * itemsize
    storage, _dtype, fshape, fstride, storage_offset, _rg = ckpt.tensor(i)
    offset = ckpt.storage(storage)[1] + storage_offset * itemsize
    # The planner takes the tensor's strides as they are in the file: a view saved by
    # torch.save (transposed, a column block) is read as runs too.
    ranges = [list(rs) for rs in sel.ranges]
    one = (name, 0, 0, None, offset, itemsize, fshape, fstride, ranges)
    if device.type not in ("cpu", "cuda"):
        return read_selection(ckpt, i, name, sel, torch.device("cpu")).to(device)
    try:
        if device.type == "cpu":
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes:
                _core.copy_slices_to_host(ckpt, [buf], [one], host_threads())
        else:
            from zeroload import _cuda

            dev = _cuda.cuda_device(device)
            dest = _cuda.backend.empty(nbytes, dev)
            if nbytes:
                _cuda.backend.synchronize(dev, all_streams=False)
                with _cuda.backend.exporting(dev):
                    _core.copy_slices_to_cuda(ckpt, [dest], [one], dev.index, None)
            buf = _cuda.backend.finish(dest)
    except ValueError as e:
        if "separate" not in str(e):
            raise
        # Millions of runs (an element-by-element walk of a transposed tensor): gather
        # through the copy-on-write view instead, touching only the pages selected.
        part = _gather_from_view(ckpt, i, sel.ranges, dtype, itemsize)
        return (part.to(device) if device.type != "cpu" else part).reshape(sel.shape)
    return buf.view(dtype).reshape(sel.shape)


def _gather_from_view(
    ckpt: _core.Checkpoint,
    i: int,
    ranges: Sequence[Sequence[tuple[int, int]]],
    dtype: torch.dtype,
    itemsize: int,
) -> torch.Tensor:
    """The rectangle copied out of a pread copy of the bytes the tensor spans (never the
    mapping): for tensors laid out non-contiguously in the file."""
    _s, _name, shape, stride, _storage_offset, _rg = ckpt.tensor(i)
    carrier = _CARRIERS[itemsize]
    src = _torch.read_span(ckpt, i)
    part = torch.empty(0, dtype=carrier).set_(
        src.untyped_storage(), src.storage_offset(), shape, stride
    )
    for d, rs in enumerate(ranges):
        idx = [j for a, b in rs for j in range(a, b)]
        part = part.index_select(d, torch.tensor(idx, dtype=torch.long))
    return part.contiguous().view(dtype) if dtype != carrier else part.contiguous()
