"""Baselines on the convex student's block: learned ReLU, fixed gates, logit KD, pruning."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvxdist import baselines as B
from cvxdist.data import load_dataset, samples_per_class
from cvxdist.distill.evaluation import evaluate_spliced, spliced_predict
from cvxdist.distill.objectives import objective_loss
from cvxdist.distill.pipeline import DistillConfig, prepare_block, solve_prepared
from cvxdist.distill.student import parameter_count
from cvxdist.streaming import image_patches
from cvxdist.teachers import load_teacher

CONFIG = {
    "objective": "activations",
    "reg": "coupled",
    "gates": 12,
    "max_rows": 500,
    "lam_frac": 0.05,
    "input_variance": 1.0,
    "max_input_dim": 16,
    "output_variance": 1.0,
    "max_output_dim": 8,
}


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-cnn")


@pytest.fixture(scope="module")
def data():
    train = samples_per_class(load_dataset("digits", "train"), 10, seed=0)
    test = load_dataset("digits", "test")
    return train, test


@pytest.fixture(scope="module")
def solved(teacher, data):
    train, _ = data
    config = DistillConfig(cut="stage3", **CONFIG)
    block = prepare_block(teacher, train.images, "stage3", config, progress=False)
    convex = solve_prepared(teacher, block, config, (config.lam_frac,), progress=False)
    return block, convex


def _module_rows_agree(teacher, block, student, head_predict, images):
    """The Flax block, at every output location, equals the head on reduced patch rows."""
    z = teacher.cut_functions("stage3").prefix(teacher.variables, jnp.asarray(images))
    patches = np.asarray(image_patches(z, 3, block.row_info["stride"]))
    rows = block.reduction.rows(patches.reshape(-1, patches.shape[-1]))
    reduced = np.asarray(head_predict(jnp.asarray(rows, jnp.float32)))
    expected = block.reduction.out_mean + reduced @ block.reduction.out_basis.T
    got = np.asarray(student(z)).reshape(expected.shape)
    close = np.all(np.abs(got - expected) <= 1e-3 * np.abs(expected).max(), axis=1)
    assert close.mean() >= 0.99


def test_relu_student_shares_a_channel_reduction(teacher, data):
    train, _ = data
    config = DistillConfig(cut="stage3", channel_dim=4, **CONFIG)
    block = prepare_block(teacher, train.images, "stage3", config, progress=False)
    student = B.relu_block_student(block, 2000, B.AdamConfig(steps=50, batch_size=None))
    assert student.module.reduced_channels == 4
    assert parameter_count(student.variables) == B.relu_params_for(block, student.module.hidden)
    p = student.variables["params"]
    head = {k: p[k] for k in ("w_in", "b_in", "w_out", "skip", "bias")}

    def predict(a):
        return B._mlp(head, a)

    _module_rows_agree(teacher, block, student, predict, train.images[:6])


def test_relu_student_matches_the_budget_and_its_rows(teacher, data, solved):
    train, _ = data
    block, convex = solved
    budget = convex.report["params"]
    student = B.relu_block_student(block, budget, B.AdamConfig(steps=300, batch_size=None))
    params = parameter_count(student.variables)
    assert params == student.report["params"] == B.relu_params_for(block, student.module.hidden)
    per_neuron = block.rows.shape[1] + 1 + block.targets.shape[1]
    assert abs(params - budget) <= per_neuron / 2 + 1  # the closest width
    curve = student.report["adam"]["curve"]
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    assert all(b["time_s"] >= a["time_s"] for a, b in itertools.pairwise(curve))
    assert [p["step"] for p in curve] == list(range(0, 301, 100))
    p = student.variables["params"]
    head = {k: p[k] for k in ("w_in", "b_in", "w_out", "skip")}
    head["bias"] = p["bias"]

    def predict(a):
        return B._mlp(head, a)

    _module_rows_agree(teacher, block, student, predict, train.images[:6])


def test_mini_batch_adam_draws_batches(solved):
    block, _ = solved
    full = B.train_relu_head(block.terms, 8, B.AdamConfig(steps=100, batch_size=None))
    mini = B.train_relu_head(block.terms, 8, B.AdamConfig(steps=100, batch_size=32))
    # Same init (same seed); different trajectories because the mini-batches differ.
    assert full[1]["curve"][0]["loss"] == pytest.approx(mini[1]["curve"][0]["loss"])
    assert not np.allclose(full[0]["w_in"], mini[0]["w_in"])
    assert mini[1]["loss"] < mini[1]["curve"][0]["loss"]


def test_fixed_gate_student_has_the_convex_gates_and_size(teacher, data, solved):
    train, _ = data
    block, convex = solved
    student = B.fixed_gate_block_student(block, convex, B.AdamConfig(steps=300, batch_size=None))
    assert student.module is convex.module  # same gates, same neurons, same architecture
    assert student.report["params"] == convex.report["params"]
    new, old = student.variables["params"], convex.variables["params"]
    np.testing.assert_array_equal(new["gates"], old["gates"])
    np.testing.assert_array_equal(new["proj"], old["proj"])
    assert not np.allclose(new["w_in"], old["w_in"])
    curve = student.report["adam"]["curve"]
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    index = jnp.asarray(convex.module.neuron_gate, jnp.int32)

    def predict(a):
        return B._gated(new, a, new["gates"], index)

    _module_rows_agree(teacher, block, student, predict, train.images[:6])


def test_gated_head_at_the_convex_weights_has_the_convex_loss(solved):
    """The gated head Adam trains, evaluated at the convex student's own weights, is the
    convex model: its loss is the data term of the certified objective, which is that
    objective minus λ R(U) with U rebuilt from the neurons (all in float64 numpy here)."""
    block, convex = solved
    p = convex.variables["params"]
    index = jnp.asarray(convex.module.neuron_gate, jnp.int32)
    (term,) = block.terms
    loss = objective_loss(block.terms, lambda q, a: B._gated(q, a, p["gates"], index))
    head = {k: p[k] for k in ("w_in", "w_out", "bias", "skip")}
    ours = float(loss(head, [(term.rows, term.targets, None)]))
    f64 = {k: np.asarray(v, np.float64) for k, v in p.items()}
    a = np.asarray(term.rows, np.float64).reshape(-1, term.rows.shape[-1])
    targets = np.asarray(term.targets, np.float64).reshape(len(a), -1)
    gate_of = np.asarray(convex.module.neuron_gate)
    masks = (a @ f64["gates"] >= 0)[:, gate_of]
    pred = ((a @ f64["w_in"]) * masks) @ f64["w_out"] + f64["bias"] + a @ f64["skip"]
    expected = 0.5 * np.mean(np.sum((pred - targets) ** 2, axis=-1))
    assert ours == pytest.approx(expected, rel=1e-5)
    U = [  # U_i = Σ over gate i's neurons of w_in w_outᵀ
        f64["w_in"][:, gate_of == i] @ f64["w_out"][gate_of == i] for i in np.unique(gate_of)
    ]
    penalty = sum(np.linalg.norm(u) for u in U)  # coupled
    objective = convex.report["objective"]
    assert expected + convex.report["lam"] * penalty == pytest.approx(objective, rel=1e-4)


def test_kd_loss_is_zero_only_at_the_teacher():
    t = jnp.asarray([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    assert float(B.kd_loss(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(B.kd_loss(t + jnp.asarray([1.0, 0.0, 0.0]), t, 4.0)) > 1e-3
    # Shifting all logits of a row leaves the softmax, hence the loss, unchanged.
    assert float(B.kd_loss(t + 5.0, t, 2.0)) == pytest.approx(0.0, abs=1e-5)


def test_logit_kd_trains_only_the_student_and_is_spliceable(teacher, data, solved):
    train, test = data
    block, convex = solved
    before = jax.tree.map(np.asarray, teacher.variables)
    budget = convex.report["params"]
    config = B.KDConfig(steps=200, batch_size=50, log_every=50)
    [student] = B.kd_students(teacher, train.images, "stage3", None, [block], [budget], config)
    curve = student.report["kd"]["curve"]
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    assert abs(student.report["params"] - budget) <= block.rows.shape[1] + block.targets.shape[1]
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, teacher.variables))
    spliced = spliced_predict(teacher, "stage3", "stage3", [student])(test.images)
    agreement = np.mean(spliced.argmax(-1) == teacher.predict(test.images).argmax(-1))
    assert agreement > 0.8


def test_pruning_keeps_the_largest_kernel_weights(teacher):
    block_params = teacher.block_params("stage2", "stage3")
    budget = block_params // 3
    pruned = B.pruned_block(teacher, "stage2", "stage3", budget)
    report = pruned.report
    assert report["params"] == budget == report["nonzero_params"]
    assert report["kept_kernel_weights"] + report["unprunable_params"] == budget
    kernels_before, kernels_after = [], []
    for col, stage_tree in pruned.variables["params"].items():
        original = teacher.variables["params"][col]
        for (path, new), (_, old) in zip(
            jax.tree_util.tree_flatten_with_path(stage_tree)[0],
            jax.tree_util.tree_flatten_with_path(original)[0],
        ):
            new, old = np.asarray(new), np.asarray(old)
            if path[-1].key == "kernel" and new.ndim == 4:
                kernels_before.append(np.abs(old).ravel())
                kernels_after.append(np.abs(new).ravel())
            else:
                np.testing.assert_array_equal(new, old)  # BatchNorm untouched
    before, after = np.concatenate(kernels_before), np.concatenate(kernels_after)
    kept = after > 0
    assert kept.sum() == report["kept_kernel_weights"]
    assert before[kept].min() >= before[~kept].max()  # global magnitude order
    np.testing.assert_array_equal(after[kept], before[kept])


def test_pruning_at_full_budget_is_the_teacher_and_below_the_floor_is_reported(teacher, data):
    _, test = data
    full = B.pruned_block(teacher, "stage3", None, teacher.block_params("stage3"))
    assert full.report["kernel_sparsity"] == 0.0
    spliced = spliced_predict(teacher, "stage3", "stage3", [full])(test.images)
    np.testing.assert_allclose(spliced, teacher.predict(test.images), rtol=1e-4, atol=1e-4)
    tiny = B.pruned_block(teacher, "stage3", None, 10)
    assert tiny.report["kept_kernel_weights"] == 0
    assert tiny.report["params"] == tiny.report["unprunable_params"] > 10
    metrics = evaluate_spliced(teacher, [tiny], "stage3", None, test.images, test.labels)
    assert metrics["block_params"] == tiny.report["params"]
    assert metrics["accuracy"] < 0.5  # every conv weight gone: the block is a constant
