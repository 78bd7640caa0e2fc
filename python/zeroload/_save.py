"""``zeroload.save``: write a checkpoint as ``torch.save`` or ``safetensors`` would, atomically.

The format follows the suffix, as loading does: ``.safetensors`` -> a safetensors file,
anything else -> a ``torch.save`` zip. The whole file is laid out in memory first (the
pickle, zip headers, offsets), the object is checked to be loadable with
``torch.load(weights_only=True)`` before a byte is written, and then tensor bytes go
straight from tensor memory to the file through ``zeroload._writer`` (parallel positional
writes in Rust, a temporary file renamed over ``path``). CUDA tensors go through
:func:`_write_cuda` (device -> pinned staging -> file).

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
from typing import Any, Callable, Dict, List, Mapping, Tuple

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
        self.fixed: List[Tuple[bytes, int]] = []  # (bytes, file offset): no CRC needed

    def add(self, source: Any, nbytes: int, file_offset: int) -> None:
        self.requests.append((len(self.sources), 0, nbytes, file_offset))
        self.sources.append(source)

    def add_tensor(self, t: torch.Tensor, file_offset: int) -> None:
        """Bytes of the contiguous tensor ``t`` at ``file_offset`` (CPU: zero-copy)."""
        nbytes = t.numel() * t.element_size()
        if nbytes == 0:
            self.requests.append((-1, 0, 0, file_offset))  # keeps CRC order; skipped
            return
        if t.device.type == "cuda":
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
        for raw, at in self.fixed:
            host.append((len(sources), 0, len(raw), at))
            sources.append(raw)
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


def _storage_alignment() -> int:
    try:
        return int(torch.serialization._get_storage_alignment())
    except AttributeError:  # older torch: fixed
        return 64


def _local_header(name: bytes, cursor: int, size: int, align: int) -> Tuple[bytes, bool]:
    """A local file header for a stored entry whose data follows it, padded (``FB`` extra
    field) so the data starts on an ``align`` boundary, as torch's writer pads."""
    start = cursor + 30 + len(name) + 4
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
    extra = z64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
    sizes = _U32 if size >= _ZIP64_AT else 0
    head = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 0, 0x0808, 0, 0, 0, 0, sizes, sizes, len(name), len(extra)
    )
    return head + name + extra, bool(z64)


def _plan_torch(obj: Any, path: Path) -> _Plan:
    _check(path, obj, "obj", set())
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(obj)
    storages = pickler.storages
    for s in storages:
        if s.device.type not in ("cpu", "cuda"):
            raise _refuse(path, "a storage", f"it is on {s.device}, which has no bytes to write")

    prefix = (path.name.split(".")[0] or "archive") + "/"
    align = _storage_alignment()
    small = [
        ("data.pkl", buf.getvalue()),
        (".format_version", b"1"),
        (".storage_alignment", str(align).encode()),
        ("byteorder", sys.byteorder.encode()),
    ]
    tail = [("version", b"3\n"), (".data/serialization_id", _serialization_id())]
    records: List[Tuple[str, Any, int]] = [(n, b, len(b)) for n, b in small]
    records += [(f"data/{i}", s, s.nbytes()) for i, s in enumerate(storages)]
    records += [(n, b, len(b)) for n, b in tail]

    plan = _Plan()
    plan.crc = True
    entries: List[Tuple[bytes, int, int, bool]] = []  # name, data offset, size, zip64
    cursor = 0
    for name, payload, size in records:
        full = (prefix + name).encode()
        head, z64 = _local_header(full, cursor, size, align)
        plan.fixed.append((head, cursor))
        data_at = cursor + len(head)
        entries.append((full, cursor, size, z64))
        if isinstance(payload, bytes):
            plan.add(payload, size, data_at)
        else:
            t = torch.empty(0, dtype=torch.uint8, device=payload.device)
            plan.add_tensor(t.set_(payload, 0, (size,), (1,)), data_at)
        cursor = data_at + size + (24 if z64 else 16)
    data_ends = [r[3] + r[2] for r in plan.requests]
    cd_offset = cursor

    def finish(crcs: List[int]) -> Tail:
        """Data descriptors (they hold the CRCs), the central directory, the end records."""
        out = bytearray()
        reqs: List[Request] = []
        central = bytearray()
        for (name, at, size, z64), crc, end in zip(entries, crcs, data_ends):
            desc = struct.pack("<IIQQ" if z64 else "<IIII", 0x08074B50, crc, size, size)
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
            central += struct.pack(
                "<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 45 if fields else 0, 0x0808, 0, 0, 0, crc,
                _fit(size), _fit(size), len(name), len(extra), 0, 0, 0, 0, _fit(at),
            )  # fmt: skip
            central += name + extra
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
