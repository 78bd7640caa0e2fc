"""Legacy (pre-zip) torch.save files: `torch.save(obj, f, _use_new_zipfile_serialization=
False)` and what torch < 1.6 wrote. They must load as `torch.load(f, weights_only=True)`
loads them, parsed by the Rust core: same objects, storages shared as in the file, views
with their offsets; the same globals refused; bad files a CheckpointError naming the
file. Their storages' bytes follow the pickles at arbitrary offsets: those not aligned for
their dtype are copied into aligned memory, the others are views of the file."""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyNet, random_tensor, strided_views, training_checkpoint
from reference import assert_same, assert_sharing_same, tensors_in

import zeroload
from zeroload import _core

# Every dtype a legacy torch.save writes and torch.load reads back (the newer dtypes,
# float8 and uint16 to uint64, have no legacy storage class: torch.load refuses them).
LEGACY_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
]


def save_legacy(obj: Any, path: Path) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def check_like_torch(path: Path) -> Any:
    """Loads `path` with zeroload and with torch.load(weights_only=True) and checks the
    results are the same objects with the same sharing; returns ours."""
    ref = torch.load(path, weights_only=True)
    ours = zeroload.load(path)
    assert_same(ours, ref)
    assert_sharing_same(ours, ref)
    for name, t in tensors_in(ours).items():
        # Whatever the file's layout, every tensor comes out aligned for its dtype.
        assert t.data_ptr() % t.element_size() == 0, name
    return ours


def test_format_is_detected_by_content(tmp_path: Path) -> None:
    # No suffix tells: the first pickle is torch's magic number.
    path = save_legacy({"w": torch.ones(3)}, tmp_path / "weights")
    ckpt = _core.Checkpoint.open(str(path))
    assert ckpt.format == "torch legacy"
    check_like_torch(path)


def test_module_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet().eval()
    path = save_legacy(model.state_dict(), tmp_path / "tiny.bin")
    ours = check_like_torch(path)
    assert isinstance(ours, collections.OrderedDict)
    fresh = TinyNet().eval()
    fresh.load_state_dict(ours)
    idx = torch.randint(0, 50, (4,))
    assert torch.equal(fresh(idx), model(idx))


def test_load_into_a_model(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TinyNet().eval()
    path = save_legacy(model.state_dict(), tmp_path / "tiny.pt")
    fresh = TinyNet().eval()
    zeroload.load_into(fresh, path)
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    # A model built on the meta device gets the file's tensors themselves.
    with torch.device("meta"):
        empty = TinyNet().eval()
    zeroload.load_into(empty, path)
    idx = torch.randint(0, 50, (4,))
    assert torch.equal(empty(idx), model(idx))
    for name, t in empty.state_dict().items():
        assert t.data_ptr() % t.element_size() == 0, name


def test_nested_objects_and_plain_values(tmp_path: Path) -> None:
    path = save_legacy(training_checkpoint(), tmp_path / "train.pt")
    check_like_torch(path)


@pytest.mark.parametrize("dtype", LEGACY_DTYPES, ids=str)
def test_every_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    # An odd-sized uint8 tensor first puts the next storages at odd offsets.
    obj = {
        "odd": torch.arange(3, dtype=torch.uint8),
        "x": random_tensor((5, 3), dtype, seed=1),
        "scalar": random_tensor((), dtype, seed=2),
        "empty": torch.zeros(0, 2, dtype=dtype),
    }
    path = save_legacy(obj, tmp_path / "dtypes.pt")
    check_like_torch(path)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.complex32,
        torch.bits8,
    ],
    ids=str,
)
def test_dtypes_torch_load_cannot_read_back(tmp_path: Path, dtype: torch.dtype) -> None:
    # Legacy torch.save writes these on an UntypedStorage, which torch.load then fails to
    # read ("UntypedStorage has no attribute dtype"); zeroload reads them, checked
    # against the tensors saved.
    obj = {"odd": torch.arange(3, dtype=torch.uint8), "x": random_tensor((4, 2), dtype, 7)}
    path = save_legacy(obj, tmp_path / "new.pt")
    with pytest.raises(AttributeError):
        torch.load(path, weights_only=True)
    ours = zeroload.load(path)
    assert ours["x"].dtype == dtype and ours["x"].shape == obj["x"].shape
    assert torch.equal(ours["x"].view(torch.uint8), obj["x"].view(torch.uint8))
    assert ours["x"].data_ptr() % ours["x"].element_size() == 0


def test_a_model_directory_with_a_legacy_bin(tmp_path: Path) -> None:
    # Older Hub repositories: pytorch_model.bin in the legacy format.
    torch.manual_seed(2)
    sd = TinyNet().state_dict()
    save_legacy(sd, tmp_path / "pytorch_model.bin")
    assert_same(
        zeroload.load(tmp_path), torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    )


