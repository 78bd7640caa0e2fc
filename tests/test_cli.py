"""The command line, through `zeroload.cli.main([...])` and `python -m zeroload`, checked
against torch.load / safetensors references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import zeroload
from zeroload import cli
from zeroload.bench.gptmodel import GPTModel, config

safetensors_torch = pytest.importorskip("safetensors.torch")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    pkg = str(Path(zeroload.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "zeroload", *args], capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = GPTModel(config("tiny")).eval()
    out = {"dir": d, "model": model}
    out["gpt"] = d / "gpt.pth"
    torch.save(model.state_dict(), out["gpt"])
    emb = torch.nn.Embedding(10, 4)
    base = torch.arange(20, dtype=torch.float32)
    out["weird"] = d / "weird.pth"
    torch.save(
        {
            "transposed": torch.randn(3, 5).t(),
            "emb": emb.weight.detach(),
            "tied": emb.weight.detach(),
            "half": torch.randn(4, dtype=torch.bfloat16),
            "slice": base[5:9],
            "whole": base,
            "scalar": torch.tensor(3),
            "empty": torch.zeros(0, 3),
            "flag": torch.tensor([True, False]),
            "expanded": torch.randn(3, 1).expand(3, 4),  # stride 0
            "bf16_t": torch.randn(4, 3, dtype=torch.bfloat16).t(),  # numpy has no bfloat16
            "every_other": torch.arange(10, dtype=torch.int16)[::2],
        },
        out["weird"],
    )
    out["train"] = d / "train.pth"
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "opt": {"lr": 0.1}}, out["train"])
    out["st"] = d / "a.safetensors"
    safetensors_torch.save_file(
        {"a": torch.randn(3, 5), "h": torch.randn(4, dtype=torch.bfloat16)},
        out["st"],
        metadata={"format": "pt", "note": "hi"},
    )
    # a two-shard safetensors directory with an index
    shard_dir = d / "sharded"
    shard_dir.mkdir()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(sd)
    halves = {
        "s-1.safetensors": names[: len(names) // 2],
        "s-2.safetensors": names[len(names) // 2 :],
    }
    for fname, keys in halves.items():
        safetensors_torch.save_file({k: sd[k] for k in keys}, shard_dir / fname)
    index = {
        "metadata": {"total_size": 123},
        "weight_map": {k: f for f, ks in halves.items() for k in ks},
    }
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    out["sharded"] = shard_dir
    return out


def _inspect_json(capsys: pytest.CaptureFixture, path: Path) -> dict:
    assert cli.main(["inspect", "--json", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


# -- help -----------------------------------------------------------------------------


def test_help_everywhere() -> None:
    r = _run("--help")
    assert r.returncode == 0
    for cmd in ("demo", "bench", "inspect", "convert"):
        assert cmd in r.stdout
        sub = _run(cmd, "--help")
        assert sub.returncode == 0, sub.stderr
        assert f"zeroload {cmd}" in sub.stdout


def test_every_size_the_command_line_offers_has_a_model_config() -> None:
    from zeroload import bench
    from zeroload.bench import gptmodel

    assert set(bench.SIZES.values()) <= set(gptmodel.CONFIGS)
    for short in bench.SIZES:
        assert gptmodel.config(short)["emb_dim"] > 0


TORCH_FREE_CHILD = textwrap.dedent(
    """
    import json, sys
    from zeroload.cli import main
    try:
        rc = main(sys.argv[1:])
    except SystemExit as e:  # --help
        rc = e.code
    harness = sorted(m for m in sys.modules if m.startswith("zeroload.bench."))
    print(
        json.dumps({"rc": rc, "torch": "torch" in sys.modules, "harness": harness}),
        file=sys.stderr,
    )
    """
)


def _run_torch_free(*args: str) -> dict:
    env = dict(os.environ)
    pkg = str(Path(zeroload.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg, env.get("PYTHONPATH")) if p)
    r = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_CHILD, *args], capture_output=True, text=True, env=env
    )
    return json.loads(r.stderr.strip().splitlines()[-1])


def test_help_inspect_and_convert_never_import_torch(files: dict, tmp_path: Path) -> None:
    # The core is torch-free, so the quick commands start in a fraction of torch's import;
    # and only demo and bench import the benchmark harness (zeroload.bench.*).
    runs = {
        "--help": ["--help"],
        "inspect --help": ["inspect", "--help"],
        "inspect .pth": ["inspect", str(files["weird"])],
        "inspect nested .pth": ["inspect", str(files["train"])],
        "inspect .safetensors": ["inspect", "--json", str(files["st"])],
        "inspect shards": ["inspect", str(files["sharded"])],
        "convert .pth": ["convert", str(files["weird"]), str(tmp_path / "a.safetensors")],
        "convert --key": [
            "convert",
            "--key",
            "state_dict",
            str(files["train"]),
            str(tmp_path / "b.safetensors"),
        ],
        "convert shards": ["convert", str(files["sharded"]), str(tmp_path / "c.safetensors")],
    }
    for what, args in runs.items():
        assert _run_torch_free(*args) == {"rc": 0, "torch": False, "harness": []}, what
    assert set(safetensors_torch.load_file(tmp_path / "c.safetensors")) == set(
        files["model"].state_dict()
    )


def test_dtype_tables_agree_with_torch_and_safetensors() -> None:
    # inspect and convert work without torch, from the core's dtype table.
    from zeroload import _core
    from zeroload._convert import SAFETENSORS_DTYPES
    from zeroload._inspect import DTYPE_ITEMSIZE

    assert len(DTYPE_ITEMSIZE) == len(_core.dtypes()) >= 16
    for name, size in DTYPE_ITEMSIZE.items():
        assert getattr(torch, name).itemsize == size, name
    assert {"float32": "F32", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3"}.items() <= (
        SAFETENSORS_DTYPES.items()
    )
    assert "complex128" not in SAFETENSORS_DTYPES  # the format has no such dtype
    for name, st in SAFETENSORS_DTYPES.items():
        assert _core.safetensors_dtype_name(name) == st, name
        if st in safetensors_torch._TYPES:  # the installed safetensors may know fewer
            assert safetensors_torch._TYPES[st] == getattr(torch, name), name


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


# -- inspect --------------------------------------------------------------------------


def test_inspect_matches_torch_load(files: dict, capsys: pytest.CaptureFixture) -> None:
    info = _inspect_json(capsys, files["weird"])
    ref = torch.load(files["weird"], weights_only=True)
    assert [t["name"] for t in info["tensors"]] == list(ref)
    for t in info["tensors"]:
        r = ref[t["name"]]
        assert t["dtype"] == str(r.dtype).split(".")[-1]
        assert t["shape"] == list(r.shape)
        assert t["bytes"] == r.numel() * r.element_size()
    assert info["files"][0]["format"] == "torch zip"
    tot = info["totals"]
    assert tot["tensors"] == len(ref)
    assert tot["bytes"] == sum(r.numel() * r.element_size() for r in ref.values())
    assert tot["by_dtype"]["bfloat16"] == {"tensors": 2, "elements": 16, "bytes": 32}
    assert tot["file_bytes"] == files["weird"].stat().st_size


def test_inspect_table(files: dict, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["inspect", str(files["gpt"])]) == 0
    out = capsys.readouterr().out
    sd = files["model"].state_dict()
    for name, t in sd.items():
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [name])
        assert "[" + ", ".join(map(str, t.shape)) + "]" in line
    n = sum(t.numel() for t in sd.values())
    assert f"{n:,} elements" in out


def test_inspect_safetensors_metadata(files: dict, capsys: pytest.CaptureFixture) -> None:
    info = _inspect_json(capsys, files["st"])
    assert info["files"][0]["format"] == "safetensors"
    assert info["files"][0]["metadata"] == {"format": "pt", "note": "hi"}
    with safetensors_torch.safe_open(files["st"], "pt") as f:
        assert [t["name"] for t in info["tensors"]] == list(f.keys())


@pytest.mark.parametrize("which", ["dir", "index"])
def test_inspect_shards(files: dict, capsys: pytest.CaptureFixture, which: str) -> None:
    d = files["sharded"]
    path = d if which == "dir" else d / "model.safetensors.index.json"
    info = _inspect_json(capsys, path)
    assert len(info["files"]) == 2
    assert info["metadata"] == {"total_size": 123}
    sd = files["model"].state_dict()
    got = {t["name"]: t["shape"] for t in info["tensors"]}
    assert got == {k: list(v.shape) for k, v in sd.items()}


def test_inspect_nested_checkpoint(files: dict, capsys: pytest.CaptureFixture) -> None:
    info = _inspect_json(capsys, files["train"])
    names = {t["name"] for t in info["tensors"]}
    assert names == {f"state_dict.{k}" for k in files["model"].state_dict()}


def test_inspect_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["inspect", str(tmp_path / "nope.pth")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "FileNotFoundError" in err and "nope.pth" in err


def test_inspect_corrupt_file_subprocess(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    r = _run("inspect", str(bad))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "CheckpointError" in r.stderr and "bad.pth" in r.stderr


def test_inspect_lists_non_tensor_entries(files: dict, capsys: pytest.CaptureFixture) -> None:
    info = _inspect_json(capsys, files["train"])
    ref = torch.load(files["train"], weights_only=True)
    assert [(e["name"], e["type"], e["value"]) for e in info["entries"]] == [
        ("epoch", "int", repr(ref["epoch"])),
        ("opt.lr", "float", repr(ref["opt"]["lr"])),
    ]
    assert _inspect_json(capsys, files["gpt"])["entries"] == []  # a flat state dict
    assert cli.main(["inspect", str(files["train"])]) == 0
    out = capsys.readouterr().out
    assert "other entries (2, not tensors):" in out
    assert any(ln.split() == ["epoch", "int", "3"] for ln in out.splitlines())


def test_inspect_lists_many_entries_up_to_a_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "many.pth"
    torch.save({"w": torch.ones(2), "steps": list(range(50)), "name": "x" * 100}, path)
    info = _inspect_json(capsys, path)
    assert len(info["entries"]) == 51
    assert info["entries"][-1]["value"].endswith("...")  # long values are cut short
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "other entries (51, not tensors):" in out and "... and 11 more (--json" in out


def test_inspect_says_one_tensor_not_one_tensors(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "one.pth"
    torch.save({"w": torch.ones(1)}, path)
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 tensor in 1 storage\n" in out
    assert "total: 1 tensor, 1 element, " in out
    assert "tensors" not in out and "storages" not in out and "elements" not in out
    dst = tmp_path / "one.safetensors"
    assert cli.main(["convert", str(path), str(dst)]) == 0
    assert ": 1 tensor, " in capsys.readouterr().out


def test_inspect_directory_hint_lists_pth_files(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "net.pth")
    assert cli.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "net.pth" in err and "no checkpoint in this directory" in err


def test_mistyped_path_gets_did_you_mean(files: dict, capsys: pytest.CaptureFixture) -> None:
    typo = files["dir"] / "gtp.pth"
    assert cli.main(["inspect", str(typo)]) == 1
    err = capsys.readouterr().err
    assert f"did you mean {files['gpt']}?" in err
    with pytest.raises(FileNotFoundError, match="did you mean"):
        zeroload.load(typo)
    # nothing close: no guess; a missing directory names the closest one that exists
    assert cli.main(["inspect", str(files["dir"] / "zzzzzzzz.pth")]) == 1
    assert "did you mean" not in capsys.readouterr().err
    assert cli.main(["inspect", str(files["dir"] / "nodir" / "gpt.pth")]) == 1
    err = capsys.readouterr().err
    assert "nodir does not exist" in err and f"{files['dir']} does)" in err


def test_exit_statuses_are_documented_in_help() -> None:
    r = _run("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "Exit status: 0 done, 1 checkpoint error" in text
    assert "2 usage error" in text and "130 interrupted" in text


def test_cli_and_bench_commands_import_no_cycle() -> None:
    # bench.commands takes UsageError from the leaf module, not from the CLI that imports it
    code = (
        "import sys, zeroload.bench.commands as c, zeroload._usage as u;"
        "assert c.UsageError is u.UsageError;"
        "assert 'zeroload.cli' not in sys.modules, 'bench.commands imported the cli'"
    )
    env = dict(os.environ)
    pkg = str(Path(zeroload.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg, env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    from zeroload import _usage

    assert cli.UsageError is _usage.UsageError  # the old name still works


# -- convert --------------------------------------------------------------------------


def test_convert_model_roundtrip(files: dict, tmp_path: Path) -> None:
    dst = tmp_path / "gpt.safetensors"
    assert cli.main(["convert", str(files["gpt"]), str(dst)]) == 0
    got = safetensors_torch.load_file(dst)
    ref = torch.load(files["gpt"], weights_only=True)
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    with safetensors_torch.safe_open(dst, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with torch.device("meta"):
        model = GPTModel(config("tiny"))
    model.load_state_dict(got, assign=True)
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model.eval()(idx), files["model"](idx))


def test_convert_shared_noncontiguous_and_dtypes(
    files: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dst = tmp_path / "weird.safetensors"
    assert cli.main(["convert", str(files["weird"]), str(dst)]) == 0
    err = capsys.readouterr().err
    assert "share storage" in err and "separate copies" in err
    got = safetensors_torch.load_file(dst)
    ref = torch.load(files["weird"], weights_only=True)
    assert list(sorted(got)) == sorted(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def test_convert_safetensors_and_shard_sets(files: dict, tmp_path: Path) -> None:
    dst = tmp_path / "st.safetensors"
    assert cli.main(["convert", str(files["st"]), str(dst)]) == 0
    ref = safetensors_torch.load_file(files["st"])
    got = safetensors_torch.load_file(dst)
    assert set(got) == set(ref) and all(torch.equal(got[k], v) for k, v in ref.items())
    dst = tmp_path / "merged.safetensors"
    assert cli.main(["convert", str(files["sharded"]), str(dst)]) == 0
    got = safetensors_torch.load_file(dst)
    sd = files["model"].state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], v) for k, v in sd.items())


def test_convert_refuses_an_output_not_named_safetensors(
    files: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dst = tmp_path / "model.pth"
    assert cli.main(["convert", str(files["gpt"]), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "model.pth" in err and ".safetensors" in err and "--force" in err
    assert "torch.load" in err  # why: loaders pick the format by the name
    assert not dst.exists()
    assert cli.main(["convert", "--force", str(files["gpt"]), str(dst)]) == 0
    got = safetensors_torch.load_file(dst)
    assert set(got) == set(files["model"].state_dict())
    assert list(tmp_path.iterdir()) == [dst]  # no temporary file left beside it


def test_convert_refuses_to_write_over_its_source(
    files: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "same.safetensors"
    src.write_bytes(files["st"].read_bytes())
    assert cli.main(["convert", "--force", str(src), str(src)]) == 2
    assert "source" in capsys.readouterr().err
    assert src.read_bytes() == files["st"].read_bytes()


def test_convert_dedupe_drops_aliases(files: dict, tmp_path: Path, capsys) -> None:
    dst = tmp_path / "dedup.safetensors"
    assert cli.main(["convert", "--dedupe", str(files["weird"]), str(dst)]) == 0
    assert "tied" in capsys.readouterr().err
    got = safetensors_torch.load_file(dst)
    ref = torch.load(files["weird"], weights_only=True)
    assert "tied" not in got and torch.equal(got["emb"], ref["tied"])
    # a slice of a larger storage is not an alias: both are kept
    assert torch.equal(got["slice"], ref["slice"]) and torch.equal(got["whole"], ref["whole"])


def test_convert_refuses_to_overwrite(files: dict, tmp_path: Path, capsys) -> None:
    dst = tmp_path / "exists.safetensors"
    dst.write_bytes(b"keep me")
    assert cli.main(["convert", str(files["gpt"]), str(dst)]) == 2  # usage: --force fixes it
    assert "--force" in capsys.readouterr().err
    assert dst.read_bytes() == b"keep me"
    assert cli.main(["convert", "--force", str(files["gpt"]), str(dst)]) == 0
    assert set(safetensors_torch.load_file(dst)) == set(files["model"].state_dict())


def test_convert_nested_needs_key(files: dict, tmp_path: Path, capsys) -> None:
    dst = tmp_path / "train.safetensors"
    assert cli.main(["convert", str(files["train"]), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "--key state_dict" in err
    assert not dst.exists()
    assert cli.main(["convert", "--key", "state_dict", str(files["train"]), str(dst)]) == 0
    got = safetensors_torch.load_file(dst)
    for k, v in files["model"].state_dict().items():
        assert torch.equal(got[k], v)
    assert cli.main(["convert", "--force", "--key", "nope", str(files["train"]), str(dst)]) == 2


def test_convert_subprocess(files: dict, tmp_path: Path) -> None:
    dst = tmp_path / "sub.safetensors"
    r = _run("convert", str(files["gpt"]), str(dst))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    assert set(safetensors_torch.load_file(dst)) == set(files["model"].state_dict())


# -- demo and bench (fresh processes: the slowest tests here) ---------------------------


def test_demo_tiny(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["demo", "--size", "tiny", "--repeat", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for method in ("baseline", "sequential", "meta", "mmap_assign", "per_tensor", "zeroload"):
        assert method in out
    assert "ratios" in out
    assert "all read" in out  # the time until every weight has been read
    # the fair comparison leads, and says what only a GPU shows
    assert out.lstrip().startswith("Fair CPU comparison: mmap_assign")
    assert "What only a GPU shows" in out and "RESULTS.md" in out
    assert "medians of 2 runs per method" in out
    rows = json.loads((tmp_path / "zeroload-demo-tiny-cpu.json").read_text())
    assert [r["method"] for r in rows] == [
        "baseline",
        "sequential",
        "meta",
        "mmap_assign",
        "per_tensor",
        "zeroload",
    ]
    for r in rows:
        assert r["ok"], r
        assert r["check"] == "equal", r
        assert r["cpu_peak"] is not None and r["wall_s"] > 0
        assert r["touched_s"] >= r["wall_s"]
        assert len(r["runs"]) == 2  # two runs, each in a fresh process
        for name in ("wall_s", "touched_s", "cpu_peak", "cpu_peak_read"):
            values = [run[name] for run in r["runs"]]
            assert r[name] == pytest.approx(sum(values) / 2), (name, r)  # median of two
        for run in r["runs"]:  # the peak until all read includes the peak at load
            assert run["cpu_peak_read"] >= run["cpu_peak"]
    png = tmp_path / "zeroload-demo-tiny-cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_writes_nothing_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    work, scratch = tmp_path / "cwd", tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(work)
    args = ["demo", "--size", "tiny", "--methods", "zeroload", "--tmpdir", str(scratch)]
    args += ["--repeat", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert "tiny test model" in out.err and "0.17M parameters" in out.err
    assert list(work.iterdir()) == [] and list(scratch.iterdir()) == []


def test_demo_leaves_the_temp_dir_as_it_found_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch creates its compile cache ($TMPDIR/torchinductor_<user>) whenever a model is
    # built on the meta device, as the demo and its loaders do: in a fresh process, so that
    # no earlier test has created it already.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    r = _run("demo", "--size", "tiny", "--methods", "zeroload", "mmap_assign", "--repeat", "1")
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_repeat_must_be_a_positive_number(bad: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--size", "tiny", "--repeat", bad])
    assert e.value.code == 2
    assert "not a positive whole number" in capsys.readouterr().err


def _rows(**figures: list) -> tuple:
    """A zeroload row and a peer row, from lists of per-run figures."""
    from zeroload.bench import compare

    def row(method: str, which: int) -> compare.Row:
        runs = [
            {"wall_s": w, "touched_s": t, "cpu_peak": 1 << 30, "cpu_peak_read": 1 << 30}
            for w, t in zip(figures["wall_s"][which], figures["touched_s"][which])
        ]
        return compare._row(method, method, runs)

    return row("zeroload", 0), row("peer", 1)


def test_table_prints_a_ratio_only_where_ranges_do_not_overlap() -> None:
    from zeroload.bench import compare

    # load: 1.0-1.2 s vs 2.0-2.4 s, apart: a ratio of the medians; all read: 0.9-1.3 s vs
    # 1.1-1.5 s, overlapping: "same"
    zl, peer = _rows(
        wall_s=[[1.0, 1.1, 1.2], [2.0, 2.2, 2.4]], touched_s=[[0.9, 1.0, 1.3], [1.1, 1.2, 1.5]]
    )
    assert (zl.wall_s, peer.wall_s, zl.span("wall_s")) == (1.1, 2.2, (1.0, 1.2))
    text = compare.format_table([peer, zl])
    assert "medians of 3 runs per method" in text
    assert "1.10 s (1.00-1.20)" in text and "2.20 s (2.00-2.40)" in text
    ratios = text.split("ratios")[1]
    assert "load 2.0x" in ratios and "all read same" in ratios
    assert "peak RSS all read same" in ratios  # identical peaks
    # the fair figures lead the ratio line
    line = next(ln for ln in ratios.splitlines() if "peer" in ln)
    assert line.split()[1:4] == ["peak", "RSS", "all"]


def test_a_run_that_fails_fails_the_row() -> None:
    from zeroload.bench import compare

    row = compare._row("zeroload", "", [{"wall_s": 1.0}, {"error": "killed by signal 9"}])
    assert not row.ok and row.error == "killed by signal 9"
    assert "FAILED" in compare.format_table([row])


def test_model_labels_say_why_gpt2_small_has_163m_parameters() -> None:
    from zeroload.bench.gptmodel import describe

    assert describe("small") == (
        "gpt2-small config, 163M parameters (124M as in GPT-2 + 38.6M untied output head)"
    )
    assert describe("xl").startswith("gpt2-xl config, 1638M parameters (1558M as in GPT-2")


def test_size_figures_are_the_models_own(tmp_path: Path) -> None:
    # The help text's figures come from bench.parameter_count / checkpoint_bytes, which
    # must agree with the model itself for every size.
    from zeroload import bench
    from zeroload.bench.gptmodel import GPTModel, num_parameters

    for name, cfg in bench.CONFIGS.items():
        assert bench.parameter_count(cfg) == num_parameters(cfg), name
        with torch.device("meta"):
            sd = GPTModel(cfg).state_dict()
        assert bench.checkpoint_bytes(cfg) == sum(t.numel() * 4 for t in sd.values()), name
    torch.save(GPTModel(bench.CONFIGS["tiny"]).state_dict(), tmp_path / "tiny.pth")
    size = (tmp_path / "tiny.pth").stat().st_size
    est = bench.checkpoint_bytes(bench.CONFIGS["tiny"])
    assert est <= size <= 1.1 * est + (64 << 10)  # the file: tensors plus zip and pickle
    small = bench.CONFIGS[bench.SIZES["small"]]
    help_text = cli._parser()._subparsers._group_actions[0].choices["demo"].format_help()
    n, gb = bench.parameter_count(small) / 1e6, bench.checkpoint_bytes(small) / 1e9
    assert f"{n:.0f}M parameters" in " ".join(help_text.split())
    assert f"{gb:.2f} GB file" in " ".join(help_text.split())


def test_bench_state_dict(files: dict, capsys: pytest.CaptureFixture) -> None:
    args = ["bench", str(files["weird"]), "--methods", "torch_load", "zeroload"]
    rc = cli.main([*args, "--repeat", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    table = out.split("ratios")[0]
    lines = {ln.split()[0]: ln for ln in table.splitlines() if ln.split()[:1]}
    # zeroload's digest compared with torch.load's (the reference row, not compared)
    assert "reference" in lines["torch_load"] and "equal" in lines["zeroload"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
@pytest.mark.parametrize("cmd", ["demo", "bench"])
def test_cuda_without_cuda_is_a_clear_error(files: dict, capsys, cmd: str) -> None:
    args = ["demo", "--size", "tiny"] if cmd == "demo" else ["bench", str(files["gpt"])]
    assert cli.main([*args, "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


# -- scale: 100,000 tensors ---------------------------------------------------------------
# What these check is the output at 20k and 100k tensors; the timeouts only stop a run
# that hangs (they are no measure of scaling, hence the names).


@pytest.fixture(scope="module", params=[20_000, 100_000], ids=["20k", "100k"])
def many(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    # n names: n/2 tensors, each also saved under a second name (tied), so that --dedupe
    # drops n/2 names.
    n = request.param
    d = tmp_path_factory.mktemp(f"many{n}")
    half = {f"layers.{i}.w": torch.full((2,), float(i)) for i in range(n // 2)}
    sd = {**half, **{f"tied.{i}.w": half[f"layers.{i}.w"] for i in range(n // 2)}}
    torch.save(sd, d / "many.pth")
    safetensors_torch.save_file(half, d / "many.safetensors")
    return {"n": n, "dir": d, "sd": sd}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_inspect_lists_every_tensor_of_a_large_file(
    many: dict, fmt: str, capsys: pytest.CaptureFixture
) -> None:
    info = _inspect_json(capsys, many["dir"] / f"many.{fmt}")
    names = [t["name"] for t in info["tensors"]]
    if fmt == "pth":
        assert names == list(many["sd"])
    else:
        with safetensors_torch.safe_open(many["dir"] / "many.safetensors", "pt") as f:
            assert names == list(f.keys())
    assert all(t["shape"] == [2] and t["bytes"] == 8 for t in info["tensors"])
    assert info["totals"]["tensors"] == len(names)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_convert_writes_every_tensor_of_a_large_file(many: dict, tmp_path: Path, capsys) -> None:
    src, n = many["dir"] / "many.pth", many["n"]
    dst = tmp_path / "out.safetensors"
    assert cli.main(["convert", str(src), str(dst)]) == 0
    with safetensors_torch.safe_open(dst, "pt") as f:
        assert sorted(f.keys()) == sorted(many["sd"])
        for i in range(0, n // 2, 997):
            assert torch.equal(f.get_tensor(f"tied.{i}.w"), many["sd"][f"layers.{i}.w"])
    assert cli.main(["convert", "--dedupe", "--force", str(src), str(dst)]) == 0
    assert "dropped aliases: tied.0.w, tied.1.w" in capsys.readouterr().err
    with safetensors_torch.safe_open(dst, "pt") as f:
        assert len(f.keys()) == n // 2


def test_convert_writes_packed_float4_with_safetensors_shape(tmp_path: Path) -> None:
    # torch's float4_e2m1fn_x2 holds two 4-bit values per element; a safetensors header
    # counts values, so the last dimension doubles on the way out and halves on the way in.
    packed = torch.arange(12, dtype=torch.uint8).reshape(3, 4).view(torch.float4_e2m1fn_x2)
    src, dst = tmp_path / "f4.pth", tmp_path / "f4.safetensors"
    torch.save({"w": packed, "scale": torch.ones(3)}, src)
    assert cli.main(["convert", str(src), str(dst)]) == 0
    from safetensors import safe_open

    with safe_open(dst, "pt") as f:
        assert f.get_slice("w").get_dtype() == "F4"
        assert f.get_slice("w").get_shape() == [3, 8]
        got = f.get_tensor("w")
    assert got.dtype == packed.dtype and got.shape == packed.shape
    assert torch.equal(got.view(torch.uint8), packed.view(torch.uint8))
    zero_d = tmp_path / "f4_0d.pth"
    torch.save({"w": packed[0, 0]}, zero_d)
    assert cli.main(["convert", str(zero_d), str(tmp_path / "x.safetensors")]) != 0


def test_inspect_lists_tensors_torch_cannot_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # A safetensors file with a 6-bit float tensor: zeroload loads the others and refuses
    # that one when asked; inspect describes all of them.
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "six": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [8, 11]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "f6.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(11))
    assert cli.main(["inspect", "--json", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {t["name"]: t for t in out["tensors"]}
    assert rows["a"]["dtype"] == "float32" and rows["a"]["bytes"] == 8
    assert rows["six"]["dtype"] == "F6_E2M3" and rows["six"]["shape"] == [4]
    assert rows["six"]["bytes"] == 3
    assert out["totals"]["bytes"] == 11
