"""``zeroload.save``: write a checkpoint as ``torch.save`` or ``safetensors`` would, atomically.

The format follows the suffix, as loading does: ``.safetensors`` -> a safetensors file,
anything else -> a ``torch.save`` zip. The whole file is laid out in memory first (the
pickle, zip headers, offsets), the object is checked to be loadable with
``torch.load(weights_only=True)`` before a byte is written, and then tensor bytes go
straight from tensor memory to the file through ``zeroload._writer`` (positional writes in
Rust, CRCs on other threads, a temporary file renamed over ``path``). CUDA tensors go through
:func:`_write_cuda` (device -> pinned staging -> file).

The pickle (``data.pkl``) is written by :func:`_fast_pickle` for the usual checkpoint
contents (dicts, OrderedDicts with their ``_metadata``, lists, tuples, None, bools, ints,
floats, strings, ``torch.Size``, dtypes, devices, and dense CPU/CUDA tensors and
Parameters): it emits the protocol 2 opcodes itself, reducing tensors as torch does and
checking as it walks, several times faster than the C pickler calling back into Python
for every object and tensor. Anything else (bytes, sets, a tensor with backward hooks,
a subclass, a cycle through a tuple, ...) makes it give up, and the general path runs as
it always has: :func:`_check` (which names what it refuses), then :class:`_Pickler`.
Both give files that load to the same objects, sharing included.

torch zip layout (as ``torch.save`` writes it; see torch/serialization.py ``_save`` and
caffe2/serialize/inline_container.cc): records ``<stem>/data.pkl`` (pickle protocol 2,
persistent ids ``('storage', <StorageType>, key, location, numel)``), ``.format_version``,
``.storage_alignment``, ``byteorder``, ``data/<key>`` per storage in first-use order,
``version``, ``.data/serialization_id``; every record stored, its data 64-byte aligned by
an ``FB`` padding extra field, followed by a data descriptor; zip64 end records always.
"""

from __future__ import annotations

import collections
import copyreg
import io
import os
import pickle
import secrets
import struct
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Tuple

import torch
from torch.utils.dlpack import to_dlpack

from zeroload import _core
from zeroload._torch import progress_bar
from zeroload._writer import Request, Tail, write_file

__all__ = ["save"]

_U32 = 0xFFFFFFFF  # "see the zip64 extra field" in a 32-bit size or offset
#: Sizes and offsets from here on go to zip64 fields (a module global so the tests can
#: exercise the zip64 layout without writing 4 GiB).
_ZIP64_AT = _U32


def _fit(x: int) -> int:
    """``x`` for a 32-bit zip field: the value, or the zip64 marker."""
    return _U32 if x >= _ZIP64_AT else x


#: dtypes torch exports through DLPack as whole-byte elements (others go as bytes).
_DLPACK_DTYPES = {
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
    torch.complex64, torch.complex128,
}  # fmt: skip
#: torch dtype -> safetensors dtype name, and values per element (2 for packed float4).
_ST_DTYPES: Dict[str, Tuple[str, int]] = {n: (st, k) for n, _, st, k in _core.dtypes() if st}
#: The exact container types ``torch.load(weights_only=True)`` rebuilds.
_DICTS = (dict, collections.OrderedDict, collections.Counter)
_PLAIN = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device)


def save(
    obj: Any,
    path: os.PathLike[str] | str,
    *,
    metadata: Mapping[str, str] | None = None,
    progress: bool | None = None,
) -> None:
    """Save ``obj`` to ``path`` atomically, as ``torch.save`` or safetensors would.

    The format follows the suffix: ``.safetensors`` writes a safetensors file (``obj`` a
    ``dict[str, Tensor]``; ``metadata`` becomes the header's ``__metadata__``, as in
    ``safetensors.torch.save_file``); any other suffix writes a ``torch.save`` zip that
    ``torch.load(path, weights_only=True)``, ``torch.load(path, mmap=True)`` and
    ``zeroload.load(path)`` read back as ``torch.save`` would have given them (storages
    shared as in ``obj``, views keeping stride and offset, 64-byte aligned records).

    The bytes go to a new file in the same directory, which is fsynced and renamed over
    ``path`` (the directory fsynced too): saving over the file that live tensors map (a
    resumed training run) is safe, and a failure (a refused object, a full disk, Ctrl-C)
    leaves ``path`` as it was and no temporary file behind. Tensor bytes are written
    with parallel positional writes straight from tensor memory (a tensor that is a
    zeroload mapping is not copied first); CUDA tensors go device -> pinned staging ->
    file. ``progress``: a progress bar (``None``: for large saves in interactive sessions).

    Raises:
        CheckpointError: ``obj`` holds something ``torch.load(weights_only=True)`` cannot
            read (named by its path in ``obj``, e.g. ``obj["opt"]["fn"]``), or is not a
            valid safetensors dict (non-string keys, tensors sharing memory, a dtype
            safetensors lacks); nothing is written.
    """
    path = Path(os.fspath(path))
    if path.suffix == ".safetensors":
        plan = _plan_safetensors(obj, path, metadata)
    else:
        if metadata is not None:
            raise _core.CheckpointError(
                f"{path}: metadata is written only to .safetensors files (torch.save's zip "
                "format has no place for it); put it in the saved object instead"
            )
        plan = _plan_torch(obj, path)
    plan.write(path, progress)


