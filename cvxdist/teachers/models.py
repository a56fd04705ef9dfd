"""Flax (linen) teacher architectures with named cut points.

Every model is a sequence of named *segments*, run in order::

    stem -> stage1 -> stage2 -> stage3 [-> stage4] -> head

Each segment's variables live under its own name in the variable tree (``params["stage2"]``,
``batch_stats["stage2"]``), and ``model.apply(variables, x, start=A, stop=B)`` runs only the
segments from ``A`` to ``B`` inclusive, which is what prefix / block / suffix functions are
built from (see `cvxdist.teachers.Teacher`). Inputs are images ``(N, H, W, C)`` in ``[0, 1]``;
the stem standardizes them with the fixed per-channel ``mean``/``std`` of the config, so a
teacher is self-contained. Any input size works: the head global-average-pools.

All convolutions use ``SAME`` padding; stride-2 downsampling happens in the first
convolution of ``stage2`` onward (and in the shortcut, a 1×1 projection with BatchNorm).
"""

from __future__ import annotations

import dataclasses
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
    """``depth`` basic blocks (``residual``) or plain ConvBN layers; the first one strides."""

    features: int
    depth: int
    stride: int
    residual: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        layer = BasicBlock if self.residual else ConvBN
        for i in range(self.depth):
            x = layer(self.features, stride=self.stride if i == 0 else 1)(x, train)
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
        return cut_names(self.config.model)

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
        names = self.cuts
        first = 0 if start is None else names.index(start)
        last = len(names) - 1 if stop is None else names.index(stop)
        for name in names[first : last + 1]:
            x = self._segment(name)(x, train)
        return x


def cut_names(model: str) -> tuple[str, ...]:
    """The ordered cut points (segment names) of a model."""
    if model not in _SPECS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")
    stages = _SPECS[model][1]
    return ("stem", *(f"stage{i + 1}" for i in range(len(stages))), "head")


def build_model(config: ArchConfig) -> CutNetwork:
    """The Flax module for an architecture config (validates the model name)."""
    cut_names(config.model)
    return CutNetwork(config)
