"""Flax (linen) teacher architectures with named cut points.

Every model is a sequence of named stages, run in order::

    stem -> stage1 -> stage2 -> stage3 [-> stage4] -> head

and every stage is a sequence of residual blocks (or plain ConvBN layers for ``small_cnn``),
so the finest cut points, the *segments*, are::

    stem -> stage1.block1 -> ... -> stage1.blockK -> stage2.block1 -> ... -> head

A cut name is a stage (``stage2``, the span ``stage2.block1..stage2.blockK``), a block
(``stage2.block3``), ``stem`` or ``head``. Each stage's variables live under its own name in
the variable tree (``params["stage2"]["BasicBlock_0"]`` is ``stage2.block1``), and
``model.apply(variables, x, start=A, stop=B)`` runs only the segments from the first of ``A``
to the last of ``B``, which is what prefix / block / suffix functions are built from (see
`cvxdist.teachers.Teacher`). Inputs are images ``(N, H, W, C)`` in ``[0, 1]``;
the stem standardizes them with the fixed per-channel ``mean``/``std`` of the config, so a
teacher is self-contained. Any input size works: the head global-average-pools.

Stems: the CIFAR stem is one 3×3 ConvBN; the ImageNet stem (``*_imagenet`` models, the
configuration of torchvision's ResNets and of the convex-distillation paper) is a 7×7
stride-2 ConvBN and a 3×3 stride-2 max pool, so the stages see 1/4 of the input size.
Blocks: basic (two 3×3 ConvBN) or bottleneck (1×1, 3×3, 1×1 expanding 4×, as in
torchvision's ResNet-50, stride on the 3×3). Stride-2 downsampling happens in the first block
of ``stage2`` onward (and in the shortcut, a 1×1 projection with BatchNorm).

Padding: ``ArchConfig.padding = "same"`` (the default, the teachers trained here) is
``SAME``; ``"symmetric"`` pads ``k // 2`` on every side as PyTorch does, which differs from
``SAME`` for stride-2 layers on even sizes (used by imported torchvision teachers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

PADDINGS = ("same", "symmetric")

_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Everything needed to rebuild a teacher network (stored in ``teacher.json``)."""

    model: str
    num_classes: int
    in_channels: int
    width: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    padding: str = "same"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArchConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        kwargs["mean"] = tuple(float(v) for v in kwargs.get("mean", (0.0,)))
        kwargs["std"] = tuple(float(v) for v in kwargs.get("std", (1.0,)))
        return cls(**kwargs)


def _scaled(base: int, width: float) -> int:
    return max(1, round(base * width))