# ---------------------------------------------------------------------------------------
# What to write: sources, byte ranges, and the bytes that need CRCs
# ---------------------------------------------------------------------------------------


class _Plan:
    """A laid-out file: ``size`` bytes; host ranges (``sources``/``requests``), CUDA
    ranges (``cuda``: tensor, file offset), and ``finish(crcs)`` for the rest."""

    def __init__(self) -> None:
        self.size = 0
        self.sources: List[Any] = []
        self.requests: List[Request] = []
        self.cuda: List[Tuple[torch.Tensor, int]] = []
        self.crc = False
        self.finish: Callable[[List[int]], Tail] | None = None
        # Bytes that need no CRC (zip headers), in one buffer: (offset in it, nbytes,
        # file offset) each.
        self.fixed = bytearray()
        self.fixed_ranges: List[Tuple[int, int, int]] = []

    def add(self, source: Any, nbytes: int, file_offset: int) -> None:
        self.requests.append((len(self.sources), 0, nbytes, file_offset))
        self.sources.append(source)

    def add_fixed(self, raw: bytes, file_offset: int) -> None:
        self.fixed_ranges.append((len(self.fixed), len(raw), file_offset))
        self.fixed += raw

    def add_tensor(self, t: torch.Tensor, file_offset: int) -> None:
        """Bytes of the contiguous tensor ``t`` at ``file_offset`` (CPU: zero-copy)."""
        nbytes = t.nbytes
        if nbytes == 0:
            self.requests.append((-1, 0, 0, file_offset))  # keeps CRC order; skipped
            return
        if t.is_cuda:
            self.requests.append((-2, len(self.cuda), nbytes, file_offset))
            self.cuda.append((t, file_offset))
            return
        self.add(to_dlpack(t if t.dtype in _DLPACK_DTYPES else _bytes_of(t)), nbytes, file_offset)

    def write(self, path: Path, progress: bool | None) -> None:
        """Writes the file: data ranges (CRCs in request order), the fixed ranges with
        them (after them in the request list, so their CRCs are dropped), CUDA ranges,
        then what ``finish`` makes of the CRCs."""
        data = [r for r in self.requests if r[0] >= 0]
        sources = list(self.sources)
        host = list(data)
        if self.fixed_ranges:
            host += [(len(sources), *r) for r in self.fixed_ranges]
            sources.append(bytes(self.fixed))
        total = sum(r[2] for r in self.requests)
        bar = progress_bar(progress, total, f"Saving {path.name}")
        cuda = [r for r in self.requests if r[0] == -2]

        def extra(fd: int) -> List[int]:
            host_bytes = sum(r[2] for r in data)
            items = [(self.cuda[r[1]][0], r[3]) for r in cuda]
            if bar is None:
                return _write_cuda(fd, path, items, None)
            return _write_cuda(fd, path, items, lambda done, _: bar(host_bytes + done, total))

        def finish(crcs: List[int]) -> Tail:
            # CRCs back in request order: host ones, then CUDA ones, empty ranges 0.
            it_host, it_cuda = iter(crcs[: len(data)]), iter(crcs[len(host) :])
            ordered = [
                next(it_host) if r[0] >= 0 else next(it_cuda) if r[0] == -2 else 0
                for r in self.requests
            ]
            assert self.finish is not None
            return self.finish(ordered)

        try:
            write_file(
                path,
                self.size,
                sources,
                host,
                crc=self.crc,
                progress=bar,
                extra=extra if cuda else None,
                finish=finish if self.finish is not None else None,
            )
        finally:
            if bar is not None:
                bar.close()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The bytes of the contiguous tensor ``t`` as a 1-D uint8 tensor (no copy)."""
    nbytes = t.numel() * t.element_size()
    out = torch.empty(0, dtype=torch.uint8, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset() * t.element_size(), (nbytes,), (1,))


def _write_cuda(
    fd: int,
    path: Path,
    items: List[Tuple[torch.Tensor, int]],
    progress: Callable[[int, int], Any] | None,
) -> List[int]:
    """Writes each contiguous CUDA tensor's bytes at its file offset; returns their
    CRC-32s. Through the core's device -> pinned staging -> file path when the extension
    has it (``_core.write_from_cuda``); otherwise one bounded chunk at a time through
    pageable host memory."""
    write_from_cuda = getattr(_core, "write_from_cuda", None)
    if write_from_cuda is not None:
        by_device: Dict[int, List[int]] = {}
        for i, (t, _) in enumerate(items):
            by_device.setdefault(t.device.index or 0, []).append(i)
        crcs = [0] * len(items)
        for device, idx in by_device.items():
            torch.cuda.synchronize(device)  # no kernel may still write the sources
            # (device address, nbytes) of each tensor's bytes; `items` keeps them alive.
            sources = [(items[i][0].data_ptr(), _nbytes(items[i][0])) for i in idx]
            requests = [(k, 0, n, items[i][1]) for k, (i, (_, n)) in enumerate(zip(idx, sources))]
            got = write_from_cuda(fd, sources, requests, device, None, progress)
            for i, c in zip(idx, got):
                crcs[i] = c
        return crcs
    chunk = 64 << 20
    crcs = []
    for t, offset in items:
        raw = _bytes_of(t)
        crc = 0
        for start in range(0, raw.numel(), chunk):
            host = raw[start : start + chunk].cpu()
            crc = zlib.crc32(host.numpy().data, crc)
            _core.write_host(fd, os.fspath(path), [to_dlpack(host)],
                             [(0, 0, host.numel(), offset + start)], None, False)  # fmt: skip
        crcs.append(crc)
    return crcs


# ---------------------------------------------------------------------------------------
# Checking that torch.load(weights_only=True) can read an object back
# ---------------------------------------------------------------------------------------


def _refuse(path: Path, where: str, what: str) -> _core.CheckpointError:
    return _core.CheckpointError(f"{path}: cannot save {where}: {what}")


def _check_tensor(path: Path, where: str, t: torch.Tensor) -> None:
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise _refuse(
            path, where, f"a {type(t).__module__}.{type(t).__qualname__} (a tensor subclass) "
            "is not something torch.load(weights_only=True) reads back; save a plain "
            "tensor (for a DTensor, .full_tensor() or its .to_local() shard)",
        )  # fmt: skip
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        raise _refuse(
            path, where, f"a {t.layout} tensor; zeroload.save writes dense tensors only "
            "(use torch.save for sparse, quantized or nested tensors)",
        )  # fmt: skip
    if t.device.type not in ("cpu", "cuda"):
        raise _refuse(path, where, f"a tensor on {t.device} has no bytes to write")
    if t.requires_grad and t.grad_fn is not None:
        raise _refuse(
            path, where, "a non-leaf tensor that requires grad (torch.save refuses it "
            "too); save t.detach()",
        )  # fmt: skip
    if t.__dict__:
        raise _refuse(
            path, where, f"a tensor with Python attributes ({', '.join(map(repr, t.__dict__))}); "
            "torch.load(weights_only=True) cannot rebuild them",
        )  # fmt: skip


def _check(path: Path, obj: Any, where: str, seen: set) -> None:
    """Refuses, naming ``where`` in ``obj``, anything the weights-only unpickler refuses."""
    kind = type(obj)
    if kind in _PLAIN or kind is torch.Size:
        return
    if isinstance(obj, torch.Tensor):
        _check_tensor(path, where, obj)
        return
    if id(obj) in seen:
        return
    if kind in _DICTS:
        seen.add(id(obj))
        for k, v in obj.items():
            if type(k) not in _PLAIN:
                raise _refuse(path, f"{where} key {k!r}", f"a {kind.__name__} key must be a "
                              "plain value (str, int, float, ...)")  # fmt: skip
            _check(path, v, f"{where}[{k!r}]", seen)
        for name, v in vars(obj).items() if kind is collections.OrderedDict else ():
            _check(path, v, f"{where}.{name}", seen)
        return
    if kind in (list, tuple, set):
        seen.add(id(obj))
        for i, v in enumerate(obj):
            _check(path, v, f"{where}[{i}]", seen)
        return
    name = f"{kind.__module__}.{kind.__qualname__}"
    raise _refuse(
        path, where, f"a {name} is not something torch.load(weights_only=True) can read "
        "back (only tensors, dicts, lists, tuples, sets, numbers, strings, None, "
        "torch.Size, dtypes and devices are)",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# torch zip
# ---------------------------------------------------------------------------------------


#: Types the pickler meets most that are never storages.
_NOT_STORAGE = frozenset(
    {str, int, float, bool, type(None), tuple, list, dict, collections.OrderedDict, bytes,
     torch.Size, torch.dtype, torch.device, torch.Tensor, torch.nn.Parameter}
)  # fmt: skip


class _StorageRef:
    """A tensor's storage as :func:`_reduce_tensor` hands it to the pickler: the
    untyped storage and the dtype it is viewed as (``None``: an untyped storage, as
    ``_rebuild_tensor_v3`` takes)."""

    __slots__ = ("dtype", "storage")

    def __init__(self, storage: torch.UntypedStorage, dtype: torch.dtype | None) -> None:
        self.storage, self.dtype = storage, dtype


_V3_DTYPES = frozenset(torch.storage._new_dtypes())
_STORAGE_TYPES = {
    dtype: getattr(torch, name)
    for dtype, name in torch.storage._dtype_to_storage_type_map().items()
}


def _reduce_tensor(t: torch.Tensor) -> Any:
    """What ``Tensor.__reduce_ex__`` returns for a plain dense CPU or CUDA tensor (torch/
    _tensor.py ``_reduce_ex_internal``), without building a ``TypedStorage`` per tensor;
    anything else goes to torch's own reduction."""
    if (
        t.layout is not torch.strided
        or t.device.type not in ("cpu", "cuda")
        or t._backward_hooks
        or t.is_quantized
        or t.__dict__
    ):
        return t.__reduce_ex__(2)
    v3 = t.dtype in _V3_DTYPES
    args: tuple = (
        _StorageRef(t.untyped_storage(), None if v3 else t.dtype),
        t.storage_offset(),
        tuple(t.size()),
        t.stride(),
        t.requires_grad,
        collections.OrderedDict(),
    )
    if v3:
        args += (t.dtype,)
    metadata = torch._utils.get_tensor_metadata(t)
    if metadata:
        args += (metadata,)
    rebuild = torch._utils._rebuild_tensor_v3 if v3 else torch._utils._rebuild_tensor_v2
    return (rebuild, args)


