"""Checkpoints of 20,000 and 100,000 tensors: every per-call cost is O(1) in the number of
tensors, so loops over all names stay linear.

These are not timing tests: the limits are generous (the linear paths take a few seconds
on two cores). A per-call cost that grows with the number of tensors makes a loop over
100k names take hours, and the timeout turns that into a failure instead of a hung CI.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from reference import assert_same
from safetensors import safe_open

import zeroload
from zeroload import _core

pytestmark = pytest.mark.timeout(60)

BIG = 100_000
MID = 20_000
WIDTH = 4  # float32 elements per tensor


def name(i: int) -> str:
    return f"layer{i // 10}.w{i % 10}"


def expected(count: int) -> torch.Tensor:
    """Row i holds the values of tensor i."""
    return torch.arange(count * WIDTH, dtype=torch.float32).reshape(count, WIDTH)


def write_safetensors(path: Path, ids: list[int], metadata: dict[str, str]) -> None:
    """A safetensors file holding tensors `ids` (rows of `expected`), its data laid out in
    the reverse of name order, so that name order and file order differ. Written by hand:
    `save_file` of 100k tensors takes seconds."""
    rows = expected(max(ids) + 1)
    layout = sorted(ids, key=name, reverse=True)
    header: dict[str, object] = {"__metadata__": metadata}
    nbytes = WIDTH * 4
    for slot, i in enumerate(layout):
        header[name(i)] = {
            "dtype": "F32",
            "shape": [WIDTH],
            "data_offsets": [slot * nbytes, (slot + 1) * nbytes],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data = rows[torch.tensor(layout)].contiguous().numpy().tobytes()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("scale")
    # Hand the heap these tests grew back to the system: glibc keeps freed memory
    # resident (and raises its mmap threshold after big frees), which would let later
    # tests that measure RSS growth (test_track.py) allocate without growing the RSS.
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except AttributeError:  # not glibc
        pass


@pytest.fixture(scope="module")
def st_big(big_dir: Path) -> Path:
    path = big_dir / "big.safetensors"
    write_safetensors(path, list(range(BIG)), {"format": "pt", "tensors": str(BIG)})
    return path


@pytest.fixture(scope="module")
def pth_big(big_dir: Path) -> Path:
    """100k tensors, each with its own storage (torch.save takes a few seconds)."""
    rows = expected(BIG)
    path = big_dir / "big.pth"
    torch.save({name(i): rows[i].clone() for i in range(BIG)}, path)
    return path


@pytest.fixture(scope="module")
def pth_shared(big_dir: Path) -> Path:
    """20k tensors that are views of one storage (and one tensor that is all of it)."""
    rows = expected(MID)
    sd = {name(i): rows[i] for i in range(MID)}
    sd["all"] = rows
    path = big_dir / "shared.pth"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def shards_big(big_dir: Path) -> Path:
    """The 100k tensors in 8 safetensors shards, with a Hugging Face index."""
    folder = big_dir / "sharded"
    folder.mkdir()
    weight_map = {}
    for s in range(8):
        ids = list(range(s, BIG, 8))
        file = f"model-{s + 1:05d}-of-00008.safetensors"
        write_safetensors(folder / file, ids, {"format": "pt"})
        weight_map.update({name(i): file for i in ids})
    index = folder / "model.safetensors.index.json"
    index.write_text(
        json.dumps({"metadata": {"total_size": BIG * WIDTH * 4}, "weight_map": weight_map})
    )
    return index


def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors) if tensors else torch.empty(0, WIDTH)


def test_import_zeroload_does_not_import_torch() -> None:
    code = (
        "import sys, zeroload\n"
        "assert 'torch' not in sys.modules, 'import zeroload imported torch'\n"
        "assert zeroload.CheckpointError.__mro__[1] is ValueError\n"
        "from zeroload import load\n"  # resolved lazily, with its docstring
        "assert 'torch' in sys.modules and load.__doc__.startswith('Load a checkpoint')\n"
        "import zeroload._open, zeroload._load_into\n"  # the lazy names are the real ones
        "assert zeroload.open is zeroload._open.open\n"
        "assert zeroload.load_into is zeroload._load_into.load_into\n"
        "assert set(zeroload.__all__) <= set(dir(zeroload))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("fixture", ["st_big", "pth_big"])
def test_open_loops_over_100k_keys(request: pytest.FixtureRequest, fixture: str) -> None:
    path = request.getfixturevalue(fixture)
    names = [name(i) for i in range(BIG)]
    with zeroload.open(path, "pt") as f:
        keys = f.keys()
        if fixture == "st_big":
            with safe_open(path, "pt") as ref:
                assert keys == list(ref.keys())  # safetensors sorts names
                assert f.metadata() == ref.metadata() == {"format": "pt", "tensors": str(BIG)}
                assert f.offset_keys() == list(ref.offset_keys())
            assert keys == sorted(names)
        else:
            assert keys == names  # the state dict's order
            assert f.metadata() is None
        rows = stacked([f.get_tensor(k) for k in names])
        assert torch.equal(rows, expected(BIG))
        handles = [f.get_slice(k) for k in names]
        assert torch.equal(stacked([h[1:3] for h in handles]), expected(BIG)[:, 1:3])
        assert {(tuple(h.get_shape()), h.get_dtype()) for h in handles} == {((WIDTH,), "F32")}


@pytest.mark.parametrize("fixture", ["st_big", "pth_big"])
def test_load_100k_tensors(request: pytest.FixtureRequest, fixture: str) -> None:
    path = request.getfixturevalue(fixture)
    sd = zeroload.load(path)
    names = [name(i) for i in range(BIG)]
    assert list(sd) == (sorted(names) if fixture == "st_big" else names)
    assert torch.equal(stacked([sd[k] for k in names]), expected(BIG))
    # Each tensor is its own storage of its own bytes, as torch.load and load_file give.
    assert {sd[k].untyped_storage().nbytes() for k in names} == {WIDTH * 4}
    assert len({sd[k].data_ptr() for k in names}) == BIG


@pytest.mark.parametrize("fixture", ["st_big", "pth_big"])
def test_load_keys_from_100k(request: pytest.FixtureRequest, fixture: str) -> None:
    path = request.getfixturevalue(fixture)
    wanted = [name(i) for i in range(0, BIG, 2)]
    sd = zeroload.load(path, keys=wanted)
    assert sorted(sd) == sorted(wanted)
    assert torch.equal(stacked([sd[k] for k in wanted]), expected(BIG)[::2])
    odd = zeroload.load(path, keys=lambda k: k.endswith(("1", "3", "5", "7", "9")))
    assert len(odd) == BIG // 2


def test_shared_storage_at_scale_matches_torch(pth_shared: Path) -> None:
    ours = zeroload.load(pth_shared)
    ref = torch.load(pth_shared, weights_only=True, mmap=True)
    assert_same(ours, ref)
    assert len({t.untyped_storage().data_ptr() for t in ours.values()}) == 1
    with zeroload.open(pth_shared) as f:
        rows = stacked([f.get_tensor(name(i)) for i in range(MID)])
        assert torch.equal(rows, expected(MID))
        assert f.get_tensor(name(5)).storage_offset() == 5 * WIDTH


def test_shard_set_of_100k(shards_big: Path) -> None:
    names = [name(i) for i in range(BIG)]
    sd = zeroload.load(shards_big)
    assert sorted(sd) == sorted(names)
    assert torch.equal(stacked([sd[k] for k in names]), expected(BIG))
    some = zeroload.load(shards_big, keys=names[::3])
    assert torch.equal(stacked([some[k] for k in names[::3]]), expected(BIG)[::3])
    with zeroload.open(shards_big) as f:
        assert sorted(f.keys()) == sorted(names)
        assert torch.equal(stacked([f.get_tensor(k) for k in names]), expected(BIG))


class Wide(torch.nn.Module):
    """A module with `count` parameters, w0 ... w{count-1}."""

    def __init__(self, count: int) -> None:
        super().__init__()
        for i in range(count):
            self.register_parameter(f"w{i}", torch.nn.Parameter(torch.empty(WIDTH)))


@pytest.fixture(scope="module")
def wide_file(big_dir: Path) -> Path:
    rows = expected(MID)
    path = big_dir / "wide.safetensors"
    from safetensors.torch import save_file

    save_file({f"w{i}": rows[i] for i in range(MID)}, path)
    return path


def counting_opens(monkeypatch: pytest.MonkeyPatch, *modules: types.ModuleType) -> list[str]:
    """Records every Checkpoint.open made through the `_core` of any of `modules`."""
    opened: list[str] = []

    class Checkpoint:
        @staticmethod
        def open(path: str) -> _core.Checkpoint:
            opened.append(os.fspath(path))
            return _core.Checkpoint.open(path)

    class CountingCore(types.ModuleType):
        def __getattr__(self, attr: str) -> object:
            return Checkpoint if attr == "Checkpoint" else getattr(_core, attr)

    for module in modules:
        monkeypatch.setattr(module, "_core", CountingCore("_core"))
    return opened


@pytest.mark.parametrize("on_meta", [True, False], ids=["meta", "materialised"])
def test_load_into_20k_parameters_parses_once(
    wide_file: Path, monkeypatch: pytest.MonkeyPatch, on_meta: bool
) -> None:
    import zeroload._load_into as load_into_module
    import zeroload._shards as shards_module

    if on_meta:
        with torch.device("meta"):
            model = Wide(MID)
    else:
        model = Wide(MID)
    # The shard set's files are opened by its name index (`_shards.tensor_index`).
    opened = counting_opens(monkeypatch, load_into_module, shards_module)
    result = zeroload.load_into(model, wide_file)
    assert not result.missing_keys and not result.unexpected_keys
    assert opened == [os.fspath(wide_file)]
    rows = stacked([getattr(model, f"w{i}").detach() for i in range(MID)])
    assert torch.equal(rows, expected(MID))
