"""Distillation objectives on the shipped digits teacher, checked against the network itself.

The convex problem of each objective is built from host arrays (TermData) through composed
operators; these tests recompute the same quantities through the teacher's own forward
passes (its logits, ``jax.jvp`` of its suffix), independently of the operators.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvxdist import baselines as B
from cvxdist.data import load_dataset, samples_per_class
from cvxdist.distill.evaluation import spliced_predict
from cvxdist.distill.objectives import linear_head, objective_loss, resolve_objective
from cvxdist.distill.pipeline import DistillConfig, build_student, prepare_block, solve_block
from cvxdist.distill.student import BlockStudent
from cvxdist.errors import UserError
from cvxdist.streaming import select_images
from cvxdist.teachers import load_teacher

SMALL = {
    "gates": 12,
    "max_rows": 400,
    "reg": "coupled",
    "lam_frac": 0.05,
    "max_input_dim": 12,
    "max_output_dim": 8,
    "tol": 1e-5,
    "max_iters": 5000,
}


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-cnn")


@pytest.fixture(scope="module")
def images():
    return samples_per_class(load_dataset("digits", "train"), 8, seed=0).images


def _convex_student(block, config):
    """The solution and its student without refit (its network is the convex model)."""
    gates, [solution], _ = solve_block(block, config, (config.lam_frac,), progress=False)
    student = build_student(solution, gates, block.reduction, block.row_info, block.stage)
    return solution, student


def test_linear_head_is_the_teachers_dense_layer(teacher):
    W, w0 = linear_head(teacher, "stage3")
    head = teacher.variables["params"]["head"]["Dense_0"]
    np.testing.assert_allclose(W, np.asarray(head["kernel"]), atol=1e-5)
    np.testing.assert_allclose(w0, np.asarray(head["bias"]), atol=1e-5)
    assert linear_head(teacher, "stage2") is None  # stage3 + head: not linear
    assert resolve_objective(None, True) == "logits"
    assert resolve_objective(None, False) == "mixed"
    with pytest.raises(UserError, match="linear suffix"):
        resolve_objective("logits", False)
    with pytest.raises(UserError, match="unknown objective"):
        resolve_objective("kl", True)


def test_logits_objective_is_the_spliced_networks_logit_error(teacher, images):
    """½ mean‖student logits − teacher logits‖² of the *spliced network* equals the convex
    problem's data term at its solution: the composed operator is the network's suffix."""
    config = DistillConfig(cut="stage3", objective="logits", **SMALL)
    block = prepare_block(teacher, images, "stage3", config, progress=False)
    (term,) = block.terms
    assert term.kind == "logits" and block.reduction.out_mean.any() == 0
    _, w0 = linear_head(teacher, "stage3")
    # The term's targets are the teacher's own logits minus the head's bias.
    np.testing.assert_allclose(term.targets, teacher.predict(images) - w0, atol=2e-4)
    solution, student = _convex_student(block, config)
    logits = spliced_predict(teacher, "stage3", "stage3", [student])(images)
    error = 0.5 * np.mean(np.sum((logits - teacher.predict(images)) ** 2, axis=1))
    penalty = np.sum(np.linalg.norm(np.asarray(solution.weights.U), axis=(1, 2)))  # coupled
    data_term = float(solution.stats.objective) - float(solution.stats.lam) * penalty
    assert error == pytest.approx(data_term, rel=1e-3)
    # Only the head's column space is fitted: the output expansion is orth(W).
    expand = np.asarray(student.variables["params"]["expand"])
    np.testing.assert_allclose(expand @ expand.T, np.eye(len(expand)), atol=1e-5)


def test_gauss_newton_through_the_linear_head_is_the_logits_objective(teacher, images):
    """After the last stage the suffix is linear, so its Jacobian model is exact: Gauss–Newton
    and logits are the same objective (same optimum value)."""
    values, reduction = {}, None
    for objective in ("logits", "gauss-newton"):  # GN in the logits' output basis
        config = DistillConfig(cut="stage3", objective=objective, **SMALL)
        block = prepare_block(
            teacher, images, "stage3", config, progress=False, reduction=reduction
        )
        assert len(block.terms[0].rows) == len(images)  # the same images for both
        reduction = block.reduction
        _, [solution], _ = solve_block(block, config, (0.05,), progress=False)
        values[objective] = float(solution.stats.objective)
    assert values["gauss-newton"] == pytest.approx(values["logits"], rel=5e-5)


def test_gauss_newton_term_is_the_linearised_suffix(teacher, images):
    """Before the last stage: the term's readout of any outputs equals ``jax.jvp`` of the
    teacher's suffix at the teacher's block output, applied to the expanded outputs."""
    config = DistillConfig(cut="stage2", objective="gauss-newton", **SMALL)
    block = prepare_block(teacher, images, "stage2", config, progress=False)
    (term,) = block.terms
    fns = teacher.cut_functions("stage2")
    v = teacher.variables
    rng = np.random.default_rng(0)
    n = 3
    outputs = rng.standard_normal((n, term.rows.shape[1], term.output_width)).astype(np.float32)
    fitted = np.asarray(term.readout(jnp.asarray(outputs), jnp.asarray(term.jacobian[:n])))
    basis = block.reduction.out_basis
    shape = block.row_info["output_shape"]
    # The fit images are `select_images`' seeded choice of ``len(term.rows)`` images.
    ids = select_images(len(images), len(term.rows), config.seed)[:n]
    y = fns.block(v, fns.prefix(v, images[ids]))
    for i in range(n):
        tangent = (outputs[i] @ basis.T).reshape(shape).astype(np.float32)
        _, jvp = jax.jvp(lambda a: fns.suffix(v, a[None])[0], (y[i],), (jnp.asarray(tangent),))
        np.testing.assert_allclose(fitted[i], np.asarray(jvp), rtol=1e-3, atol=1e-4)


def test_mixed_terms_are_normalised_at_zero(teacher, images):
    config = DistillConfig(cut="stage3", objective="mixed", logit_weight=3.0, **SMALL)
    block = prepare_block(teacher, images, "stage3", config, progress=False)
    kinds = [t.kind for t in block.terms]
    assert kinds == ["activations", "logits"]
    for term in block.terms:
        expected = 1.0 if term.kind == "activations" else 3.0
        assert term.weight * term.value_at_zero() == pytest.approx(expected, rel=1e-6)
    stage2 = DistillConfig(cut="stage2", objective="mixed", **SMALL)
    block2 = prepare_block(teacher, images, "stage2", stage2, progress=False)
    assert [t.kind for t in block2.terms] == ["activations", "gauss-newton"]


def test_adam_baseline_trains_on_the_same_objective(teacher, images):
    """The ReLU student's Adam loss is the spliced network's logit error, as the convex
    student's data term is."""
    config = DistillConfig(cut="stage3", objective="logits", **SMALL)
    block = prepare_block(teacher, images, "stage3", config, progress=False)
    relu = B.relu_block_student(block, 2000, B.AdamConfig(steps=200, batch_size=None))
    assert isinstance(relu, BlockStudent)
    logits = spliced_predict(teacher, "stage3", "stage3", [relu])(images)
    error = 0.5 * np.mean(np.sum((logits - teacher.predict(images)) ** 2, axis=1))
    assert relu.report["adam"]["loss"] == pytest.approx(error, rel=2e-3)
    curve = relu.report["adam"]["curve"]
    assert curve[-1]["loss"] < 0.9 * curve[0]["loss"]  # Adam made progress
    # The objective's loss of the ReLU head, through objective_loss, is that same number.
    (term,) = block.terms
    names = ("w_in", "b_in", "w_out", "skip", "bias")
    head = {k: v for k, v in relu.variables["params"].items() if k in names}
    loss = objective_loss(block.terms, B._mlp)(head, [(term.rows, term.targets, None)])
    assert float(loss) == pytest.approx(error, rel=2e-3)
