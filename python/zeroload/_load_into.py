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
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.modules.module import _IncompatibleKeys

from zeroload import _core, _dtensor, _shards, _torch
from zeroload._cuda import DeviceLike
from zeroload._layout import is_contiguous


class _Entry(NamedTuple):
    file: Path
    ckpt: _core.Checkpoint
    tensor: int


def _entries(path: str | os.PathLike[str]) -> dict[str, _Entry]:
    """Every tensor name of the checkpoint (all shards), in file order."""
    index = _shards.tensor_index(
        _shards.resolve(path),
        "load_into needs a state dict (a flat dict of name -> tensor); this checkpoint "
        "holds other objects. Load it with zeroload.load and pass the state dict to "
        "module.load_state_dict",
    )
    out: dict[str, _Entry] = {}
    for file, ckpt, part in zip(index.files, index.ckpts, index.names):
        out.update(zip(part, map(_Entry, repeat(file), repeat(ckpt), part.values())))
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
    strict: bool = True,
    *,
    device: DeviceLike | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> _IncompatibleKeys:
    """Load the checkpoint at `path` into `module`'s parameters and buffers.

    Args:
        module: the module to fill. Meta-device tensors are replaced (assigned) by loaded
            ones; materialised tensors are overwritten in place (their `data_ptr()` stays).
            Build it inside `with zeroload.init_empty():` to get parameters on the meta
            device and buffers computed.
        path: a checkpoint file, shard index or model directory (as `zeroload.load`).
        strict: raise on missing or unexpected keys, as `load_state_dict` does (and
            positionally too: `load_into(model, path, False)`), and on parameters or
            buffers that would stay on the meta device.
        device: where meta-device tensors are loaded (default "cpu"). Materialised tensors
            stay where they are.
        dtype: cast floating-point tensors of the checkpoint to this dtype first (then,
            for materialised tensors, to the tensor's own dtype, as `copy_` does).
        progress: show a progress bar (tqdm) for the bytes copied: into materialised
            tensors (CPU or GPU) and, for meta-device tensors, to a GPU. Meta-device
            tensors loaded on the CPU are views of the file, so nothing is copied and no
            bar is shown. None shows one for copies over 1 GB in interactive sessions.

    Tied parameters (one `Parameter` registered under several names, such as a language
    model's `lm_head.weight` and `embed_tokens.weight`) are satisfied by any one of their
    names in the checkpoint (checkpoints store them once), read once, and stay one object
    under every name. Were several of the names in the checkpoint, the last (in the
    module's order) is read, as the last copy wins in `load_state_dict`.

    Returns:
        `(missing_keys, unexpected_keys)`, like `Module.load_state_dict`. With
        `strict=False`, `missing_keys` also lists every parameter or buffer left on the
        meta device (a non-persistent buffer included).

    Raises:
        RuntimeError: size mismatches (always); with strict, missing/unexpected keys and
            parameters or buffers that would stay on the meta device, worded like
            `load_state_dict`'s errors. Nothing is written then.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"load_into expects an nn.Module, not {type(module).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, not {strict!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, not {dtype!r}")
    entries = _entries(path)
    targets: dict[str, torch.Tensor] = module.state_dict(keep_vars=True)
    ties = _tie_groups(targets)

    # Each target with a checkpoint tensor: the name it is read from (for tied targets,
    # the last of their names the checkpoint holds).
    source: dict[str, str] = {}
    for k in targets:
        if k in source:
            continue
        group = ties.get(k, (k,))
        present = [n for n in group if n in entries]
        if present:
            for n in group:
                source[n] = present[-1]
    missing = [k for k in targets if k not in source]
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
    for k in targets:
        if k not in entries:
            continue
        e = entries[k]
        file_shape = torch.Size(e.ckpt.tensor(e.tensor)[2])
        if file_shape != targets[k].shape:
            msgs.append(
                f"size mismatch for {k}: copying a param with shape {file_shape} from "
                f"checkpoint, the shape in current model is {targets[k].shape}."
            )
    on_meta = _left_on_meta(module, {id(targets[k]) for k in source})
    if strict and on_meta:
        msgs.append(
            "Left on the meta device (the checkpoint has nothing for them): {}. Buffers "
            "that no checkpoint holds (non-persistent ones, such as a rotary inv_freq) are "
            "computed when the model is built inside `with zeroload.init_empty():` "
            "(parameters on meta, buffers real) instead of `torch.device('meta')`; or "
            "materialise these before loading; strict=False lists them in "
            "missing_keys. ".format(", ".join(f'"{k}"' for k in on_meta))
        )
    if msgs:
        raise _error(module, msgs)

    # One name per target object is read: the name its bytes come from.
    shared = [k for k in targets if source.get(k) == k]
    shared, _ = _dtensor.partition(targets, shared)
    dtensors = [k for k in source if _dtensor.is_dtensor(targets[k])]
    if dtensors:  # each rank reads only its shard
        # Every name of a tied DTensor, each mapped to the entry it is read from: the
        # DTensor loader reads each object once and assigns it under all of its names
        # together (FSDP2's load hooks then see the whole tie).
        by_target = {k: entries[source[k]] for k in dtensors}
        _dtensor.load(module, targets, by_target, dtensors, device=device, dtype=dtype)
    meta = [k for k in shared if targets[k].is_meta]
    live = [k for k in shared if not targets[k].is_meta]
    if live:
        _fill_in_place(targets, entries, live, dtype, progress)
    if meta:
        _assign(module, entries, meta, device, dtype, progress)
    _retie(module, ties, source)
    listed = set(missing)
    missing.extend(k for k in on_meta if k not in listed)
    return _IncompatibleKeys(missing, unexpected)


def _tie_groups(targets: dict[str, torch.Tensor]) -> dict[str, tuple[str, ...]]:
    """The names of every target registered under several names (one object), each
    mapped to all of its names in the module's order."""
    by_object: dict[int, list[str]] = {}
    for k, t in targets.items():
        by_object.setdefault(id(t), []).append(k)
    out: dict[str, tuple[str, ...]] = {}
    for names in by_object.values():
        if len(names) > 1:
            group = tuple(names)
            for k in group:
                out[k] = group
    return out


