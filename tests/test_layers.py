"""Module rules of ARCHITECTURE.md for the Python package, checked on the source and by
importing (the Rust side's are in tests/layers.rs): the torch-free modules import without
torch, and the loaders take shared helpers from leaf modules, never from the CLI's
modules or the memory tracker."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import zeroload

PACKAGE = Path(zeroload.__file__).resolve().parent

# Modules that must import without torch: the package itself (its API is lazy), the
# command line and what `inspect` and `convert` run on, and the leaf helpers.
TORCH_FREE = [
    "zeroload",
    "zeroload.cli",
    "zeroload._atomic",
    "zeroload._convert",
    "zeroload._inspect",
    "zeroload._layout",
    "zeroload._procfs",
    "zeroload._pread",
    "zeroload._shards",
    "zeroload._track",
    "zeroload._units",
    "zeroload._usage",
    "zeroload._writer",
]

# What no loader module may import: the CLI and its library modules, the memory tracker
# (a user-facing tool) and the benchmark harness.
NOT_FOR_LOADERS = {"zeroload.cli", "zeroload._inspect", "zeroload._track", "zeroload.bench"}

LOADERS = [
    "_cuda",
    "_dtensor",
    "_hf",
    "_init_empty",
    "_load",
    "_load_into",
    "_open",
    "_pread",
    "_shards",
    "_slices",
    "_torch",
    "distributed",
]


def _imports(module: str) -> set[str]:
    """The `zeroload` modules a module's source imports (at any depth of the file)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            # `from zeroload import _x` imports the module zeroload._x.
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m == "zeroload" or m.startswith("zeroload.")}


def test_torch_free_modules_import_without_torch() -> None:
    child = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for m in sys.argv[1:]:\n"
        "    importlib.import_module(m)\n"
        "    out[m] = 'torch' in sys.modules\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PACKAGE.parent), env.get("PYTHONPATH")) if p
    )
    # One interpreter per module: an earlier import must not hide a later one's torch.
    for module in TORCH_FREE:
        r = subprocess.run(
            [sys.executable, "-c", child, module], capture_output=True, text=True, env=env
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {module: False}, f"importing {module} imports torch"


def test_loaders_take_shared_helpers_from_leaf_modules() -> None:
    for module in LOADERS:
        bad = {
            m
            for m in _imports(module)
            if any(m == n or m.startswith(n + ".") for n in NOT_FOR_LOADERS)
        }
        assert not bad, f"zeroload/{module}.py imports {sorted(bad)}"


def test_the_layer_check_sees_imports() -> None:
    # The check above can fail: it finds the imports each form of import statement makes.
    assert {"zeroload._inspect", "zeroload._shards"} <= _imports("_convert")
    assert "zeroload._cuda" in _imports("_slices")  # a function-level `from zeroload import`
    assert "zeroload._procfs" in _imports("_track")
