"""zeroload.save: torch zip and safetensors files read back by torch, safetensors and
zeroload exactly as torch.save / save_file's files are; atomic replacement; refusals."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import (
    ALL_DTYPES,
    SAFETENSORS_DTYPES,
    TORCH_ONLY_DTYPES,
    TiedNet,
    random_tensor,
    strided_views,
    training_checkpoint,
)
from reference import assert_same, assert_sharing_same, assert_tensor_same
from safetensors import safe_open
from safetensors.torch import load_file

import zeroload
from zeroload import _core

pytestmark = pytest.mark.filterwarnings("ignore:BComplex32 support is experimental:UserWarning")

PYTHONPATH = str(Path(zeroload.__file__).parent.parent)


def load_all_ways(path: Path) -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("torch.load", lambda: torch.load(path, weights_only=True)),
        ("torch.load(mmap=True)", lambda: torch.load(path, mmap=True, weights_only=True)),
        ("zeroload.load", lambda: zeroload.load(path)),
    ]


def assert_saves_like_torch(obj: Any, tmp_path: Path, name: str = "ckpt.pt") -> None:
    """zeroload.save's file loads, every way, to what torch.save's file loads to."""
    ours, ref = tmp_path / name, tmp_path / f"ref-{name}"
    zeroload.save(obj, ours)
    torch.save(obj, ref)
    expected = torch.load(ref, weights_only=True)
    for how, load in load_all_ways(ours):
        got = load()
        try:
            assert_same(got, expected)
            assert_sharing_same(got, expected)
        except AssertionError as e:
            raise AssertionError(f"{how}: {e}") from e
    assert_zip_like_torch(ours, ref)


def assert_zip_like_torch(ours: Path, ref: Path) -> None:
    """Same record names (in order), every record stored, its data 64-byte aligned, CRCs
    that zipfile verifies."""
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(ref) as b:
        assert a.testzip() is None
        strip = lambda z: [i.filename.split("/", 1)[1] for i in z.infolist()]  # noqa: E731
        names_a, names_b = strip(a), strip(b)
        assert names_a[:-1] == names_b[:-1]  # the serialization id differs, not its name
        assert names_a[-1] == names_b[-1] == ".data/serialization_id"
        raw = ours.read_bytes()
        for info in a.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            at = info.header_offset
            name_len, extra_len = (
                int.from_bytes(raw[at + 26 : at + 28], "little"),
                int.from_bytes(raw[at + 28 : at + 30], "little"),
            )
            assert (at + 30 + name_len + extra_len) % 64 == 0, info.filename


def test_training_checkpoint_round_trips_as_torch_save(tmp_path: Path) -> None:
    obj = training_checkpoint()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    opt.step()
    scheduler.step()
    obj["scheduler"] = scheduler.state_dict()
    obj["rng"] = torch.get_rng_state()
    obj["param"] = torch.nn.Parameter(torch.randn(3, 2))
    obj["frozen"] = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    assert_saves_like_torch(obj, tmp_path)


def test_module_state_dict_keeps_metadata_and_ties(tmp_path: Path) -> None:
    sd = TiedNet().state_dict()
    assert isinstance(sd, collections.OrderedDict) and hasattr(sd, "_metadata")
    assert_saves_like_torch(sd, tmp_path)
    got = zeroload.load(tmp_path / "ckpt.pt")
    assert got["wte.weight"].data_ptr() == got["lm_head.weight"].data_ptr()
    with zipfile.ZipFile(tmp_path / "ckpt.pt") as z:  # the tied weight is written once
        assert sum("/data/" in n for n in z.namelist()) == len(sd) - 1


def test_views_keep_strides_offsets_and_sharing(tmp_path: Path) -> None:
    assert_saves_like_torch(strided_views(), tmp_path)


@pytest.mark.parametrize("dtype", ALL_DTYPES + TORCH_ONLY_DTYPES, ids=str)
def test_every_dtype_torch_save_writes(dtype: torch.dtype, tmp_path: Path) -> None:
    t = random_tensor((5, 7), dtype)
    obj = {"t": t, "view": t[1:, 2:], "scalar": random_tensor((), dtype, seed=1)}
    ours = tmp_path / "d.pt"
    zeroload.save(obj, ours)
    torch.save(obj, tmp_path / "ref.pt")
    expected = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert_same(torch.load(ours, weights_only=True), expected)
    assert_same(torch.load(ours, mmap=True, weights_only=True), expected)


def test_empty_and_large_tensors(tmp_path: Path) -> None:
    big = torch.randn(5 << 20)  # 20 MiB: split across writer threads
    obj = {"empty": torch.empty(0), "none": torch.zeros(0, 3), "big": big, "after": big[7:9]}
    assert_saves_like_torch(obj, tmp_path)


def test_many_small_tensors(tmp_path: Path) -> None:
    obj = {f"t{i}": torch.full((i % 5 + 1,), float(i)) for i in range(3000)}
    assert_saves_like_torch(obj, tmp_path)


def test_tensor_of_a_zeroload_mapping_is_written_from_it(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    zeroload.save({"w": torch.randn(64, 64), "b": torch.randn(64)}, src)
    sd = zeroload.load(src)
    zeroload.save(sd, tmp_path / "copy.pt")
    assert_same(zeroload.load(tmp_path / "copy.pt"), load_file(src))


# ---------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("st_name", list(SAFETENSORS_DTYPES))
def test_safetensors_every_dtype(st_name: str, tmp_path: Path) -> None:
    dtype = SAFETENSORS_DTYPES[st_name]
    sd = {"a": random_tensor((3, 4), dtype), "b": random_tensor((2,), dtype, seed=2)}
    path = tmp_path / "x.safetensors"
    zeroload.save(sd, path)
    got = load_file(path)
    assert list(got) == sorted(sd)
    for k in sd:
        assert_tensor_same(got[k], sd[k], k)
    with safe_open(path, "pt") as f:
        assert f.metadata() is None


def test_safetensors_matches_save_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    base = torch.randn(6, 8)
    sd = {
        "t": base.t(),  # non-contiguous: written contiguous
        "h": torch.randn(5, dtype=torch.float16),
        "i": torch.arange(7, dtype=torch.int64),
        "s": torch.tensor(3.5),
        "e": torch.empty(0, 4),
        "b": torch.tensor([True, False]),
    }
    meta = {"format": "pt", "step": "12"}
    ours, ref = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    zeroload.save(sd, ours)
    save_file({k: v.contiguous() for k, v in sd.items()}, ref)
    assert ours.read_bytes() == ref.read_bytes()  # same order, offsets, padding
    zeroload.save(sd, ours, metadata=meta)  # save_file orders metadata keys at random
    with safe_open(ours, "pt") as f:
        assert f.metadata() == meta
    got = zeroload.load(ours)
    for k in sd:
        assert torch.equal(got[k], sd[k])


def test_safetensors_refuses_shared_memory_naming_both(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    path = tmp_path / "tied.safetensors"
    with pytest.raises(zeroload.CheckpointError, match=r"'a' and 'b' share memory.*save_model"):
        zeroload.save({"a": w, "b": w}, path)
    with pytest.raises(zeroload.CheckpointError, match="share memory"):
        zeroload.save({"a": w, "b": w[1:3]}, path)
    assert not path.exists()
    zeroload.save({"top": w[:2], "bottom": w[2:]}, path)  # disjoint views: fine
    got = load_file(path)
    assert torch.equal(got["top"], w[:2]) and torch.equal(got["bottom"], w[2:])


@pytest.mark.parametrize(
    "obj, match",
    [
        ([torch.ones(1)], "dict"),
        ({1: torch.ones(1)}, "key 1"),
        ({"a": 3}, r"obj\['a'\].*not a tensor"),
        ({"c": torch.ones(2, dtype=torch.complex128)}, "complex128"),
    ],
)
def test_safetensors_refusals(obj: Any, match: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    with pytest.raises(zeroload.CheckpointError, match=match):
        zeroload.save(obj, path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# Refusals and atomicity
# ---------------------------------------------------------------------------------------


class Custom:
    pass


@pytest.mark.parametrize(
    "bad, where, what",
    [
        ({"bad": lambda x: x}, r"obj\['bad'\]", "builtins.function"),
        ({"opt": [{"fn": Custom()}]}, r"obj\['opt'\]\[0\]\['fn'\]", "Custom"),
        ({"d": collections.defaultdict(int)}, r"obj\['d'\]", "defaultdict"),
        ({"g": torch.ones(2, requires_grad=True) * 2}, r"obj\['g'\]", "non-leaf"),
        ({"s": torch.ones(3).to_sparse()}, r"obj\['s'\]", "sparse"),
        ({"m": torch.empty(3, device="meta")}, r"obj\['m'\]", "meta"),
    ],
)
def test_refused_objects_write_nothing(bad: Any, where: str, what: str, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old contents")
    with pytest.raises(zeroload.CheckpointError, match=f"{path.name}.*{where}.*{what}"):
        zeroload.save(bad, path)
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_metadata_needs_safetensors(tmp_path: Path) -> None:
    with pytest.raises(zeroload.CheckpointError, match="metadata"):
        zeroload.save({"a": torch.ones(1)}, tmp_path / "a.pt", metadata={"x": "y"})


def failing_progress(exc: BaseException) -> Any:
    """A progress bar factory whose bar raises ``exc`` once the write has started."""

    def make(progress: Any, total: int, desc: str) -> Any:
        class Bar:
            def __call__(self, done: int, total: int) -> None:
                if done > 0 or total == 0:
                    raise exc

            def close(self) -> None:
                pass

        return Bar()

    return make


@pytest.mark.parametrize("exc", [RuntimeError("tensor failed"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_old_file(
    exc: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zeroload import _save

    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.zeros(10)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(_save, "progress_bar", failing_progress(exc))
    with pytest.raises(type(exc)):
        zeroload.save({"w": torch.randn(40 << 20)}, path)  # 160 MiB: many progress calls
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_disk_full_leaves_old_file(tmp_path: Path) -> None:
    """A write that the OS refuses (the file size limit, as a full disk would) fails with
    OSError; the old file and the directory are as they were."""
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.zeros(10)}, path)
    before = path.read_bytes()
    r = run_python(
        """
        import resource, signal, sys, torch, zeroload
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            zeroload.save({"w": torch.randn(1 << 20)}, sys.argv[1])
        except OSError as e:
            print("OSError", e.errno)
        """,
        str(path),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OSError"), r.stdout + r.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_ctrl_c_in_a_subprocess_leaves_old_file(tmp_path: Path) -> None:
    """SIGINT delivered while the writer threads run: KeyboardInterrupt, old file kept."""
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.zeros(10)}, path)
    before = path.read_bytes()
    r = run_python(
        """
        import os, signal, sys, torch, zeroload
        from zeroload import _save
        class Bar:
            def __call__(self, done, total):
                if done == 0:
                    os.kill(os.getpid(), signal.SIGINT)  # arrives while writing
            def close(self):
                pass
        _save.progress_bar = lambda *a: Bar()
        try:
            zeroload.save({"w": torch.randn(40 << 20)}, sys.argv[1])
        except KeyboardInterrupt:
            print("interrupted")
        """,
        str(path),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "interrupted", r.stdout + r.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_resume_pattern_saves_over_the_mapped_file(suffix: str, tmp_path: Path) -> None:
    """load -> train -> save over the same path: no SIGBUS, the old tensors keep reading
    the old bytes, the new file holds the new values (a subprocess, so a SIGBUS would show
    as its exit status)."""
    path = tmp_path / f"ckpt{suffix}"
    r = run_python(
        """
        import sys, torch, zeroload
        path = sys.argv[1]
        torch.manual_seed(0)
        start = {"w": torch.randn(256, 256), "b": torch.randn(1 << 20)}
        zeroload.save(start, path)
        sd = zeroload.load(path)
        old_b = sd["b"]                     # untouched: still a view of the old file
        sd["w"] += 1.0                      # "train" (copy-on-write: file unchanged)
        new = {"w": sd["w"], "b": sd["b"] * 2}
        zeroload.save(new, path)            # over the file sd maps
        assert torch.equal(old_b, start["b"]), "old tensor changed"
        back = zeroload.load(path)
        assert torch.equal(back["w"], start["w"] + 1.0)
        assert torch.equal(back["b"], start["b"] * 2)
        print("ok")
        """,
        str(path),
    )
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    assert r.stdout.strip() == "ok"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_progress_bar_reports_the_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zeroload import _save

    seen: list[tuple[int, int]] = []

    class Bar:
        def __call__(self, done: int, total: int) -> None:
            seen.append((done, total))

        def close(self) -> None:
            pass

    monkeypatch.setattr(_save, "progress_bar", lambda *a: Bar())
    zeroload.save({"w": torch.randn(1000)}, tmp_path / "a.safetensors")
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] >= 4000


# ---------------------------------------------------------------------------------------
# The core's writer
# ---------------------------------------------------------------------------------------


def test_write_host_checks_requests(tmp_path: Path) -> None:
    import zlib

    path = tmp_path / "raw"
    with open(path, "wb") as f:
        fd = f.fileno()
        t = torch.arange(10, dtype=torch.uint8)
        crcs = _core.write_host(fd, str(path), [b"abc", t], [(0, 0, 3, 0), (1, 2, 5, 3)])
        assert crcs == [zlib.crc32(b"abc"), zlib.crc32(bytes(range(2, 7)))]
        with pytest.raises(ValueError, match="past its end"):
            _core.write_host(fd, str(path), [b"abc"], [(0, 1, 3, 0)])
        with pytest.raises(ValueError, match="source #1"):
            _core.write_host(fd, str(path), [b"abc"], [(1, 0, 1, 0)])
        with pytest.raises(ValueError, match="overlaps"):
            _core.write_host(fd, str(path), [b"abcd"], [(0, 0, 4, 0), (0, 0, 2, 2)])
        with pytest.raises(ValueError, match="not contiguous"):
            _core.write_host(fd, str(path), [torch.ones(4, 4).t()], [(0, 0, 4, 0)])
    assert path.read_bytes() == b"abc" + bytes(range(2, 7))


def test_conjugate_and_negative_views_keep_their_bits(tmp_path: Path) -> None:
    """torch writes conj/neg bits as rebuild metadata; so does zeroload.save."""
    z, w = torch.randn(4, dtype=torch.complex64), torch.randn(4, dtype=torch.complex64)
    neg = w.conj().imag  # a float view of w's storage with the negative bit
    assert neg.is_neg()
    obj = {"conj": z.conj(), "z": z, "neg": neg}
    zeroload.save(obj, tmp_path / "ours.pt")
    torch.save(obj, tmp_path / "ref.pt")
    expected = torch.load(tmp_path / "ref.pt", weights_only=True)
    # (zeroload.load refuses conj/neg bits, naming them, for either file.)
    for _, load in load_all_ways(tmp_path / "ours.pt")[:2]:
        got = load()
        for k in obj:
            assert torch.equal(got[k], expected[k]), k
            assert got[k].is_conj() == obj[k].is_conj() and got[k].is_neg() == obj[k].is_neg()


def test_fast_tensor_reduction_pickles_like_torch() -> None:
    """The pickler's reduction of plain tensors gives the pickle torch's own gives."""
    import copyreg
    import io

    from zeroload import _save

    base = torch.randn(4, 6)
    obj = {
        "a": base,
        "t": base.t(),
        "u16": torch.arange(5).to(torch.uint16),
        "p": torch.nn.Parameter(torch.ones(2)),
        "g": torch.ones(3, requires_grad=True),
    }
    ours = io.BytesIO()
    _save._Pickler(ours).dump(obj)

    ref = io.BytesIO()
    torch_pickler = _save._Pickler(ref)
    torch_pickler.dispatch_table = dict(copyreg.dispatch_table)  # torch.Tensor.__reduce_ex__
    torch_pickler.dump(obj)
    assert ours.getvalue() == ref.getvalue()


@pytest.mark.gpu
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_cuda_tensors_save_like_their_cpu_copies(suffix: str, tmp_path: Path) -> None:
    """CUDA tensors (device -> staging -> file) give the file their CPU copies give, and
    torch.load(map_location="cpu") reads them back."""
    cpu = {"w": torch.randn(300, 200), "b": torch.randn(7).half(), "t": torch.randn(5, 3)}
    gpu = {k: v.cuda() for k, v in cpu.items()}
    gpu["t"] = gpu["t"].t()  # non-contiguous on the device
    cpu["t"] = cpu["t"].t()
    if suffix == ".pt":
        gpu["tied"], cpu["tied"] = gpu["w"], cpu["w"]
    zeroload.save(gpu, tmp_path / f"gpu{suffix}")
    zeroload.save(cpu, tmp_path / f"cpu{suffix}")
    if suffix == ".pt":
        got = torch.load(tmp_path / f"gpu{suffix}", weights_only=True, map_location="cpu")
        assert_same(got, torch.load(tmp_path / f"cpu{suffix}", weights_only=True))
        assert zipfile.ZipFile(tmp_path / f"gpu{suffix}").testzip() is None
    else:
        assert (tmp_path / f"gpu{suffix}").read_bytes() == (tmp_path / f"cpu{suffix}").read_bytes()


def test_zip64_fields_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zip64 layout (records or offsets past 4 GiB), exercised by moving the point
    where it starts to 100 bytes: torch, zipfile and zeroload read the file back."""
    from zeroload import _save

    monkeypatch.setattr(_save, "_ZIP64_AT", 100)
    obj = {"small": torch.arange(5.0), "big": torch.randn(300), "tied": None}
    obj["tied"] = obj["big"][10:20]
    assert_saves_like_torch(obj, tmp_path)
    raw = (tmp_path / "ckpt.pt").read_bytes()
    assert raw.count(b"\xff\xff\xff\xff") >= 3  # the markers are there


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_a_replaced_file_keeps_its_permissions(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    path.chmod(0o640)
    zeroload.save({"w": torch.ones(2)}, path)
    assert path.stat().st_mode & 0o777 == 0o640
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))


