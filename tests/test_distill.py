"""Convex block distillation end to end on the shipped digits teacher (tiny sizes)."""

from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kill_when_blocked, without_timings
from test_light_install import HEAVY_MODULES, modules_loaded_by

from cvxdist.cli import main
from cvxdist.data import load_dataset, samples_per_class
from cvxdist.distill import DistillConfig, distill, evaluate_spliced, spliced_predict
from cvxdist.distill.io import load_students
from cvxdist.distill.objectives import activation_term
from cvxdist.distill.pipeline import prepare_block, solve_prepared
from cvxdist.distill.prepare import _replaced_input_fn
from cvxdist.distill.student import (
    BlockStudent,
    GatedStudent,
    Reduction,
    parameter_count,
    student_from_network,
)
from cvxdist.mapping import GatedNetwork, predict, predict_convex
from cvxdist.streaming import collect_activations, image_patches
from cvxdist.teachers import load_teacher

TINY = {
    "gates": 16,
    "max_rows": 1500,
    "reg": "coupled",
    "max_iters": 2000,
    "objective": "activations",
}


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-cnn")


@pytest.fixture(scope="module")
def data():
    train = samples_per_class(load_dataset("digits", "train"), 15, seed=0)
    test = load_dataset("digits", "test")
    return train, test


@pytest.fixture(scope="module")
def solved(teacher, data):
    train, _ = data
    config = DistillConfig(cut="stage3", lam_frac=0.05, **TINY)
    block = prepare_block(teacher, train.images, "stage3", config, progress=False)
    student = solve_prepared(teacher, block, config, (config.lam_frac,), progress=False)
    return config, block, student


def expected_params(module: GatedStudent) -> int:
    """A student's parameter count from its shapes alone (gates and reductions included)."""
    d, c, K, Q = module.features, module.outputs, len(module.neuron_gate), module.num_gates
    count = d * Q + d * K + K * c + c  # gates, first and second layer, bias
    count += d * c if module.skip else 0
    channels = module.reduced_channels or module.in_channels
    if module.reduced_channels is not None:
        count += module.in_channels * channels
    if module.reduced_in is not None:  # k×k patch projection (a head student: pooled input)
        patch = module.kernel_size**2 * channels if module.kernel_size else channels
        count += patch * d + d
    if module.reduced_out is not None:
        count += c * module.out_channels + module.out_channels
    return count


def accuracy_by_hand(teacher, students, cut, to, images, labels, batch=1000) -> float:
    """Top-1 accuracy of the teacher with cut..to replaced by ``students``, composed here from
    the teacher's cut functions (independently of ``spliced_predict``)."""
    fns, v = teacher.cut_functions(cut, to), teacher.variables
    correct = 0
    for begin in range(0, len(images), batch):
        z = fns.prefix(v, jnp.asarray(images[begin : begin + batch]))
        for student in students:
            z = student(z)
        pred = np.asarray(fns.suffix(v, z)).argmax(-1)
        correct += int(np.sum(pred == labels[begin : begin + batch]))
    return correct / len(images)


def _assert_reproduces_the_convex_model(teacher, images, config, block, student):
    """Rows recomputed at *every* location must match the student's output there."""
    from cvxdist.gates import sample_gates
    from cvxdist.problems import make_problem
    from cvxdist.solvers import solve
    from cvxdist.streaming import image_patches

    assert student.report["converged"] and student.report["rel_gap"] <= 1e-3
    fns = teacher.cut_functions("stage3")
    z = fns.prefix(teacher.variables, jnp.asarray(images[:8]))
    patches = np.asarray(image_patches(z, 3, block.row_info["stride"]))
    rows = block.reduction.rows(patches.reshape(-1, patches.shape[-1]))
    gates = sample_gates(
        jax.random.key(config.seed), block.rows, config.gates, kind="data", noise=0.05
    )
    problem = make_problem(block.rows, block.targets, gates, skip=True, bias=True)
    solution = solve(problem, float(student.report["lam"]), reg="coupled", tol=config.tol)
    convex = np.asarray(predict_convex(solution, gates, rows))
    expected = block.reduction.out_mean + convex @ block.reduction.out_basis.T
    got = np.asarray(student(z)).reshape(expected.shape)
    scale = np.abs(expected).max()
    # float32 convolution vs matmul: a mask may flip on a row at the gate boundary.
    close = np.all(np.abs(got - expected) <= 1e-3 * scale, axis=1)
    assert close.mean() >= 0.99


