r"""Deployable student blocks (Flax) built from solved convex problems.

Conv-block student, for a teacher block ``z (B, H, W, C_in) -> y (B, H', W', C_out)`` with
stride ``s`` and a ``k×k`` receptive field::

    a = conv_k,s(z; W_proj) + b_proj            (d' channels: the reduced patch features;
                                                 the raw k·k·C_in patch when not reduced;
                                                 z W_ch first when channels are reduced)
    h = (a W_in) ⊙ 1[a G ≥ 0][:, neuron_gate]   (K neurons, Q distinct fixed gates)
    o = h W_out + a V + b                        (c' reduced outputs)
    y = o E + e [+ z]                            (E: back to C_out channels, if reduced;
                                                 + z: the optional identity shortcut)

Every matrix acts per location, so ``G``, ``W_in``, ``V`` are 1×1 convolutions on ``a`` and
``W_out``, ``E`` are 1×1 convolutions: the paper's ``conv1x1(conv_k(z) ⊙ 1[gate_conv_k(z) ≥ 0])``
with the input projection factored out. On the rows of the convex problem (``a`` at every
output location) the block computes exactly the convex model's prediction.

Head student: the same network on globally average-pooled features (no convolution).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cvxdist.mapping import GatedNetwork, gated_forward


def _zeros(shape: tuple[int, ...]) -> Any:
    return lambda *_: jnp.zeros(shape, jnp.float32)


class GatedStudent(nn.Module):
    """A gated two-layer student block (see the module docstring).

    Attributes (static): ``in_channels``, ``out_channels``, ``kernel_size`` and ``stride``
    (``kernel_size = 0`` means a head student on pooled features), ``reduced_in`` (``d'``;
    ``None``: raw patch features), ``reduced_out`` (``c'``; ``None``: no output expansion),
    ``neuron_gate`` (gate index of each neuron), ``num_gates``, ``skip``,
    ``reduced_channels`` (``r``: a 1×1 projection ``C_in -> r`` before the patches, which then
    cost ``k·k·r`` instead of ``k·k·C_in`` per feature; ``None``: none), ``identity`` (add
    the block input to the output: a parameter-free shortcut for stride-1 blocks that keep
    their channels; the convex model then fits the residual ``y - z``).
    """

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    reduced_in: int | None
    reduced_out: int | None
    neuron_gate: tuple[int, ...]
    num_gates: int
    skip: bool
    identity: bool = False
    reduced_channels: int | None = None

    @property
    def features(self) -> int:
        if self.reduced_in is not None:
            return self.reduced_in
        k = max(self.kernel_size, 1)
        return k * k * (self.reduced_channels or self.in_channels)

    @property
    def outputs(self) -> int:
        return self.reduced_out if self.reduced_out is not None else self.out_channels

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        d, c, K = self.features, self.outputs, len(self.neuron_gate)
        a = self._features(z)
        locations = a.shape[:-1]
        a = a.reshape(-1, d)  # 2-D products: GEMMs in an exported ONNX graph, not Einsums
        out = gated_forward(
            a,
            self.param("gates", _zeros((d, self.num_gates))),
            self.param("w_in", _zeros((d, K))),
            self.param("w_out", _zeros((K, c))),
            jnp.asarray(self.neuron_gate, jnp.int32),
            self.param("skip", _zeros((d, c))) if self.skip else None,
            self.param("bias", _zeros((c,))),
        )
        if self.reduced_out is not None:
            expand = self.param("expand", _zeros((c, self.out_channels)))
            out = out @ expand + self.param("expand_bias", _zeros((self.out_channels,)))
        out = out.reshape(*locations, -1)
        if self.identity:
            out = out + z
        return out

    def _features(self, z: jnp.ndarray) -> jnp.ndarray:
        if self.kernel_size == 0:  # head student: global average pooling
            a = z.mean(axis=(1, 2)) if z.ndim == 4 else z
            if self.reduced_in is None:
                return a
            proj = self.param("proj", _zeros((self.in_channels, self.reduced_in)))
            return a @ proj + self.param("proj_bias", _zeros((self.reduced_in,)))
        k, s = self.kernel_size, self.stride
        channels = self.in_channels
        if self.reduced_channels is not None:  # no bias: SAME zero padding stays zero
            z = z @ self.param("channels", _zeros((channels, self.reduced_channels)))
            channels = self.reduced_channels
        if self.reduced_in is None:
            from cvxdist.streaming import image_patches

            return image_patches(z, k, s)
        proj = self.param("proj", _zeros((k, k, channels, self.reduced_in)))
        a = jax.lax.conv_general_dilated(
            z,
            proj.astype(z.dtype),
            window_strides=(s, s),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return a + self.param("proj_bias", _zeros((self.reduced_in,)))


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
    reduced_channels: int | None = None

    # The same feature map and output sizes as the convex student.
    features = GatedStudent.features
    outputs = GatedStudent.outputs

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
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
class Reduction:
    """Centering and orthonormal bases of the reduced input/output spaces.

    ``rows_reduced = (rows - in_mean) @ in_basis`` (``in_basis (D, d')``, or ``None``: rows are
    only centered) and ``targets ≈ out_mean + targets_reduced @ out_basis.T`` (``out_basis
    (C, c')`` or ``None``). With ``channel_basis (C_in, r)``, every pixel of a patch row is
    first projected on it (``rows (N, k·k·C_in) -> (N, k·k·r)``, no centering) and ``in_mean``,
    ``in_basis`` live in that space. ``*_kept`` are the fractions of variance kept.
    """

    in_mean: np.ndarray
    in_basis: np.ndarray | None
    out_mean: np.ndarray
    out_basis: np.ndarray | None
    in_kept: float = 1.0
    out_kept: float = 1.0
    channel_basis: np.ndarray | None = None
    channel_kept: float = 1.0

    def rows(self, raw: np.ndarray) -> np.ndarray:
        if self.channel_basis is not None:
            raw = project_channels(raw, self.channel_basis)
        centered = raw - self.in_mean
        return centered if self.in_basis is None else centered @ self.in_basis

    def targets(self, raw: np.ndarray) -> np.ndarray:
        centered = raw - self.out_mean
        return centered if self.out_basis is None else centered @ self.out_basis


def project_channels(rows: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Patch rows ``(N, k·k·C)`` with every pixel projected on ``basis (C, r)``: ``(N, k·k·r)``."""
    pixels = rows.reshape(len(rows), -1, basis.shape[0])
    return (pixels @ basis).reshape(len(rows), -1)


def student_from_network(
    net: GatedNetwork,
    reduction: Reduction,
    *,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    identity: bool = False,
) -> tuple[GatedStudent, dict[str, Any]]:
    """The Flax student and its ``params`` reproducing ``net`` on reduced rows.

    ``kernel_size = 0`` builds a head student on pooled features; ``identity`` adds the
    block input to the output (``net`` then fits the residual).
    """
    if identity and (kernel_size == 0 or stride != 1 or in_channels != out_channels):
        raise ValueError("an identity shortcut needs a stride-1 conv block that keeps channels")
    reduced_in = None if reduction.in_basis is None else reduction.in_basis.shape[1]
    reduced_out = None if reduction.out_basis is None else reduction.out_basis.shape[1]
    channel_basis = reduction.channel_basis
    if channel_basis is not None and kernel_size == 0:
        raise ValueError("channel reduction is for conv students (a head student's input PCA)")
    reduced_channels = None if channel_basis is None else channel_basis.shape[1]
    c = net.w_out.shape[1]
    module = GatedStudent(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        stride=stride,
        reduced_in=reduced_in,
        reduced_out=reduced_out,
        neuron_gate=tuple(int(i) for i in np.asarray(net.neuron_gate)),
        num_gates=int(net.gates.shape[1]),
        skip=net.skip is not None,
        identity=identity,
        reduced_channels=reduced_channels,
    )
    f32 = lambda a: jnp.asarray(np.asarray(a, np.float64), jnp.float32)  # noqa: E731
    params: dict[str, Any] = {
        "gates": f32(net.gates),
        "w_in": f32(net.w_in),
        "w_out": f32(net.w_out),
        "bias": f32(np.zeros(c) if net.bias is None else net.bias),
    }
    if net.skip is not None:
        params["skip"] = f32(net.skip)
    params.update(input_reduction_params(reduction, in_channels, kernel_size))
    if reduced_out is not None:
        params["expand"] = f32(reduction.out_basis.T)
        params["expand_bias"] = f32(reduction.out_mean)
    elif np.any(reduction.out_mean != 0):
        params["bias"] = f32(np.asarray(params["bias"]) + reduction.out_mean)
    return module, {"params": params}


def input_reduction_params(
    reduction: Reduction, in_channels: int, kernel_size: int
) -> dict[str, jnp.ndarray]:
    """``channels``, ``proj``, ``proj_bias`` of a student's feature map (see `Reduction`)."""
    params: dict[str, jnp.ndarray] = {}
    if reduction.channel_basis is not None:
        params["channels"] = jnp.asarray(reduction.channel_basis, jnp.float32)
        in_channels = reduction.channel_basis.shape[1]
    basis = reduction.in_basis
    if basis is None:
        if np.any(reduction.in_mean != 0):
            raise ValueError("rows without an input basis must not be centered (in_mean = 0)")
        return params
    # Centering folds into the projection bias: a = (patch - mean) @ B = patch @ B - mean @ B.
    params["proj_bias"] = jnp.asarray(-reduction.in_mean @ basis, jnp.float32)
    shape = (kernel_size, kernel_size, in_channels, -1) if kernel_size else basis.shape
    params["proj"] = jnp.asarray(basis.reshape(shape), jnp.float32)
    return params


def parameter_count(params: Any) -> int:
    """Number of stored parameters (gates, projections and expansions included)."""
    return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params)))


def flops(fn: Any, *args: Any) -> float:
    """FLOPs of one call of ``fn(*args)`` as XLA counts them (compiled cost analysis)."""
    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


@dataclasses.dataclass
class BlockStudent:
    """One solved stage: the Flax module, its variables and what it took to get there."""

    stage: str
    module: GatedStudent
    variables: dict[str, Any]
    report: dict[str, Any]

    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        return self.module.apply(self.variables, z)


def chain(students: Sequence[BlockStudent]) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
    """``f(variables_list, z)`` applying the students in order (variables traced)."""
    modules = [s.module for s in students]

    def run(variables: Sequence[Any], z: jnp.ndarray) -> jnp.ndarray:
        for module, v in zip(modules, variables):
            z = module.apply(v, z)
        return z

    return run
