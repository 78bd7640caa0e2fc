"""safetensors files: zeroload.load and zeroload.open against the safetensors package."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ALL_DTYPES, random_tensor
from reference import assert_same
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import zeroload

# Every dtype both torch and safetensors can hold.
ST_DTYPES = [
    d
    for d in ALL_DTYPES
    if d not in (torch.complex32, torch.complex128, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
]


@pytest.fixture(scope="module")
def st_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("st") / "all.safetensors"
    tensors = {
        f"t.{str(d).split('.')[1]}": random_tensor((3, 4), d, i) for i, d in enumerate(ST_DTYPES)
    }
    tensors["zero_dim"] = torch.tensor(2.5)
    tensors["empty"] = torch.empty(0, 3)
    tensors["b_first_in_file_last_by_name"] = torch.arange(6, dtype=torch.int32)
    save_file(tensors, path, metadata={"format": "pt", "note": "hello"})
    return path


def test_load_equals_safetensors_load_file(st_file: Path) -> None:
    ours, ref = zeroload.load(st_file), load_file(st_file)
    assert type(ours) is dict
    assert sorted(ours) == sorted(ref)
    for name in ref:
        assert_same(ours[name], ref[name], name)


def test_keys_come_in_safe_open_order(st_file: Path) -> None:
    with safe_open(st_file, "pt") as f:
        expected = list(f.keys())
    assert list(zeroload.load(st_file)) == expected
    with zeroload.open(st_file) as f:
        assert f.keys() == expected


def test_open_is_safe_open_compatible(st_file: Path) -> None:
    with safe_open(st_file, "pt") as ref, zeroload.open(st_file) as f:
        assert f.metadata() == ref.metadata() == {"format": "pt", "note": "hello"}
        for name in ref.keys():
            assert_same(f.get_tensor(name), ref.get_tensor(name), name)
            ours_slice, ref_slice = f.get_slice(name), ref.get_slice(name)
            assert ours_slice.get_shape() == ref_slice.get_shape()
            assert ours_slice.get_dtype() == ref_slice.get_dtype()


@pytest.mark.parametrize(
    "index", [np.s_[1:], np.s_[:, :2], np.s_[0], np.s_[::2, 1:3], np.s_[..., -1]]
)
def test_get_slice_matches_safetensors(st_file: Path, index: object) -> None:
    name = "t.float32"
    with safe_open(st_file, "pt") as ref, zeroload.open(st_file) as f:
        ours, expected = f.get_slice(name)[index], ref.get_slice(name)[index]
    assert torch.equal(ours, expected)
    ours.fill_(0)  # the slice owns its memory
    assert torch.equal(zeroload.load(st_file)["t.float32"], load_file(st_file)["t.float32"])


def test_numpy_framework_is_zero_copy_and_correct(st_file: Path) -> None:
    with safe_open(st_file, "np") as ref, zeroload.open(st_file, framework="np") as f:
        for name in ["t.float32", "t.int64", "t.uint16", "t.bool", "zero_dim", "empty"]:
            a, b = f.get_tensor(name), ref.get_tensor(name)
            assert isinstance(a, np.ndarray)
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)


def test_numpy_framework_refuses_dtypes_numpy_lacks(st_file: Path) -> None:
    with (
        zeroload.open(st_file, framework="np") as f,
        pytest.raises(TypeError, match=r"t\.bfloat16"),
    ):
        f.get_tensor("t.bfloat16")


def test_get_tensor_unknown_name_suggests(st_file: Path) -> None:
    with zeroload.open(st_file) as f, pytest.raises(KeyError, match=r"did you mean 't\.float32'"):
        f.get_tensor("t.float23")


def test_closed_handle_refuses(st_file: Path) -> None:
    f = zeroload.open(st_file)
    t = f.get_tensor("t.int32")
    f.close()
    with pytest.raises(RuntimeError, match="closed"):
        f.keys()
    assert t.sum() == load_file(st_file)["t.int32"].sum()  # tensors outlive the handle


def test_copy_on_write_never_touches_the_file(st_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "cow.safetensors"
    path.write_bytes(st_file.read_bytes())
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    sd = zeroload.load(path)
    sd["t.float32"].zero_()
    sd["t.int64"].fill_(-1)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_misaligned_tensors_load_correctly(tmp_path: Path) -> None:
    # A hand-written header can place float32 data at an odd offset.
    data = b"\x00" + np.arange(4, dtype=np.float32).tobytes()
    header = {
        "odd": {"dtype": "F32", "shape": [4], "data_offsets": [1, 17]},
        "pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "misaligned.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    ours = zeroload.load(path)
    assert torch.equal(ours["odd"], torch.arange(4, dtype=torch.float32))
    assert torch.equal(ours["odd"], load_file(path)["odd"])


def test_keys_and_dtype(st_file: Path) -> None:
    ours = zeroload.load(st_file, keys=["t.float32", "t.int32"], dtype=torch.float16)
    ref = load_file(st_file)
    assert list(ours) == ["t.float32", "t.int32"]
    assert torch.equal(ours["t.float32"], ref["t.float32"].half())
    assert ours["t.int32"].dtype == torch.int32


def test_open_takes_safe_opens_arguments_in_order(st_file: Path) -> None:
    with safe_open(st_file, "np", "cpu") as ref, zeroload.open(st_file, "np", "cpu") as f:
        np.testing.assert_array_equal(f.get_tensor("t.int32"), ref.get_tensor("t.int32"))
    with zeroload.open(st_file, "pt") as f:
        assert isinstance(f.get_tensor("t.int32"), torch.Tensor)
    with zeroload.open(st_file, framework="pt", device="cpu") as f:
        assert f.get_tensor("t.int32").device.type == "cpu"
    # The old order (device second) gets a pointed message.
    with pytest.raises(ValueError, match=r"framework.*pass device='cuda'"):
        zeroload.open(st_file, "cuda")


def test_open_tensors_are_whole_storage_views_like_safe_open(st_file: Path) -> None:
    with safe_open(st_file, "pt") as ref, zeroload.open(st_file) as f:
        for name in ref.keys():
            ours, theirs = f.get_tensor(name), ref.get_tensor(name)
            assert ours.untyped_storage().nbytes() == theirs.untyped_storage().nbytes()
            assert ours.storage_offset() == 0 and ours.is_contiguous()
