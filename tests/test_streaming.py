"""Activation streaming: chunks of whole images vs one forward, patch rows vs convolution,
pooled rows, logits and Jacobians vs the teacher, image subsets, cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cvxdist.streaming as streaming
from cvxdist.errors import UserError
from cvxdist.streaming import (
    collect_activations,
    image_patches,
    infer_stride,
    patch_rows,
    select_images,
    stream_activations,
    stream_blocks,
)
from cvxdist.teachers import ArchConfig, untrained_teacher


@pytest.fixture(scope="module")
def teacher():
    config = ArchConfig("resnet20", num_classes=4, in_channels=1, width=0.25)
    return untrained_teacher(config, (8, 8, 1), seed=0)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(size=(23, 8, 8, 1)).astype(np.float32)


def test_streamed_chunks_equal_one_full_forward(teacher, images):
    v = teacher.variables
    fns = teacher.cut_functions("stage2", "stage3")
    z_full = np.asarray(fns.prefix(v, images))
    y_full = np.asarray(fns.block(v, z_full))
    chunks = list(stream_blocks(teacher, images, "stage2", "stage3", batch_size=10, progress=False))
    assert [len(z) for z, _ in chunks] == [10, 10, 3]  # last batch padded, then trimmed
    np.testing.assert_allclose(np.concatenate([z for z, _ in chunks]), z_full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([y for _, y in chunks]), y_full, rtol=1e-5, atol=1e-6)
    assert z_full.shape == (23, 8, 8, 4) and y_full.shape == (23, 2, 2, 16)


@pytest.mark.parametrize(("k", "stride", "size"), [(3, 1, 6), (3, 2, 7), (1, 2, 6), (5, 2, 8)])
def test_patch_rows_reproduce_a_convolution(k, stride, size):
    rng = np.random.default_rng(k * 10 + stride)
    c_in, c_out = 3, 5
    z = jnp.asarray(rng.standard_normal((2, size, size, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, c_in, c_out)), jnp.float32)  # HWIO
    conv = jax.lax.conv_general_dilated(
        z, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    rows, targets = patch_rows(z, conv, kernel_size=k)  # stride inferred from the shapes
    h_out = -(-size // stride)
    assert rows.shape == (2 * h_out * h_out, k * k * c_in)
    assert targets.shape == (2 * h_out * h_out, c_out)
    np.testing.assert_allclose(rows @ kernel.reshape(-1, c_out), targets, rtol=1e-4, atol=1e-4)
    # the documented feature order: (kh, kw, C_in); row order: (image, row, column)
    patches = image_patches(z, k, stride)
    centre = (k // 2) * k + k // 2
    if stride == 1:
        np.testing.assert_array_equal(patches[..., centre * c_in : (centre + 1) * c_in], z)


def test_stride_is_inferred_and_mismatches_are_rejected():
    assert infer_stride((28, 28), (14, 14)) == 2 and infer_stride((7, 7), (4, 4)) == 2
    assert infer_stride((8, 8), (8, 8)) == 1 and infer_stride((8, 8), (3, 3)) == 3
    with pytest.raises(UserError, match="pooled rows"):
        infer_stride((8, 8), (5, 5))
    with pytest.raises(UserError, match="pooled rows"):
        patch_rows(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 3)))


def test_patch_rows_of_a_teacher_block(teacher, images):
    v = teacher.variables
    fns = teacher.cut_functions("stage3")
    z = fns.prefix(v, images)
    y = fns.block(v, z)  # stride-2 stage: (23, 4, 4, 8) -> (23, 2, 2, 16)
    acts = collect_activations(teacher, images, "stage3", batch_size=8, progress=False)
    assert acts.rows.shape == (23, 2 * 2, 9 * 8) and acts.targets.shape == (23, 2 * 2, 16)
    np.testing.assert_array_equal(acts.image_ids, np.arange(23))
    rows, targets = acts.flat_rows()
    expected_rows, expected_targets = patch_rows(z, y, 3)
    np.testing.assert_allclose(rows, expected_rows, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targets, expected_targets, rtol=1e-5, atol=1e-6)
    # locations are (row, column)-ordered: image 5, output location (1, 0)
    np.testing.assert_allclose(acts.targets[5, 2], y[5, 1, 0], rtol=1e-5, atol=1e-6)
    chunks = list(stream_activations(teacher, images, "stage3", batch_size=8, progress=False))
    assert [len(c) for c in chunks] == [8, 8, 7]  # whole images, bounded by the batch
    assert acts.logits is None and acts.jacobian is None


def test_a_subset_of_images_keeps_every_location_and_its_ids(teacher, images):
    ids = select_images(len(images), 5, seed=3)
    assert len(ids) == 5 and np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(ids, select_images(len(images), 5, seed=3))  # seeded
    np.testing.assert_array_equal(select_images(len(images), None, 0), np.arange(23))
    full = collect_activations(teacher, images, "stage2", progress=False)
    part = collect_activations(teacher, images, "stage2", image_ids=ids, batch_size=2)
    np.testing.assert_array_equal(part.image_ids, ids)
    np.testing.assert_allclose(part.rows, full.rows[ids], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(part.targets, full.targets[ids], rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="at least 1"):
        select_images(len(images), 0, 0)


def test_logits_and_jacobian_of_the_linear_suffix(teacher, images):
    """After the last stage the suffix is pool + dense, so logits = J_n vec(y_n) + w0 exactly,
    and J_n is the head's weights over L: both from the teacher, independently."""
    acts = collect_activations(
        teacher, images, "stage3", logits=True, jacobian=True, batch_size=10, progress=False
    )
    np.testing.assert_allclose(acts.logits, teacher.predict(images), rtol=1e-5, atol=1e-5)
    head = teacher.variables["params"]["head"]["Dense_0"]
    W, w0 = np.asarray(head["kernel"]), np.asarray(head["bias"])
    L = acts.locations
    assert acts.jacobian.shape == (23, 4, L * 16)
    expected = np.tile(W.T / L, (1, L))  # (k, L·C): the mean over locations, then W
    np.testing.assert_allclose(acts.jacobian[7], expected, rtol=1e-5, atol=1e-7)
    fitted = np.einsum("nkl,nl->nk", acts.jacobian, acts.targets.reshape(23, -1)) + w0
    np.testing.assert_allclose(fitted, acts.logits, rtol=1e-4, atol=1e-5)


