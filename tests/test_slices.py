"""Sliced reads: rectangles of checkpoint tensors (per dimension, a list of index ranges)
read straight into destination tensors, reading at most twice the selected bytes. The
planner behind DTensor loading and the distributed StorageReader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import random_tensor
from reference import raw_bytes

from zeroload import CheckpointError, _core, _slices

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.complex64, torch.bool]


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def expected(full: torch.Tensor, ranges: list) -> torch.Tensor:
    t = full
    for d, rs in enumerate(ranges):
        idx = [i for a, b in rs for i in range(a, b)]
        t = t.index_select(d, torch.tensor(idx, dtype=torch.long))
    return t


def open_tensor(path: Path, name: str) -> tuple[_core.Checkpoint, int]:
    ckpt = _core.Checkpoint.open(path)
    return ckpt, dict(ckpt.flat_tensors())[name]


def read_rect(path: Path, name: str, ranges: list, out: torch.Tensor, **kw) -> _slices.Stats:
    ckpt, i = open_tensor(path, name)
    return _slices.read([_slices.SliceRead(name, ckpt, i, ranges, out, **kw)])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slices")
    sd = {f"t_{str(dt)[6:]}": random_tensor((13, 7, 5), dt, seed=i) for i, dt in enumerate(DTYPES)}
    sd["big"] = torch.randn(4096, 256)
    safetensors.torch.save_file(sd, d / "m.safetensors")
    # torch.save keeps a transposed view as it is: a tensor laid out non-contiguously.
    torch.save({**sd, "transposed": sd["t_float32"][:, :, 0].t()}, d / "m.pth")
    return {"safetensors": d / "m.safetensors", "pth": d / "m.pth"}


def reference(files: dict[str, Path], fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "safetensors":
        return safetensors.torch.load_file(files[fmt])
    return torch.load(files[fmt], weights_only=True)


RECTANGLES = [
    [[(0, 13)], [(0, 7)], [(0, 5)]],  # whole
    [[(4, 9)], [(0, 7)], [(0, 5)]],  # Shard(0)
    [[(0, 13)], [(3, 7)], [(0, 5)]],  # Shard(1)
    [[(0, 13)], [(0, 7)], [(2, 3)]],  # Shard(2): one element per run
    [[(0, 3), (8, 13)], [(1, 2), (4, 7)], [(0, 5)]],  # _StridedShard-like
    [[(2, 5), (2, 5)], [(0, 7)], [(1, 4)]],  # the same rows twice
    [[(5, 5)], [(0, 7)], [(0, 5)]],  # empty
]


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ranges", RECTANGLES)
def test_rectangles_match_indexing(files: dict, fmt: str, dtype: torch.dtype, ranges) -> None:
    name = f"t_{str(dtype)[6:]}"
    want = expected(reference(files, fmt)[name], ranges)
    out = torch.full_like(want, 1) if want.numel() else torch.empty_like(want)
    read_rect(files[fmt], name, ranges, out)
    assert torch.equal(raw_bytes(out), raw_bytes(want))


def test_strided_destination_is_filled_in_place(files: dict) -> None:
    full = reference(files, "safetensors")["t_float32"]
    big = torch.zeros(13, 20, 5)
    view = big[:, 4:11]  # not contiguous
    ptr = view.data_ptr()
    read_rect(files["safetensors"], "t_float32", [[(0, 13)], [(0, 7)], [(0, 5)]], view)
    assert view.data_ptr() == ptr
    assert torch.equal(raw_bytes(big[:, 4:11]), raw_bytes(full))
    assert big[:, :4].count_nonzero() == 0 and big[:, 11:].count_nonzero() == 0


def test_other_dtypes_and_devices_go_through_a_cast(files: dict) -> None:
    full = reference(files, "safetensors")["t_float32"]
    ranges = [[(0, 13)], [(2, 6)], [(0, 5)]]
    out = torch.empty(13, 4, 5, dtype=torch.float64)
    read_rect(files["safetensors"], "t_float32", ranges, out)
    assert torch.equal(out, full[:, 2:6].double())
    # via: cast to bf16 first (load_into's dtype=), then to the destination's dtype.
    out = torch.empty(13, 4, 5)
    read_rect(files["safetensors"], "t_float32", ranges, out, via=torch.bfloat16)
    assert torch.equal(out, full[:, 2:6].bfloat16().float())


def test_tensor_laid_out_non_contiguously_in_the_file(files: dict) -> None:
    full = torch.load(files["pth"], weights_only=True)["transposed"]
    assert not full.is_contiguous()
    ranges = [[(1, 4)], [(2, 11)]]
    out = torch.empty(3, 9)
    read_rect(files["pth"], "transposed", ranges, out)
    assert torch.equal(out, full[1:4, 2:11])


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_read_stay_within_twice_the_selection(files: dict, world: int) -> None:
    path = files["safetensors"]
    full = reference(files, "safetensors")["big"]
    cols = 256 // world
    for ranges, bound in [
        ([[(0, 4096 // world)], [(0, 256)]], 1.0),  # Shard(0): exactly the rows
        ([[(0, 4096)], [(cols, 2 * cols)]], 2.0),  # Shard(1): one run per row
    ]:
        out = torch.empty(expected(full, ranges).shape)
        ckpt, i = open_tensor(path, "big")
        before = rchar()
        stats = _slices.read([_slices.SliceRead("big", ckpt, i, ranges, out)])
        read = rchar() - before
        assert torch.equal(out, expected(full, ranges))
        assert stats.delivered == out.numel() * 4
        # The planner's count bounds what the process read (plus reading /proc/self/io).
        assert read <= stats.read + 4096
        assert out.numel() * 4 <= read <= bound * out.numel() * 4 + 4096, (ranges, read)


def test_bad_selections_are_refused_naming_file_and_tensor(files: dict) -> None:
    path = files["safetensors"]
    with pytest.raises(ValueError, match=r"m\.safetensors: tensor 't_float32'.*0\.\.14.*0\.\.13"):
        read_rect(path, "t_float32", [[(0, 14)], [(0, 7)], [(0, 5)]], torch.empty(14, 7, 5))
    with pytest.raises(ValueError, match="3 dimensions, the selection 2"):
        read_rect(path, "t_float32", [[(0, 13)], [(0, 7)]], torch.empty(13, 7))
    with pytest.raises(ValueError, match=r"selection has shape \[13, 7, 5\].*\[13, 7, 4\]"):
        read_rect(path, "t_float32", [[(0, 13)], [(0, 7)], [(0, 5)]], torch.empty(13, 7, 4))


def test_copy_slices_to_host_checks_every_request(files: dict) -> None:
    ckpt, i = open_tensor(files["safetensors"], "t_float32")
    storage, _dt, shape, stride, off, _rg = ckpt.tensor(i)
    base = ckpt.storage(storage)[1] + off * 4

    def one(name, dest=0, dst_off=0, ranges=None, strides=None):
        return (name, dest, dst_off, strides, base, 4, shape, stride, ranges or [[(0, 13)]] * 3)

    whole = [[(0, 13)], [(0, 7)], [(0, 5)]]
    dst = torch.empty(13, 7, 5)
    _core.copy_slices_to_host(ckpt, [dst], [one("ok", ranges=whole)])
    with pytest.raises(ValueError, match=r'"small".*needs 1820 bytes of destination #0'):
        _core.copy_slices_to_host(ckpt, [torch.empty(10)], [one("small", ranges=whole)])
    with pytest.raises(ValueError, match=r'"x".*destination #1 does not exist'):
        _core.copy_slices_to_host(ckpt, [dst], [one("x", dest=1, ranges=whole)])
    with pytest.raises(ValueError, match=r'"rev".*reversed'):
        _core.copy_slices_to_host(ckpt, [dst], [one("rev", ranges=[[(5, 2)], [(0, 7)], [(0, 5)]])])
    # Two slices writing partly the same destination bytes (would race).
    with pytest.raises(ValueError, match="destinations overlap"):
        top, bottom = [[(0, 6)], [(0, 7)], [(0, 5)]], [[(6, 13)], [(0, 7)], [(0, 5)]]
        two = [one("a", ranges=top), one("b", dst_off=400, ranges=bottom)]
        _core.copy_slices_to_host(ckpt, [torch.empty(1000)], two)
    with pytest.raises(ValueError, match=r'"over".*past the end of the file'):
        far = ("over", 0, 0, None, ckpt.file_size - 8, 4, [4], [1], [[(0, 4)]])
        _core.copy_slices_to_host(ckpt, [dst], [far])
    with pytest.raises(ValueError, match="overlap"):
        _core.copy_slices_to_host(ckpt, [dst], [one("z", ranges=whole, strides=[0, 5, 1])])


def test_a_file_cut_short_after_opening_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    safetensors.torch.save_file({"a": torch.ones(64, 64), "b": torch.ones(256, 64)}, path)
    ckpt, i = open_tensor(path, "b")
    os.truncate(path, path.stat().st_size - 1000)
    out = torch.empty(256, 32)
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: tensor \"b\".*truncated"):
        _slices.read([_slices.SliceRead("b", ckpt, i, [[(0, 256)], [(32, 64)]], out)])


@pytest.mark.gpu
def test_rectangles_into_cuda_tensors(files: dict) -> None:
    full = reference(files, "safetensors")
    for name in ["t_float32", "t_bfloat16", "big"]:
        shape = full[name].shape
        ranges = [[(0, shape[0])], [(1, shape[1] // 2 + 1)]] + [[(0, n)] for n in shape[2:]]
        want = expected(full[name], ranges)
        out = torch.empty(want.shape, dtype=want.dtype, device="cuda")
        stats = read_rect(files["safetensors"], name, ranges, out)
        assert stats.delivered == want.numel() * want.element_size()
        assert torch.equal(out.cpu(), want)
