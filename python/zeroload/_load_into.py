"""`zeroload.load_into(module, path)`: load a checkpoint into an `nn.Module`.

- Parameters and buffers on the meta device are loaded with `zeroload.load` and assigned
  (`load_state_dict(..., assign=True)`): no memory is allocated twice.
- Materialised parameters and buffers (CPU or CUDA) are filled in place: when the file's
  dtype and shape match and both sides are contiguous, the bytes go straight from the
  file into the existing storage (host: parallel `pread`; CUDA: pinned staging ring and
  async copies), with no intermediate tensor. Other cases (dtype casts, non-contiguous
  tensors, other devices) load that tensor and `copy_` it, as `load_state_dict` would.
- Missing and unexpected keys and size mismatches are reported like
  `Module.load_state_dict` reports them, but before anything is written.

Each file is opened and parsed once; everything after works from that parse, and every
step costs O(1) per tensor.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.modules.module import _IncompatibleKeys

from zeroload import _core, _dtensor, _shards, _torch
from zeroload._core import CheckpointError
from zeroload._device import DeviceLike
from zeroload._inspect import is_contiguous


class _Entry(NamedTuple):
    file: Path
    ckpt: _core.Checkpoint
    tensor: int


def _entries(path: str | os.PathLike[str]) -> dict[str, _Entry]:
    """Every tensor name of the checkpoint (all shards), in file order."""
    shard_set = _shards.resolve(path)
    out: dict[str, _Entry] = {}
    for file in shard_set.files:
        ckpt = _core.Checkpoint.open(os.fspath(file))
        flat = ckpt.flat_tensors()
        if flat is None:
            raise CheckpointError(
                f"{file}: load_into needs a state dict (a flat dict of name -> tensor); this "
                "checkpoint holds other objects. Load it with zeroload.load and pass the "
                "state dict to module.load_state_dict"
            )
        for name, i in flat:
            if name in out:
                raise CheckpointError(f"{file}: tensor {name!r} also appears in {out[name].file}")
            out[name] = _Entry(file, ckpt, i)
    return out


def _error(module: torch.nn.Module, msgs: list[str]) -> RuntimeError:
    return RuntimeError(
        "Error(s) in loading state_dict for {}:\n\t{}".format(
            module.__class__.__name__, "\n\t".join(msgs)
        )
    )


def load_into(
    module: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    device: DeviceLike | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    progress: bool | None = None,
) -> _IncompatibleKeys:
    """Load the checkpoint at `path` into `module`'s parameters and buffers.

    Args:
        module: the module to fill. Meta-device tensors are replaced (assigned) by loaded
            ones; materialised tensors are overwritten in place (their `data_ptr()` stays).
        path: a checkpoint file, shard index or model directory (as `zeroload.load`).
        device: where meta-device tensors are loaded (default "cpu"). Materialised tensors
            stay where they are.
        dtype: cast floating-point tensors of the checkpoint to this dtype first (then,
            for materialised tensors, to the tensor's own dtype, as `copy_` does).
        strict: raise on missing or unexpected keys, as `load_state_dict` does.
        progress: show a progress bar (tqdm) for the bytes copied: into materialised
            tensors (CPU or GPU) and, for meta-device tensors, to a GPU. Meta-device
            tensors loaded on the CPU are views of the file, so nothing is copied and no
            bar is shown. None shows one for copies over 1 GB in interactive sessions.

    Returns:
        `(missing_keys, unexpected_keys)`, like `Module.load_state_dict`.

    Raises:
        RuntimeError: size mismatches (always), missing/unexpected keys (with strict),
            worded like `load_state_dict`'s errors; nothing is written then.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"load_into expects an nn.Module, not {type(module).__name__}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, not {dtype!r}")
    entries = _entries(path)
    targets: dict[str, torch.Tensor] = module.state_dict(keep_vars=True)

    missing = [k for k in targets if k not in entries]
    unexpected = [k for k in entries if k not in targets]
    msgs: list[str] = []
    if strict:
        if missing:
            msgs.append(
                "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing))
            )
        if unexpected:
            msgs.append(
                "Unexpected key(s) in state_dict: {}. ".format(
                    ", ".join(f'"{k}"' for k in unexpected)
                )
            )
    shared = [k for k in targets if k in entries]
    for k in shared:
        e = entries[k]
        file_shape = torch.Size(e.ckpt.tensor(e.tensor)[2])
        if file_shape != targets[k].shape:
            msgs.append(
                f"size mismatch for {k}: copying a param with shape {file_shape} from "
                f"checkpoint, the shape in current model is {targets[k].shape}."
            )
    if msgs:
        raise _error(module, msgs)

    shared, dtensors = _dtensor.partition(targets, shared)
    if dtensors:  # each rank reads only its shard
        _dtensor.load(module, targets, entries, dtensors, device=device, dtype=dtype)
    meta = [k for k in shared if targets[k].is_meta]
    live = [k for k in shared if not targets[k].is_meta]
    if live:
        _fill_in_place(targets, entries, live, dtype, progress)
    if meta:
        _assign(module, entries, meta, device, dtype, progress)
    return _IncompatibleKeys(missing, unexpected)


def _load_entries(
    entries: dict[str, _Entry],
    names: list[str],
    device: DeviceLike,
    dtype: torch.dtype | None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """`zeroload.load(..., keys=names)` on the already parsed files."""
    by_file: dict[Path, list[str]] = {}
    for k in names:
        by_file.setdefault(entries[k].file, []).append(k)
    target = _torch.resolve_target(device, None)
    readahead = _torch.Readahead(None)
    loaded: dict[str, torch.Tensor] = {}
    for keys in by_file.values():
        loaded.update(
            _torch.load_checkpoint(
                entries[keys[0]].ckpt,
                target,
                dtype=dtype,
                keys=set(keys).__contains__,
                progress=progress,
                readahead=readahead,
            )
        )
    return loaded


def _assign(
    module: torch.nn.Module,
    entries: dict[str, _Entry],
    names: list[str],
    device: DeviceLike | None,
    dtype: torch.dtype | None,
    progress: bool | None,
) -> None:
    sd = _load_entries(entries, names, "cpu" if device is None else device, dtype, progress)
    result = module.load_state_dict(sd, strict=False, assign=True)
    # Everything asked for is in `sd` and the module: nothing can be missing here that
    # the caller did not already hear about.
    assert not result.unexpected_keys, result


def _fill_in_place(
    targets: dict[str, torch.Tensor],
    entries: dict[str, _Entry],
    names: list[str],
    dtype: torch.dtype | None,
    progress: bool | None,
) -> None:
    # (file, device) -> {destination range: (name, file offset, nbytes)}; a later name
    # with the same destination (tied parameters) replaces an earlier one, as the last
    # `copy_` wins in load_state_dict.
    direct: dict[tuple[Path, torch.device], dict[tuple[int, int], tuple[str, int, int]]] = {}
    fallback: list[str] = []
    for k in names:
        t = targets[k]
        e = entries[k]
        storage, dtype_name, shape, stride, storage_offset, _rg = e.ckpt.tensor(e.tensor)
        file_dtype = getattr(torch, dtype_name)
        want_dtype = dtype if dtype is not None and file_dtype.is_floating_point else file_dtype
        nbytes = math.prod(shape) * t.element_size()
        if (
            want_dtype == file_dtype == t.dtype
            and t.device.type in ("cpu", "cuda")
            and t.layout == torch.strided
            and not t.is_conj()
            and not t.is_neg()
            and t.is_contiguous()
            and is_contiguous(shape, stride)
            and nbytes > 0
        ):
            _key, offset, _n, _loc = e.ckpt.storage(storage)
            file_offset = offset + storage_offset * t.element_size()
            group = direct.setdefault((e.file, t.device), {})
            group[(t.data_ptr(), nbytes)] = (k, file_offset, nbytes)
        elif nbytes > 0 or t.numel() > 0:
            fallback.append(k)

    with torch.no_grad():
        for (_file, dev), group in direct.items():
            ranges = sorted(group)
            # Partially overlapping destinations (views of one storage under two names)
            # cannot be copied concurrently: send them the slow way, in key order.
            clash: set[tuple[int, int]] = set()
            for a, b in zip(ranges, ranges[1:]):
                if b[0] < a[0] + a[1]:
                    clash.update((a, b))
            for r in clash:
                fallback.append(group.pop(r)[0])
            if not group:
                continue
            # Each destination is the parameter's own tensor (detached: DLPack will not
            # export tensors that require grad); the core reads its address and size.
            dests = [targets[k].detach() for k, _off, _n in group.values()]
            requests = [(off, n, j, 0) for j, (_k, off, n) in enumerate(group.values())]
            ckpt = entries[next(iter(group.values()))[0]].ckpt
            total = sum(n for _k, _off, n in group.values())
            bar = _torch.progress_bar(progress, total, f"zeroload {dev}")
            try:
                if dev.type == "cpu":
                    _core.copy_to_host(ckpt, dests, requests, None, bar)
                else:
                    from zeroload import _device

                    _device.copy_into(ckpt, dests, requests, dev, progress=bar)
            finally:
                if bar is not None:
                    bar.close()
        if fallback:
            slow = set(fallback)
            _copy_fallback(targets, entries, [k for k in names if k in slow], dtype)


def _copy_fallback(
    targets: dict[str, torch.Tensor],
    entries: dict[str, _Entry],
    names: list[str],
    dtype: torch.dtype | None,
) -> None:
    """`copy_`s each tensor (cast to `dtype` first if asked) into its target, reading it
    with `pread` in bounded pieces (`_torch.fill_from_file`), never through the mapping:
    a file truncated meanwhile raises `CheckpointError`."""
    for k in names:
        e = entries[k]
        file_dtype = getattr(torch, e.ckpt.tensor(e.tensor)[1])
        via = dtype if _torch.casts(file_dtype, dtype) else None
        _torch.fill_from_file(e.ckpt, e.tensor, targets[k], via)
