"""Tensor memory layout arithmetic shared by the loaders and the CLI (torch-free leaf)."""

from __future__ import annotations

from collections.abc import Sequence


def is_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Row-major dense, as ``torch.Tensor.is_contiguous`` has it (dimensions of size 1 may
    have any stride)."""
    expected = 1
    for d, s in zip(reversed(shape), reversed(stride)):
        if d != 1 and s != expected:
            return False
        expected *= d
    return True
