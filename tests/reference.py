"""Comparison against torch's own loaders, shared by the test modules."""

from __future__ import annotations

import collections
from typing import Any

import torch


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as bytes (works for every dtype, float8 and bool included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


def assert_tensor_same(ours: torch.Tensor, ref: torch.Tensor, where: str = "") -> None:
    assert type(ours) is type(ref), f"{where}: {type(ours)} != {type(ref)}"
    assert ours.dtype == ref.dtype, f"{where}: dtype {ours.dtype} != {ref.dtype}"
    assert ours.shape == ref.shape, f"{where}: shape {ours.shape} != {ref.shape}"
    assert ours.stride() == ref.stride(), f"{where}: stride {ours.stride()} != {ref.stride()}"
    assert ours.storage_offset() == ref.storage_offset(), f"{where}: storage_offset"
    assert ours.requires_grad == ref.requires_grad, f"{where}: requires_grad"
    assert ours.untyped_storage().nbytes() == ref.untyped_storage().nbytes(), f"{where}: nbytes"
    assert torch.equal(raw_bytes(ours), raw_bytes(ref)), f"{where}: values differ"


def assert_same(ours: Any, ref: Any, where: str = "root") -> None:
    """Same structure, container types, key order, plain values and tensors."""
    assert type(ours) is type(ref), f"{where}: {type(ours).__name__} != {type(ref).__name__}"
    if isinstance(ref, torch.Tensor):
        assert_tensor_same(ours, ref, where)
    elif isinstance(ref, dict):
        assert list(ours.keys()) == list(ref.keys()), f"{where}: keys/order differ"
        for k in ref:
            assert_same(ours[k], ref[k], f"{where}[{k!r}]")
        if isinstance(ref, collections.OrderedDict):
            assert hasattr(ours, "_metadata") == hasattr(ref, "_metadata"), f"{where}: _metadata"
            if hasattr(ref, "_metadata"):
                assert_same(ours._metadata, ref._metadata, f"{where}._metadata")
    elif isinstance(ref, (list, tuple)):
        assert len(ours) == len(ref), f"{where}: length {len(ours)} != {len(ref)}"
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(ref, float) and ref != ref:
        assert ours != ours, f"{where}: expected nan"
    else:
        assert ours == ref, f"{where}: {ours!r} != {ref!r}"


def tensors_in(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested structure, by path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors_in(v, f"{prefix}[{k!r}]"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors_in(v, f"{prefix}[{i}]"))
    return out


def assert_sharing_same(ours: Any, ref: Any) -> None:
    """Tensors that share a storage in torch's result share one in ours, and only those."""
    a, b = tensors_in(ours), tensors_in(ref)
    names = list(b)

    def groups(ts: dict[str, torch.Tensor]) -> set[frozenset[str]]:
        by_ptr: dict[int, set[str]] = collections.defaultdict(set)
        for n in names:
            if ts[n].untyped_storage().nbytes():
                by_ptr[ts[n].untyped_storage().data_ptr()].add(n)
        return {frozenset(g) for g in by_ptr.values()}

    assert groups(a) == groups(b)