def test_student_block_reproduces_the_convex_model(teacher, data, solved):
    train, _ = data
    config, block, student = solved
    _assert_reproduces_the_convex_model(teacher, train.images, config, block, student)


def test_channel_reduction_before_the_patches(teacher, data):
    train, _ = data
    config = DistillConfig(cut="stage3", lam_frac=0.05, channel_dim=4, max_input_dim=20, **TINY)
    block = prepare_block(teacher, train.images, "stage3", config, progress=False)
    student = solve_prepared(teacher, block, config, (config.lam_frac,), progress=False)
    c_in = block.row_info["input_shape"][-1]
    assert block.reduction.channel_basis.shape == (c_in, 4)
    assert 0 < block.reduction.channel_kept < 1
    params = student.variables["params"]
    assert params["channels"].shape == (c_in, 4)
    assert params["proj"].shape == (3, 3, 4, 20)  # k·k·r patch features, not k·k·C_in
    assert student.module.features == 20 and student.report["channel_dim"] == 4
    _assert_reproduces_the_convex_model(teacher, train.images, config, block, student)


def test_spliced_accuracy_is_close_to_the_teacher(teacher, data, solved):
    _, test = data
    _, _, student = solved
    metrics = evaluate_spliced(teacher, [student], "stage3", None, test.images, test.labels)
    teacher_accuracy = float(np.mean(teacher.predict(test.images).argmax(-1) == test.labels))
    assert metrics["teacher_accuracy"] == pytest.approx(teacher_accuracy, abs=1e-12)
    assert teacher_accuracy > 0.95
    accuracy = accuracy_by_hand(teacher, [student], "stage3", None, test.images, test.labels)
    assert metrics["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert accuracy >= teacher_accuracy - 0.08
    assert metrics["agreement"] >= 0.9
    assert 0 <= metrics["block_rel_mse"] < 0.5
    assert metrics["block_params"] == expected_params(student.module)
    assert metrics["teacher_block_params"] == 13952  # stage3 of the digits CNN, by hand
    assert metrics["block_flops"] > 0 and metrics["teacher_block_flops"] > 0


def test_splicing_the_teacher_block_back_is_exact(teacher, data):
    _, test = data
    fns = teacher.cut_functions("stage2", "stage3")

    own = BlockStudent("stage2", _TeacherBlock(fns.block, teacher.variables), {}, {})
    spliced = spliced_predict(teacher, "stage2", "stage3", [own])
    ours, reference = spliced(test.images), teacher.predict(test.images)
    # Separately compiled prefix/block/suffix differ from one fused forward only by rounding.
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours.argmax(-1), reference.argmax(-1))


class _TeacherBlock:
    def __init__(self, block, variables):
        self.block, self.variables = block, variables

    def apply(self, variables, z):
        del variables
        return self.block(self.variables, z)


@pytest.mark.parametrize("identity", [False, True])
def test_student_block_is_the_gated_network_on_patches_plus_the_shortcut(identity):
    rng = np.random.default_rng(3)
    C, d, c = 2, 18, 2  # raw 3×3 patches of 2 channels, 2 output channels (no reduction)
    net = GatedNetwork(
        gates=jnp.asarray(rng.standard_normal((d, 3)), jnp.float32),
        neuron_gate=jnp.asarray([0, 1, 2, 2]),
        w_in=jnp.asarray(rng.standard_normal((d, 4)), jnp.float32),
        w_out=jnp.asarray(rng.standard_normal((4, c)), jnp.float32),
        skip=jnp.asarray(rng.standard_normal((d, c)), jnp.float32),
        bias=jnp.asarray([0.5, -1.0], jnp.float32),
    )
    reduction = Reduction(in_mean=np.zeros(d), in_basis=None, out_mean=np.zeros(c), out_basis=None)
    module, variables = student_from_network(
        net, reduction, in_channels=C, out_channels=C, kernel_size=3, stride=1, identity=identity
    )
    z = jnp.asarray(rng.standard_normal((2, 5, 5, C)), jnp.float32)
    rows = np.asarray(image_patches(z, 3, 1)).reshape(-1, d)
    expected = np.asarray(predict(net, rows)).reshape(z.shape) + (np.asarray(z) if identity else 0)
    np.testing.assert_allclose(module.apply(variables, z), expected, rtol=1e-5, atol=1e-5)


