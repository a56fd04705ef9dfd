r"""Non-convex baselines on the same block, rows and loss as the convex student.

``ReluStudent`` is the same two-layer shape with a *learned* ReLU instead of fixed gates::

    a = conv_k,s(z; W_proj) + b_proj      (the same reduced patch features as the convex student)
    o = relu(a W_in + b_in) W_out + b + a V
    y = o E + e

trained with Adam (optax) on the squared distillation loss :math:`\frac{1}{2N}\|\hat y - y\|^2`
in the reduced output space, full batch or mini-batch. Its hidden width is chosen so that its
parameter count (projections included) matches a given budget.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cvxdist.distill.student import Reduction, _zeros


class ReluStudent(nn.Module):
    """Learned-ReLU student block with the convex student's input/output reductions."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    reduced_in: int | None
    reduced_out: int | None
    hidden: int
    skip: bool

    @property
    def features(self) -> int:
        if self.reduced_in is not None:
            return self.reduced_in
        k = max(self.kernel_size, 1)
        return k * k * self.in_channels

    @property
    def outputs(self) -> int:
        return self.reduced_out if self.reduced_out is not None else self.out_channels

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        from cvxdist.distill.student import GatedStudent

        a = GatedStudent._features(self, z)  # same feature map as the convex student
        return self.head(a)

    def head(self, a: jnp.ndarray) -> jnp.ndarray:
        d, c, K = self.features, self.outputs, self.hidden
        hidden = nn.relu(a @ self.param("w_in", _zeros((d, K))) + self.param("b_in", _zeros((K,))))
        out = hidden @ self.param("w_out", _zeros((K, c))) + self.param("bias", _zeros((c,)))
        if self.skip:
            out = out + a @ self.param("skip", _zeros((d, c)))
        if self.reduced_out is not None:
            out = out @ self.param("expand", _zeros((c, self.out_channels)))
            out = out + self.param("expand_bias", _zeros((self.out_channels,)))
        return out


@dataclasses.dataclass(frozen=True)
class AdamConfig:
    """Adam settings for the non-convex students."""

    steps: int = 2000
    learning_rate: float = 3e-3
    batch_size: int | None = 1024  # None: full batch
    seed: int = 0


def matched_hidden(budget: int, d: int, c: int, shared: int) -> int:
    """Hidden width whose parameter count ``shared + K (d + 1 + c)`` is closest to ``budget``."""
    return max(1, round((budget - shared) / (d + 1 + c)))


def _init_mlp(key: jax.Array, d: int, K: int, c: int, skip: bool) -> dict[str, jnp.ndarray]:
    k1, k2 = jax.random.split(key)
    params = {
        "w_in": jax.random.normal(k1, (d, K)) * jnp.sqrt(2.0 / d),
        "b_in": jnp.zeros((K,)),
        "w_out": jax.random.normal(k2, (K, c)) * jnp.sqrt(1.0 / K),
        "bias": jnp.zeros((c,)),
    }
    if skip:
        params["skip"] = jnp.zeros((d, c))
    return params


def _mlp(params: dict[str, jnp.ndarray], a: jnp.ndarray) -> jnp.ndarray:
    out = jax.nn.relu(a @ params["w_in"] + params["b_in"]) @ params["w_out"] + params["bias"]
    if "skip" in params:
        out = out + a @ params["skip"]
    return out


def train_relu_head(
    rows: np.ndarray,
    targets: np.ndarray,
    hidden: int,
    config: AdamConfig,
    *,
    skip: bool = True,
    progress: bool = False,
) -> tuple[dict[str, jnp.ndarray], dict[str, Any]]:
    """Adam on 1/(2N)||relu(a W_in + b_in) W_out + b + a V - y||² over rows ``(N, d)``.

    Returns the parameters and a report (final full-data loss, time, loss history).
    """
    from tqdm.auto import tqdm

    A = jnp.asarray(rows, jnp.float32)
    T = jnp.asarray(targets, jnp.float32)
    N = A.shape[0]
    params = _init_mlp(jax.random.key(config.seed), A.shape[1], hidden, T.shape[1], skip)
    optimizer = optax.adam(config.learning_rate)
    state = optimizer.init(params)
    batch = N if config.batch_size is None else min(config.batch_size, N)

    def loss_fn(p: dict[str, jnp.ndarray], a: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        return 0.5 * jnp.mean(jnp.sum((_mlp(p, a) - t) ** 2, axis=-1))

    def run(params: Any, state: Any, key: jax.Array, steps: int) -> tuple:
        def step(carry: tuple, key: jax.Array) -> tuple:
            params, state = carry
            idx = jax.random.choice(key, N, (batch,), replace=False) if batch < N else None
            a, t = (A, T) if idx is None else (A[idx], T[idx])
            loss, grads = jax.value_and_grad(loss_fn)(params, a, t)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, state), losses = jax.lax.scan(step, (params, state), jax.random.split(key, steps))
        return params, state, losses

    run = jax.jit(run, static_argnums=3)  # steps sets the scan length
    start = time.perf_counter()
    key = jax.random.key(config.seed + 1)
    history = []
    rounds = max(1, config.steps // 100)
    for _ in tqdm(range(rounds), desc="Adam", disable=not progress, leave=False):
        key, sub = jax.random.split(key)
        params, state, losses = run(params, state, sub, config.steps // rounds)
        history.append(float(losses[-1]))
    final = float(loss_fn(params, A, T))
    report = {
        "loss": final,
        "time_s": time.perf_counter() - start,
        "steps": rounds * (config.steps // rounds),
        "hidden": hidden,
        "history": history,
    }
    return params, report


def relu_student_variables(
    params: dict[str, jnp.ndarray],
    reduction: Reduction,
    *,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
) -> tuple[ReluStudent, dict[str, Any]]:
    """Wrap trained head parameters with the shared reductions as a deployable block."""
    reduced_in = None if reduction.in_basis is None else reduction.in_basis.shape[1]
    reduced_out = None if reduction.out_basis is None else reduction.out_basis.shape[1]
    module = ReluStudent(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        stride=stride,
        reduced_in=reduced_in,
        reduced_out=reduced_out,
        hidden=int(params["w_in"].shape[1]),
        skip="skip" in params,
    )
    variables = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    if reduced_in is not None:
        basis = reduction.in_basis
        variables["proj_bias"] = jnp.asarray(-reduction.in_mean @ basis, jnp.float32)
        shape = (in_channels, reduced_in)
        if kernel_size:
            shape = (kernel_size, kernel_size, in_channels, reduced_in)
        variables["proj"] = jnp.asarray(basis.reshape(shape), jnp.float32)
    if reduced_out is not None:
        variables["expand"] = jnp.asarray(reduction.out_basis.T, jnp.float32)
        variables["expand_bias"] = jnp.asarray(reduction.out_mean, jnp.float32)
    else:
        variables["bias"] = variables["bias"] + jnp.asarray(reduction.out_mean, jnp.float32)
    return module, {"params": variables}
