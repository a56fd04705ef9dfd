"""SplicedEvaluator: the metrics of a spliced network, computed independently, and one
compilation per span and student architecture (the benchmarks evaluate hundreds of students)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from cvxdist.data import load_dataset, samples_per_class
from cvxdist.distill import DistillConfig, SplicedEvaluator, distill, evaluation
from cvxdist.teachers import load_teacher

TINY = {"gates": 8, "lam_frac": 0.05, "max_rows": 400, "reg": "coupled", "max_input_dim": 8}


@pytest.fixture(scope="module")
def setup():
    teacher = load_teacher("digits-cnn")
    train = samples_per_class(load_dataset("digits", "train"), 5, seed=0)
    test = load_dataset("digits", "test")
    one = distill(teacher, train.images, DistillConfig(cut="stage3", **TINY), progress=False)
    two = distill(
        teacher, train.images, DistillConfig(cut="stage2", to="stage3", **TINY), progress=False
    )
    return teacher, test, one, two


def _reference(teacher, students, cut, last, images, labels):
    """Accuracy, agreement and block relative MSE in float64 numpy, batch by batch."""
    fns = teacher.cut_functions(cut, last)
    v = teacher.variables
    z = np.asarray(fns.prefix(v, images))
    y = np.asarray(fns.block(v, z), np.float64)
    out = z
    for s in students:
        out = np.asarray(s(out))
    logits = np.asarray(fns.suffix(v, out))
    teacher_pred = np.asarray(teacher.apply(v, images)).argmax(-1)
    flat = y.reshape(-1, y.shape[-1])
    spread = np.sum((flat - flat.mean(axis=0)) ** 2)
    return {
        "accuracy": np.mean(logits.argmax(-1) == labels),
        "agreement": np.mean(logits.argmax(-1) == teacher_pred),
        "block_rel_mse": np.sum((out.astype(np.float64) - y) ** 2) / spread,
    }


@pytest.mark.parametrize("block_images", [None, 100])
def test_metrics_match_an_independent_computation(setup, block_images):
    teacher, test, one, two = setup
    evaluator = SplicedEvaluator(teacher, test.images, test.labels, block_images, batch_size=64)
    for students, cut, to in ((one, "stage3", None), (two, "stage2", "stage3")):
        got = evaluator(students, cut, to)
        want = _reference(teacher, students, cut, "stage3", test.images, test.labels)
        assert got["accuracy"] == pytest.approx(want["accuracy"])
        assert got["agreement"] == pytest.approx(want["agreement"])
        if block_images is None:
            assert got["block_rel_mse"] == pytest.approx(want["block_rel_mse"], rel=1e-4)
        else:  # on the first 100 images only
            first = _reference(
                teacher, students, cut, "stage3", test.images[:100], test.labels[:100]
            )
            assert got["block_rel_mse"] == pytest.approx(first["block_rel_mse"], rel=1e-4)
        assert got["block_params"] == sum(s.report["params"] for s in students)
        assert got["teacher_block_params"] == teacher.block_params(cut, "stage3")
        assert got["test_images"] == len(test.images)


def test_another_student_of_the_same_shapes_compiles_nothing(setup, monkeypatch):
    teacher, test, one, two = setup
    evaluator = SplicedEvaluator(teacher, test.images, test.labels, block_images=None)
    first = evaluator(one, "stage3", None)
    compiled = []
    real_jit = jax.jit

    def counting_jit(*args, **kwargs):
        compiled.append(args)
        return real_jit(*args, **kwargs)

    monkeypatch.setattr(evaluation.jax, "jit", counting_jit)
    (student,) = one
    params = student.variables["params"]
    zeroed = {**params, "w_out": np.zeros_like(params["w_out"])}  # same shapes, new values
    other = dataclasses.replace(student, variables={"params": zeroed})
    second = evaluator([other], "stage3", None)
    assert compiled == []
    assert second["block_rel_mse"] != first["block_rel_mse"]  # the new values were used
    evaluator(two, "stage2", "stage3")  # another span: its own forwards
    assert len(compiled) == 2
