"""The main job installs light: TensorFlow (and torch) are for the `data` extra and the tests.

`tests/test_distill.py::test_demo_quick_writes_the_contract` checks that the demo loads none of
them either (with `modules_loaded_by`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

#: Top-level modules that neither `import cvxdist` nor the demo may load.
HEAVY_MODULES = ("tensorflow", "tensorflow_datasets", "torch")
ROOT = Path(__file__).resolve().parent.parent


def _requirements() -> dict[str | None, set[str]]:
    """Installed cvxdist's requirement names by extra (``None``: the runtime ones)."""
    by_extra: dict[str | None, set[str]] = {}
    for line in metadata.requires("cvxdist") or []:
        spec, _, marker = line.partition(";")
        name = re.split(r"[<>=!~\[ ]", spec.strip(), maxsplit=1)[0].lower()
        extra = re.search(r"extra\s*==\s*['\"]([\w-]+)", marker)
        by_extra.setdefault(extra.group(1) if extra else None, set()).add(name)
    return by_extra


def test_runtime_dependencies_leave_tensorflow_to_the_data_extra():
    requirements = _requirements()
    assert {"jax", "flax"} <= requirements[None]
    assert not requirements[None] & {"tensorflow", "tensorflow-cpu", "tensorflow-datasets", "torch"}
    assert {"tensorflow-datasets", "tensorflow-cpu"} <= requirements["data"]


def modules_loaded_by(snippet: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``snippet`` in a fresh interpreter (its exit status is ``rc``, 0 if unset); returns
    the process and the top-level modules it had loaded at the end."""
    code = (
        f"import json, sys\nrc = 0\n{snippet}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    lines = done.stderr.splitlines()
    assert lines, f"no output (exit status {done.returncode})"
    return done, set(json.loads(lines[-1])) if lines[-1].startswith("[") else set()


def test_importing_cvxdist_and_its_commands_loads_no_tensorflow():
    done, loaded = modules_loaded_by(
        "import importlib\n"
        "from cvxdist.cli import build_parser\n"
        "build_parser()\n"
        "for m in ('distill.runner', 'distill.io', 'baselines', 'data', 'fetch', 'teachers'):\n"
        "    importlib.import_module('cvxdist.' + m)"
    )
    assert done.returncode == 0, done.stderr
    assert {"cvxdist", "jax", "flax"} <= loaded
    assert not loaded & set(HEAVY_MODULES)
