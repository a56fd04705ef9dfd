"""Write the three notebooks (no outputs): ``python notebooks/build.py``.

Each notebook starts with a Colab install cell (it does nothing where cvxdist is already
importable, e.g. in CI or a local checkout) and a parameters cell; ``CVXDIST_TINY=1`` shrinks
every size so the whole notebook runs in seconds (``tests/test_notebooks.py`` runs them so).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

INSTALL = """
# Colab or a fresh environment: fetch and install cvxdist (nothing happens if importable).
import importlib.util
import subprocess
import sys

REPO_URL = "https://github.com/OWNER/cvxdist"  # set to the URL of this repository
if importlib.util.find_spec("cvxdist") is None:
    subprocess.run(["git", "clone", "--depth=1", REPO_URL, "cvxdist-src"], check=True)
    pip = [sys.executable, "-m", "pip", "install", "-q", "-e", "cvxdist-src[data]"]
    subprocess.run(pip, check=True)
    sys.path.insert(0, "cvxdist-src")  # an editable install is only seen by new processes
"""

COLAB_NOTE = """
**On Colab.** Run the first cell: it clones the repository (set `REPO_URL`) and installs it
with the `data` extra (TensorFlow Datasets). Colab has no Debian `dataset-fashion-mnist`
package, so load datasets through TFDS instead of local IDX files: pass
`dataset="tfds:fashion_mnist"` (any TFDS image-classification name works after `tfds:`) and
optionally a `data_dir` for the TFDS cache, e.g.
`load_dataset("tfds:fashion_mnist", "train", data_dir="/content/tfds")`. JAX uses a GPU
runtime when there is one; nothing here assumes it.
"""


def md(*parts: str) -> nbformat.NotebookNode:
    return new_markdown_cell("\n\n".join(textwrap.dedent(p).strip() for p in parts))


def code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(textwrap.dedent(text).strip())


def notebook(cells: list) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def quickstart() -> nbformat.NotebookNode:
    return notebook(
        [
            md(
                """
                # cvxdist 1: the convex gated-ReLU solver

                A two-layer network with *fixed* gates `g_i` is linear in its weights once the
                masks `1[X g_i ≥ 0]` are known, so fitting it is a convex problem:

                `min_U 1/(2N) ||Σ_i diag(1[X g_i ≥ 0]) X U_i − Y||² + λ R(U)`

                cvxdist solves it with jitted JAX solvers to a **certified** relative duality
                gap, then factors `U` into neurons.
                """,
                COLAB_NOTE,
            ),
            code(INSTALL),
            code(
                """
                import os

                TINY = os.environ.get("CVXDIST_TINY") == "1"  # CI: tiny sizes
                N, d, c, P = (300, 8, 2, 16) if TINY else (4000, 20, 3, 200)
                """
            ),
            md(
                """
                ## A planted problem

                Targets from a random ReLU network plus noise; gates sampled from the rows
                (`kind="data"`) and deduplicated.
                """
            ),
            code(
                """
                import jax
                import numpy as np

                from cvxdist.gates import sample_gates
                from cvxdist.problems import lam_max, make_problem
                from cvxdist.prox import get_regularizer

                rng = np.random.default_rng(0)
                X = rng.standard_normal((N, d)).astype(np.float32)
                W1, W2 = rng.standard_normal((d, 8)), rng.standard_normal((8, c))
                noise = 0.1 * rng.standard_normal((N, c))
                Y = (np.maximum(X @ W1, 0) @ W2 + noise).astype(np.float32)
                G = sample_gates(jax.random.key(0), X, P, kind="data")
                problem = make_problem(X, Y, G, skip=True, bias=True)
                lmax = float(lam_max(problem, get_regularizer("coupled")))
                print(f"{G.shape[1]} distinct gates, lambda_max = {lmax:.4g}")
                """
            ),
            md(
                """
                ## One certified solve

                `rel_gap` bounds the relative suboptimality of the returned weights;
                `active_gates` counts the gates the group lasso kept.
                """
            ),
            code(
                """
                from cvxdist.solvers import solve

                solution = solve(problem, lam_frac=0.05, reg="coupled", tol=1e-4)
                s = solution.stats
                print(
                    f"converged={bool(solution.converged)} iterations={int(s.iterations)} "
                    f"objective={float(s.objective):.5g} rel_gap={float(s.rel_gap):.1e} "
                    f"active_gates={int(s.active_gates)} time={float(s.time_s):.2f}s"
                )
                assert float(s.rel_gap) <= 1e-4
                """
            ),
            md(
                """
                ## From convex weights to a network

                Each non-zero block `U_i` is split by an SVD into neurons sharing gate `g_i`;
                the network reproduces the convex model.
                """
            ),
            code(
                """
                from cvxdist.mapping import predict, predict_convex, to_network

                net = to_network(solution, G)
                ours = np.asarray(predict(net, X))
                convex = np.asarray(predict_convex(solution, G, X))
                print(f"{net.num_neurons} neurons on {net.num_gates} gates; "
                      f"max difference {np.abs(ours - convex).max():.1e}")
                """
            ),
            md(
                """
                ## A warm-started λ path

                One compilation for the whole path (λ is a traced argument); a larger λ keeps
                fewer gates.
                """
            ),
            code(
                """
                import matplotlib.pyplot as plt

                from cvxdist.solvers import solve_path

                fracs = [0.5, 0.2, 0.1, 0.05] if TINY else list(np.geomspace(0.8, 0.005, 12))
                path = solve_path(problem, lam_fracs=fracs, reg="coupled", progress=False)
                lams = [float(p.stats.lam) / lmax for p in path]
                active = [int(p.stats.active_gates) for p in path]
                fig, ax = plt.subplots(figsize=(5, 3))
                ax.semilogx(lams, active, "o-")
                ax.set_xlabel("λ / λ_max")
                ax.set_ylabel("active gates")
                plt.show()
                """
            ),
            md(
                """
                The same solve from the command line, on arrays `X (N,d)`, `Y (N,c)`,
                `G (d,P)` stored in an `.npz`:

                ```
                cvxdist solve problem.npz --lam-frac 0.05 --reg coupled --out solution.npz
                ```
                """
            ),
        ]
    )


def distill_block() -> nbformat.NotebookNode:
    return notebook(
        [
            md(
                """
                # cvxdist 2: replace a ResNet block by a convex student

                The last stage of a trained teacher is replaced by a gated two-layer block
                fitted to what the rest of the network reads (no labels): after the last
                stage the suffix is a global pool and a dense layer, so the teacher's logits
                are a linear function of the block's output and matching them is still a
                convex problem. It is solved to a certified optimum, spliced back and
                evaluated without fine-tuning; then compared with a same-size ReLU block
                trained by Adam on the same objective, the convex student's network trained
                by Adam (fixed gates), and magnitude pruning of the teacher block.
                """,
                COLAB_NOTE,
            ),
            code(INSTALL),
            code(
                """
                import os

                from cvxdist.teachers import shipped_teachers

                TINY = os.environ.get("CVXDIST_TINY") == "1"  # CI: digits teacher, tiny sizes
                FASHION = "fashion-resnet20" in shipped_teachers()
                TEACHER = "fashion-resnet20" if FASHION and not TINY else "digits-cnn"
                DATASET = None  # local files of the teacher dataset; Colab: "tfds:fashion_mnist"
                SAMPLES_PER_CLASS = 10 if TINY else 100
                GATES, MAX_ROWS = (16, 800) if TINY else (128, 20_000)
                print(TEACHER)
                """
            ),
            code(
                """
                import numpy as np

                from cvxdist.data import samples_per_class
                from cvxdist.distill.runner import load_teacher_and_data

                teacher, train, test = load_teacher_and_data(TEACHER, DATASET, None)
                if TINY:
                    test = test.take(np.arange(min(300, len(test))))
                subset = samples_per_class(train, SAMPLES_PER_CLASS, seed=0)
                cut = [c for c in teacher.cuts if c not in ("stem", "head")][-1]
                print(f"{teacher.name}: cuts {teacher.cuts}; replacing {cut} "
                      f"({teacher.block_params(cut)} parameters), {len(subset)} unlabeled images")
                """
            ),
            md(
                """
                ## Activations, reduction and the convex solve

                `prepare_block` streams whole images through the teacher, takes `3×3` patches
                of the block input at every output location (rows), reduces them by PCA, and
                builds the objective's data terms: by default after the last stage the
                teacher's logits through its head (`objective="logits"`; the alternatives are
                `"activations"`, `"mixed"` and `"gauss-newton"`). `solve_prepared` samples
                gates from the rows, solves the group-lasso (`coupled`) problem to a relative
                duality gap ≤ `tol` (whole gates are pruned), refits the output layer on the
                same objective and maps the solution to a Flax block.
                """
            ),
            code(
                """
                from cvxdist.distill import DistillConfig
                from cvxdist.distill.pipeline import prepare_block, solve_prepared

                config = DistillConfig(cut=cut, gates=GATES, max_rows=MAX_ROWS, lam_frac=0.02,
                                       reg="coupled", max_input_dim=16, refit=True)
                block = prepare_block(teacher, subset.images, cut, config, progress=not TINY)
                convex = solve_prepared(teacher, block, config, (0.02,), progress=False)
                print(block.objective, [(t.kind, t.rows.shape) for t in block.terms])
                keys = ("rel_gap", "iterations", "active_gates", "neurons", "params")
                {k: convex.report[k] for k in keys}
                """
            ),
            md(
                """
                ## Baselines of the same size

                A learned-ReLU student trained by Adam on the same data terms (the same
                objective), the convex student's own network trained by Adam (fixed gates,
                non-convex), and global magnitude pruning of the teacher block to the same
                number of parameters (no fine-tuning). See `cvxdist.baselines`.
                """
            ),
            code(
                """
                from cvxdist import baselines

                adam = baselines.AdamConfig(steps=200 if TINY else 2000, batch_size=None)
                budget = convex.report["params"]
                relu = baselines.relu_block_student(block, budget, adam)
                fixed = baselines.fixed_gate_block_student(block, convex, adam)
                pruned = baselines.pruned_block(teacher, cut, None, budget)
                """
            ),
            code(
                """
                from IPython.display import Markdown, display

                from cvxdist.distill import spliced_predict

                reference = teacher.predict(test.images).argmax(-1)
                lines = [
                    "| model | accuracy | agreement | block params |",
                    "|---|---|---|---|",
                    f"| teacher | {np.mean(reference == test.labels):.4f} | 1 | "
                    f"{teacher.block_params(cut)} |",
                ]
                local = DistillConfig(**{**vars(config), "objective": "activations"})
                local_block = prepare_block(teacher, subset.images, cut, local, progress=False)
                activations = solve_prepared(teacher, local_block, local, (0.02,), progress=False)
                students = {"convex (certified)": convex, "convex, fitted to activations":
                            activations, "ReLU, Adam": relu, "fixed gates, Adam": fixed,
                            "magnitude pruning": pruned}
                for name, student in students.items():
                    pred = spliced_predict(teacher, cut, cut, [student])(test.images).argmax(-1)
                    lines.append(f"| {name} | {np.mean(pred == test.labels):.4f} | "
                                 f"{np.mean(pred == reference):.4f} | {student.report['params']} |")
                display(Markdown("\\n".join(lines)))
                """
            ),
            md(
                """
                `evaluate_spliced` reports everything about one spliced network: accuracy,
                agreement, block-output error, parameters and FLOPs of both blocks, and CPU
                latency per image.
                """
            ),
            code(
                """
                from cvxdist.distill import evaluate_spliced

                evaluate_spliced(teacher, [convex], cut, None, test.images, test.labels)
                """
            ),
            md(
                """
                ## Label-free model selection along a λ path

                The path is warm-started and compiled once; each student is judged by its
                agreement with the teacher on held-out *training* images (no labels).
                """
            ),
            code(
                """
                import matplotlib.pyplot as plt

                from cvxdist.data import holdout_split
                from cvxdist.distill.pipeline import build_student, solve_block

                rest, held = holdout_split(subset, 0.2, seed=0)
                fracs = (0.2, 0.02) if TINY else (0.3, 0.1, 0.05, 0.02, 0.01, 0.005)
                gates, path, _ = solve_block(block, config, fracs, False)
                reference = teacher.predict(held.images).argmax(-1)
                sizes, agreements = [], []
                for solution in path:
                    student = build_student(solution, gates, block.reduction, block.row_info, cut)
                    logits = spliced_predict(teacher, cut, cut, [student])(held.images)
                    sizes.append(student.report["params"])
                    agreements.append(float(np.mean(logits.argmax(-1) == reference)))
                fig, ax = plt.subplots(figsize=(5, 3))
                ax.plot(sizes, agreements, "o-")
                ax.set_xlabel("student block parameters (gates included)")
                ax.set_ylabel("held-out agreement with teacher")
                plt.show()
                """
            ),
            md(
                """
                The command-line equivalent (writes `result.json`, the student and a plot):

                ```
                cvxdist distill --teacher fashion-resnet20 --cut stage3 --gates 128 \\
                    --samples-per-class 100 --out runs/stage3
                ```
                """
            ),
        ]
    )


def benchmarks_notebook() -> nbformat.NotebookNode:
    return notebook(
        [
            md(
                """
                # cvxdist 3: the distillation benchmark

                `cvxdist bench distill --out DIR` runs experiments E1-E4 (accuracy vs student
                size, vs samples per class, loss vs wall time against Adam, the head student
                with polishing) over several seeds, writing one JSON record per finished point
                (a rerun skips them), `distill.json`, `REPORT.md` and plots. It needs a source
                checkout (the `benchmarks/` folder). This notebook runs a tiny grid, then shows
                the committed full results.
                """,
                COLAB_NOTE,
            ),
            code(INSTALL),
            code(
                """
                import os
                import tempfile
                from pathlib import Path

                from cvxdist.commands.bench import benchmarks_root, load_benchmark

                TINY = os.environ.get("CVXDIST_TINY") == "1"
                harness = load_benchmark("distill")  # benchmarks/distill/ of the checkout
                OUT = Path(tempfile.mkdtemp(prefix="bench-distill-"))
                """
            ),
            md(
                """
                ## A tiny grid

                One seed, the digits teacher, E3's first part only: the convex solver run to a
                series of duality-gap tolerances against Adam's loss curve, compilation excluded
                (`e3_lam_path=()` leaves out the second part, test accuracy against wall time).
                The full grid is `harness.full_grid(harness.default_teacher())`; `--quick` is
                `harness.quick_grid()`.
                """
            ),
            code(
                """
                import dataclasses

                grid = dataclasses.replace(
                    harness.quick_grid(),
                    seeds=(0,),
                    e3_methods=("relu-adam",),
                    e3_adam_steps=100 if TINY else 1000,
                    e3_lam_path=(),
                )
                payload = harness.run_grid(OUT, grid, ["E3"], log=print)
                print(payload["computed"], "points computed,", payload["reused"], "reused")
                """
            ),
            code(
                """
                from IPython.display import Image, Markdown, display

                display(Markdown(harness.markdown_report(payload)))
                display(Image(filename=str(OUT / "e3_loss_vs_time.png")))
                """
            ),
            md(
                """
                Running the same grid again computes nothing: every point is read back from
                `OUT/records/`.
                """
            ),
            code(
                """
                again = harness.run_grid(OUT, grid, ["E3"], log=print)
                assert again["computed"] == 0, again["computed"]
                """
            ),
            md(
                """
                ## The committed results

                The full grid's output lives in `benchmarks/results/distill/`
                (`benchmarks/results/REPORT.md` has the tables).
                """
            ),
            code(
                """
                import json

                results = benchmarks_root() / "benchmarks" / "results" / "distill"
                if (results / "distill.json").is_file():
                    full = json.loads((results / "distill.json").read_text())
                    display(Markdown(harness.markdown_report(full)))
                    for png in sorted(results.glob("*.png")):
                        display(Image(filename=str(png)))
                else:
                    print("no committed results in", results)
                """
            ),
        ]
    )


def main() -> None:
    for name, build in (
        ("01_solver_quickstart.ipynb", quickstart),
        ("02_distill_a_resnet_block.ipynb", distill_block),
        ("03_benchmarks.ipynb", benchmarks_notebook),
    ):
        nb = build()
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