def test_student_parameter_count_by_hand():
    d_raw, d, c, C = 18, 4, 3, 5  # 3x3 patches of 2 channels, reduced to 4 in, 3 out
    net = GatedNetwork(
        gates=jnp.ones((d, 2)),
        neuron_gate=jnp.asarray([0, 1, 1]),
        w_in=jnp.ones((d, 3)),
        w_out=jnp.ones((3, c)),
        skip=jnp.ones((d, c)),
        bias=jnp.ones((c,)),
    )
    reduction = Reduction(
        in_mean=np.zeros(d_raw),
        in_basis=np.linalg.qr(np.random.default_rng(0).standard_normal((d_raw, d)))[0],
        out_mean=np.zeros(C),
        out_basis=np.linalg.qr(np.random.default_rng(1).standard_normal((C, c)))[0],
    )
    module, variables = student_from_network(
        net, reduction, in_channels=2, out_channels=C, kernel_size=3, stride=1
    )
    assert isinstance(module, GatedStudent)
    # proj 3·3·2·4 + proj_bias 4 + gates 4·2 + w_in 4·3 + w_out 3·3 + bias 3 + skip 4·3
    # + expand 3·5 + expand_bias 5
    assert parameter_count(variables) == 72 + 4 + 8 + 12 + 9 + 3 + 12 + 15 + 5
    y = module.apply(variables, jnp.ones((1, 6, 6, 2)))
    assert y.shape == (1, 6, 6, C)


def test_two_consecutive_stages(teacher, data):
    train, test = data
    config = DistillConfig(cut="stage2", to="stage3", lam_frac=0.05, **TINY)
    students = distill(teacher, train.images, config, progress=False)
    assert [s.stage for s in students] == ["stage2", "stage3"]
    metrics = evaluate_spliced(teacher, students, "stage2", "stage3", test.images, test.labels)
    assert metrics["block_params"] == sum(s.report["params"] for s in students)
    assert metrics["teacher_block_params"] == teacher.block_params("stage2", "stage3")
    assert metrics["accuracy"] > 0.8