class _Pickler(pickle.Pickler):
    """torch.save's pickler: storages become persistent ids, numbered by first use
    (torch/serialization.py ``_save``). Plain tensors are reduced by
    :func:`_reduce_tensor` (what torch's reduction gives, faster)."""

    def __init__(self, f: io.BytesIO) -> None:
        super().__init__(f, protocol=2)
        self.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _reduce_tensor}
        self.storages: List[torch.UntypedStorage] = []
        self._keys: Dict[int, Tuple[str, str]] = {}  # storage _cdata -> key, location
        self._dtypes: Dict[int, torch.dtype] = {}

    def persistent_id(self, obj: Any) -> Any:
        cls = type(obj)
        if cls in _NOT_STORAGE:  # the common case, decided without torch's checks
            return None
        if cls is _StorageRef:
            storage = obj.storage
            if obj.dtype is None:
                dtype, storage_type, numel = torch.uint8, torch.UntypedStorage, storage.nbytes()
            else:
                dtype, storage_type = obj.dtype, _STORAGE_TYPES[obj.dtype]
                numel = storage.nbytes() // obj.dtype.itemsize
        elif isinstance(obj, torch.storage.TypedStorage):
            storage = obj._untyped_storage
            dtype = obj.dtype
            storage_type = getattr(torch, obj._pickle_storage_type())
            numel = obj._size()
        elif torch.is_storage(obj):
            storage = obj
            dtype = torch.uint8
            storage_type = torch.serialization.normalize_storage_type(type(obj))
            numel = storage.nbytes()
        else:
            return None
        ptr = storage.data_ptr()
        if ptr != 0 and storage.device.type != "meta":
            if self._dtypes.setdefault(ptr, dtype) != dtype:
                raise RuntimeError(
                    "Cannot save multiple tensors or storages that view the same data as "
                    "different types"
                )
        known = self._keys.get(storage._cdata)
        if known is None:
            location = torch.serialization.location_tag(storage)
            known = self._keys[storage._cdata] = (str(len(self._keys)), location)
            self.storages.append(storage)
        return ("storage", storage_type, known[0], known[1], numel)


