"""Turns what the Rust core hands out (DLPack exports, a tensor table, an object graph)
into torch objects: tensors on the requested device, views on shared storages, and the
containers `torch.load` would have returned.

Every step costs O(1) per tensor asked for, never a walk of the whole tensor table per
tensor: `zeroload.open(...).get_tensor` in a loop over 100k names stays linear."""

from __future__ import annotations

import collections
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import torch

from zeroload import _core, _cuda, _pread
from zeroload._cuda import DeviceLike, parse_device
from zeroload._layout import is_contiguous
from zeroload._procfs import proc_kib_field

MapLocation = Union[DeviceLike, Mapping[str, DeviceLike], None]
KeysFilter = Union[Iterable[str], Callable[[str], bool], None]

# Above this many bytes to copy, `progress=None` shows a bar in interactive sessions.
AUTO_PROGRESS_BYTES = 1 << 30

# Makes a torch tensor from a DLPack capsule. `torch.from_dlpack` accepts capsules (its
# documented legacy form) and hands them to `torch._C._from_dlpack`; calling that directly
# saves a Python frame per tensor (a third of the cost on loads of many small tensors).
from_capsule: Callable[[Any], torch.Tensor] = getattr(torch._C, "_from_dlpack", torch.from_dlpack)

CPU = torch.device("cpu")


def resolve_target(device: DeviceLike | None, map_location: MapLocation) -> MapLocation:
    """One target from `device` and its torch.load alias `map_location`."""
    if map_location is not None and device is not None:
        if parse_device(device) != _as_device_or_none(map_location):
            raise ValueError(
                "pass either device= or map_location= (an alias of device), not both "
                f"(got device={device!r}, map_location={map_location!r})"
            )
    target = map_location if map_location is not None else device
    if target is None:
        return CPU
    if callable(target) and not isinstance(target, (str, torch.device)):
        raise TypeError(
            "map_location callables are not supported: pass a device (e.g. 'cuda:0') or a "
            "dict mapping saved locations to devices"
        )
    if isinstance(target, Mapping):
        return {str(k): parse_device(v) for k, v in target.items()}
    return parse_device(target)


def _as_device_or_none(d: Any) -> torch.device | None:
    try:
        return parse_device(d)
    except (TypeError, ValueError):
        return None


def device_of(ckpt: _core.Checkpoint, target: MapLocation) -> Callable[[int], torch.device]:
    """Storage index -> device: one target, or torch's dict form (saved -> new)."""
    if isinstance(target, torch.device):
        return lambda _i: target
    assert isinstance(target, Mapping)

    def lookup(i: int) -> torch.device:
        saved = ckpt.storage(i)[3]
        return parse_device(target.get(saved, saved))

    return lookup


def wants_progress(progress: bool | None, nbytes: int) -> bool:
    if progress is not None:
        return bool(progress)
    return nbytes >= AUTO_PROGRESS_BYTES and _interactive()


def _interactive() -> bool:
    if hasattr(sys, "ps1") or bool(getattr(sys.flags, "interactive", 0)):
        return True
    return "ipykernel" in sys.modules or "IPython" in sys.modules


