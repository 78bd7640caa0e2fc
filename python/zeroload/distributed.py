"""`torch.distributed.checkpoint` integration: `StorageReader`.

    import torch.distributed.checkpoint as dcp
    import zeroload.distributed

    state_dict = model.state_dict()          # DTensors of a TP / FSDP2 model, or tensors
    dcp.load(state_dict, storage_reader=zeroload.distributed.StorageReader("model_dir"))

A drop-in for `torch.distributed.checkpoint.HuggingFaceStorageReader` (same FQNs: the
tensor names in the files) that reads every format zeroload reads: Hugging Face model
directories and shard indexes (safetensors or `.bin`), single `.safetensors` files and
`torch.save` files (`.pt`, `.pth`, `.bin`). Each rank reads only the rectangles its
state dict asks for, straight into the destination tensors (host `preadv` or the CUDA
staging ring), with no intermediate copy of the checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import StorageReader as _DCPStorageReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.futures import Future

from zeroload import _core, _shards, _slices, _torch
from zeroload._core import CheckpointError

__all__ = ["StorageReader"]

# Sharded safetensors files written by HuggingFaceStorageWriter(save_distributed=True)
# record each tensor's offset in the full tensor under this metadata key.
_DCP_SHARDING_INFO = "DCP_SHARDING_INFO"
_SAVED_OFFSETS = "saved_offsets"


@dataclass
class _TensorItem:
    """Where one stored chunk lies: file and index in its tensor table."""

    file: str
    tensor: int


@dataclass
class _BytesItem:
    """A non-tensor value of a torch.save file (an int, a string...), handed to the planner
    as `torch.save` bytes, as DCP's own checkpoints store them."""

    value: Any


class StorageReader(_DCPStorageReader):
    """A `torch.distributed.checkpoint` storage reader for any checkpoint zeroload reads.

    Args:
        path: a model directory, a shard index (`*.index.json`), a `.safetensors` file or
            a `torch.save` file.
        thread_count: reader threads per copy for CPU destinations (default: up to 8);
            named like `HuggingFaceStorageReader`'s argument.

    FQNs are the names in the checkpoint. Nested `torch.save` files (`{"model": sd,
    "step": 3}`) are flattened the way DCP flattens state dicts (`"model.layer.weight"`),
    and their non-tensor values load through `LoadPlanner.load_bytes`. Safetensors shard
    files carrying DCP's `DCP_SHARDING_INFO` metadata (HuggingFaceStorageWriter with
    `save_distributed=True`) are read as chunks of their full tensors.

    Example::

        dcp.load(model.state_dict(), storage_reader=StorageReader("Llama-3-8B/"))
    """

    def __init__(self, path: str | os.PathLike, *, thread_count: int | None = None) -> None:
        super().__init__()
        self.path: str | os.PathLike = path
        self.thread_count = thread_count
        self.storage_data: dict[MetadataIndex, _TensorItem | _BytesItem] = {}
        self.load_id = uuid.uuid4().hex
        self._ckpts: dict[str, _core.Checkpoint] = {}

    @property
    def checkpoint_id(self) -> str | os.PathLike:
        """The checkpoint being read (what `dcp.load(checkpoint_id=...)` sets)."""
        return self.path

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self.storage_data = {}
        self._ckpts = {}
        if checkpoint_id:
            self.path = checkpoint_id
        self.load_id = uuid.uuid4().hex

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        """Whether `checkpoint_id` names a checkpoint this reader can open."""
        try:
            _files(checkpoint_id)
        except (OSError, ValueError, TypeError):
            return False
        return True

    def _open(self, file: str) -> _core.Checkpoint:
        ckpt = self._ckpts.get(file)
        if ckpt is None:
            ckpt = self._ckpts[file] = _core.Checkpoint.open(file)
        return ckpt

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Every tensor of the checkpoint (names, dtypes, shapes) from the files' headers;
        no tensor data is read."""
        shard_set = _shard_set(self.path)
        sd_meta: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        storage: dict[MetadataIndex, _TensorItem | _BytesItem] = {}
        for file in shard_set.files:
            f = os.fspath(file)
            ckpt = self._open(f)
            for fqn, item in _items(ckpt, f, shard_set.file_tensors(file, ckpt)):
                if isinstance(item, _BytesItem):
                    if fqn in sd_meta:
                        raise _shards.duplicate(f, repr(fqn), "another file")
                    sd_meta[fqn] = BytesStorageMetadata()
                    storage[MetadataIndex(fqn)] = item
                    continue
                _storage, dtype_name, shape, _stride, _off, _rg = ckpt.tensor(item.tensor)
                offsets = _saved_offsets(ckpt, fqn, len(shape))
                index = MetadataIndex(fqn, offsets)
                if index in storage:
                    other = getattr(storage[index], "file", "another file")
                    what = f"tensor {fqn!r} (at offset {list(offsets)})"
                    raise _shards.duplicate(f, what, other)
                storage[index] = item
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(shape))
                md = sd_meta.get(fqn)
                if md is None:
                    sd_meta[fqn] = TensorStorageMetadata(
                        properties=TensorProperties(dtype=getattr(torch, dtype_name)),
                        size=torch.Size(o + n for o, n in zip(offsets, shape)),
                        chunks=[chunk],
                    )
                elif isinstance(md, TensorStorageMetadata) and len(md.size) == len(shape):
                    md.chunks.append(chunk)
                    md.size = torch.Size(max(s, o + n) for s, o, n in zip(md.size, offsets, shape))
                else:
                    raise CheckpointError(f"{f}: tensor {fqn!r} disagrees with another file")
        self.storage_data = storage
        return Metadata(
            state_dict_metadata=sd_meta,
            storage_data=storage,
            storage_meta=StorageMeta(checkpoint_id=self.path, load_id=self.load_id),
        )

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        if metadata.storage_data is None:
            raise ValueError("the checkpoint metadata has no storage_data")
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Reads every item of this rank's plan: tensor rectangles straight into the
        tensors `planner.resolve_tensor` gives (then `commit_tensor`), non-tensor values
        through `planner.load_bytes`."""
        reads: list[_slices.SliceRead] = []
        tensor_items = []
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            if item.type == LoadItemType.BYTE_IO:
                if not isinstance(info, _BytesItem):
                    raise CheckpointError(f"{item.storage_index.fqn!r} is a tensor, not bytes")
                buf = io.BytesIO()
                torch.save(info.value, buf)
                buf.seek(0)
                planner.load_bytes(item, buf)
                continue
            if not isinstance(info, _TensorItem):
                raise CheckpointError(f"{item.storage_index.fqn!r} is not a tensor")
            ckpt = self._open(info.file)
            target = planner.resolve_tensor(item).detach()
            ranges = [[(o, o + n)] for o, n in zip(item.storage_offsets, item.lengths)]
            reads.append(
                _slices.SliceRead(item.storage_index.fqn, ckpt, info.tensor, ranges, target)
            )
            tensor_items.append((item, target))
        _slices.read(reads, threads=self.thread_count)
        for item, target in tensor_items:
            planner.commit_tensor(item, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


def _files(path: str | os.PathLike) -> list[str]:
    """The checkpoint's files (see `_shard_set`)."""
    return [os.fspath(f) for f in _shard_set(path).files]


def _shard_set(path: str | os.PathLike) -> _shards.ShardSet:
    """The checkpoint's files: as `zeroload.load` resolves `path`, or, for a directory
    with no index, every `.safetensors` file in it (what HuggingFaceStorageReader reads:
    the shard files of `HuggingFaceStorageWriter(save_distributed=True)` have none)."""
    try:
        return _shards.resolve(path)
    except FileNotFoundError:
        p = os.fspath(path)
        if not os.path.isdir(p):
            raise
        found = sorted(
            Path(p, n)
            for n in os.listdir(p)
            if n.endswith(".safetensors") and os.path.isfile(os.path.join(p, n))
        )
        if not found:
            raise
        return _shards.ShardSet(files=found)


def _saved_offsets(ckpt: _core.Checkpoint, fqn: str, ndim: int) -> tuple[int, ...]:
    meta = ckpt.metadata
    if not meta or _DCP_SHARDING_INFO not in meta:
        return (0,) * ndim
    try:
        info = json.loads(meta[_DCP_SHARDING_INFO])
        offsets = tuple(int(o) for o in info[fqn][_SAVED_OFFSETS])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{ckpt.path}: {_DCP_SHARDING_INFO} metadata has no valid offsets for {fqn!r} ({e})"
        ) from None
    if len(offsets) != ndim or any(o < 0 for o in offsets):
        raise CheckpointError(
            f"{ckpt.path}: {_DCP_SHARDING_INFO} gives {fqn!r} offsets {list(offsets)} for a "
            f"{ndim}-d tensor"
        )
    return offsets