# ---------------------------------------------------------------------------------------
# The fast pickle emitter
# ---------------------------------------------------------------------------------------


class _GiveUp(Exception):
    """Raised inside :func:`_fast_pickle` for what it leaves to the general pickler."""


class _Pickled(NamedTuple):
    """A pickled object: ``data.pkl``, and its storages in key order, each with a tensor
    whose own bytes are exactly the storage's (contiguous, from its start, to its end;
    handed to the writer as is) or ``None`` (written through a byte view of the storage)."""

    data: bytes
    storages: List[torch.UntypedStorage]
    nbytes: List[int]
    spans: List[torch.Tensor | None]


# Protocol 2 opcodes (see pickletools): one byte each, or with their argument bytes.
_MARK, _STOP, _TUPLE, _EMPTY_TUPLE, _REDUCE, _BUILD = b"(", b".", b"t", b")", b"R", b"b"
_EMPTY_LIST, _APPEND, _APPENDS = b"]", b"a", b"e"
_EMPTY_DICT, _SETITEM, _SETITEMS = b"}", b"s", b"u"
_NONE, _BINPERSID = b"N", b"Q"
_BOOLS = {True: b"\x88", False: b"\x89"}
_TUPLES = {1: b"\x85", 2: b"\x86", 3: b"\x87"}  # TUPLE1..3 (no MARK needed)
_BININT1 = [b"K" + bytes((i,)) for i in range(256)]
_BINPUT = [b"q" + bytes((i,)) for i in range(256)]
_BINGET = [b"h" + bytes((i,)) for i in range(256)]
_BATCH = 1000  # items per APPENDS/SETITEMS, as pickle batches them
_pack_float = struct.Struct(">d").pack


def _binput(i: int) -> bytes:
    return _BINPUT[i] if i < 256 else b"r" + i.to_bytes(4, "little")


def _binget(i: int) -> bytes:
    return _BINGET[i] if i < 256 else b"j" + i.to_bytes(4, "little")


def _int_op(v: int) -> bytes:
    """``v`` as pickle protocol 2 writes it (BININT1/BININT2/BININT, else LONG1/LONG4)."""
    if 0 <= v < 256:
        return _BININT1[v]
    if 0 <= v < 65536:
        return b"M" + v.to_bytes(2, "little")
    if -0x80000000 <= v < 0x80000000:
        return b"J" + v.to_bytes(4, "little", signed=True)
    # pickle's encode_long: little-endian two's complement, as short as it goes.
    n = (v.bit_length() >> 3) + 1
    raw = v.to_bytes(n, "little", signed=True)
    if v < 0 and n > 1 and raw[-1] == 0xFF and raw[-2] & 0x80:
        raw = raw[:-1]
    if len(raw) < 256:
        return b"\x8a" + bytes((len(raw),)) + raw
    return b"\x8b" + len(raw).to_bytes(4, "little") + raw


