"""The spellings users bring from the APIs zeroload replaces: safe_open's `filename=`,
`backend=` on `load` as on `open`, `mmap=` on `load_bytes` as on `load` (and `mmap=None`,
torch.load's default). Each is compared with the library it comes from; the old
spellings keep working (their own tests are in test_parity.py and test_load.py)."""

from __future__ import annotations

import gc
import io
import os
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import training_checkpoint
from reference import assert_same
from safetensors import safe_open

import zeroload


@pytest.fixture
def st_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(
        {"w": torch.arange(4096, dtype=torch.int64), "b": torch.ones(3, 5)},
        path,
        metadata={"format": "pt"},
    )
    return path


def test_open_takes_safe_opens_filename_keyword(st_file: Path) -> None:
    with safe_open(filename=str(st_file), framework="pt", device="cpu") as theirs:
        want = {k: theirs.get_tensor(k) for k in theirs.keys()}
        their_meta = theirs.metadata()
    with zeroload.open(filename=st_file, framework="pt", device="cpu") as f:
        assert f.keys() == sorted(want)
        assert f.metadata() == their_meta
        for k in want:
            assert_same(f.get_tensor(k), want[k], k)
    with zeroload.SafeOpen(filename=str(st_file)) as f:
        assert_same(f.get_tensor("w"), want["w"])
    with zeroload.open(filename=st_file, backend="pread") as f:
        assert_same(f.get_tensor("b"), want["b"])
    # The positional path still works, and exactly one of the two must be given.
    with zeroload.open(st_file, "pt") as f:
        assert_same(f.get_tensor("w"), want["w"])
    with pytest.raises(TypeError, match="both path and filename"):
        zeroload.open(st_file, filename=st_file)
    with pytest.raises(TypeError, match="needs a path"):
        zeroload.open()
    with pytest.raises(FileNotFoundError):
        zeroload.open(filename=st_file.with_name("missing.safetensors"))


def _rewrite_tail(path: Path) -> None:
    """Zeroes the last 32 KiB of `path` in place (the mmap hazard's trigger)."""
    with open(path, "r+b") as out:
        out.seek(-8 * 4096, os.SEEK_END)
        out.write(bytes(8 * 4096))


def test_load_takes_backend_as_open_does(st_file: Path) -> None:
    want = safetensors.torch.load_file(st_file)
    private = zeroload.load(st_file, backend="pread")
    mapped = zeroload.load(st_file, backend="mmap")
    default = zeroload.load(st_file, mmap=None)  # torch.load's default: maps, as True
    for sd in (private, mapped, default):
        assert list(sd) == sorted(want)
        for k in want:
            assert_same(sd[k], want[k], k)
    # "pread" is mmap=False: a snapshot; "mmap" and mmap=None are views of the file.
    _rewrite_tail(st_file)
    assert private["w"][-1] == 4095
    assert mapped["w"][-1] == 0
    assert default["w"][-1] == 0
    with pytest.raises(ValueError, match="backend must be 'mmap' or 'pread'"):
        zeroload.load(st_file, backend="mmapp")
    with pytest.raises(ValueError, match="contradict"):
        zeroload.load(st_file, mmap=False, backend="mmap")


def test_load_backend_on_torch_files_and_file_objects(tmp_path: Path) -> None:
    ckpt = training_checkpoint()
    path = tmp_path / "c.pth"
    torch.save(ckpt, path)
    ref = torch.load(path, weights_only=True)
    assert_same(zeroload.load(path, backend="pread"), ref)
    with open(path, "rb") as f:
        assert_same(zeroload.load(f, backend="pread"), ref)


def _memfd_maps() -> int:
    """How many mappings of zeroload's in-memory files this process has."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sum("/memfd:zeroload" in line for line in maps)


def test_load_bytes_takes_mmap(tmp_path: Path) -> None:
    ckpt = training_checkpoint()
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    data = buf.getvalue()
    ref = torch.load(io.BytesIO(data), weights_only=True)
    for mmap in (True, None, False):
        assert_same(zeroload.load_bytes(data, mmap=mmap), ref)
    st = safetensors.torch.save({"w": torch.arange(256, dtype=torch.int32)})
    assert_same(zeroload.load_bytes(st, mmap=False), safetensors.torch.load(st))
    if sys.platform != "linux":
        return
    # mmap=False: the tensors own their memory and the in-memory file is gone with the
    # call; the default keeps it mapped as long as its tensors live.
    gc.collect()
    before = _memfd_maps()
    private = zeroload.load_bytes(st, mmap=False)
    gc.collect()
    assert _memfd_maps() == before
    mapped = zeroload.load_bytes(st)
    assert _memfd_maps() == before + 1
    assert_same(private["w"], mapped["w"])
    del mapped
    gc.collect()
    assert _memfd_maps() == before