def _pads(padding: str, kernel: int) -> Any:
    """Flax padding for a ``kernel``-wide window: ``SAME`` or ``k // 2`` on every side."""
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; choose one of {', '.join(PADDINGS)}")
    return "SAME" if padding == "same" else ((kernel // 2, kernel // 2),) * 2


BN_EPSILON = 1e-5


class ConvBN(nn.Module):
    """3×3 (or k×k) convolution, BatchNorm, optional ReLU."""

    features: int
    kernel: int = 3
    stride: int = 1
    relu: bool = True
    padding: str = "same"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=_pads(self.padding, self.kernel),
            use_bias=False,
            kernel_init=_CONV_INIT,
        )(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPSILON)(x)
        return nn.relu(x) if self.relu else x

    def folded(self, x: jnp.ndarray) -> jnp.ndarray:
        """The inference-mode layer as one convolution: BatchNorm folded into the kernel
        (``W·s``) and a bias (``b − μ·s``), ``s = γ / √(σ² + ε)``; the same function up to
        float32 rounding, with fewer ops for an exported graph. Call it on a bound module."""
        params, stats = self.variables["params"], self.variables["batch_stats"]["BatchNorm_0"]
        norm = params["BatchNorm_0"]
        with jax.ensure_compile_time_eval():  # constants stay constants in a traced graph
            scale = norm["scale"] * lax.rsqrt(stats["var"] + BN_EPSILON)
            kernel = params["Conv_0"]["kernel"] * scale
            bias = norm["bias"] - stats["mean"] * scale
        x = lax.conv_general_dilated(
            x,
            kernel,
            (self.stride, self.stride),
            _pads(self.padding, self.kernel),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        x = x + bias
        return nn.relu(x) if self.relu else x


def _fold_batchnorm(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    """Flax method interceptor: an inference-mode `ConvBN` runs as `ConvBN.folded`."""
    train = kwargs.get("train", args[1] if len(args) > 1 else False)
    if isinstance(context.module, ConvBN) and context.method_name == "__call__" and not train:
        return context.module.folded(args[0])
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def folded_batchnorm() -> Iterator[None]:
    """Within it, every inference-mode `ConvBN` applied (hence traced) runs as
    `ConvBN.folded`: one convolution with a bias. Jitted functions traced before keep
    their cached, unfolded trace."""
    with nn.intercept_methods(_fold_batchnorm):
        yield


class BasicBlock(nn.Module):
    """Two 3×3 ConvBN layers with an identity (or 1×1 projection) shortcut."""

    features: int
    stride: int = 1
    padding: str = "same"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        y = ConvBN(self.features, stride=self.stride, padding=self.padding)(x, train)
        y = ConvBN(self.features, relu=False, padding=self.padding)(y, train)
        return _shortcut_relu(x, y, self.stride, train)


class Bottleneck(nn.Module):
    """1×1 ConvBN, 3×3 ConvBN (strided), 1×1 ConvBN to ``4 × features`` channels, with an
    identity (or 1×1 projection) shortcut: torchvision's ResNet-50 block (v1.5)."""

    features: int
    stride: int = 1
    padding: str = "same"
    expansion: int = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        y = ConvBN(self.features, kernel=1, padding=self.padding)(x, train)
        y = ConvBN(self.features, stride=self.stride, padding=self.padding)(y, train)
        y = ConvBN(self.features * self.expansion, 1, relu=False, padding=self.padding)(y, train)
        return _shortcut_relu(x, y, self.stride, train)


def _shortcut_relu(x: jnp.ndarray, y: jnp.ndarray, stride: int, train: bool) -> jnp.ndarray:
    """``relu(shortcut(x) + y)``: identity, or a 1×1 ConvBN projection when the block
    strides or changes the channels (created in the caller's scope, after its layers)."""
    if stride != 1 or x.shape[-1] != y.shape[-1]:
        x = ConvBN(y.shape[-1], kernel=1, stride=stride, relu=False)(x, train)
    return nn.relu(x + y)


# block kind -> the layer class a stage repeats
_LAYERS: dict[str, type[nn.Module]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "plain": ConvBN,
}


class Stage(nn.Module):
    """``depth`` blocks of one kind (``basic``, ``bottleneck`` or ``plain`` ConvBN layers);
    the first one strides.

    ``__call__(x, train, first, last)`` runs blocks ``first..last`` (0-based, inclusive;
    all by default); ``x`` must be the input of block ``first``.
    """

    features: int
    depth: int
    stride: int
    kind: str = "basic"
    padding: str = "same"

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False, first: int = 0, last: int | None = None
    ) -> jnp.ndarray:
        layer = _LAYERS[self.kind]
        last = self.depth - 1 if last is None else last
        for i in range(first, last + 1):
            stride = self.stride if i == 0 else 1
            name = f"{layer.__name__}_{i}"
            x = layer(self.features, stride=stride, padding=self.padding, name=name)(x, train)
        return x


class Stem(nn.Module):
    """Fixed standardization, then one 3×3 ConvBN (``cifar``), or a 7×7 stride-2 ConvBN and
    a 3×3 stride-2 max pool (``imagenet``)."""

    features: int
    mean: Sequence[float]
    std: Sequence[float]
    kind: str = "cifar"
    padding: str = "same"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
        if self.kind == "cifar":
            return ConvBN(self.features, padding=self.padding)(x, train)
        x = ConvBN(self.features, kernel=7, stride=2, padding=self.padding)(x, train)
        return max_pool(x, 3, 2, self.padding)


def max_pool(x: jnp.ndarray, window: int, stride: int, padding: str) -> jnp.ndarray:
    """``window×window`` max pooling of ``(N, H, W, C)`` (padding counts as ``-inf``).

    The same values as ``nn.max_pool``, computed on ``(N·C, H, W)`` planes: an ONNX
    converter (jax2onnx) maps that to ONNX ``MaxPool``, but not a pooling window over NHWC.
    """
    n, h, w, c = x.shape
    pads = _pads(padding, window)
    if pads == "SAME":
        pads = lax.padtype_to_pads((h, w), (window, window), (stride, stride), "SAME")
    planes = jnp.transpose(x, (0, 3, 1, 2)).reshape(n * c, h, w)
    pooled = lax.reduce_window(
        planes, -jnp.inf, lax.max, (1, window, window), (1, stride, stride), ((0, 0), *pads)
    )
    return jnp.transpose(pooled.reshape(n, c, *pooled.shape[1:]), (0, 2, 3, 1))


class Head(nn.Module):
    """Global average pooling and a dense classifier: ``(N, H, W, C) -> (N, classes)``."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class _Spec(NamedTuple):
    stem_width: int
    stages: list[tuple[int, int, int]]  # (stage width, blocks or layers, stride)
    block: str  # a key of _LAYERS
    stem: str = "cifar"  # or "imagenet"


def _torchvision(depths: tuple[int, ...], block: str, stem: str) -> _Spec:
    widths, strides = (64, 128, 256, 512), (1, 2, 2, 2)
    return _Spec(64, list(zip(widths, depths, strides)), block, stem)


_SPECS: dict[str, _Spec] = {
    "resnet20": _Spec(16, [(16, 3, 1), (32, 3, 2), (64, 3, 2)], "basic"),
    "resnet32": _Spec(16, [(16, 5, 1), (32, 5, 2), (64, 5, 2)], "basic"),
    "resnet56": _Spec(16, [(16, 9, 1), (32, 9, 2), (64, 9, 2)], "basic"),
    "small_cnn": _Spec(16, [(16, 1, 1), (32, 2, 2), (64, 2, 2)], "plain"),
}
# torchvision's layouts, with the CIFAR stem (``resnet18``) or the ImageNet one
for _name, _depths, _block in (
    ("resnet18", (2, 2, 2, 2), "basic"),
    ("resnet34", (3, 4, 6, 3), "basic"),
    ("resnet50", (3, 4, 6, 3), "bottleneck"),
):
    _SPECS[_name] = _torchvision(_depths, _block, "cifar")
    _SPECS[f"{_name}_imagenet"] = _torchvision(_depths, _block, "imagenet")

MODEL_NAMES = tuple(_SPECS)


class CutNetwork(nn.Module):
    """A teacher network made of named segments (see the module docstring).

    ``__call__(x, start=None, stop=None, train=False)`` runs segments ``start..stop``
    (inclusive; ``None`` means the first / last one). ``x`` must be the input of ``start``.
    """

    config: ArchConfig

    @property
    def cuts(self) -> tuple[str, ...]:
        """Stage-level cut names (``stem``, ``stage1``, …, ``head``)."""
        return cut_names(self.config.model)

    @property
    def segments(self) -> tuple[str, ...]:
        """The finest cut names, in order (``stem``, ``stage1.block1``, …, ``head``)."""
        return segment_names(self.config.model)

    def _segment(self, name: str) -> nn.Module:
        cfg = self.config
        spec = _SPECS[cfg.model]
        if name == "stem":
            width = _scaled(spec.stem_width, cfg.width)
            return Stem(width, cfg.mean, cfg.std, spec.stem, cfg.padding, name=name)
        if name == "head":
            return Head(cfg.num_classes, name=name)
        features, depth, stride = spec.stages[int(name.removeprefix("stage")) - 1]
        width = _scaled(features, cfg.width)
        return Stage(width, depth, stride, spec.block, cfg.padding, name=name)

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        start: str | None = None,
        stop: str | None = None,
        train: bool = False,
    ) -> jnp.ndarray:
        spans = cut_spans(self.config.model)
        segments = self.segments
        first = 0 if start is None else spans[start][0]
        last = len(segments) - 1 if stop is None else spans[stop][1]
        # consecutive blocks of one stage run in one call of that stage's module
        for stage, run in group_by_stage(segments[first : last + 1]):
            module = self._segment(stage)
            if isinstance(module, Stage):
                x = module(x, train, split_segment(run[0])[1], split_segment(run[-1])[1])
            else:
                x = module(x, train)
        return x


def cut_names(model: str) -> tuple[str, ...]:
    """The ordered cut points (segment names) of a model."""
    if model not in _SPECS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")
    stages = _SPECS[model].stages
    return ("stem", *(f"stage{i + 1}" for i in range(len(stages))), "head")


def split_segment(segment: str) -> tuple[str, int]:
    """``stage2.block3`` → ``("stage2", 2)`` (0-based block); ``stem`` → ``("stem", 0)``."""
    stage, _, block = segment.partition(".block")
    return stage, int(block) - 1 if block else 0


def group_by_stage(segments: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Consecutive segments grouped by their stage: ``[(stage, [segment, ...]), ...]``."""
    grouped = itertools.groupby(segments, key=lambda segment: split_segment(segment)[0])
    return [(stage, list(run)) for stage, run in grouped]


@functools.cache
def segment_names(model: str) -> tuple[str, ...]:
    """The finest cut points of a model: ``stem``, every block of every stage, ``head``."""
    cut_names(model)
    blocks = (
        f"stage{i + 1}.block{j + 1}"
        for i, (_, depth, _) in enumerate(_SPECS[model].stages)
        for j in range(depth)
    )
    return ("stem", *blocks, "head")


@functools.cache
def cut_spans(model: str) -> dict[str, tuple[int, int]]:
    """Every valid cut name (stage level and block level, in network order) mapped to the
    inclusive range of `segment_names` indices it covers (cached: do not modify)."""
    spans: dict[str, tuple[int, int]] = {}
    for i, segment in enumerate(segment_names(model)):
        stage = split_segment(segment)[0]
        if stage != segment:
            spans[stage] = (spans.get(stage, (i, i))[0], i)
        spans[segment] = (i, i)
    return spans


def variable_path(model: str, segment: str) -> tuple[str, ...]:
    """Where a segment's variables live in each collection (``stage2.block1`` →
    ``("stage2", "BasicBlock_0")``; ``Bottleneck_i`` / ``ConvBN_i`` for the other kinds)."""
    stage, block = split_segment(segment)
    if stage == segment:
        return (stage,)
    return (stage, f"{_LAYERS[_SPECS[model].block].__name__}_{block}")


def build_model(config: ArchConfig) -> CutNetwork:
    """The Flax module for an architecture config (validates the model name and padding)."""
    cut_names(config.model)
    _pads(config.padding, 1)
    return CutNetwork(config)