# ---------------------------------------------------------------------------------------
# The fast pickle emitter: the same objects as torch's pickler, or it leaves them to it
# ---------------------------------------------------------------------------------------


def nested_values() -> dict:
    shared = {"x": [1, 2]}
    loop: list = ["a list holding itself"]
    loop.append(loop)
    ints = [0, 1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**63, 2**64 + 5, 3**300]
    return {
        "ints": ints + [-i for i in ints] + [-129, -(2**31), -(2**31) - 1, -(2**64)],
        "floats": [0.0, -0.0, 1.5, -2.25e300, float("inf"), float("-inf"), float("nan")],
        "strings": ["", "plain", "ünïcödé ✓ 🚀", "a\nb\x00c"],
        "singletons": (None, True, False),
        "tuples": ((), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), ([],)),
        "nested": [[[]], {"k": ({}, [{}])}, collections.OrderedDict(z=1, a=2)],
        "keys": {1: "int", -2.5: "float", None: "none", False: "bool", "s": "str"},
        "torch": [
            torch.Size([]),
            torch.Size([2, 3]),
            torch.float16,
            torch.bfloat16,
            torch.device("cpu"),
            torch.device("cuda", 1),
        ],
        "shared once": shared,
        "shared twice": [shared, shared["x"]],
        "loop": loop,
        "long list": list(range(2500)),
        "long dict": {f"k{i}": i for i in range(2500)},
    }