def test_one_student_per_block_each_solved_on_the_replaced_prefix(teacher, data):
    train, test = data
    config = DistillConfig(
        cut="stage2.block2", to="stage3", lam_frac=0.05, per_block=True, identity=True, **TINY
    )
    students = distill(teacher, train.images, config, progress=False)
    assert [s.stage for s in students] == ["stage2.block2", "stage3.block1", "stage3.block2"]
    # the identity shortcut only where the block keeps its shape (stage3.block1 strides)
    assert [s.module.identity for s in students] == [True, False, True]
    # stage3.block1's rows are patches of what the stage2.block2 *student* outputs
    images, v = train.images[:20], teacher.variables
    input_fn = _replaced_input_fn(teacher, config.cut, students[:1])
    acts = collect_activations(teacher, images, "stage3.block1", input_fn=input_fn)
    rows, _ = acts.flat_rows()
    via_student = students[0](teacher.cut_functions("stage2.block2").prefix(v, images))
    via_teacher = teacher.cut_functions("stage3.block1").prefix(v, images)
    stride = students[1].module.stride
    assert len(rows) == len(images) * (-(-via_student.shape[1] // stride)) ** 2

    def patch_sum(z):
        return np.asarray(image_patches(z, 3, stride)).sum(axis=(0, 1, 2))

    np.testing.assert_allclose(rows.sum(0), patch_sum(via_student), rtol=1e-4, atol=1e-3)
    assert not np.allclose(rows.sum(0), patch_sum(via_teacher), rtol=1e-2)
    # with the shortcut, the targets are what the teacher's block adds to the student's input
    input_fn = _replaced_input_fn(teacher, config.cut, students[:2])
    acts = collect_activations(
        teacher, images, "stage3.block2", input_fn=input_fn, identity=True, progress=False
    )
    _, targets = acts.flat_rows()
    z = students[1](via_student)
    fns = teacher.cut_functions("stage3.block2")
    y = fns.block(v, fns.prefix(v, images))
    np.testing.assert_allclose(
        targets.sum(0), np.asarray(y - z).sum(axis=(0, 1, 2)), rtol=1e-4, atol=1e-3
    )
    metrics = evaluate_spliced(
        teacher, students, "stage2.block2", "stage3", test.images, test.labels
    )
    assert metrics["teacher_block_params"] == teacher.block_params("stage2.block2", "stage3")
    assert metrics["teacher_block_params"] < teacher.block_params("stage2", "stage3")
    assert metrics["block_params"] == sum(s.report["params"] for s in students)
    assert metrics["accuracy"] > 0.8


def test_distill_cli_writes_result_and_evaluate_reads_it(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", "--teacher", "digits-cnn", "--cut", "stage3", "--gates", "12"]
    args += ["--samples-per-class", "10", "--max-rows", "800", "--reg", "coupled", "--quiet"]
    args += ["--lam-path", "0.3", "0.1", "--per-block", "--identity", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    result = json.loads((out / "result.json").read_text())
    assert (out / "plot.png").stat().st_size > 1000
    assert len(result["stages"][0]["path"]) == 2  # label-free selection over the path
    students, info = load_students(out)
    assert info["cut"] == "stage3" and len(students) == 2  # --per-block: stage3.block1, 2
    assert [s.module.identity for s in students] == [False, True]
    # The reported numbers are those of the saved students, recomputed here.
    teacher, test = load_teacher("digits-cnn"), load_dataset("digits", "test")
    accuracy = accuracy_by_hand(teacher, students, "stage3", None, test.images, test.labels)
    assert result["accuracy"] == summary["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert result["block_params"] == sum(expected_params(s.module) for s in students)
    assert main(["evaluate", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(result["accuracy"])


def test_demo_quick_writes_the_contract(tmp_path):
    out = tmp_path / "demo"
    # In a fresh interpreter, to see that the demo never imports TensorFlow (nor torch).
    argv = ["demo", "--quick", "--quiet", "--out", str(out)]
    done, loaded = modules_loaded_by(f"from cvxdist.cli import main\nrc = main({argv!r})")
    assert done.returncode == 0, done.stderr
    assert "jax" in loaded and not loaded & set(HEAVY_MODULES)
    assert "| teacher |" in done.stdout
    result = _check_demo(out, "digits-cnn", "digits", max_drop=0.1)
    assert result["students"][0]["block_params"] <= result["teacher_block_params"] / 4


@pytest.mark.slow  # ~2 CPU minutes (10k test images, three times); covered by the digits demo
def test_fashion_mnist_demo_at_reduced_size(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--teacher", "fashion-resnet20", "--quick", "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert "fashion_mnist" in capsys.readouterr().out
    _check_demo(out, "fashion-resnet20", "fashion_mnist", max_drop=0.3)


def _check_demo(out, teacher_name, dataset, max_drop):
    """The demo's result.json against the teacher and the saved student, recomputed here."""
    result = json.loads((out / "result.json").read_text())
    teacher, test = load_teacher(teacher_name), load_dataset(dataset, "test")
    assert result["teacher"] == teacher_name and result["samples_per_class"] == 20
    # The teacher's accuracy on the whole test split is the one recorded when it was trained.
    assert result["teacher_accuracy"] == pytest.approx(teacher.info["test_accuracy"], abs=2e-4)
    assert result["teacher_block_params"] == teacher.block_params(result["cut"])
    convex, relu = result["students"]
    assert "convex" in convex["method"] and "Adam" in relu["method"]
    [student], info = load_students(out)
    assert info["teacher_sha256"] == teacher.checkpoint_sha256
    args = (teacher, [student], result["cut"], None, test.images, test.labels)
    assert convex["accuracy"] == pytest.approx(accuracy_by_hand(*args), abs=1e-12)
    assert convex["block_params"] == expected_params(student.module)
    assert result["convex_solve"]["rel_gap"] <= 1e-3 and result["convex_solve"]["converged"]
    for row in (convex, relu):
        assert result["teacher_accuracy"] - max_drop <= row["accuracy"] <= 1.0, row
        assert row["time_s"] > 0
    # the two students are matched by parameter count (within one hidden unit)
    assert abs(convex["block_params"] - relu["block_params"]) <= 0.05 * convex["block_params"]
    # ONNX: both networks exported and checked on the whole test split, size and latency
    if "skipped" in result["onnx"]:  # a runtime install without the export extra
        assert not all(importlib.util.find_spec(m) for m in ("jax2onnx", "onnxruntime"))
        return result
    for name in ("teacher", "compressed"):
        onnx = result["onnx"][name]
        assert (out / onnx["file"]).stat().st_size == onnx["bytes"]
        assert onnx["ok"] and onnx["max_abs_diff_continuous"] <= 1e-4
        assert onnx["top1_mismatches"] <= onnx["rounding_sensitive_images"]  # gate boundaries
        assert onnx["images_checked"] == len(test) and set(onnx["latency_ms"]) == {"1", "256"}
    assert "| compressed | compressed.onnx |" in (out / "table.md").read_text()
    return result


def test_interrupted_distillation_resumes_from_finished_stages(
    teacher, data, tmp_path, monkeypatch
):
    import cvxdist.distill.pipeline as pipeline

    train, _ = data
    config = DistillConfig(cut="stage2", to="stage3", lam_frac=0.05, **TINY)
    real = pipeline.solve_prepared
    calls = []

    def interrupt_on_second(*args, **kwargs):
        calls.append(args[1].stage)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "solve_prepared", interrupt_on_second)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, train.images, config, progress=False, cache_dir=tmp_path)
    monkeypatch.setattr(pipeline, "solve_prepared", real)
    messages = []
    students = distill(
        teacher, train.images, config, progress=False, cache_dir=tmp_path, log=messages.append
    )
    assert "loaded from the cache" in messages[0] and messages[0].startswith("stage2")
    assert not any("loaded" in m for m in messages[1:])
    assert [s.stage for s in students] == ["stage2", "stage3"]
    again = []
    distill(teacher, train.images, config, progress=False, cache_dir=tmp_path, log=again.append)
    assert sum("loaded from the cache" in m for m in again) == 2


PATH_RUN = ["distill", "--teacher", "digits-cnn", "--cut", "stage3", "--gates", "8"]
PATH_RUN += ["--samples-per-class", "10", "--max-rows", "600", "--reg", "coupled", "--quiet"]
PATH_RUN += ["--lam-path", "0.3", "0.1", "0.05", "0.02"]


def test_killed_lam_path_resumes_at_the_first_unsolved_lam(tmp_path, monkeypatch, capsys):
    import cvxdist.solvers

    out = tmp_path / "run"
    setup = "block_after('cvxdist.distill.pipeline', '_save_solution', 2)"
    kill_when_blocked(setup, [*PATH_RUN, "--out", str(out)], tmp_path / "marker")
    assert not (out / "result.json").exists()
    real, lams = cvxdist.solvers.solve, []

    def counting(problem, lam, **kwargs):
        lams.append(lam)
        return real(problem, lam, **kwargs)

    monkeypatch.setattr(cvxdist.solvers, "solve", counting)
    assert main([*PATH_RUN, "--out", str(out)]) == 0
    lam_max = json.loads((out / "result.json").read_text())["stages"][0]["lam_max"]
    np.testing.assert_allclose(lams, [0.05 * lam_max, 0.02 * lam_max])  # only those not saved
    assert not list((out / "cache").glob("path-*"))  # the finished stage replaced them
    monkeypatch.setattr(cvxdist.solvers, "solve", real)
    assert main([*PATH_RUN, "--no-cache", "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    resumed, whole = (
        json.loads((d / "result.json").read_text()) for d in (out, tmp_path / "whole")
    )
    assert without_timings(resumed) == without_timings(whole)


@pytest.mark.slow  # the E4 point of test_bench_distill's tiny grid covers head + polish
def test_head_student_with_polishing(teacher, data):
    train, test = data
    reports = {}
    for polish in (False, True):
        config = DistillConfig(
            cut="stage3",
            to="head",
            head_student=True,
            gates=32,
            reg="coupled",
            lam_frac=0.01,
            polish=polish,
            skip=False,
        )
        [student] = distill(teacher, train.images, config, progress=False)
        metrics = evaluate_spliced(teacher, [student], "stage3", "head", test.images, test.labels)
        assert student.stage == "stage3..head"
        assert metrics["teacher_block_params"] == teacher.block_params("stage3", "head")
        assert metrics["accuracy"] > 0.7
        reports[polish] = student.report
    polish = reports[True]["polish"]
    assert polish["rel_gap"] <= 1e-3 and polish["kept_gates"] == reports[False]["active_gates"]
    with pytest.raises(Exception, match="use --to head"):
        distill(
            teacher, train.images, DistillConfig(cut="stage3", head_student=True), progress=False
        )


def test_refit_output_undoes_second_layer_shrinkage():
    from cvxdist.distill.refit import refit_output
    from cvxdist.mapping import parameter_count as net_params

    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, 6)).astype(np.float32)
    true = GatedNetwork(
        gates=jnp.asarray(rng.standard_normal((6, 3)), jnp.float32),
        neuron_gate=jnp.asarray([0, 1, 2, 2]),
        w_in=jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
        w_out=jnp.asarray(rng.standard_normal((4, 2)), jnp.float32),
        skip=jnp.asarray(rng.standard_normal((6, 2)), jnp.float32),
        bias=jnp.asarray([0.5, -1.0], jnp.float32),
    )
    Y = np.asarray(predict(true, X))
    shrunk = true._replace(w_out=0.3 * true.w_out, skip=0.3 * true.skip, bias=0.0 * true.bias)
    refit, info = refit_output(shrunk, [activation_term(X[:, None], Y[:, None])], ridge=1e-10)
    assert info["train_rel_objective_after"] < 1e-8 < info["train_rel_objective_before"]
    np.testing.assert_allclose(np.asarray(refit.w_out), np.asarray(true.w_out), atol=1e-4)
    np.testing.assert_allclose(np.asarray(refit.bias), np.asarray(true.bias), atol=1e-4)
    assert net_params(refit) == net_params(shrunk)  # same size: only the values change


@pytest.mark.parametrize(
    "kinds",
    [("activations",), ("logits",), ("activations", "logits"), ("logits", "gauss-newton")],
)
def test_refit_output_is_the_least_squares_fit_of_its_terms(kinds):
    # The refit's normal equations (Kronecker-split for activations and logits, dense with a
    # Gauss-Newton term) against numpy's least squares on the explicit design: each column
    # is the terms' weighted readouts of one basis output layer θ = e_(a,i).
    from cvxdist.distill.objectives import TermData
    from cvxdist.distill.refit import objective_value, refit_output

    rng = np.random.default_rng(1)
    N, L, d, c, k = 120, 4, 3, 3, 4  # k ≥ c: the head identifies every output
    net = GatedNetwork(
        gates=jnp.asarray(rng.standard_normal((d, 2)), jnp.float32),
        neuron_gate=jnp.asarray([0, 1, 1]),
        w_in=jnp.asarray(rng.standard_normal((d, 3)), jnp.float32),
        w_out=jnp.zeros((3, c), jnp.float32),
        skip=jnp.zeros((d, c), jnp.float32),
        bias=jnp.zeros((c,), jnp.float32),
    )
    rows = rng.standard_normal((N, L, d)).astype(np.float32)
    head = rng.standard_normal((c, k)).astype(np.float32)
    make = {
        "activations": lambda: activation_term(rows, rng.standard_normal((N, L, c))),
        "logits": lambda: TermData(
            "logits", rows, rng.standard_normal((N, k)).astype(np.float32), 0.7, head=head
        ),
        "gauss-newton": lambda: TermData(
            "gauss-newton",
            rows,
            rng.standard_normal((N, k)).astype(np.float32),
            1.3,
            jacobian=rng.standard_normal((N, k, L * c)).astype(np.float32),
        ),
    }
    terms = [make[kind]() for kind in kinds]
    q = 3 + d + 1

    def readouts(w_out, skip, bias):
        layer = net._replace(w_out=w_out, skip=skip, bias=bias)
        parts = []
        for t in terms:
            out = np.asarray(predict(layer, t.rows.reshape(-1, d)), np.float64)
            read = np.asarray(t.readout(out.reshape(*t.rows.shape[:2], c)), np.float64)
            parts.append(np.sqrt(t.weight / t.num_groups) * read.reshape(-1))
        return np.concatenate(parts)

    def split(theta):
        theta = jnp.asarray(theta.reshape(q, c), jnp.float32)
        return theta[:3], theta[3 : 3 + d], theta[-1]

    design = np.stack([readouts(*split(e)) for e in np.eye(q * c)], axis=1)
    target = np.concatenate(
        [np.sqrt(t.weight / t.num_groups) * t.targets.reshape(-1) for t in terms]
    )
    theta, *_ = np.linalg.lstsq(design, target, rcond=None)
    best = 0.5 * np.sum((design @ theta - target) ** 2)

    refit, info = refit_output(net, terms, ridge=1e-9)
    assert info["applied"]
    np.testing.assert_allclose(objective_value(refit, terms), best, rtol=1e-4)
    got = np.concatenate([np.asarray(refit.w_out), np.asarray(refit.skip), refit.bias[None]])
    np.testing.assert_allclose(got, theta.reshape(q, c), atol=1e-3)


def test_refit_flag_keeps_the_student_size(teacher, data, solved):
    _, test = data
    _, block, student = solved
    refit_config = DistillConfig(cut="stage3", lam_frac=0.05, refit=True, **TINY)
    refitted = solve_prepared(teacher, block, refit_config, (0.05,), progress=False)
    assert refitted.report["params"] == student.report["params"]
    info = refitted.report["refit"]
    assert info["train_rel_objective_after"] <= info["train_rel_objective_before"]
    metrics = evaluate_spliced(teacher, [refitted], "stage3", None, test.images, test.labels)
    assert metrics["accuracy"] >= metrics["teacher_accuracy"] - 0.08


def test_lam_path_selection_under_a_size_budget(teacher, data):
    from cvxdist.data import holdout_split

    train, _ = data
    rest, held = holdout_split(train, 0.2, 0)
    base = {**TINY, "cut": "stage3", "lam_path": (0.6, 0.3, 0.1), "reg": "nuclear"}
    base.update(max_input_dim=12, max_output_dim=8, max_iters=500)
    block = prepare_block(teacher, rest.images, "stage3", DistillConfig(**base), progress=False)
    messages = []

    def chosen(**extra):
        config = DistillConfig(**base, **extra)
        student = solve_prepared(
            teacher,
            block,
            config,
            config.lam_path,
            holdout_images=held.images,
            progress=False,
            log=messages.append,
        )
        return student.report

    free = chosen(agreement_tol=0.0)
    sizes = sorted({p["params"] for p in free["path"]})
    assert len(sizes) >= 2
    budget = sizes[-2]
    capped = chosen(agreement_tol=0.0, max_params=budget)
    assert capped["params"] <= budget
    fitting = [p for p in capped["path"] if p["params"] <= budget]
    assert any(p["params"] == capped["params"] for p in fitting)
    best = max(p["holdout_agreement"] for p in fitting)
    assert max(p["holdout_agreement"] for p in fitting if p["params"] == capped["params"]) == best
    tiny = chosen(max_params=1)  # nothing fits: the smallest student, and a message
    assert tiny["params"] == sizes[0]
    assert any("no student on the λ path fits 1" in m for m in messages)