class ProgressBar:
    """A tqdm bar (notebook-aware) fed by the copy engine's (done, total) callback."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        self._bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        self._bar.close()


def cpu_storage(ckpt: _core.Checkpoint, i: int) -> torch.UntypedStorage:
    """Storage `i` as a zero-copy view of the copy-on-write mapping."""
    return torch.from_dlpack(ckpt.storage_view(i)).untyped_storage()


def progress_bar(progress: bool | None, nbytes: int, desc: str) -> ProgressBar | None:
    return ProgressBar(nbytes, desc) if wants_progress(progress, nbytes) else None


def private_cpu_storages(
    ckpt: _core.Checkpoint, ids: Sequence[int], *, progress: bool | None
) -> list[torch.UntypedStorage]:
    """Storages `ids` read into memory of their own (not views of the file): parallel
    preads by the copy engine, with the GIL released; the bar (`progress`) counts bytes."""
    dests: list[torch.Tensor] = []
    requests: list[tuple[int, int, int, int]] = []
    for i in ids:
        _key, offset, nbytes, _loc = ckpt.storage(i)
        t = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            requests.append((offset, nbytes, len(dests), 0))
        dests.append(t)
    total = sum(r[1] for r in requests)
    bar = progress_bar(progress, total, "zeroload cpu")
    try:
        if requests:
            # Only the destinations with bytes to copy (an empty tensor has no address).
            live = [dests[r[2]] for r in requests]
            renumbered = [(off, n, j, 0) for j, (off, n, _d, _o) in enumerate(requests)]
            _core.copy_to_host(ckpt, live, renumbered, None, bar)
    finally:
        if bar is not None:
            bar.close()
    return [t.untyped_storage() for t in dests]


def materialize_storages(
    ckpt: _core.Checkpoint,
    wanted: Sequence[int],
    devices: Callable[[int], torch.device],
    *,
    progress: bool | None,
    staging_bytes: int | None = None,
    private: bool = False,
) -> dict[int, torch.UntypedStorage]:
    """One torch storage per wanted storage index: zero-copy mmap views on the CPU (with
    `private`, copies of their own), one owned allocation per storage on other devices,
    filled by the copy engine."""
    out: dict[int, torch.UntypedStorage] = {}
    by_device: dict[torch.device, list[int]] = collections.defaultdict(list)
    for i in wanted:
        by_device[devices(i)].append(i)
    for device, ids in by_device.items():
        if device.type == "cpu" and private:
            unique = list(dict.fromkeys(ids))
            out.update(zip(unique, private_cpu_storages(ckpt, unique, progress=progress)))
        elif device.type == "cpu":
            for i in ids:
                out[i] = cpu_storage(ckpt, i)
        elif device.type == "cuda":
            total = sum(ckpt.storage(i)[2] for i in ids)
            bar = progress_bar(progress, total, f"zeroload {device}")
            try:
                tensors = _cuda.storage_tensors(
                    ckpt, ids, device, progress=bar, budget=staging_bytes
                )
            finally:
                if bar is not None:
                    bar.close()
            for i, t in zip(ids, tensors):
                out[i] = t.untyped_storage()
        else:
            # Other backends (mps, xpu...): pread in bounded pieces through a bounce
            # buffer, one storage at a time.
            for i in ids:
                out[i] = read_storage_to(ckpt, i, device).untyped_storage()
    return out


def read_storage_to(ckpt: _core.Checkpoint, i: int, device: torch.device) -> torch.Tensor:
    """Storage `i` as a 1-D uint8 tensor of its own on `device`, read with `pread` at most
    `_pread.CHUNK` bytes at a time (never through the mapping)."""
    _key, offset, nbytes, _loc = ckpt.storage(i)
    out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    bounce = torch.empty(_pread.bounce_size(nbytes, 1), dtype=torch.uint8)

    def consume(start: int, length: int) -> None:
        out[start : start + length].copy_(bounce[:length])

    _pread.read_pieces(ckpt, offset, nbytes, 1, bounce, consume)
    return out


def read_span(ckpt: _core.Checkpoint, i: int) -> torch.Tensor:
    """Tensor `i` as a view on a CPU copy of the bytes it spans in its storage, read with
    `pread` (never through the mapping): for tensors laid out non-contiguously in the
    file (a transposed view saved by torch.save), which no run of bytes holds."""
    s, dtype_name, shape, stride, storage_offset, _rg = ckpt.tensor(i)
    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    _key, offset, _nbytes, _loc = ckpt.storage(s)
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    lo = storage_offset + sum((n - 1) * st for n, st in zip(shape, stride) if st < 0)
    hi = storage_offset + sum((n - 1) * st for n, st in zip(shape, stride) if st > 0)
    span = (hi - lo + 1) * itemsize
    buf = torch.empty(span, dtype=torch.uint8)
    _pread.read_into(ckpt, offset + lo * itemsize, span, buf)
    t = torch.empty(0, dtype=dtype)
    t.set_(buf.untyped_storage(), storage_offset - lo, shape, stride)
    return t


def fill_from_file(
    ckpt: _core.Checkpoint, i: int, dest: torch.Tensor, via: torch.dtype | None = None
) -> None:
    """`dest.copy_(tensor i)` (cast to `via` first, if given, then to `dest`'s dtype as
    `copy_` does) with the bytes read by `pread` at most `_pread.CHUNK` at a time through
    a bounce buffer, never through the mapping. `dest`: shaped like tensor `i`, on any
    device, any layout `copy_` takes."""
    s, dtype_name, shape, stride, storage_offset, _rg = ckpt.tensor(i)
    dtype = getattr(torch, dtype_name)
    if math.prod(shape) == 0:
        return
    cast = via is not None and via != dtype
    if not is_contiguous(shape, stride):
        src = read_span(ckpt, i)
        with torch.no_grad():
            dest.copy_(src.to(via) if cast else src)
        return
    itemsize = torch.empty((), dtype=dtype).element_size()
    _key, offset, _nbytes, _loc = ckpt.storage(s)
    # Whole rows of the first dimension (a 0-d tensor: one element) per piece.
    inner = list(shape[1:])
    row = math.prod(inner) * itemsize
    nbytes = math.prod(shape) * itemsize
    bounce = torch.empty(_pread.bounce_size(nbytes, row), dtype=torch.uint8)
    flat = dest.reshape(1, *shape) if not shape else dest

    def consume(start: int, length: int) -> None:
        piece = bounce[:length].view(dtype).view(length // row, *inner)
        with torch.no_grad():
            flat[start // row : (start + length) // row].copy_(piece.to(via) if cast else piece)

    _pread.read_pieces(ckpt, offset + storage_offset * itemsize, nbytes, row, bounce, consume)


def read_cast(ckpt: _core.Checkpoint, i: int, dtype: torch.dtype) -> torch.Tensor:
    """Tensor `i` cast to `dtype`, in memory of its own, read by `fill_from_file`."""
    shape = ckpt.tensor(i)[2]
    out = torch.empty(shape, dtype=dtype)
    fill_from_file(ckpt, i, out, dtype)
    return out


def view(ckpt: _core.Checkpoint, i: int, storage: torch.UntypedStorage) -> torch.Tensor:
    """Tensor `i` of the table as a view (dtype, shape, stride, offset) on `storage`."""
    _s, dtype_name, shape, stride, offset, requires_grad = ckpt.tensor(i)
    t = torch.empty(0, dtype=getattr(torch, dtype_name), device=storage.device)
    t.set_(storage, offset, shape, stride)
    if requires_grad:
        t.requires_grad_(True)
    return t


def cpu_tensors(
    ckpt: _core.Checkpoint,
    wanted: Sequence[int] | None,
    storages: dict[int, torch.UntypedStorage],
) -> list[torch.Tensor | None]:
    """CPU tensors for a load, indexed like the tensor table (None for those not asked
    for). A tensor that is its whole, unshared storage (every safetensors tensor, most of
    a state dict) comes from one typed DLPack export, so torch makes tensor and storage in
    one call; the others are views on storages made once each (kept in `storages`), so
    tensors that shared a storage in the file share it here too."""
    out: list[torch.Tensor | None] = ckpt.export_tensors(wanted, from_capsule)
    for i in range(len(out)) if wanted is None else wanted:
        if out[i] is None:
            s = ckpt.tensor(i)[0]
            storage = storages.get(s)
            if storage is None:
                storage = storages[s] = cpu_storage(ckpt, s)
            out[i] = view(ckpt, i, storage)
    return out


def device_tensors(
    ckpt: _core.Checkpoint,
    wanted: Sequence[int] | None,
    storages: Mapping[int, torch.UntypedStorage],
) -> list[torch.Tensor | None]:
    """Views on materialised storages, indexed like the tensor table."""
    out: list[torch.Tensor | None] = [None] * ckpt.num_tensors
    for i in range(len(out)) if wanted is None else wanted:
        out[i] = view(ckpt, i, storages[ckpt.tensor(i)[0]])
    return out


def tensor_on(ckpt: _core.Checkpoint, i: int, device: torch.device) -> torch.Tensor:
    """Tensor `i` alone on `device` (the lazy handles' `get_tensor`)."""
    if device.type == "cpu":
        t = ckpt.export_tensor(i, from_capsule)
        if t is not None:
            return t
    s = ckpt.tensor(i)[0]
    storages = materialize_storages(ckpt, [s], lambda _s: device, progress=False)
    return view(ckpt, i, storages[s])


class _Builder:
    """What the Rust object-graph walk calls back into for torch-specific objects."""

    def __init__(
        self,
        ckpt: _core.Checkpoint,
        tensors: list[torch.Tensor | None],
        storages: dict[int, torch.UntypedStorage],
        cpu: bool,
    ) -> None:
        self.tensors = tensors
        self._ckpt = ckpt
        self._storages = storages
        self._cpu = cpu

    @staticmethod
    def size(dims: tuple[int, ...]) -> torch.Size:
        return torch.Size(dims)

    @staticmethod
    def device(name: str) -> torch.device:
        return torch.device(name)

    @staticmethod
    def dtype(name: str) -> torch.dtype:
        return getattr(torch, name)

    @staticmethod
    def parameter(t: torch.Tensor | None, requires_grad: bool) -> torch.Tensor | None:
        if t is None:
            return None
        return torch.nn.Parameter(t, requires_grad=requires_grad)

    def storage(self, i: int) -> Any:
        s = self._storages.get(i)
        if s is None and self._cpu:
            # A storage saved by itself; tensors on it (if any) were built on this one.
            s = self._storages[i] = cpu_storage(self._ckpt, i)
        return s


# Floating-point dtypes that `dtype=` leaves alone: torch cannot convert the packed
# 4-bit float (two values per byte) to anything.
_NOT_CASTABLE = {getattr(torch, "float4_e2m1fn_x2", None)}


def castable(t: torch.Tensor | None, dtype: torch.dtype) -> bool:
    return t is not None and casts(t.dtype, dtype)


def casts(file_dtype: torch.dtype, dtype: torch.dtype | None) -> bool:
    """Whether `dtype=` casts tensors of `file_dtype` (floating-point ones, but the
    packed 4-bit float)."""
    return (
        dtype is not None
        and file_dtype.is_floating_point
        and file_dtype != dtype
        and file_dtype not in _NOT_CASTABLE
    )


def cast(
    tensors: list[torch.Tensor | None],
    dtype: torch.dtype | None,
    progress: bool | None = None,
    ckpt: _core.Checkpoint | None = None,
) -> list:
    """`dtype=`: floating-point tensors are cast (each a new tensor, so a copy: `progress`
    shows a bar counting the bytes cast), others kept. `ckpt`: the tensors are CPU views
    of its file, indexed like its tensor table; those cast are read from the file with
    `pread` in bounded pieces (`read_cast`), never through the mapping."""
    if dtype is None:
        return tensors
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, not {dtype!r}")
    todo = [t for t in tensors if castable(t, dtype)]
    total = sum(t.numel() * t.element_size() for t in todo if t is not None)
    bar = progress_bar(progress, total, f"zeroload cast to {dtype}") if todo else None
    out: list[torch.Tensor | None] = []
    done = 0
    try:
        for i, t in enumerate(tensors):
            if castable(t, dtype):
                assert t is not None
                if ckpt is None:
                    out.append(t.to(dtype))
                else:
                    out.append(read_cast(ckpt, i, dtype).requires_grad_(t.requires_grad))
                if bar is not None:
                    done += t.numel() * t.element_size()
                    bar(done, total)
            else:
                out.append(t)
    finally:
        if bar is not None:
            bar.close()
    return out


def select_keys(ckpt: _core.Checkpoint, keys: KeysFilter) -> list[tuple[str, int]]:
    """The (name, tensor index) pairs a `keys=` filter selects, in checkpoint order."""
    flat = ckpt.flat_tensors()
    if flat is None:
        raise ValueError(
            f"{ckpt.path}: keys= needs a checkpoint that is a flat dict of tensors (a state "
            "dict); this one holds other objects, load it whole instead"
        )
    if callable(keys):
        return [(n, i) for n, i in flat if keys(n)]
    if isinstance(keys, str):
        keys = [keys]
    wanted = list(keys)  # type: ignore[arg-type]
    names = {n for n, _ in flat}
    missing = [k for k in wanted if k not in names]
    if missing:
        raise KeyError(missing_key_message(ckpt.path, missing[0], names))
    chosen = set(wanted)
    return [(n, i) for n, i in flat if n in chosen]


def missing_key_message(path: Any, key: str, names: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(names), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{os.fspath(path)}: no tensor named {key!r}{hint}"


class Readahead:
    """The `readahead=` policy of one load (shared by the files of a shard set).

    True: always; False: never; None (auto): while the bytes scheduled so far fit in half
    the memory the kernel reports available, so readahead never evicts what it read
    before the weights are touched."""

    def __init__(self, setting: bool | None) -> None:
        if setting is not None and not isinstance(setting, bool):
            raise TypeError(f"readahead must be True, False or None, not {setting!r}")
        self._budget: int | None = None
        self._on = setting is not False
        if setting is None:
            available = _mem_available()
            self._on = available is not None
            self._budget = (available or 0) // 2

    def start(self, ckpt: _core.Checkpoint, storages: Sequence[int] | None) -> None:
        """Reads `storages` (all when None) of `ckpt` ahead."""
        if self._on:
            self._spend(ckpt.readahead(storages, self._budget))

    def start_ranges(self, ckpt: _core.Checkpoint, ranges: Sequence[tuple[int, int]]) -> None:
        """Reads byte ranges `(offset, nbytes)` of `ckpt`'s file ahead, in order."""
        if self._on and ranges:
            self._spend(ckpt.readahead_ranges(ranges, self._budget))

    def _spend(self, scheduled: int) -> None:
        if self._budget is not None:
            self._budget = max(0, self._budget - scheduled)


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where unknown)."""
    return proc_kib_field("/proc/meminfo", b"MemAvailable")


def load_checkpoint(
    ckpt: _core.Checkpoint,
    target: MapLocation,
    *,
    dtype: torch.dtype | None,
    keys: KeysFilter,
    progress: bool | None,
    staging_bytes: int | None = None,
    readahead: Readahead | None = None,
    private: bool = False,
) -> Any:
    """Loads one open checkpoint: see `zeroload.load`. `private`: CPU tensors are read
    into memory of their own rather than mapped (`mmap=False`)."""
    if keys is None:
        selection = None
        wanted_tensors = None
        wanted_storages: list[int] | None = None
    else:
        selection = select_keys(ckpt, keys)
        wanted_tensors = [i for _, i in selection]
        wanted_storages = sorted({ckpt.tensor(i)[0] for i in wanted_tensors})
    cpu = isinstance(target, torch.device) and target.type == "cpu" and not private
    storages: dict[int, torch.UntypedStorage]
    if cpu:
        if readahead is not None:
            readahead.start(ckpt, wanted_storages)
        storages = {}
        tensors = cpu_tensors(ckpt, wanted_tensors, storages)
    else:
        devices = device_of(ckpt, target)
        ids = range(ckpt.num_storages) if wanted_storages is None else wanted_storages
        storages = materialize_storages(
            ckpt, ids, devices, progress=progress, staging_bytes=staging_bytes, private=private
        )
        tensors = device_tensors(ckpt, wanted_tensors, storages)
    cast_tensors = cast(tensors, dtype, progress, ckpt if cpu else None)
    result = ckpt.build(_Builder(ckpt, cast_tensors, storages, cpu))
    if selection is not None:
        chosen = {n for n, _ in selection}
        for name in [k for k in result if k not in chosen]:
            del result[name]
    return result