def _str_op(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _global_op(obj: Any) -> bytes:
    """The GLOBAL opcode pickle writes for ``obj`` (a class, function or dtype)."""
    raw = pickle.dumps(obj, protocol=2)
    end = raw.index(b"\n", raw.index(b"\n", 3) + 1) + 1
    assert raw[2:3] == b"c", raw
    return raw[2:end]


def _ints_tuple_op(values: Tuple[int, ...]) -> bytes:
    """A tuple of ints, unmemoized (a size or stride: never shared)."""
    ops = b"".join(map(_int_op, values))
    if not values:
        return _EMPTY_TUPLE
    return ops + _TUPLES[len(values)] if len(values) <= 3 else _MARK + ops + _TUPLE


_SCALAR_KEYS = (int, float, bool, type(None))  # dict keys besides str the emitter writes


def _fast_pickle(obj: Any) -> _Pickled | None:
    """``obj`` pickled as :class:`_Pickler` would (what unpickles is the same: types,
    values, which objects are shared), or ``None`` when ``obj`` holds anything but the
    usual checkpoint contents; then :func:`_pickle` decides (refuses or pickles it).

    It writes the opcodes itself, where the C pickler would call back into Python for
    every object (``persistent_id``) and every tensor (its reduction, a ``TypedStorage``
    per tensor). What it accepts is a subset of what :func:`_check` accepts, so it checks
    as it goes: plain values, containers of the exact types ``torch.load(weights_only=
    True)`` rebuilds, and dense CPU/CUDA tensors and Parameters that torch reduces to
    ``_rebuild_tensor_v2``/``_v3``/``_rebuild_parameter`` (no hooks, no Python attributes,
    leaves if they require grad). Containers, tensors and globals are memoized, so shared
    objects stay shared after loading; storages are numbered by first use, as torch does.
    """
    out = bytearray(b"\x80\x02")  # PROTO 2
    memo: Dict[int, int] = {}  # id of a container or tensor in obj -> memo index
    consts: Dict[Any, int] = {}  # a global or a constant string -> memo index
    building: set = set()  # ids of tuples being written: a cycle through one gives up
    storages: List[torch.UntypedStorage] = []
    nbytes: List[int] = []
    spans: List[torch.Tensor | None] = []
    keys: Dict[int, int] = {}  # storage _cdata -> key
    views: Dict[int, torch.dtype] = {}  # data pointer -> the dtype its storage is viewed as
    locations: Dict[int, str] = {}  # t.get_device() -> torch's location tag
    shapes: Dict[Tuple[int, ...], bytes] = {}  # size or stride -> its ops
    next_memo = 0

    def put(key: int) -> bytes:
        nonlocal next_memo
        memo[key] = next_memo
        next_memo += 1
        return _binput(next_memo - 1)

    def const(value: Any, op: Callable[[Any], bytes]) -> bytes:
        """A global or string written once, then fetched from the memo."""
        nonlocal next_memo
        at = consts.get(value)
        if at is not None:
            return _binget(at)
        consts[value] = next_memo
        next_memo += 1
        return op(value) + _binput(next_memo - 1)

    def shape(values: Tuple[int, ...]) -> bytes:
        ops = shapes.get(values)
        if ops is None:
            ops = shapes[values] = _ints_tuple_op(tuple(values))
        return ops

    def pid(t: torch.Tensor, dtype: torch.dtype, v3: bool, offset: int, plain: bool) -> bytes:
        """The persistent id of ``t``'s storage, ``('storage', <StorageType>, key,
        location, numel)``, as :meth:`_Pickler.persistent_id` makes it (``offset``: t's
        storage offset; ``plain``: no conj/neg bit)."""
        storage = t.untyped_storage()
        view = torch.uint8 if v3 else dtype
        ptr = storage.data_ptr()
        if ptr and views.setdefault(ptr, view) is not view:
            raise _GiveUp  # the general pickler raises its error for this
        key = keys.get(storage._cdata)
        if key is None:
            key = keys[storage._cdata] = len(storages)
            size = storage.nbytes()
            storages.append(storage)
            nbytes.append(size)
            # The tensor itself is the writer's source when its bytes are the storage's.
            whole = plain and offset == 0 and t.nbytes == size
            spans.append(t if whole and t.is_contiguous() else None)
        device = t.get_device()  # -1: the CPU
        location = locations.get(device)
        if location is None:
            location = locations[device] = torch.serialization.location_tag(storage)
        numel = nbytes[key] if v3 else nbytes[key] // dtype.itemsize
        return b"".join((
            _MARK, const("storage", _str_op),
            const(torch.UntypedStorage if v3 else _STORAGE_TYPES[dtype], _global_op),
            _str_op(str(key)), const(location, _str_op), _int_op(numel), _TUPLE, _BINPERSID,
        ))  # fmt: skip

    def tensor_args(t: torch.Tensor, requires_grad: bool) -> bytes:
        """``_rebuild_tensor_v2``/``_v3`` and its arguments, as :func:`_reduce_tensor`
        gives them, up to REDUCE."""
        dtype = t.dtype
        v3 = dtype in _V3_DTYPES
        if not v3 and dtype not in _STORAGE_TYPES:
            raise _GiveUp
        metadata = _tensor_metadata(t)  # conj/neg bits
        offset = int(t.storage_offset())
        size, stride = t.size(), t.stride()
        parts = [
            const(_rebuild_v3 if v3 else _rebuild_v2, _global_op), _MARK,
            pid(t, dtype, v3, offset, not metadata), _int_op(offset),
            shapes.get(size) or shape(size), shapes.get(stride) or shape(stride),
            _BOOLS[requires_grad], const(collections.OrderedDict, _global_op), _EMPTY_TUPLE,
            _REDUCE,
        ]  # fmt: skip
        if v3:
            parts.append(const(dtype, _global_op))
        if metadata:
            parts.append(_flat_dict_op(metadata))
        parts += (_TUPLE, _REDUCE)
        return b"".join(parts)

    def tensor(t: torch.Tensor, cls: type) -> None:
        if (
            t.layout is not torch.strided
            or t.is_quantized
            or t.is_nested
            or not (t.is_cpu or t.is_cuda)
            or t._backward_hooks
            or t.__dict__
        ):
            raise _GiveUp
        requires_grad = t.requires_grad
        if requires_grad and t.grad_fn is not None:
            raise _GiveUp
        if cls is torch.Tensor:
            out.extend(tensor_args(t, requires_grad))
        else:  # Parameter.__reduce_ex__: its .data (a plain tensor), requires_grad, hooks
            out.extend(const(torch._utils._rebuild_parameter, _global_op))
            out.extend(tensor_args(t, False))
            out.extend(_BOOLS[requires_grad])
            out.extend(const(collections.OrderedDict, _global_op))
            out.extend(b")R\x87R")  # EMPTY_TUPLE REDUCE TUPLE3 REDUCE
        out.extend(put(id(t)))

    def items(pairs: Any, n: int) -> None:
        """Dict items, batched as pickle batches them (SETITEM for a lone one)."""
        if n == 1:
            for k, v in pairs:
                key(k)
                emit(v)
            out.extend(_SETITEM)
            return
        count = 0
        for k, v in pairs:
            if not count:
                out.extend(_MARK)
            key(k)
            emit(v)
            count += 1
            if count == _BATCH:
                out.extend(_SETITEMS)
                count = 0
        if count:
            out.extend(_SETITEMS)

    def key(k: Any) -> None:
        if type(k) is str:
            out.extend(_str_op(k))
        elif type(k) in _SCALAR_KEYS:
            emit(k)
        else:
            raise _GiveUp

    def emit(x: Any) -> None:
        cls = type(x)
        if cls is torch.Tensor or cls is torch.nn.Parameter:
            at = memo.get(id(x))
            if at is not None:
                out.extend(_binget(at))
            else:
                tensor(x, cls)
        elif cls is str:
            out.extend(_str_op(x))
        elif cls is int:
            out.extend(_int_op(x))
        elif cls is float:
            out.extend(b"G" + _pack_float(x))
        elif x is None:
            out.extend(_NONE)
        elif cls is bool:
            out.extend(_BOOLS[x])
        elif cls is dict or cls is collections.OrderedDict or cls is list:
            at = memo.get(id(x))
            if at is not None:
                out.extend(_binget(at))
            elif cls is list:
                out.extend(_EMPTY_LIST + put(id(x)))
                for start in range(0, len(x), _BATCH):
                    batch = x[start : start + _BATCH]
                    out.extend(_MARK if len(batch) > 1 else b"")
                    for v in batch:
                        emit(v)
                    out.extend(_APPENDS if len(batch) > 1 else _APPEND)
            elif cls is dict:
                out.extend(_EMPTY_DICT + put(id(x)))
                if x:
                    items(iter(x.items()), len(x))
            else:  # OrderedDict's reduction: OrderedDict(), its items, its __dict__
                out.extend(const(cls, _global_op) + _EMPTY_TUPLE + _REDUCE + put(id(x)))
                if x:
                    items(iter(x.items()), len(x))
                if vars(x):
                    emit(vars(x))
                    out.extend(_BUILD)
        elif cls is tuple:
            if not x:
                out.extend(_EMPTY_TUPLE)
                return
            at = memo.get(id(x))
            if at is not None:
                out.extend(_binget(at))
                return
            if id(x) in building:
                raise _GiveUp  # a cycle through a tuple: pickle's POP_MARK dance
            building.add(id(x))
            out.extend(_MARK if len(x) > 3 else b"")
            for v in x:
                emit(v)
            building.discard(id(x))
            out.extend((_TUPLES[len(x)] if len(x) <= 3 else _TUPLE) + put(id(x)))
        elif cls is torch.Size:
            out.extend(const(cls, _global_op) + _ints_tuple_op(tuple(x)) + b"\x85R")
        elif cls is torch.dtype:
            out.extend(const(x, _global_op))
        elif cls is torch.device:
            out.extend(const(cls, _global_op))
            args = x.__reduce__()[1]  # ("cpu",) or ("cuda", 0)
            out.extend(b"".join(_int_op(a) if type(a) is int else _str_op(a) for a in args))
            out.extend(_TUPLES[len(args)] + _REDUCE)
        else:
            raise _GiveUp

    try:
        emit(obj)
    except (_GiveUp, RecursionError):
        return None
    out.extend(_STOP)
    return _Pickled(bytes(out), storages, nbytes, spans)


_rebuild_v2 = torch._utils._rebuild_tensor_v2
_rebuild_v3 = torch._utils._rebuild_tensor_v3
#: What torch._utils.get_tensor_metadata returns (conj/neg bits), without its type check.
_tensor_metadata: Callable[[torch.Tensor], Dict[str, bool]] = torch._C._get_tensor_metadata  # type: ignore[attr-defined]


def _flat_dict_op(d: Dict[str, bool]) -> bytes:
    """A tensor's metadata dict (``{"conj": True}``), unmemoized: it is made afresh."""
    ops = b"".join(_str_op(k) + _BOOLS[v] for k, v in d.items())
    return _EMPTY_DICT + (_MARK + ops + _SETITEMS if len(d) > 1 else ops + _SETITEM)


def _storage_alignment() -> int:
    try:
        return int(torch.serialization._get_storage_alignment())
    except AttributeError:  # older torch: fixed
        return 64


_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_DESCRIPTOR = struct.Struct("<IIII")
_DESCRIPTOR64 = struct.Struct("<IIQQ")
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")
#: The ``FB`` extra field padding a record's data to its alignment, by padding length
#: (up to torch's default alignment; longer pads are made as needed).
_PADDING = [b"FB" + pad.to_bytes(2, "little") + b"Z" * pad for pad in range(64)]


def _local_header(name: bytes, cursor: int, size: int, align: int) -> Tuple[bytes, bool]:
    """A local file header for a stored entry whose data follows it, padded (``FB`` extra
    field) so the data starts on an ``align`` boundary, as torch's writer pads."""
    start = cursor + 30 + len(name) + 4
    if size < _ZIP64_AT and cursor < _ZIP64_AT:  # the common case, in one pack
        pad = -start % align
        head = _LOCAL_HEADER.pack(0x04034B50, 0, 0x0808, 0, 0, 0, 0, 0, 0, len(name), 4 + pad)
        return head + name + (_PADDING[pad] if pad < len(_PADDING) else _padding(pad)), False
    fields: List[int] = []
    if size >= _ZIP64_AT:
        fields += [size, size]
    if cursor >= _ZIP64_AT:
        fields.append(cursor)
    z64 = b""
    if fields:
        z64 = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields)
        start += len(z64)
    pad = -start % align
    extra = z64 + _padding(pad)
    sizes = _U32 if size >= _ZIP64_AT else 0
    head = _LOCAL_HEADER.pack(
        0x04034B50, 0, 0x0808, 0, 0, 0, 0, sizes, sizes, len(name), len(extra)
    )
    return head + name + extra, bool(z64)


