"""`zeroload.load`: a drop-in for `torch.load(path, weights_only=True)`."""

from __future__ import annotations

import os
from typing import Any

import torch

from zeroload import _core, _shards, _torch
from zeroload._core import CheckpointError
from zeroload._device import DeviceLike
from zeroload._torch import KeysFilter, MapLocation


def load(
    path: str | os.PathLike,
    device: DeviceLike | None = None,
    *,
    dtype: torch.dtype | None = None,
    keys: KeysFilter = None,
    progress: bool | None = None,
    map_location: MapLocation = None,
    weights_only: bool = True,
    mmap: bool | None = True,
    staging_bytes: int | None = None,
    readahead: bool | None = None,
) -> Any:
    """Load a checkpoint the way `torch.load(path, weights_only=True)` would.

    Args:
        path: a `.safetensors` file, a `torch.save` zip file (`.pt`, `.pth`, `.bin`), a
            Hugging Face shard index (`*.index.json`) or a model directory.
        device: "cpu" (default: tensors are copy-on-write views of the file), "cuda",
            "cuda:N" or a `torch.device` (each storage copied once to the device).
        dtype: cast floating-point tensors to this dtype (on the target device).
        keys: names, or a predicate on names, of the tensors to load (flat state dicts
            only); other tensors are never read.
        progress: show a progress bar; None shows one for big device loads in
            interactive sessions.
        map_location: `torch.load`'s name for `device`; also accepts its dict form
            (saved location -> device).
        weights_only: must stay True: zeroload never executes code from a checkpoint.
        mmap: accepted for drop-in use; CPU loads are always memory-mapped.
        staging_bytes: size of the pinned staging ring for GPU loads (default 256 MiB,
            or the ZEROLOAD_STAGING_BYTES environment variable).
        readahead: CPU loads only. The tensors come back at once as views of the file;
            their bytes are read from disk when first touched. With readahead, a
            background thread asks the kernel to read the loaded tensors' bytes into the
            page cache right away, in file order, so the first pass over the weights (a
            forward pass, a `.to("cuda")`) finds them in memory instead of faulting pages
            in from disk one at a time. Nothing is mapped into the process: the RSS stays
            where it was until tensors are touched. None (default): on while the bytes
            fit in half the memory the kernel reports available; True: always; False:
            never (e.g. when you will touch only a few of the tensors).

    Returns:
        For torch files, what `torch.load` returns (same containers, key order and
        values; tensors that shared a storage still do). For safetensors files and shard
        sets, a `dict[str, Tensor]` in `safe_open(...).keys()` order.

    Raises:
        CheckpointError: the file is malformed, truncated, hostile or unsupported.
        FileNotFoundError: the path does not exist.
        CudaError: CUDA is unavailable or a CUDA call failed.
    """
    if not weights_only:
        raise ValueError(
            "zeroload.load(weights_only=False) is not supported: zeroload never executes "
            "code from a checkpoint. Checkpoints holding only tensors, containers and plain "
            "values load with the default weights_only=True."
        )
    del mmap  # CPU tensors are always views of a private mapping.
    target = _torch.resolve_target(device, map_location)
    policy = _torch.Readahead(readahead)
    shard_set = _shards.resolve(path)
    options: dict[str, Any] = dict(
        dtype=dtype, progress=progress, staging_bytes=staging_bytes, readahead=policy
    )
    if len(shard_set.files) == 1 and shard_set.weight_map is None:
        ckpt = _core.Checkpoint.open(os.fspath(shard_set.files[0]))
        return _torch.load_checkpoint(ckpt, target, keys=keys, **options)
    return _load_shards(shard_set, target, keys, options)


def _load_shards(
    shard_set: _shards.ShardSet, target: MapLocation, keys: KeysFilter, options: dict
) -> dict:
    weight_map = shard_set.weight_map or {}
    if keys is not None and not callable(keys):
        wanted = [keys] if isinstance(keys, str) else list(keys)
        unknown = [k for k in wanted if k not in weight_map]
        if unknown:
            raise KeyError(_torch.missing_key_message(shard_set.index, unknown[0], weight_map))
        keys = set(wanted).__contains__
    merged: dict[str, Any] = {}
    for file, names in shard_set.names_by_file().items():
        expected = names if keys is None else [n for n in names if keys(n)]
        if not expected:
            continue
        here = set(expected)
        ckpt = _core.Checkpoint.open(os.fspath(file))
        part = _torch.load_checkpoint(ckpt, target, keys=here.__contains__, **options)
        for name, tensor in part.items():
            if name in merged:
                raise CheckpointError(f"{file}: tensor {name!r} also appears in another shard")
            merged[name] = tensor
        if len(part) != len(here):
            missing = sorted(here - part.keys())
            raise CheckpointError(
                f"{file}: the index {shard_set.index} places {missing[0]!r} here, "
                "but the shard does not hold it"
            )
    return merged
