"""Users install a wheel, not a toolchain: the wheel maturin builds installs with pip into a
fresh virtual environment whose PATH has no cargo or rustc, and there it imports, loads a
`.pth` and a `.safetensors` file (checked against torch.load and safetensors), runs the
README's quickstart recipe and the command line.

The wheel is built once per test session (maturin reuses the cargo target directory of
the development install, so this is mostly a link), or taken from ZEROLOAD_TEST_WHEEL.
torch and numpy are not installed again into the new environment: a .pth file points it
at the site-packages that already hold them, which keeps the test fast and offline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RUST_TOOLS = ("cargo", "rustc", "rustup", "maturin")


def _maturin() -> list[str] | None:
    beside = Path(sys.executable).parent / "maturin"  # the test extra installs it here
    exe = str(beside) if beside.exists() else shutil.which("maturin")
    return [exe] if exe else None


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("ZEROLOAD_TEST_WHEEL")
    if given:
        return Path(given)
    maturin = _maturin()
    if maturin is None or shutil.which("cargo") is None:
        pytest.skip("building the wheel needs maturin and cargo (or set ZEROLOAD_TEST_WHEEL)")
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [*maturin, "build", "--release", "--interpreter", sys.executable, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    (whl,) = out.glob("zeroload-*.whl")
    return whl


def _bin(root: Path, name: str) -> Path:
    """A program in the virtual environment at `root` (Windows: Scripts\\name.exe)."""
    if os.name == "nt":
        return root / "Scripts" / f"{name}.exe"
    return root / "bin" / name


def _path_without_rust() -> str:
    """This PATH less every directory holding a Rust tool (or maturin)."""
    keep = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        # (`which` with this one directory: on Windows the tools are `cargo.exe` and so on)
        if d and not any(shutil.which(t, path=d) for t in RUST_TOOLS)
    ]
    return os.pathsep.join(keep)


@pytest.fixture(scope="session")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    py = _bin(root, "python")
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # torch, numpy and safetensors from where they are installed already (appended after
    # the venv's own site-packages, so the venv's zeroload comes first).
    import numpy

    parents = {str(Path(m.__file__).resolve().parent.parent) for m in (torch, numpy)}
    parents.add(str(Path(safetensors_torch.__file__).resolve().parent.parent))
    (site / "_test_parent_packages.pth").write_text("\n".join(sorted(parents)) + "\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CARGO", "RUSTUP", "PYTHON", "VIRTUAL_ENV", "MATURIN"))
    }
    env["PATH"] = os.pathsep.join([str(py.parent), _path_without_rust()])
    for tool in RUST_TOOLS:
        assert shutil.which(tool, path=env["PATH"]) is None, tool
    # pip from this environment installs into the new one (no network, no dependencies:
    # they are there already); no build step can run for a wheel.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-index",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        env={**env, "PATH": os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])},
    )
    assert r.returncode == 0, r.stderr
    return {"root": root, "python": py, "site": site, "env": env}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("wheel-data")
    torch.manual_seed(0)
    sd = {
        "emb.weight": torch.randn(10, 4),
        "fc.weight": torch.randn(3, 4),
        "fc.bias": torch.randn(3),
        "steps": torch.tensor(7),
    }
    torch.save(sd, d / "model.pth")
    safetensors_torch.save_file(
        {k: v for k, v in sd.items() if k != "steps"}, d / "model.safetensors"
    )
    return {"dir": d, "pth": d / "model.pth", "st": d / "model.safetensors"}


CHILD = textwrap.dedent(
    """
    import json, os, shutil, sys
    report = {"rust_on_path": [t for t in ("cargo", "rustc") if shutil.which(t)]}
    import zeroload
    report["zeroload"] = zeroload.__file__
    import torch
    from safetensors.torch import load_file

    pth, st = sys.argv[1], sys.argv[2]
    ours, ref = zeroload.load(pth), torch.load(pth, weights_only=True)
    report["pth_equal"] = list(ours) == list(ref) and all(
        torch.equal(ours[k], ref[k]) for k in ref
    )
    ours, ref = zeroload.load(st), load_file(st)
    report["st_equal"] = sorted(ours) == sorted(ref) and all(
        torch.equal(ours[k], ref[k]) for k in ref
    )
    with zeroload.open(st) as f:
        report["open_equal"] = torch.equal(f.get_tensor("fc.weight"), ref["fc.weight"])

    # The README's quickstart: a model on the meta device, loaded and assigned.
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.emb(x))

    with torch.device("meta"):
        model = Net()
    model.load_state_dict(zeroload.load(st), assign=True)
    x = torch.tensor([1, 2, 3])
    report["quickstart_equal"] = torch.equal(
        model(x), torch.nn.functional.linear(ref["emb.weight"][x], ref["fc.weight"], ref["fc.bias"])
    )
    print(json.dumps(report))
    """
)


def test_wheel_installs_and_loads_without_rust(venv: dict, checkpoints: dict) -> None:
    r = subprocess.run(
        [str(venv["python"]), "-c", CHILD, str(checkpoints["pth"]), str(checkpoints["st"])],
        capture_output=True,
        text=True,
        env=venv["env"],
        cwd=checkpoints["dir"],
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["rust_on_path"] == []
    # the wheel, not the tree
    assert Path(report["zeroload"]).resolve().is_relative_to(venv["site"].resolve())
    assert report["pth_equal"] and report["st_equal"] and report["open_equal"]
    assert report["quickstart_equal"]


def test_wheel_command_line(venv: dict, checkpoints: dict, tmp_path: Path) -> None:
    exe = _bin(venv["root"], "zeroload")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(exe), *args], capture_output=True, text=True, env=venv["env"], cwd=tmp_path
        )

    r = run("--help")
    assert r.returncode == 0 and "inspect" in r.stdout and "convert" in r.stdout
    r = run("inspect", "--json", str(checkpoints["pth"]))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert [t["name"] for t in info["tensors"]] == ["emb.weight", "fc.weight", "fc.bias", "steps"]
    dst = tmp_path / "out.safetensors"
    r = run("convert", str(checkpoints["pth"]), str(dst))
    assert r.returncode == 0, r.stderr
    got, ref = safetensors_torch.load_file(dst), torch.load(checkpoints["pth"], weights_only=True)
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], v) for k, v in ref.items())
    r = subprocess.run(
        [str(venv["python"]), "-m", "zeroload", "inspect", str(checkpoints["st"])],
        capture_output=True,
        text=True,
        env=venv["env"],
    )
    assert r.returncode == 0 and "fc.weight" in r.stdout, r.stderr


def test_wheel_is_abi3_for_python_3_9_and_later(wheel: Path) -> None:
    # One wheel for every CPython >= 3.9 (pyo3's abi3-py39); the platform tag is what
    # the build host allows (manylinux_2_28 in the release workflow's container).
    name = wheel.name
    assert "-cp39-abi3-" in name, name
    if sys.platform.startswith("linux"):
        assert "-manylinux_" in name, name
