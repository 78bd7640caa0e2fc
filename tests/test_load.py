"""zeroload.load on torch.save files: the same objects torch.load(weights_only=True) gives."""

from __future__ import annotations

import collections
import ctypes
import hashlib
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ALL_DTYPES, TiedNet, TinyNet, random_tensor, training_checkpoint
from reference import assert_same, assert_sharing_same

import zeroload


def save(tmp_path: Path, obj: object, name: str = "ckpt.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def check_against_torch(path: Path) -> object:
    ours = zeroload.load(path)
    ref = torch.load(path, weights_only=True)
    assert_same(ours, ref)
    assert_sharing_same(ours, ref)
    return ours


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_torch_saves(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = {"x": random_tensor((3, 5), dtype), "scalar": random_tensor((), dtype, seed=1)}
    check_against_torch(save(tmp_path, sd))


def test_views_keep_stride_and_offset(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = {
        "transposed": base.t(),
        "sliced": base[2:5, 3:7],
        "row": base[4],
        "stepped": base[::2, ::3],
        "expanded": torch.arange(4.0).reshape(4, 1).expand(4, 6),
        "zero_dim": torch.tensor(3.25),
        "empty": torch.empty(0, 7),
        "empty_3d": torch.empty(2, 0, 3, dtype=torch.int64),
        "base": base,
    }
    ours = check_against_torch(save(tmp_path, sd))
    # Views of one tensor share its memory, as in the file.
    assert ours["sliced"].untyped_storage().data_ptr() == ours["base"].untyped_storage().data_ptr()
    assert ours["expanded"].stride() == (1, 0)


def test_tied_weights_stay_tied(tmp_path: Path) -> None:
    model = TiedNet()
    ours = check_against_torch(save(tmp_path, model.state_dict()))
    assert ours["wte.weight"].data_ptr() == ours["lm_head.weight"].data_ptr()


def test_state_dict_is_an_ordered_dict_with_metadata(model_file: Path) -> None:
    ours = check_against_torch(model_file)
    assert isinstance(ours, collections.OrderedDict)
    assert ours._metadata[""] == {"version": 1}
    assert ours._metadata["norm"]["version"] == 2


def test_full_training_checkpoint(tmp_path: Path) -> None:
    ckpt = training_checkpoint()
    ours = check_against_torch(save(tmp_path, ckpt))
    assert ours["step"] == 2**70
    assert ours["optimizer"]["param_groups"][0]["lr"] == 3e-4
    # exp_avg etc. are real tensors and the step counters are 0-dim tensors.
    state = ours["optimizer"]["state"][0]
    assert state["exp_avg"].shape == ckpt["optimizer"]["state"][0]["exp_avg"].shape


def test_parameter_saved_directly(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.randn(3, 4))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    ours = check_against_torch(save(tmp_path, {"p": p, "frozen": frozen, "alone": p}))
    assert isinstance(ours["p"], torch.nn.Parameter) and ours["p"].requires_grad
    assert ours["alone"] is ours["p"]


def test_objects_shared_in_the_pickle_stay_shared(tmp_path: Path) -> None:
    shared = [1, 2]
    t = torch.ones(2)
    ours = zeroload.load(save(tmp_path, {"a": shared, "b": shared, "t1": t, "t2": t}))
    assert ours["a"] is ours["b"]
    assert ours["t1"] is ours["t2"]


def test_non_dict_roots(tmp_path: Path) -> None:
    check_against_torch(save(tmp_path, torch.arange(5), "t.pt"))
    check_against_torch(save(tmp_path, [torch.ones(2), (torch.zeros(1), 3)], "l.pt"))
    check_against_torch(save(tmp_path, 42, "int.pt"))


def test_cpu_tensors_are_copy_on_write_views_of_the_file(model_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "cow.pth"
    path.write_bytes(model_file.read_bytes())
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    sd = zeroload.load(path)
    for t in sd.values():
        t.add_(1) if t.is_floating_point() else t.fill_(7)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    # The changes are visible through the tensors themselves.
    fresh = torch.load(path, weights_only=True)
    assert torch.equal(sd["head.weight"], fresh["head.weight"] + 1)


def test_tensors_outlive_the_loader(model_file: Path) -> None:
    sd = zeroload.load(model_file)
    w = sd["head.weight"]
    del sd
    import gc

    gc.collect()
    assert torch.equal(w, torch.load(model_file, weights_only=True)["head.weight"])


def test_seed_flow_meta_model_assign_gives_identical_outputs(model_file: Path) -> None:
    torch.manual_seed(0)
    reference = TinyNet().eval()
    reference.load_state_dict(torch.load(model_file, weights_only=True))
    with torch.device("meta"):
        model = TinyNet()
    model.load_state_dict(zeroload.load(model_file), assign=True)
    model.eval()
    idx = torch.randint(0, 50, (4, 6))
    with torch.no_grad():
        ours, ref = model(idx.reshape(-1)), reference(idx.reshape(-1))
    assert torch.equal(ours, ref)


def test_keys_selects_tensors_by_name_or_predicate(model_file: Path) -> None:
    ref = torch.load(model_file, weights_only=True)
    some = zeroload.load(model_file, keys=["head.weight", "embed.weight"])
    assert list(some) == [k for k in ref if k in ("head.weight", "embed.weight")]
    assert torch.equal(some["head.weight"], ref["head.weight"])
    biases = zeroload.load(model_file, keys=lambda k: k.endswith(".bias"))
    assert list(biases) == [k for k in ref if k.endswith(".bias")]


def test_keys_missing_name_suggests_near_matches(model_file: Path) -> None:
    with pytest.raises(KeyError, match=r"head\.weigth.*did you mean 'head\.weight'"):
        zeroload.load(model_file, keys=["head.weigth"])


def test_dtype_casts_floating_tensors_only(model_file: Path) -> None:
    ref = torch.load(model_file, weights_only=True)
    ours = zeroload.load(model_file, dtype=torch.bfloat16)
    for k, t in ref.items():
        expected = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert ours[k].dtype == expected.dtype
        assert torch.equal(ours[k], expected)


def test_drop_in_arguments(model_file: Path) -> None:
    ref = torch.load(model_file, weights_only=True)
    for kwargs in (
        {"map_location": "cpu"},
        {"map_location": torch.device("cpu")},
        {"map_location": {"cpu": "cpu"}},
        {"weights_only": True, "mmap": True},
        {"mmap": False},
    ):
        assert_same(zeroload.load(model_file, **kwargs), ref)


def test_weights_only_false_is_refused(model_file: Path) -> None:
    with pytest.raises(ValueError, match="never executes code"):
        zeroload.load(model_file, weights_only=False)


def test_map_location_callable_is_refused(model_file: Path) -> None:
    with pytest.raises(TypeError, match="callables are not supported"):
        zeroload.load(model_file, map_location=lambda s, loc: s)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        zeroload.load(tmp_path / "nope.pth")


def test_many_tensor_checkpoint(tmp_path: Path) -> None:
    sd = {f"layer.{i}.weight": torch.full((2,), float(i)) for i in range(3000)}
    ours = check_against_torch(save(tmp_path, sd))
    assert len(ours) == 3000


def test_module_saved_whole_is_refused_naming_the_class(tmp_path: Path) -> None:
    path = save(tmp_path, TiedNet())
    with pytest.raises(zeroload.CheckpointError, match=r"TiedNet|allow-list") as e:
        zeroload.load(path)
    assert str(path) in str(e.value)


# ----------------------------------------------------------------------------- how CPU
# tensors are made: a tensor that is its whole storage comes from one typed DLPack export,
# the others are views on one shared storage object. Both must match torch.load exactly.


def test_whole_storage_tensors_match_torch_whatever_their_strides(tmp_path: Path) -> None:
    sd = {
        # Size-1 dimensions may carry any stride; torch keeps them, and so must we.
        "odd_unit_stride": torch.arange(3.0).reshape(3, 1).as_strided((3, 1), (1, 7)),
        "unit_dims": torch.arange(6, dtype=torch.int16).reshape(1, 6, 1),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "grad": torch.ones(2, requires_grad=True),
        "fortran": torch.arange(6.0).reshape(2, 3).t(),  # whole storage, not contiguous
    }
    ours = check_against_torch(save(tmp_path, sd))
    assert ours["odd_unit_stride"].stride() == (1, 7)
    assert ours["grad"].requires_grad


def test_a_storage_saved_beside_its_tensors_is_one_storage(tmp_path: Path) -> None:
    t = torch.arange(8, dtype=torch.uint8)  # torch.save wants the same dtype for both
    path = save(tmp_path, {"t": t, "storage": t.untyped_storage()})
    ours, ref = zeroload.load(path), torch.load(path, weights_only=True)
    assert_same(ours["t"], ref["t"])
    # (torch.load wraps the storage in a TypedStorage; zeroload gives the UntypedStorage.)
    assert ours["storage"].data_ptr() == ours["t"].untyped_storage().data_ptr()
    assert ours["storage"].tolist() == ref["t"].tolist()
    alone = zeroload.load(save(tmp_path, {"s": torch.ones(3).untyped_storage()}, "s.pth"))
    assert alone["s"].nbytes() == 12


REFUSED_DTYPE_CHILD = r"""
import sys, torch, zeroload
from zeroload import _core, _torch

path = sys.argv[1]
ckpt = _core.Checkpoint.open(path)
calls = []

def refuse(capsule):
    calls.append(1)
    raise BufferError("this torch cannot import float64")

# A consumer refusing a dtype makes that export fall back (None) ...
assert ckpt.export_tensor(0, refuse) is None and calls == [1]
assert ckpt.export_tensors([0], refuse) == [None, None] and calls == [1, 1]
# ... for that call only: a later one asks again (one failure poisons nothing).
assert ckpt.export_tensor(0, torch.from_dlpack) is not None
# A load whose consumer refuses float64 builds it from its storage and a view, which
# gives the same tensors; other dtypes still export.
real = _torch.from_capsule
def refuse_float64(capsule):
    t = real(capsule)
    if t.dtype == torch.float64:
        raise BufferError("this torch cannot import float64")
    return t
_torch.from_capsule = refuse_float64
sd = zeroload.load(path)
_torch.from_capsule = real
ref = torch.load(path, weights_only=True)
for k in ref:
    assert torch.equal(sd[k], ref[k]) and sd[k].stride() == ref[k].stride(), k

def interrupt(capsule):
    raise KeyboardInterrupt

try:
    ckpt.export_tensor(1, interrupt)
except KeyboardInterrupt:
    print("ok")
"""


def test_dtypes_torch_cannot_import_fall_back_to_storage_views(tmp_path: Path) -> None:
    path = save(tmp_path, {"d": torch.arange(4.0, dtype=torch.float64), "f": torch.ones(2)})
    out = subprocess.run(
        [sys.executable, "-c", REFUSED_DTYPE_CHILD, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "ok"


# ----------------------------------------------------------------------------- readahead


PAGE = mmap.PAGESIZE


def resident_fraction(path: Path) -> float:
    """The share of the file's pages in the page cache (mincore; reads nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        buf = (ctypes.c_char * size).from_buffer(m)
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec)
        del buf
        assert rc == 0, os.strerror(ctypes.get_errno())
        return sum(v & 1 for v in vec) / pages
    finally:
        m.close()


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.fixture
def evicted_file(tmp_path: Path) -> Path:
    """A 32 MiB checkpoint whose pages are not in the page cache."""
    path = tmp_path / "cold.safetensors"
    from safetensors.torch import save_file

    save_file({f"w{i}": torch.full((1 << 20,), float(i)) for i in range(8)}, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if resident_fraction(path) > 0.1:
        pytest.skip("this file system keeps the file cached (tmpfs?): cannot test readahead")
    return path


def wait_until_resident(path: Path, fraction: float, seconds: float = 20.0) -> float:
    deadline = time.monotonic() + seconds
    while (now := resident_fraction(path)) < fraction and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


@pytest.mark.parametrize("setting", [True, None])
def test_readahead_reads_the_file_into_the_page_cache_not_into_rss(
    evicted_file: Path, setting: bool | None
) -> None:
    before = rss_kib()
    sd = zeroload.load(evicted_file, readahead=setting)
    # Background readahead fills the cache without anything touching the tensors...
    assert wait_until_resident(evicted_file, 0.99) >= 0.99
    # ... and without mapping the pages into the process.
    assert rss_kib() - before < 8 << 10
    assert torch.equal(sd["w7"], torch.full((1 << 20,), 7.0))


def test_without_readahead_nothing_is_read_until_touched(evicted_file: Path) -> None:
    sd = zeroload.load(evicted_file, readahead=False)
    time.sleep(0.5)
    assert resident_fraction(evicted_file) < 0.5
    assert torch.equal(sd["w3"], torch.full((1 << 20,), 3.0))


def test_auto_readahead_stays_within_available_memory(
    evicted_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zeroload._torch

    # Half of 40 MiB "available" is less than the 32 MiB file: auto does not read ahead.
    monkeypatch.setattr(zeroload._torch, "_mem_available", lambda: 40 << 20)
    zeroload.load(evicted_file)
    time.sleep(0.5)
    assert resident_fraction(evicted_file) < 0.5
    # With keys=, only the selected tensors count (and only they are read).
    zeroload.load(evicted_file, keys=["w1"])
    assert wait_until_resident(evicted_file, 0.1) >= 0.1
    assert resident_fraction(evicted_file) < 0.5


def test_readahead_takes_only_booleans_or_none(model_file: Path) -> None:
    with pytest.raises(TypeError, match="readahead must be True, False or None"):
        zeroload.load(model_file, readahead="yes")  # type: ignore[arg-type]


def test_device_loads_build_torchs_views_on_one_copy_per_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The GPU path's glue, without a GPU: the copy engine's allocation and copy (tested
    # in test_gpu.py on CUDA) is replaced by CPU copies of each storage's bytes.
    import zeroload._cuda
    from zeroload import _core

    copies: list[list[int]] = []

    def fake_copy(ckpt: _core.Checkpoint, ids: list[int], device: torch.device, **_: object):
        assert device.type == "cuda"
        copies.append(list(ids))
        return [torch.from_dlpack(ckpt.storage_view(i)).clone() for i in ids]

    monkeypatch.setattr(zeroload._cuda, "storage_tensors", fake_copy)
    path = save(tmp_path, training_checkpoint())
    ref = torch.load(path, weights_only=True)
    for device in ("cuda", {"cpu": "cuda:0"}):
        copies.clear()
        ours = zeroload.load(path, map_location=device)
        assert_same(ours, ref)
        assert_sharing_same(ours, ref)
        assert len(copies) == 1 and sorted(copies[0]) == sorted(set(copies[0]))
    sd_path = save(tmp_path, TiedNet().state_dict(), "tied.pth")
    with zeroload.open(sd_path, device="cuda") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            assert torch.equal(t, torch.load(sd_path, weights_only=True)[name])
