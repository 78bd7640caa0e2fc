"""examples/quickstart.ipynb runs top to bottom (tiny model) so it never rots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import zeroload

    pkg = str(Path(zeroload.__file__).resolve().parent.parent)
    monkeypatch.setenv("ZEROLOAD_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (pkg, os.environ.get("PYTHONPATH")) if p)
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
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
    assert "peak CPU RSS" in text  # the track() reports
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("<table" in h for h in html)
