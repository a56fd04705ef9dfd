"""The notebooks run top to bottom at tiny size (``CVXDIST_TINY=1``) and are committed clean."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_solver_quickstart", "02_distill_a_resnet_block", "03_benchmarks")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    monkeypatch.setenv("CVXDIST_TINY", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    # The install cell did nothing: cvxdist was importable, nothing was cloned.
    assert not (tmp_path / "cvxdist-src").exists()


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs_and_starts_with_the_install_cell(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    json.loads(path.read_text())  # plain JSON
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert 'find_spec("cvxdist") is None' in code[0].source
    assert "CVXDIST_TINY" in code[1].source
    assert any("tfds:" in c.source for c in nb.cells if c.cell_type == "markdown")