def parameters() -> dict:
    p = torch.nn.Parameter(torch.randn(3, 2))
    return {
        "param": p,
        "again": p,  # one object under two keys
        "frozen": torch.nn.Parameter(torch.randn(2), requires_grad=False),
        "grad leaf": torch.ones(2, requires_grad=True),
        "int param": torch.nn.Parameter(torch.arange(3), requires_grad=False),
    }


def every_dtype() -> dict:
    out = {}
    for dtype in ALL_DTYPES + TORCH_ONLY_DTYPES:
        t = random_tensor((4, 3), dtype)
        out[str(dtype)] = t
        out[f"{dtype} view"] = t[1:, ::2]
        out[f"{dtype} scalar"] = random_tensor((), dtype, seed=1)
    return out


def conj_neg() -> dict:
    z, w = torch.randn(4, dtype=torch.complex64), torch.randn(4, dtype=torch.complex64)
    return {"z": z, "conj": z.conj(), "neg": w.conj().imag, "conj copy": z.conj().clone()}


def empties() -> dict:
    base = torch.randn(6)
    return {"empty": torch.empty(0), "no rows": torch.zeros(0, 3), "end": base[6:], "base": base}


def module_state_dict() -> dict:
    sd = TiedNet().state_dict()
    assert hasattr(sd, "_metadata")
    assert sd["wte.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
    return sd


def optimizer_checkpoint() -> dict:
    """A model and its AdamW state after a step (tensors, ints, floats, tuples, lists)."""
    torch.manual_seed(1)
    model = TiedNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.8, 0.95))
    model(torch.randint(0, 40, (4, 5))).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}


