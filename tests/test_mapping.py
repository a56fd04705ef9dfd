"""From convex weights to a deployable gated network."""

from __future__ import annotations

import numpy as np
import pytest

from cvxdist.mapping import parameter_count, predict, predict_convex, to_network
from cvxdist.problems import make_problem
from cvxdist.solvers import Weights, solve


@pytest.mark.parametrize("reg", ["coupled", "nuclear", "one_vs_all"])
def test_network_reproduces_convex_model(x64, reg):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((80, 6))
    Y = np.maximum(X @ rng.standard_normal((6, 3)), 0)
    G = rng.standard_normal((6, 15))
    problem = make_problem(X, Y, G, skip=True, bias=True)
    solution = solve(problem, lam_frac=0.2, reg=reg, tol=1e-8)
    net = to_network(solution, G)
    X_test = rng.standard_normal((50, 6))
    np.testing.assert_allclose(
        predict(net, X_test), predict_convex(solution, G, X_test), rtol=1e-9, atol=1e-10
    )
    active = int(solution.stats.active_gates)
    assert 0 < active < 15  # λ pruned some gates
    assert net.num_gates <= active


def test_parameter_count_by_hand():
    d, c = 4, 2
    U = np.zeros((3, d, c))
    U[0, :, 0] = 1.0  # rank 1
    U[2] = np.arange(d * c).reshape(d, c) + np.eye(d, c)  # rank 2
    G = np.arange(d * 3, dtype=float).reshape(d, 3)
    net = to_network(Weights(U, np.ones((d, c)), np.ones(c)), G)
    assert net.num_gates == 2  # gate 1 is pruned
    assert net.num_neurons == 3  # 1 + 2 neurons
    np.testing.assert_array_equal(np.asarray(net.neuron_gate), [0, 1, 1])
    # gates d·Q + first layer d·K + second layer K·c + skip d·c + bias c
    assert parameter_count(net) == 4 * 2 + 4 * 3 + 3 * 2 + 4 * 2 + 2
    no_skip = to_network(Weights(U), G)
    assert parameter_count(no_skip) == 4 * 2 + 4 * 3 + 3 * 2


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="do not match"):
        to_network(Weights(np.zeros((3, 4, 2))), np.zeros((4, 2)))
