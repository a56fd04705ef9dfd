"""Fixed gates of the gated-ReLU student.

A gate is a vector ``g ∈ R^d``; its activation pattern on the rows is ``1[X g ≥ 0]``. Gates
are sampled once (seeded) and never trained. Two gates with the same pattern on the training
rows are redundant (their blocks ``U_i`` are interchangeable), and a gate whose pattern is all
zeros contributes nothing, so both are removed. A zero gate column gives the all-ones pattern,
i.e. a plain linear term.
"""

from __future__ import annotations

from typing import Literal

import jax
import numpy as np
from jax import Array


def gaussian_gates(key: Array, num_features: int, num_gates: int) -> np.ndarray:
    """``(d, P)`` standard normal gates."""
    return np.asarray(jax.random.normal(key, (num_features, num_gates)), np.float32)


def data_gates(key: Array, X: np.ndarray, num_gates: int, noise: float = 0.0) -> np.ndarray:
    """``(d, P)`` gates drawn from the rows of ``X (N, d)`` (with replacement if P > N).

    ``noise`` adds Gaussian jitter of that relative size, which keeps duplicated rows from
    producing duplicated patterns.
    """
    X = np.asarray(X)
    k_rows, k_noise = jax.random.split(key)
    replace = num_gates > X.shape[0]
    rows = np.asarray(jax.random.choice(k_rows, X.shape[0], (num_gates,), replace=replace))
    gates = X[rows].T.astype(np.float32)
    if noise > 0:
        scale = noise * np.linalg.norm(gates, axis=0, keepdims=True) / np.sqrt(X.shape[1])
        gates = gates + scale * np.asarray(jax.random.normal(k_noise, gates.shape), np.float32)
    return gates


def activation_patterns(X: np.ndarray, G: np.ndarray, chunk_rows: int = 8192) -> np.ndarray:
    """Bit-packed patterns ``(P, ceil(N/8))`` of ``1[X G ≥ 0]``, computed in row chunks."""
    X = np.asarray(X)
    G = np.asarray(G, X.dtype)
    packed = []
    for start in range(0, X.shape[0], chunk_rows):
        block = (X[start : start + chunk_rows] @ G) >= 0  # (n, P)
        packed.append(block.T)
    return np.packbits(np.concatenate(packed, axis=1), axis=1)


def dedupe_gates(
    X: np.ndarray, G: np.ndarray, *, include_linear: bool = False, chunk_rows: int = 8192
) -> np.ndarray:
    """Drop gates with an all-zero or duplicated pattern on ``X``; keep first occurrences.

    With ``include_linear``, ensure one zero gate (all-ones pattern) is present, first.
    """
    G = np.asarray(G)
    patterns = activation_patterns(X, G, chunk_rows)
    _, first = np.unique(patterns, axis=0, return_index=True)
    keep = np.sort(first)
    keep = keep[patterns[keep].any(axis=1)]
    all_ones = np.packbits(np.ones(np.asarray(X).shape[0], bool))
    is_linear = np.all(patterns[keep] == all_ones, axis=1)
    if include_linear:
        keep = keep[~is_linear]
        return np.concatenate([np.zeros((G.shape[0], 1), G.dtype), G[:, keep]], axis=1)
    return G[:, keep]


def sample_gates(
    key: Array,
    X: np.ndarray,
    num_gates: int,
    kind: Literal["gaussian", "data"] = "gaussian",
    *,
    dedupe: bool = True,
    include_linear: bool = False,
    noise: float = 0.0,
) -> np.ndarray:
    """``num_gates`` gates for rows ``X (N, d)``, then (optionally) deduplicated.

    After deduplication there can be fewer than ``num_gates`` gates; the count is the
    number of distinct non-empty patterns.
    """
    if num_gates < 1:
        raise ValueError(f"the number of gates must be at least 1, got {num_gates}")
    X = np.asarray(X)
    if kind == "gaussian":
        G = gaussian_gates(key, X.shape[1], num_gates)
    elif kind == "data":
        G = data_gates(key, X, num_gates, noise)
    else:
        raise ValueError(f"unknown gate kind {kind!r}; choose 'gaussian' or 'data'")
    if dedupe:
        G = dedupe_gates(X, G, include_linear=include_linear)
    elif include_linear:
        G = np.concatenate([np.zeros((G.shape[0], 1), G.dtype), G], axis=1)
    return G