def test_jacobian_through_a_nonlinear_suffix_matches_jacrev(teacher, images):
    acts = collect_activations(teacher, images[:3], "stage2", jacobian=True, progress=False)
    fns = teacher.cut_functions("stage2")
    y = fns.block(teacher.variables, fns.prefix(teacher.variables, images[:3]))
    jac = jax.jacrev(lambda a: fns.suffix(teacher.variables, a[None])[0])(y[1])
    np.testing.assert_allclose(acts.jacobian[1], jac.reshape(4, -1), rtol=1e-4, atol=1e-6)


def test_identity_targets_are_what_the_block_adds(teacher, images):
    plain = collect_activations(teacher, images, "stage1.block2", progress=False)
    residual = collect_activations(teacher, images, "stage1.block2", identity=True)
    fns = teacher.cut_functions("stage1.block2")
    z = np.asarray(fns.prefix(teacher.variables, images)).reshape(23, -1, 4)
    np.testing.assert_allclose(residual.targets, plain.targets - z, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="keeps its shape"):
        collect_activations(teacher, images, "stage2", identity=True, progress=False)


def test_pooled_rows_for_a_head_student(teacher, images):
    v = teacher.variables
    z = teacher.cut_functions("head").prefix(v, images)
    acts = collect_activations(
        teacher, images, "head", rows="pooled", batch_size=16, progress=False
    )
    assert acts.rows.shape == (23, 1, 16)
    np.testing.assert_allclose(acts.rows[:, 0], np.asarray(z).mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(acts.targets[:, 0], teacher.predict(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="pooled rows"):
        collect_activations(teacher, images, "head", rows="patch", progress=False)
    with pytest.raises(UserError, match="row kind"):
        collect_activations(teacher, images, "head", rows="pixels", progress=False)


def test_disk_cache_round_trip_and_keys(teacher, images, tmp_path, monkeypatch):
    kwargs = dict(batch_size=10, progress=False, cache_dir=tmp_path, logits=True)
    acts = collect_activations(teacher, images, "stage2", **kwargs)
    entries = [p for p in tmp_path.iterdir()]
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    assert not any(entries[0].glob("*.tmp*"))

    def no_compute(*args, **kw):
        raise AssertionError("cache miss: rows were recomputed")

    monkeypatch.setattr(streaming, "_compute", no_compute)
    cached = collect_activations(teacher, images, "stage2", **kwargs)
    for name in ("image_ids", "rows", "targets", "logits"):
        np.testing.assert_array_equal(getattr(cached, name), getattr(acts, name))
    assert cached.jacobian is None
    monkeypatch.undo()
    # other settings, images, image subsets or cut pairs get their own entries
    collect_activations(teacher, images, "stage2", kernel_size=1, **kwargs)
    collect_activations(teacher, images[:5], "stage2", **kwargs)
    collect_activations(teacher, images, "stage2", image_ids=[0, 4], **kwargs)
    collect_activations(teacher, images, "stage2", "stage3", **kwargs)
    assert len(list(tmp_path.iterdir())) == 5


def test_interrupted_stream_leaves_no_cache_entry(teacher, images, tmp_path):
    stream = stream_activations(
        teacher, images, "stage1", batch_size=5, progress=False, cache_dir=tmp_path
    )
    next(stream)
    stream.close()
    assert not any((p / "manifest.json").exists() for p in tmp_path.iterdir())
    acts = collect_activations(
        teacher, images, "stage1", batch_size=5, progress=False, cache_dir=tmp_path
    )
    assert acts.rows.shape == (23, 64, 9 * 4)