def _left_on_meta(module: torch.nn.Module, loaded: set[int]) -> list[str]:
    """Every parameter and buffer of `module` (non-persistent buffers too, under each
    name) that is on the meta device and not among the `loaded` objects."""
    out: list[str] = []
    for named in (
        module.named_parameters(remove_duplicate=False),
        module.named_buffers(remove_duplicate=False),
    ):
        for k, t in named:
            if t.is_meta and id(t) not in loaded and not _dtensor.is_dtensor(t):
                out.append(k)
    return out


def _retie(
    module: torch.nn.Module, ties: dict[str, tuple[str, ...]], source: dict[str, str]
) -> None:
    """After loading, every name of a tied target holds the object its source name holds
    (assigning a loaded tensor replaces only the source name's)."""
    done: set[tuple[str, ...]] = set()
    for group in ties.values():
        if group in done or group[0] not in source:
            continue
        done.add(group)
        obj = _attr(module, source[group[0]])
        for n in group:
            owner, _, leaf = n.rpartition(".")
            sub = module.get_submodule(owner)
            if getattr(sub, leaf) is not obj:
                setattr(sub, leaf, obj)


def _attr(module: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    t: torch.Tensor = getattr(module.get_submodule(owner), leaf)
    return t


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
        ckpt = entries[keys[0]].ckpt
        if ckpt.single_tensor() is not None:  # a file of a per-tensor directory
            (name,) = keys
            loaded[name] = _torch.load_checkpoint(
                ckpt, target, dtype=dtype, keys=None, progress=progress, readahead=readahead
            )
            continue
        loaded.update(
            _torch.load_checkpoint(
                ckpt,
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
                    from zeroload import _cuda

                    _cuda.copy_into(ckpt, dests, requests, dev, progress=bar)
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