def _padding(pad: int) -> bytes:
    return b"FB" + struct.pack("<H", pad) + b"Z" * pad


def _pickle(obj: Any, path: Path) -> _Pickled:
    """The general path, for what :func:`_fast_pickle` leaves: :func:`_check`, then
    torch's pickling (:class:`_Pickler`)."""
    _check(path, obj, "obj", set())
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(obj)
    storages = pickler.storages
    for s in storages:
        if s.device.type not in ("cpu", "cuda"):
            raise _refuse(path, "a storage", f"it is on {s.device}, which has no bytes to write")
    nbytes = [s.nbytes() for s in storages]
    return _Pickled(buf.getvalue(), storages, nbytes, [None] * len(storages))


def _plan_torch(obj: Any, path: Path) -> _Plan:
    pickled = _fast_pickle(obj)
    if pickled is None:
        pickled = _pickle(obj, path)

    prefix = (path.name.split(".")[0] or "archive") + "/"
    align = _storage_alignment()
    small = [
        ("data.pkl", pickled.data),
        (".format_version", b"1"),
        (".storage_alignment", str(align).encode()),
        ("byteorder", sys.byteorder.encode()),
    ]
    tail = [("version", b"3\n"), (".data/serialization_id", _serialization_id())]

    plan = _Plan()
    plan.crc = True
    entries: List[Tuple[bytes, int, int, bool]] = []  # name, header offset, size, zip64
    cursor = 0

    def place(name: str, size: int) -> int:
        """Lays out the header of record ``name`` at the cursor; returns where its
        ``size`` bytes of data go."""
        nonlocal cursor
        full = (prefix + name).encode()
        head, z64 = _local_header(full, cursor, size, align)
        plan.add_fixed(head, cursor)
        entries.append((full, cursor, size, z64))
        data_at = cursor + len(head)
        cursor = data_at + size + (24 if z64 else 16)  # then its data descriptor
        return data_at

    for name, raw in small:
        plan.add(raw, len(raw), place(name, len(raw)))
    for i, (storage, size, span) in enumerate(zip(*pickled[1:])):
        at = place(f"data/{i}", size)
        if span is None:  # the storage's bytes, through a byte view of it
            span = torch.empty(0, dtype=torch.uint8, device=storage.device)
            span.set_(storage, 0, (size,), (1,))
        plan.add_tensor(span, at)
    for name, raw in tail:
        plan.add(raw, len(raw), place(name, len(raw)))
    data_ends = [r[3] + r[2] for r in plan.requests]
    cd_offset = cursor

    def finish(crcs: List[int]) -> Tail:
        """Data descriptors (they hold the CRCs), the central directory, the end records."""
        out = bytearray()
        reqs: List[Request] = []
        central = bytearray()
        for (name, at, size, z64), crc, end in zip(entries, crcs, data_ends):
            desc = (_DESCRIPTOR64 if z64 else _DESCRIPTOR).pack(0x08074B50, crc, size, size)
            reqs.append((0, len(out), len(desc), end))
            out += desc
            fields: List[int] = []
            if size >= _ZIP64_AT:
                fields += [size, size]
            if at >= _ZIP64_AT:
                fields.append(at)
            extra = b""
            if fields:
                extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields)
            central += _CENTRAL_HEADER.pack(
                0x02014B50, 0, 45 if fields else 0, 0x0808, 0, 0, 0, crc,
                _fit(size), _fit(size), len(name), len(extra), 0, 0, 0, 0, _fit(at),
            )  # fmt: skip
            central += name
            central += extra
        n = len(entries)
        eocd64_at = cd_offset + len(central)
        central += struct.pack(
            "<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, n, n, eocd64_at - cd_offset, cd_offset
        )
        central += struct.pack("<IIQI", 0x07064B50, 0, eocd64_at, 1)
        central += struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
            _fit(eocd64_at - cd_offset), _fit(cd_offset), 0,
        )  # fmt: skip
        reqs.append((0, len(out), len(central), cd_offset))
        out += central
        return [bytes(out)], reqs

    plan.finish = finish
    plan.size = cd_offset  # the central directory extends the file when written
    return plan