def _items(
    ckpt: _core.Checkpoint, file: str, flat: list[tuple[str, int]] | None
) -> Iterator[tuple[str, _TensorItem | _BytesItem]]:
    """`(fqn, item)` of every value in one file, in file order; `flat`: the file's
    `(name, tensor index)` pairs when it is a flat dict of tensors or a file of a directory
    of per-tensor files (`ShardSet.file_tensors`), None for other checkpoints."""
    if flat is not None:
        for name, i in flat:
            yield name, _TensorItem(file, i)
        return
    # A torch.save file holding more than a flat dict of tensors: build its objects with
    # meta tensors standing in for the tensors, and flatten them as DCP flattens state
    # dicts.
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    builder = _PlaceholderBuilder(ckpt)
    tree = ckpt.build(builder)
    if not isinstance(tree, dict):
        raise CheckpointError(
            f"{file}: holds a {type(tree).__name__}, not a dict; torch.distributed.checkpoint "
            "loads dicts"
        )
    flat_tree, _mapping = flatten_state_dict(tree)
    for fqn, value in flat_tree.items():
        index = builder.index.get(id(value)) if isinstance(value, torch.Tensor) else None
        if index is not None:
            yield fqn, _TensorItem(file, index)
        elif isinstance(value, torch.Tensor):
            raise CheckpointError(f"{file}: {fqn!r} is a tensor zeroload cannot place")
        else:
            yield fqn, _BytesItem(value)


class _PlaceholderBuilder(_torch._Builder):
    """Builds a checkpoint's objects with a meta tensor (right dtype and shape, no data)
    for each tensor, remembering which tensor each stands for; containers, sizes, devices
    and dtypes as `zeroload.load` builds them."""

    def __init__(self, ckpt: _core.Checkpoint) -> None:
        self.tensors: list[torch.Tensor | None] = []
        self.index: dict[int, int] = {}
        self._path = ckpt.path
        for i, (_s, dtype_name, shape, stride, _o, _rg) in enumerate(ckpt.tensors()):
            t = torch.empty_strided(shape, stride, dtype=getattr(torch, dtype_name), device="meta")
            self.tensors.append(t)
            self.index[id(t)] = i

    @staticmethod
    def parameter(t: torch.Tensor | None, requires_grad: bool) -> torch.Tensor | None:
        return t  # the placeholder itself: its identity says which tensor it is

    def storage(self, i: int) -> Any:
        raise CheckpointError(
            f"{self._path}: holds a bare storage (#{i}) outside any tensor; "
            "torch.distributed.checkpoint cannot load it"
        )
