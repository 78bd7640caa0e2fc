"""examples/quickstart.ipynb runs top to bottom (tiny model) so it never rots, uses only the
public API, and leaves nothing behind: not in the temp dir, not in its working directory.

It runs with its recipes in both orders, and no timed run may import a module: the warm-up
must pay every recipe's one-off import cost (the first meta-device model imports ~900
modules), or whichever recipe ran first would carry it in its time. Counting imports, not
comparing times, makes that check exact rather than noisy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def test_quickstart_uses_only_the_public_api() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "class GPTModel" in code  # defines its model, as the seed notebook does
    assert "zeroload._" not in code and "from zeroload import _" not in code
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "commit the notebook without outputs"
    )


RECIPES = ("torch.load", "torch.load(mmap=True)", "zeroload.load")


@pytest.mark.parametrize("order", ["usual,builtin,zeroload", "zeroload,builtin,usual"])
def test_quickstart_notebook_runs_and_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, order: str
) -> None:
    import zeroload

    # The kernel's temp dir and working directory are empty directories of this test's own,
    # so anything the notebook forgets to remove shows up there.
    kernel_tmp = tmp_path / "tmp"
    kernel_cwd = tmp_path / "cwd"
    kernel_tmp.mkdir()
    kernel_cwd.mkdir()
    pkg = str(Path(zeroload.__file__).resolve().parent.parent)
    monkeypatch.setenv("TMPDIR", str(kernel_tmp))
    # Building a model on the meta device imports torch._dynamo, which creates torch's own
    # compile cache dir ($TMPDIR/torchinductor_<user>, reused by every torch program): not
    # the notebook's litter, so it goes elsewhere here.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch-cache"))
    monkeypatch.setenv("ZEROLOAD_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("ZEROLOAD_NOTEBOOK_ORDER", order)
    monkeypatch.setenv("ZEROLOAD_NOTEBOOK_REPEAT", "2")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (pkg, os.environ.get("PYTHONPATH")) if p)
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(kernel_cwd)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # pragma: no cover - shows the cell
        pytest.fail(f"notebook cell failed:\n{e}")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs
    )
    assert "output equals the original model's: True" in text
    assert "untied output head" in text
    assert "peak CPU RSS" in text  # the track() reports
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert sum("<table" in h for h in html) == 3  # one report per recipe
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the chart
    # the summary: a median and range per recipe, and no module imported inside a timed run
    lines = text.splitlines()
    header = next(i for i, ln in enumerate(lines) if "median (range)" in ln)
    assert "modules imported while timed" in lines[header]
    rows = {ln[:24].strip(): ln[24:].split() for ln in lines[header + 1 : header + 4]}
    assert set(rows) == set(RECIPES)
    for label, cells in rows.items():
        # "0.012 s (0.010-0.013)" twice, then the count of modules imported while timed
        assert cells[1] == "s" and cells[2].startswith("(") and cells[4] == "s", cells
        assert cells[-1] == "0", f"{label}: a timed run imported {cells[-1]} modules ({order})"
    assert sorted(p.name for p in kernel_tmp.iterdir()) == []
    assert sorted(p.name for p in kernel_cwd.iterdir()) == []