def test_shared_storages_and_views(tmp_path: Path) -> None:
    views = strided_views()
    views["same"] = views["base"]  # one tensor under two names stays one object
    path = save_legacy(views, tmp_path / "views.pt")
    ours = check_like_torch(path)
    assert ours["same"] is ours["base"]
    assert ours["slice"].storage_offset() == views["slice"].storage_offset()
    # They share one storage, as torch.load's do: a write shows through every view.
    ours["base"][3, 5] = -1.0
    assert ours["slice"][0, 0] == -1.0


def test_parameters(tmp_path: Path) -> None:
    obj = {
        "p": torch.nn.Parameter(torch.randn(2, 3)),
        "frozen": torch.nn.Parameter(torch.randn(4), requires_grad=False),
        "grad": torch.randn(2, requires_grad=True),
        "list": [torch.nn.Parameter(torch.ones(1))],
    }
    ours = check_like_torch(save_legacy(obj, tmp_path / "params.pt"))
    assert type(ours["p"]) is torch.nn.Parameter and ours["p"].requires_grad
    assert not ours["frozen"].requires_grad


def test_bare_storage_objects(tmp_path: Path) -> None:
    t = torch.arange(4.0)
    # TypedStorage warns that it is deprecated; saving it is still what older code did.
    with pytest.warns(UserWarning):
        storage = t.storage()
    path = save_legacy({"t": t, "s": storage}, tmp_path / "storage.pt")
    ref = torch.load(path, weights_only=True)
    ours = zeroload.load(path)
    assert torch.equal(ours["t"], ref["t"])
    # zeroload hands out storages untyped (as for zip files): the same bytes, and the
    # storage of the tensor beside it, as in the file.
    assert bytes(ours["s"]) == bytes(ref["s"].untyped())
    assert ours["s"].data_ptr() == ours["t"].untyped_storage().data_ptr()


def test_unaligned_storages_are_copied_aligned_ones_are_views(tmp_path: Path) -> None:
    obj = {
        "bytes": torch.arange(5, dtype=torch.uint8),
        "f32": random_tensor((7,), torch.float32, seed=3),
        "f64": random_tensor((3, 2), torch.float64, seed=4),
        "c128": random_tensor((2,), torch.complex128, seed=5),
    }
    path = save_legacy(obj, tmp_path / "unaligned.pt")
    ckpt = _core.Checkpoint.open(str(path))
    storages = {ckpt.storage(ckpt.tensor(i)[0])[0]: ckpt.tensor(i)[1] for i in range(4)}
    offsets = {
        ckpt.tensor(i)[1]: ckpt.storage(ckpt.tensor(i)[0])[1] for i in range(ckpt.num_tensors)
    }
    sizes = {"uint8": 1, "float32": 4, "float64": 8, "complex128": 16}
    expected = sorted(
        i
        for i in range(ckpt.num_storages)
        if offsets[storages[ckpt.storage(i)[0]]] % sizes[storages[ckpt.storage(i)[0]]]
    )
    assert ckpt.unaligned_storages() == expected
    assert expected, "the legacy layout puts some storages at unaligned offsets"
    ours = check_like_torch(path)
    # Values survive the copy, through every entry point.
    with zeroload.open(path) as f:
        for name, ref in obj.items():
            assert torch.equal(f.get_tensor(name), ref), name
            assert torch.equal(f.get_slice(name)[1:], ref[1:]), name
    assert_same(zeroload.load(path, mmap=False), ours)
    assert_same(zeroload.load(io.BytesIO(path.read_bytes())), ours)


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
def test_every_pickle_protocol(tmp_path: Path, protocol: int) -> None:
    # torch.save(pickle_protocol=...) applies to every pickle of the file, the magic
    # number's too. torch.load(weights_only=True) reads only protocols 2 and 3 (its
    # unpickler lacks the others' opcodes); the reference here is the unrestricted
    # torch.load of a file we just wrote.
    obj = {"a": torch.arange(3.0), "b": torch.ones(2, dtype=torch.int8), "n": [1, "x"]}
    path = tmp_path / "proto.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    assert_same(zeroload.load(path), torch.load(path, weights_only=False))


def test_a_long_pickle_is_read_past_the_first_chunk(tmp_path: Path) -> None:
    # About 150 KiB of pickle before the first storage byte.
    obj = {f"layer.{i}.weight": torch.full((2,), float(i)) for i in range(2000)}
    path = save_legacy(obj, tmp_path / "many.pt")
    check_like_torch(path)