def _serialization_id() -> bytes:
    # torch writes 40 decimal digits (two 20-digit halves of a random 64-bit seed).
    return f"{secrets.randbits(64):020d}{secrets.randbits(64):020d}".encode()


# ---------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------


def _plan_safetensors(obj: Any, path: Path, metadata: Mapping[str, str] | None) -> _Plan:
    import json

    if not isinstance(obj, dict):
        raise _core.CheckpointError(
            f"{path}: a safetensors file holds a dict[str, Tensor], not a {type(obj).__name__}"
        )
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _core.CheckpointError(f"{path}: metadata must be a dict[str, str]")
    tensors: List[Tuple[str, torch.Tensor]] = []
    for name, t in obj.items():
        where = f"obj[{name!r}]"
        if not isinstance(name, str):
            raise _refuse(path, f"key {name!r}", "safetensors names are strings")
        if not isinstance(t, torch.Tensor):
            raise _refuse(path, where, f"a {type(t).__name__}, not a tensor")
        _check_tensor(path, where, t)
        if str(t.dtype).removeprefix("torch.") not in _ST_DTYPES:
            raise _refuse(path, where, f"safetensors has no dtype {t.dtype}")
        tensors.append((name, t))
    _refuse_shared(path, tensors)

    # As safetensors orders them: largest element first, then by name (so every tensor
    # stays aligned to its element size).
    tensors.sort(key=lambda nt: (-nt[1].element_size(), nt[0]))
    header: Dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, t in tensors:
        st, per_element = _ST_DTYPES[str(t.dtype).removeprefix("torch.")]
        shape = list(t.shape)
        if per_element != 1:
            if not shape:
                raise _refuse(path, f"obj[{name!r}]", f"a 0-d {t.dtype} has no safetensors shape")
            shape[-1] *= per_element
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": st, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    plan = _Plan()
    plan.add(len(raw).to_bytes(8, "little") + raw, 8 + len(raw), 0)
    start = 8 + len(raw)
    for name, t in tensors:
        plan.add_tensor(t.detach().contiguous(), start + header[name]["data_offsets"][0])
    plan.size = start + offset
    return plan


def _refuse_shared(path: Path, tensors: List[Tuple[str, torch.Tensor]]) -> None:
    """safetensors stores no aliasing: tensors whose bytes overlap are refused, as
    ``safetensors.torch.save_file`` refuses them."""
    spans: Dict[Tuple[str, int], List[Tuple[int, int, str]]] = {}
    for name, t in tensors:
        if t.numel() == 0:
            continue
        size = t.element_size()
        lo = int(t.storage_offset()) * size
        hi = lo + (sum((d - 1) * s for d, s in zip(t.shape, t.stride())) + 1) * size
        key = (str(t.device), t.untyped_storage().data_ptr())
        spans.setdefault(key, []).append((lo, hi, name))
    for group in spans.values():
        group.sort()
        for (_lo_a, hi_a, a), (lo_b, _, b) in zip(group, group[1:]):
            if lo_b < hi_a:
                raise _core.CheckpointError(
                    f"{path}: tensors {a!r} and {b!r} share memory; a safetensors file "
                    "cannot store that, so zeroload.save refuses it as "
                    "safetensors.torch.save_file does. Keep one name (tied weights: "
                    "safetensors.torch.save_model drops the duplicates) or save a copy: "
                    f"obj[{b!r}] = obj[{b!r}].clone()"
                )
