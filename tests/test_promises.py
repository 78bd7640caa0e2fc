"""Small promises of the README and ARCHITECTURE.md, each with a test that fails when it
stops being true: a refused dtype export refuses only that call, a handle closed under a
lookup says it is closed, convert never deletes a file it did not create."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import zeroload
from zeroload import _convert, _core, _torch


def test_a_failed_dtype_export_refuses_only_that_call(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(4.0), "b": torch.ones(3), "c": torch.zeros(2)}, path)
    ckpt = _core.Checkpoint.open(path)
    calls = []

    def flaky(capsule: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("transient refusal")
        return _torch.from_capsule(capsule)

    # Within the call that failed, the dtype is not asked for again...
    assert ckpt.export_tensors(None, flaky) == [None, None, None]
    assert len(calls) == 1
    # ...but the next call asks again, and gets tensors.
    got = ckpt.export_tensors(None, flaky)
    assert all(isinstance(t, torch.Tensor) for t in got)
    assert ckpt.export_tensor(0, flaky) is not None
    assert torch.equal(zeroload.load(path)["a"], torch.arange(4.0))


def test_close_racing_lookups_raises_the_closed_handle_error(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    names = [f"t{i}" for i in range(64)]
    save_file({n: torch.full((4,), float(i)) for i, n in enumerate(names)}, path)
    errors: list[BaseException] = []
    for _round in range(20):
        f = zeroload.open(path)
        start = threading.Barrier(5)

        def reader(h: zeroload.SafeOpen = f, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                for _ in range(50):
                    for n in names:
                        h.get_tensor(n)
                        h.get_slice(n)
                    h.offset_keys()
                    h.get_tensors()
            except zeroload.CheckpointError as e:
                assert "closed" in str(e), e
            except BaseException as e:  # IndexError, KeyError: the race
                errors.append(e)

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        start.wait()
        f.close()
        for t in threads:
            t.join()
    assert not errors, errors[:3]


def test_close_in_the_middle_of_a_lookup_is_answered_consistently(tmp_path: Path) -> None:
    # Deterministic form of the race above: close() runs inside the index lookup of
    # get_tensor, after the name was found. The lookup still answers from what it read.
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(3.0)}, path)
    f = zeroload.open(path)

    class ClosingIndex(dict):  # type: ignore[type-arg]
        def __getitem__(self, key: str) -> tuple[int, int]:
            value = super().__getitem__(key)
            f.close()
            return value

    f._index = ClosingIndex(f._index)
    assert torch.equal(f.get_tensor("a"), torch.arange(3.0))
    with pytest.raises(zeroload.CheckpointError, match="closed"):
        f.get_tensor("a")


def test_convert_leaves_a_file_it_did_not_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = tmp_path / "m.pth", tmp_path / "m.safetensors"
    torch.save({"w": torch.ones(3)}, src)
    # Another file already holds convert's temporary name: convert fails, and the file
    # stays as it was.
    squatter = dst.with_name(f".{dst.name}.{os.getpid()}.zeroload-tmp")
    squatter.write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        _convert.convert(src, dst)
    assert squatter.read_bytes() == b"not ours"
    assert not dst.exists()
    squatter.unlink()

    # A failure after creating it removes the temporary it created.
    def boom(*_a: object) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(_convert, "_write_tensor", boom)
        with pytest.raises(OSError, match="disk full"):
            _convert.convert(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]
    _convert.convert(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth", "m.safetensors"]
