"""Gate sampling and pattern deduplication."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cvxdist.gates import activation_patterns, dedupe_gates, sample_gates


def test_dedupe_removes_duplicate_and_empty_patterns():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 4))
    g = rng.standard_normal((4, 3))
    empty = -X[np.argmax(np.abs(X[:, 0]))].reshape(4, 1) * 0  # zero: all-ones pattern
    G = np.concatenate([g, 2.0 * g[:, :1], g[:, 1:2] + 1e-9, empty], axis=1)
    kept = dedupe_gates(X, G)
    # 2g_0 and g_1+eps repeat patterns of g_0 and g_1; the zero gate is the linear pattern.
    assert kept.shape == (4, 4)
    np.testing.assert_array_equal(kept[:, :3], g)
    patterns = activation_patterns(X, kept)
    assert len({p.tobytes() for p in patterns}) == kept.shape[1]


def test_all_zero_pattern_is_dropped():
    X = np.abs(np.random.default_rng(1).standard_normal((20, 3))) + 0.1  # positive rows
    G = np.stack([-np.ones(3), np.ones(3)], axis=1)  # first gate is never active
    kept = dedupe_gates(X, G)
    np.testing.assert_array_equal(kept, G[:, 1:])


def test_include_linear_adds_exactly_one_all_ones_gate():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((40, 5))
    G = sample_gates(jax.random.key(0), X, 30, include_linear=True)
    assert np.all(G[:, 0] == 0)
    assert np.all(X @ G[:, 0] >= 0)
    masks = X @ G >= 0
    assert masks.all(axis=0).sum() == 1


def test_sampling_is_seeded_and_data_gates_come_from_rows():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((100, 6))
    a = sample_gates(jax.random.key(7), X, 20, kind="data", dedupe=False)
    b = sample_gates(jax.random.key(7), X, 20, kind="data", dedupe=False)
    c = sample_gates(jax.random.key(8), X, 20, kind="data", dedupe=False)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    rows = {tuple(np.round(r, 5)) for r in X.astype(np.float32)}
    assert all(tuple(np.round(col, 5)) in rows for col in a.T)
    g = sample_gates(jax.random.key(1), X, 64)
    assert g.shape[0] == 6 and 1 <= g.shape[1] <= 64


def test_bad_gate_requests():
    X = np.ones((5, 2))
    with pytest.raises(ValueError, match="at least 1"):
        sample_gates(jax.random.key(0), X, 0)
    with pytest.raises(ValueError, match="unknown gate kind"):
        sample_gates(jax.random.key(0), X, 3, kind="uniform")
