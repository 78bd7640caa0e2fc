"""Turns what the Rust core hands out (DLPack storages, a tensor table, an object graph)
into torch objects: storages on the requested device, tensor views on them, and the
containers `torch.load` would have returned."""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import torch

from zeroload import _core, _device
from zeroload._device import DeviceLike, parse_device

MapLocation = Union[DeviceLike, Mapping[str, DeviceLike], None]
KeysFilter = Union[Iterable[str], Callable[[str], bool], None]

# Above this many bytes to copy, `progress=None` shows a bar in interactive sessions.
AUTO_PROGRESS_BYTES = 1 << 30


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
        return torch.device("cpu")
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


def storage_devices(ckpt: _core.Checkpoint, target: MapLocation) -> list[torch.device]:
    """The device of every storage: one target, or torch's dict form (saved -> new)."""
    if isinstance(target, torch.device):
        return [target] * ckpt.num_storages
    assert isinstance(target, Mapping)
    out = []
    for i in range(ckpt.num_storages):
        saved = ckpt.storage(i)[3]
        out.append(parse_device(target.get(saved, saved)))
    return out


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


def materialize_storages(
    ckpt: _core.Checkpoint,
    wanted: Sequence[int],
    devices: Sequence[torch.device],
    *,
    progress: bool | None,
    staging_bytes: int | None = None,
) -> dict[int, torch.UntypedStorage]:
    """One torch storage per wanted storage index: zero-copy mmap views on the CPU, one
    owned allocation per storage on other devices, filled by the copy engine."""
    out: dict[int, torch.UntypedStorage] = {}
    by_device: dict[torch.device, list[int]] = collections.defaultdict(list)
    for i in wanted:
        by_device[devices[i]].append(i)
    for device, ids in by_device.items():
        if device.type == "cpu":
            for i in ids:
                out[i] = torch.from_dlpack(ckpt.storage_view(i)).untyped_storage()
        elif device.type == "cuda":
            total = sum(ckpt.storage(i)[2] for i in ids)
            bar = (
                ProgressBar(total, f"zeroload {device}")
                if wants_progress(progress, total)
                else None
            )
            try:
                tensors = _device.materialize_storages(
                    ckpt, ids, device, progress=bar, budget=staging_bytes
                )
            finally:
                if bar is not None:
                    bar.close()
            for i, t in zip(ids, tensors):
                out[i] = t.untyped_storage()
        else:
            # Other backends (mps, xpu...): read through the mapping, one storage at a time.
            for i in ids:
                cpu = torch.from_dlpack(ckpt.storage_view(i))
                out[i] = cpu.to(device).untyped_storage()
    return out


def make_tensors(
    ckpt: _core.Checkpoint,
    storages: Mapping[int, torch.UntypedStorage],
    wanted: Iterable[int] | None = None,
) -> list[torch.Tensor | None]:
    """Views (dtype, shape, stride, offset) on the materialised storages, indexed like the
    checkpoint's tensor table; None for tensors not asked for."""
    table = ckpt.tensors()
    selected = range(len(table)) if wanted is None else wanted
    out: list[torch.Tensor | None] = [None] * len(table)
    empty = torch.empty
    for i in selected:
        storage_index, dtype_name, shape, stride, offset, requires_grad = table[i]
        storage = storages[storage_index]
        t = empty(0, dtype=getattr(torch, dtype_name), device=storage.device)
        t.set_(storage, offset, shape, stride)
        if requires_grad:
            t.requires_grad_(True)
        out[i] = t
    return out


class _Builder:
    """What the Rust object-graph walk calls back into for torch-specific objects."""

    def __init__(self, tensors: list[torch.Tensor | None], storages: Mapping[int, Any]) -> None:
        self.tensors = tensors
        self._storages = storages

    @staticmethod
    def ordered_dict() -> collections.OrderedDict:
        return collections.OrderedDict()

    @staticmethod
    def counter(d: dict) -> collections.Counter:
        return collections.Counter(d)

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
    def parameter(t: torch.Tensor | None, requires_grad: bool) -> torch.nn.Parameter | None:
        if t is None:
            return None
        return torch.nn.Parameter(t, requires_grad=requires_grad)

    def storage(self, i: int) -> Any:
        return self._storages.get(i)


def cast(tensors: list[torch.Tensor | None], dtype: torch.dtype | None) -> list:
    """`dtype=`: floating-point tensors are cast, others kept."""
    if dtype is None:
        return tensors
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, not {dtype!r}")
    return [
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t
        for t in tensors
    ]


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


def load_file(
    path: str | os.PathLike,
    target: MapLocation,
    *,
    dtype: torch.dtype | None,
    keys: KeysFilter,
    progress: bool | None,
    staging_bytes: int | None = None,
) -> Any:
    """Loads one checkpoint file: see `zeroload.load`."""
    ckpt = _core.Checkpoint.open(os.fspath(path))
    devices = storage_devices(ckpt, target)
    if keys is None:
        wanted_tensors = None
        wanted_storages = list(range(ckpt.num_storages))
    else:
        selection = select_keys(ckpt, keys)
        wanted_tensors = [i for _, i in selection]
        wanted_storages = sorted({ckpt.tensor(i)[0] for i in wanted_tensors})
    storages = materialize_storages(
        ckpt, wanted_storages, devices, progress=progress, staging_bytes=staging_bytes
    )
    tensors = cast(make_tensors(ckpt, storages, wanted_tensors), dtype)
    result = ckpt.build(_Builder(tensors, storages))
    if keys is not None:
        chosen = {n for n, _ in selection}
        for name in [k for k in result if k not in chosen]:
            del result[name]
    return result
