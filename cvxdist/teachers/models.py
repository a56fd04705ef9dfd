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

All convolutions use ``SAME`` padding; stride-2 downsampling happens in the first
convolution of ``stage2`` onward (and in the shortcut, a 1×1 projection with BatchNorm).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

MODEL_NAMES = ("resnet20", "resnet32", "resnet56", "resnet18", "small_cnn")

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


class ConvBN(nn.Module):
    """3×3 (or k×k) convolution, BatchNorm, optional ReLU."""

    features: int
    kernel: int = 3
    stride: int = 1
    relu: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding="SAME",
            use_bias=False,
            kernel_init=_CONV_INIT,
        )(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        return nn.relu(x) if self.relu else x


class BasicBlock(nn.Module):
    """Two 3×3 ConvBN layers with an identity (or 1×1 projection) shortcut."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        y = ConvBN(self.features, stride=self.stride)(x, train)
        y = ConvBN(self.features, relu=False)(y, train)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = ConvBN(self.features, kernel=1, stride=self.stride, relu=False)(x, train)
        return nn.relu(x + y)


class Stage(nn.Module):
    """``depth`` basic blocks (``residual``) or plain ConvBN layers; the first one strides.

    ``__call__(x, train, first, last)`` runs blocks ``first..last`` (0-based, inclusive;
    all by default); ``x`` must be the input of block ``first``.
    """

    features: int
    depth: int
    stride: int
    residual: bool = True

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False, first: int = 0, last: int | None = None
    ) -> jnp.ndarray:
        layer = BasicBlock if self.residual else ConvBN
        last = self.depth - 1 if last is None else last
        for i in range(first, last + 1):
            stride = self.stride if i == 0 else 1
            x = layer(self.features, stride=stride, name=f"{layer.__name__}_{i}")(x, train)
        return x


class Stem(nn.Module):
    """Fixed standardization, then one 3×3 ConvBN."""

    features: int
    mean: Sequence[float]
    std: Sequence[float]

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
        return ConvBN(self.features)(x, train)


class Head(nn.Module):
    """Global average pooling and a dense classifier: ``(N, H, W, C) -> (N, classes)``."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


# model name -> (stem width, [(stage width, blocks or layers, stride), ...], stage kind)
_SPECS: dict[str, tuple[int, list[tuple[int, int, int]], str]] = {
    "resnet20": (16, [(16, 3, 1), (32, 3, 2), (64, 3, 2)], "residual"),
    "resnet32": (16, [(16, 5, 1), (32, 5, 2), (64, 5, 2)], "residual"),
    "resnet56": (16, [(16, 9, 1), (32, 9, 2), (64, 9, 2)], "residual"),
    "resnet18": (64, [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)], "residual"),
    "small_cnn": (16, [(16, 1, 1), (32, 2, 2), (64, 2, 2)], "plain"),
}


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
        stem_width, stages, kind = _SPECS[cfg.model]
        if name == "stem":
            return Stem(_scaled(stem_width, cfg.width), cfg.mean, cfg.std, name=name)
        if name == "head":
            return Head(cfg.num_classes, name=name)
        features, depth, stride = stages[int(name.removeprefix("stage")) - 1]
        residual = kind == "residual"
        return Stage(_scaled(features, cfg.width), depth, stride, residual, name=name)

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
    stages = _SPECS[model][1]
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
        for i, (_, depth, _) in enumerate(_SPECS[model][1])
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
    ``("stage2", "BasicBlock_0")``; a plain stage's layers are ``ConvBN_i``)."""
    stage, block = split_segment(segment)
    if stage == segment:
        return (stage,)
    layer = "BasicBlock" if _SPECS[model][2] == "residual" else "ConvBN"
    return (stage, f"{layer}_{block}")


def build_model(config: ArchConfig) -> CutNetwork:
    """The Flax module for an architecture config (validates the model name)."""
    cut_names(config.model)
    return CutNetwork(config)