def _storage_view_file(path: Path) -> Path:
    """A legacy file with storage views, as torch < 1.0 wrote them: persistent ids whose
    `view_metadata` is (view key, offset, size) into a root storage."""
    root = torch.arange(10, dtype=torch.float32)

    class Storage:
        def __init__(self, view: tuple[str, int, int] | None) -> None:
            self.view = view

    class Tensor:
        def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple) -> None:
            self.args = (storage, offset, size, stride)

        def __reduce__(self) -> tuple:
            return (
                torch._utils._rebuild_tensor_v2,
                (*self.args, False, collections.OrderedDict()),
            )

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, Storage):
                return ("storage", torch.FloatStorage, "root", "cpu", 10, obj.view)
            return None

    whole, view = Storage(None), Storage(("view", 2, 6))
    obj = {
        "whole": Tensor(whole, 0, (10,), (1,)),
        "view": Tensor(view, 1, (2, 2), (2, 1)),
        "again": Tensor(view, 0, (6,), (1,)),
    }
    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, buf, protocol=2)
    Pickler(buf, protocol=2).dump(obj)
    pickle.dump(["root"], buf, protocol=2)
    buf.write(struct.pack("<Q", 10) + root.numpy().tobytes())
    path.write_bytes(buf.getvalue())
    return path


def test_storage_views_of_old_torch(tmp_path: Path) -> None:
    path = _storage_view_file(tmp_path / "old.pt")
    ours = check_like_torch(path)
    assert ours["view"].tolist() == [[3.0, 4.0], [5.0, 6.0]]
    assert ours["again"].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "obj, name",
    [
        ({"w": torch.zeros(2), "x": _Evil()}, "system"),
        ({"w": torch.zeros(2), "cfg": Path("x")}, "PosixPath"),
        (torch.nn.Linear(2, 2), "Linear"),
    ],
    ids=["os.system", "arbitrary class", "whole module"],
)
def test_hostile_globals_are_refused_like_torch(tmp_path: Path, obj: Any, name: str) -> None:
    path = save_legacy(obj, tmp_path / "hostile.pt")
    with pytest.raises(pickle.UnpicklingError):  # the reference behaviour
        torch.load(path, weights_only=True)
    with pytest.raises(zeroload.ForbiddenGlobalError) as e:
        zeroload.load(path)
    assert str(path) in str(e.value) and name in str(e.value)
    assert isinstance(e.value, pickle.UnpicklingError)


def test_truncated_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    data = save_legacy(
        {"a": torch.arange(4.0), "b": torch.ones(2, dtype=torch.int64)}, tmp_path / "x.pt"
    ).read_bytes()
    path = tmp_path / "cut.pt"
    for n in range(len(data)):
        path.write_bytes(data[:n])
        with pytest.raises(Exception):  # noqa: B017 - the reference fails somehow
            torch.load(path, weights_only=True)
        with pytest.raises(zeroload.CheckpointError, match=re.escape(str(path))):
            zeroload.load(path)


def _legacy_bytes(obj: Any, tmp_path: Path) -> bytearray:
    return bytearray(save_legacy(obj, tmp_path / "src.pt").read_bytes())


def _corrupt_cases(tmp_path: Path) -> dict[str, bytearray]:
    obj = {"a": torch.arange(4.0)}
    good = _legacy_bytes(obj, tmp_path)
    data_at = good.rindex(b".") + 1  # the end of the storage list pickle
    cases: dict[str, bytearray] = {}
    b = bytearray(good)
    b[4] ^= 0xFF  # a digit of the magic number
    cases["magic"] = b
    b = bytearray(good)
    b[good.index(b"M\xe9\x03")] = ord("K")  # protocol version 1001 -> BININT1 0xe9
    cases["protocol"] = b
    b = bytearray(good)
    b[data_at : data_at + 8] = struct.pack("<Q", 5)  # the record's element count
    cases["record size"] = b
    b = bytearray(good)
    b[data_at : data_at + 8] = struct.pack("<Q", 2**62)
    cases["huge record"] = b
    return cases


@pytest.mark.parametrize("case", ["magic", "protocol", "record size", "huge record"])
def test_corrupt_files_are_refused_naming_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(_corrupt_cases(tmp_path)[case])
    with pytest.raises(Exception):  # noqa: B017 - the reference fails somehow
        torch.load(path, weights_only=True)
    with pytest.raises(zeroload.CheckpointError, match=re.escape(str(path))):
        zeroload.load(path)


def test_a_storage_without_bytes_is_refused(tmp_path: Path) -> None:
    # The storage list names no storage: torch would hand out uninitialised memory.
    good = _legacy_bytes({"a": torch.arange(4.0)}, tmp_path)
    list_at = good.rindex(b"\x80\x02]")
    path = tmp_path / "nodata.pt"
    path.write_bytes(bytes(good[:list_at]) + pickle.dumps([], protocol=2))
    with pytest.raises(zeroload.CheckpointError, match="no bytes for it"):
        zeroload.load(path)


def test_big_endian_files_are_refused(tmp_path: Path) -> None:
    good = _legacy_bytes({"a": torch.arange(4.0)}, tmp_path)
    at = good.index(b"little_endian") + len(b"little_endian")
    flag = good.index(b"\x88", at)  # NEWTRUE
    good[flag] = 0x89  # NEWFALSE
    path = tmp_path / "be.pt"
    path.write_bytes(bytes(good))
    with pytest.raises(zeroload.CheckpointError, match="big-endian"):
        zeroload.load(path)