#: name -> (a maker of the object, whether zeroload.load reads it back: it refuses
#: conj/neg bits and rebuilds tensors only, not every object torch's pickle holds).
PICKLE_CORPUS: dict[str, tuple[Callable[[], Any], bool]] = {
    "module state_dict (_metadata, a tied weight)": (module_state_dict, True),
    "AdamW checkpoint (state, param_groups)": (optimizer_checkpoint, True),
    "views sharing a storage": (strided_views, True),
    "parameters": (parameters, True),
    "every dtype": (every_dtype, False),
    "conj and neg views": (conj_neg, False),
    "empty tensors": (empties, True),
    "nested plain values": (nested_values, False),
}


def unpickle(pickled: Any) -> Any:
    """``data.pkl`` unpickled as torch.load unpickles it, the storages taken from memory."""
    import io
    import pickle
    import warnings

    from zeroload import _save

    dtypes = {storage_type: dtype for dtype, storage_type in _save._STORAGE_TYPES.items()}
    dtypes[torch.UntypedStorage] = torch.uint8
    loaded: dict[str, Any] = {}

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            kind, storage_type, key, _location, numel = pid
            assert kind == "storage"
            if key not in loaded:
                storage = pickled.storages[int(key)]
                loaded[key] = torch.storage.TypedStorage(
                    wrap_storage=storage, dtype=dtypes[storage_type], _internal=True
                )
                assert storage.nbytes() == numel * loaded[key].element_size()
            return loaded[key]

    with warnings.catch_warnings():  # TypedStorage's, which torch.load hides too
        warnings.filterwarnings("ignore", "TypedStorage is deprecated")
        return Unpickler(io.BytesIO(pickled.data)).load()


