"""Offsets beyond 4 GiB and 8 GiB: sparse checkpoints (their padding is a hole, so they
cost no disk) with small tensors past each boundary, loaded whole, by key and sliced on
the CPU, compared with safetensors' and torch's own readers. (The fake CUDA path reads
the same files in tests/test_cuda_engine.py.)"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import zeroload

GIB = 1 << 30
# Pads that put "a" past 4 GiB and "b" past 8 GiB.
PAD1, PAD2 = 4 * GIB + 4096, 4 * GIB


def _small() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"a": torch.randn(64, 48, generator=g), "b": torch.randn(1000, generator=g)}


def sparse_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file: `pad1` (zeros), `a`, `pad2` (zeros), `b`; only `a` and `b`
    written, the pads are holes. Returns `a` and `b`."""
    small = _small()
    layout = [("pad1", PAD1, None), ("a", None, small["a"]), ("pad2", PAD2, None)]
    layout.append(("b", None, small["b"]))
    header: dict[str, object] = {}
    offset = 0
    places = {}
    for name, nbytes, t in layout:
        if t is None:
            entry = {"dtype": "U8", "shape": [nbytes], "data_offsets": [offset, offset + nbytes]}
        else:
            nbytes = t.numel() * t.element_size()
            entry = {
                "dtype": "F32",
                "shape": list(t.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            places[name] = offset
        header[name] = entry
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, at in places.items():
            f.seek(base + at)
            f.write(small[name].numpy().tobytes())
        f.truncate(base + offset)
    return small


def crc32_of_zeros(n: int) -> int:
    """`zlib.crc32(bytes(n))` without reading n bytes: the CRC register's update for a zero
    bit is linear over GF(2), so n zero bytes are that operator to the power 8n (by
    squaring, as zlib's crc32_combine does)."""

    def times(mat: list[int], vec: int) -> int:
        out, i = 0, 0
        while vec:
            if vec & 1:
                out ^= mat[i]
            vec >>= 1
            i += 1
        return out

    def square(mat: list[int]) -> list[int]:
        return [times(mat, mat[i]) for i in range(32)]

    op = [0xEDB88320] + [1 << i for i in range(31)]  # one zero bit
    for _ in range(3):
        op = square(op)  # one zero byte
    reg = 0xFFFFFFFF
    while n:
        if n & 1:
            reg = times(op, reg)
        n >>= 1
        op = square(op)
    return reg ^ 0xFFFFFFFF


class _Storage:
    def __init__(self, key: str, cls: type, numel: int) -> None:
        self.key, self.cls, self.numel = key, cls, numel


class _Tensor:
    def __init__(self, storage: _Storage, size: tuple[int, ...]) -> None:
        self.storage, self.size = storage, size

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        stride = tuple(int(torch.tensor(self.size[i + 1 :]).prod()) for i in range(len(self.size)))
        args = (self.storage, 0, self.size, stride, False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def _zip64_extra(*values: int) -> bytes:
    return struct.pack("<HH", 1, 8 * len(values)) + b"".join(struct.pack("<Q", v) for v in values)


def sparse_torch_zip(path: Path) -> dict[str, torch.Tensor]:
    """What `torch.save({"pad1": zeros, "a": ..., "pad2": zeros, "b": ...})` writes (a
    ZIP64 archive, stored members), with the pads as holes: the storages of "a" and "b"
    lie past 4 and 8 GiB. Returns `a` and `b`."""
    small = _small()
    storages = {
        "pad1": _Storage("0", torch.ByteStorage, PAD1),
        "a": _Storage("1", torch.FloatStorage, small["a"].numel()),
        "pad2": _Storage("2", torch.ByteStorage, PAD2),
        "b": _Storage("3", torch.FloatStorage, small["b"].numel()),
    }
    sizes = {"pad1": (PAD1,), "a": tuple(small["a"].shape), "pad2": (PAD2,), "b": (1000,)}
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump({k: _Tensor(storages[k], sizes[k]) for k in storages})
    # (name, bytes or a size of zeros)
    members: list[tuple[str, bytes | int]] = [
        ("archive/data.pkl", buf.getvalue()),
        ("archive/byteorder", b"little"),
        ("archive/data/0", PAD1),
        ("archive/data/1", small["a"].numpy().tobytes()),
        ("archive/data/2", PAD2),
        ("archive/data/3", small["b"].numpy().tobytes()),
        ("archive/version", b"3\n"),
    ]
    central = []
    with open(path, "wb") as f:
        for name, data in members:
            offset = f.tell()
            size = data if isinstance(data, int) else len(data)
            crc = crc32_of_zeros(data) if isinstance(data, int) else zlib.crc32(data)
            big = size >= 0xFFFFFFFF
            extra = _zip64_extra(size, size) if big else b""
            small_size = 0xFFFFFFFF if big else size
            f.write(
                struct.pack(
                    "<IHHHHHIIIHH",
                    0x04034B50,
                    45,
                    0,
                    0,
                    0,
                    0x21,
                    crc,
                    small_size,
                    small_size,
                    len(name),
                    len(extra),
                )
                + name.encode()
                + extra
            )
            if isinstance(data, int):
                f.seek(size, os.SEEK_CUR)  # a hole
            else:
                f.write(data)
            central.append((name, crc, size, offset))
        cd_start = f.tell()
        for name, crc, size, offset in central:
            big, far = size >= 0xFFFFFFFF, offset >= 0xFFFFFFFF
            fields = ([size, size] if big else []) + ([offset] if far else [])
            extra = _zip64_extra(*fields) if fields else b""
            f.write(
                struct.pack(
                    "<IHHHHHHIIIHHHHHII",
                    0x02014B50,
                    45,
                    45,
                    0,
                    0,
                    0,
                    0x21,
                    crc,
                    0xFFFFFFFF if big else size,
                    0xFFFFFFFF if big else size,
                    len(name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    0xFFFFFFFF if far else offset,
                )
                + name.encode()
                + extra
            )
        cd_end = f.tell()
        n = len(central)
        f.write(
            struct.pack(
                "<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_end - cd_start, cd_start
            )
        )
        f.write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_end - cd_start, 0xFFFFFFFF, 0))
    return small


def _check(path: Path, small: dict[str, torch.Tensor]) -> None:
    got = zeroload.load(path, keys=["a", "b"])
    assert torch.equal(got["a"], small["a"]) and torch.equal(got["b"], small["b"])
    whole = zeroload.load(path)
    assert torch.equal(whole["b"], small["b"]) and whole["pad2"][-8:].eq(0).all()
    assert torch.equal(zeroload.load(path, keys=["b"], mmap=False)["b"], small["b"])
    with zeroload.open(path) as f:
        assert torch.equal(f.get_tensor("a"), small["a"])
        assert torch.equal(f.get_slice("a")[5:9, 10:30], small["a"][5:9, 10:30])
        assert torch.equal(f.get_slice("b")[990:], small["b"][990:])
        assert torch.equal(f.get_slice("pad2")[-3:], torch.zeros(3, dtype=torch.uint8))
    half = zeroload.load(path, keys=["a"], dtype=torch.float16)["a"]
    assert torch.equal(half, small["a"].half())


@pytest.mark.slow
def test_safetensors_offsets_past_4_and_8_gib(tmp_path: Path) -> None:
    path = tmp_path / "sparse.safetensors"
    small = sparse_safetensors(path)
    assert os.stat(path).st_blocks * 512 < 64 << 20  # sparse: no disk for the pads
    with safe_open(path, "pt") as ref:
        assert torch.equal(ref.get_tensor("a"), small["a"])
        assert torch.equal(ref.get_tensor("b"), small["b"])
    _check(path, small)


def test_crc32_of_zeros_is_zlibs() -> None:
    for n in (0, 1, 7, 1000, 65537):
        assert crc32_of_zeros(n) == zlib.crc32(bytes(n)), n


@pytest.mark.slow
def test_torch_zip64_offsets_past_4_and_8_gib(tmp_path: Path) -> None:
    path = tmp_path / "sparse.pth"
    small = sparse_torch_zip(path)
    assert os.stat(path).st_blocks * 512 < 64 << 20
    with zipfile.ZipFile(path) as z:  # a valid ZIP64 archive, members where we put them
        info = {i.filename: i for i in z.infolist()}
        assert info["archive/data/3"].header_offset > 8 * GIB
        assert info["archive/data/2"].file_size == PAD2
    ref = torch.load(path, mmap=True, weights_only=True)
    assert torch.equal(ref["a"], small["a"]) and torch.equal(ref["b"], small["b"])
    _check(path, small)
