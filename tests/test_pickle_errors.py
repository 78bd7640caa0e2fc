"""Refusals of pickled code raise what torch.load(weights_only=True) raises,
`pickle.UnpicklingError`, so existing `except` clauses keep working, and are still
`zeroload.CheckpointError`s naming the file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

import zeroload
from zeroload._core import ForbiddenGlobalError


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


@pytest.fixture(params=["whole module", "os.system", "arbitrary class in a state dict"])
def refused(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / "refused.pth"
    obj = {
        "whole module": lambda: _Net(),
        "os.system": lambda: {"w": torch.zeros(2), "x": _Evil()},
        "arbitrary class in a state dict": lambda: {"w": torch.zeros(2), "cfg": Path("x")},
    }[request.param]()
    torch.save(obj, path)
    return path


def test_torch_raises_unpickling_error_on_the_same_file(refused: Path) -> None:
    with pytest.raises(pickle.UnpicklingError):  # the reference behaviour
        torch.load(refused, weights_only=True)


def test_load_refusal_is_unpickling_error_and_checkpoint_error(refused: Path) -> None:
    with pytest.raises(pickle.UnpicklingError, match="allow-list") as e:
        zeroload.load(refused)
    assert isinstance(e.value, zeroload.CheckpointError)
    assert isinstance(e.value, ValueError)
    assert type(e.value) is ForbiddenGlobalError
    assert str(refused) in str(e.value)


def test_open_refusal_is_unpickling_error(refused: Path) -> None:
    with pytest.raises(pickle.UnpicklingError):
        zeroload.open(refused)


def test_existing_except_clauses_keep_working(refused: Path) -> None:
    def load_or_none(loader):  # code written for torch.load
        try:
            return loader(refused)
        except pickle.UnpicklingError:
            return None

    assert load_or_none(lambda p: torch.load(p, weights_only=True)) is None
    assert load_or_none(zeroload.load) is None


def test_malformed_files_are_checkpoint_errors_only(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(zeroload.CheckpointError) as e:
        zeroload.load(bad)
    assert not isinstance(e.value, pickle.UnpicklingError)


def test_the_type_is_documented_and_named() -> None:
    assert ForbiddenGlobalError.__module__ == "zeroload"
    assert ForbiddenGlobalError.__name__ == "ForbiddenGlobalError"
    assert "UnpicklingError" in (ForbiddenGlobalError.__doc__ or "")
    assert issubclass(ForbiddenGlobalError, zeroload.CheckpointError)
    assert issubclass(ForbiddenGlobalError, pickle.UnpicklingError)
