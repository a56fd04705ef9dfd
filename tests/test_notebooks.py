"""The notebooks run top to bottom at tiny size (``CVXDIST_TINY=1``), their key results hold,
and they are committed clean.

After a notebook's own cells, a probe cell (added here, not committed) prints the values the
notebook computed as one JSON line; the test checks them against the tolerance the notebook
asked for and against the teacher, evaluated here independently.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

from cvxdist.data import load_dataset
from cvxdist.teachers import load_teacher

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_solver_quickstart", "02_distill_a_resnet_block", "03_benchmarks")

PROBES = {
    "01_solver_quickstart": """
        masks = (X.astype(np.float64) @ np.asarray(G, np.float64)) >= 0
        w = solution.weights
        U = np.asarray(w.U, np.float64)
        pred = np.einsum("np,npc->nc", masks, np.einsum("nd,pdc->npc", X.astype(np.float64), U))
        pred = pred + X @ np.asarray(w.V, np.float64) + np.asarray(w.b, np.float64)
        loss = 0.5 * np.sum((pred - Y) ** 2) / len(X)
        penalty = np.sum(np.linalg.norm(U, axis=(1, 2)))
        result = {
            "rel_gap": float(solution.stats.rel_gap), "converged": bool(solution.converged),
            "objective": float(solution.stats.objective),
            "numpy_objective": float(loss + float(solution.stats.lam) * penalty),
            "network_vs_convex": float(np.abs(ours - convex).max()),
            "scale": float(np.abs(convex).max()),
            "path_gaps": [float(p.stats.rel_gap) for p in path], "path_active": active,
        }
    """,
    "02_distill_a_resnet_block": """
        result = {"rel_gap": float(convex.report["rel_gap"]), "tol": config.tol,
                  "test_images": len(test.images), "teacher_accuracy":
                  float(np.mean(teacher.predict(test.images).argmax(-1) == test.labels))}
        for name, student in students.items():
            pred = spliced_predict(teacher, cut, cut, [student])(test.images).argmax(-1)
            result[name] = float(np.mean(pred == test.labels))
    """,
    "03_benchmarks": """
        e3 = next(r for r in payload["records"] if r["experiment"] == "E3")
        curves = {r["method"]: r["curve"] for r in e3["results"] if "curve" in r}
        result = {"computed": payload["computed"], "again": again["computed"],
                  "reused": again["reused"], "tols": list(grid.e3_tols),
                  "convex": {m: [[p["tol"], p["rel_gap"]] for p in c]
                             for m, c in curves.items() if m.startswith("convex")}}
    """,
}


def run_notebook(name: str, tmp_path: Path) -> dict:
    """Execute the notebook (tiny sizes) with the probe cell last; the probe's JSON."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    probe = "import json\nimport numpy as np\n" + PROBES[name].strip().replace("\n        ", "\n")
    nb.cells.append(new_code_cell(probe + "\nprint('RESULT ' + json.dumps(result))"))
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    text = "".join(out.get("text", "") for out in nb.cells[-1].outputs)
    line = [x for x in text.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setenv("CVXDIST_TINY", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")


def test_solver_quickstart(tiny, tmp_path):
    result = run_notebook("01_solver_quickstart", tmp_path)
    assert result["converged"] and result["rel_gap"] <= 1e-4  # the tol the notebook asks for
    assert result["objective"] == pytest.approx(result["numpy_objective"], rel=1e-5)
    assert result["network_vs_convex"] <= 1e-4 * result["scale"]
    assert all(gap <= 1e-3 for gap in result["path_gaps"])  # solve_path's default tol
    active = result["path_active"]  # λ decreasing along the path: more gates kept
    assert active == sorted(active) and active[-1] > active[0]
    assert not (tmp_path / "cvxdist-src").exists()  # the install cell did nothing


def test_distill_a_resnet_block(tiny, tmp_path):
    result = run_notebook("02_distill_a_resnet_block", tmp_path)
    assert result["rel_gap"] <= result["tol"]
    teacher, test = load_teacher("digits-cnn"), load_dataset("digits", "test")
    images, labels = test.images[: result["test_images"]], test.labels[: result["test_images"]]
    expected = float(np.mean(teacher.predict(images).argmax(-1) == labels))
    assert result["teacher_accuracy"] == pytest.approx(expected, abs=1e-12)
    # At 16 gates and 100 images the certified student stays near the teacher.
    assert result["convex (certified)"] >= expected - 0.1
    assert result["ReLU, Adam"] >= expected - 0.15


def test_benchmarks(tiny, tmp_path):
    result = run_notebook("03_benchmarks", tmp_path)
    assert result["computed"] == 1 and result["again"] == 0 and result["reused"] == 1
    for method, curve in result["convex"].items():
        assert [tol for tol, _ in curve] == result["tols"], method
        assert all(gap <= tol for tol, gap in curve), curve  # each point certified


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