def assert_same_graph(ours: Any, ref: Any) -> None:
    """The same object graph: types, values (floats and tensors bitwise; tensors with
    their dtype, size, stride, offset, requires_grad, conj/neg bits), and the same sharing:
    containers and tensors met twice in one are met twice, at the same places, in the
    other, and tensors share storages in one exactly where they do in the other."""
    import struct

    pairs: dict[int, tuple[Any, Any]] = {}  # id in ours -> (ours, ref)
    back: dict[int, Any] = {}  # id in ref -> ours
    storages: dict[int, int] = {}  # storage data_ptr in ours -> in ref

    def walk(a: Any, b: Any, where: str) -> None:
        assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
        if isinstance(a, (torch.Tensor, list, dict)) or (type(a) is tuple and a):
            if id(a) in pairs or id(b) in back:
                assert pairs.get(id(a), (None, None))[1] is b, f"{where}: shared differently"
                assert back.get(id(b)) is a, f"{where}: shared differently"
                return
            pairs[id(a)], back[id(b)] = (a, b), a
        if isinstance(a, torch.Tensor):
            for attr in ("dtype", "shape", "requires_grad"):
                assert getattr(a, attr) == getattr(b, attr), f"{where}.{attr}"
            assert a.stride() == b.stride() and a.storage_offset() == b.storage_offset(), where
            assert (a.is_conj(), a.is_neg()) == (b.is_conj(), b.is_neg()), where
            sa, sb = a.untyped_storage(), b.untyped_storage()
            assert bytes(sa) == bytes(sb), f"{where}: storage bytes"
            if sa.nbytes():
                assert storages.setdefault(sa.data_ptr(), sb.data_ptr()) == sb.data_ptr(), where
        elif isinstance(a, dict):
            assert list(a) == list(b), f"{where}: keys"
            for k in a:
                walk(a[k], b[k], f"{where}[{k!r}]")
            for name in vars(a) if type(a) is collections.OrderedDict else ():
                walk(vars(a)[name], vars(b)[name], f"{where}.{name}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), f"{where}: length"
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{where}[{i}]")
        elif isinstance(a, float):
            assert struct.pack("<d", a) == struct.pack("<d", b), f"{where}: {a} vs {b}"
        else:
            assert a == b, f"{where}: {a!r} vs {b!r}"

    walk(ours, ref, "obj")
    inverse = {v: k for k, v in storages.items()}
    assert len(inverse) == len(storages), "storages shared in ref but not in ours"


@pytest.mark.parametrize("name", list(PICKLE_CORPUS))
def test_fast_pickle_unpickles_as_torchs_pickler(name: str, tmp_path: Path) -> None:
    """The fast emitter takes the usual checkpoint contents, and what it writes unpickles
    to what the general pickler's output unpickles to, storages numbered alike."""
    from zeroload import _save

    obj = PICKLE_CORPUS[name][0]()
    fast = _save._fast_pickle(obj)
    assert fast is not None, "the fast emitter gave up"
    general = _save._pickle(obj, tmp_path / "ckpt.pt")
    assert [s._cdata for s in fast.storages] == [s._cdata for s in general.storages]
    assert fast.nbytes == general.nbytes
    assert_same_graph(unpickle(fast), unpickle(general))
    assert_same_graph(unpickle(fast), obj)


@pytest.mark.parametrize("name", list(PICKLE_CORPUS))
def test_fast_pickled_files_load_as_torch_saves(name: str, tmp_path: Path) -> None:
    """zeroload.save's file loads, every way, to the object graph torch.save's file loads
    to (zeroload.load: tensors, sharing and structure as torch.load has them)."""
    make, zeroload_reads = PICKLE_CORPUS[name]
    obj = make()
    ours, ref = tmp_path / "ckpt.pt", tmp_path / "ref.pt"
    zeroload.save(obj, ours)
    torch.save(obj, ref)
    expected = torch.load(ref, weights_only=True)
    for how, load in load_all_ways(ours)[:2]:
        try:
            assert_same_graph(load(), expected)
        except AssertionError as e:
            raise AssertionError(f"{how}: {e}") from e
    if zeroload_reads:
        got = zeroload.load(ours)
        assert_same(got, expected)
        assert_sharing_same(got, expected)
    assert_zip_like_torch(ours, ref)


@torch.utils.hooks.unserializable_hook
def _hook(grad: torch.Tensor) -> torch.Tensor:
    return grad


class Subclass(torch.Tensor):
    pass


def test_what_the_emitter_leaves_goes_to_torchs_pickler(tmp_path: Path) -> None:
    """Anything but the usual contents (here a tensor with a backward hook, and values
    torch.load rebuilds that the emitter does not write) makes the emitter give up; the
    general path then saves it as before, as torch.save does."""
    from zeroload import _save

    hooked = torch.ones(3, requires_grad=True)
    hooked.register_hook(_hook)
    for odd in (hooked, {1, 2}, b"raw", 1 + 2j, collections.Counter(a=2)):
        obj = {"w": torch.randn(2), "odd": odd}
        assert _save._fast_pickle(obj) is None, odd
        assert_saves_like_torch(obj, tmp_path, name=f"{type(odd).__name__}.pt")


def test_refused_objects_are_refused_as_before(tmp_path: Path) -> None:
    """The emitter gives up on what _check refuses, so the refusal and its message are
    _check's (the subclass named, at its place in obj)."""
    from zeroload import _save

    obj = {"ok": torch.ones(2), "sub": [torch.ones(2).as_subclass(Subclass)]}
    assert _save._fast_pickle(obj) is None
    with pytest.raises(zeroload.CheckpointError, match=r"obj\['sub'\]\[0\].*Subclass"):
        zeroload.save(obj, tmp_path / "x.pt")
    mixed = torch.ones(4)  # one storage viewed as two dtypes: torch.save refuses it too
    with pytest.raises(RuntimeError, match="different types"):
        zeroload.save({"f": mixed, "i": mixed.view(torch.int32)}, tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []
