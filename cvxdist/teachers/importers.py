"""Teachers from PyTorch: torchvision-layout ResNets (``resnet18``, ``resnet34``, ``resnet50``)
with the ImageNet stem (7×7 stride-2 conv and max pool) or the CIFAR one (a 3×3 conv, the max
pool removed), from a state_dict in a ``.pth`` (read without running pickled code, see
`cvxdist.teachers.torch_files`) or a ``.safetensors`` file.

The Flax model is the same architecture with PyTorch's symmetric padding
(``ArchConfig.padding = "symmetric"``), so it computes the same logits; the width multiplier,
input channels and number of classes are read off ``conv1.weight`` and ``fc.weight``. Name
mapping (torchvision → Flax variables)::

    conv1 / bn1                          stem/ConvBN_0
    layerK.J.convI / bnI                 stageK/{BasicBlock,Bottleneck}_J/ConvBN_{I-1}
    layerK.J.downsample.0 / .1           stageK/..._J/ConvBN_{2 (basic) or 3 (bottleneck)}
    fc                                   head/Dense_0
    conv weight (O, I, kh, kw)           kernel (kh, kw, I, O)
    bn weight, bias, running_mean/var    scale, bias (params), mean, var (batch_stats)
    fc weight (classes, F)               kernel (F, classes)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cvxdist.errors import UserError
from cvxdist.teachers.checkpoint import file_sha256
from cvxdist.teachers.models import ArchConfig
from cvxdist.teachers.teacher import save_teacher, variables_template
from cvxdist.teachers.torch_files import read_state_dict

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")
STEMS = ("imagenet", "cifar")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class StateDictMismatchError(UserError, ValueError):
    """A state_dict that does not fit the requested architecture (names the first key)."""


def _convbn(conv: str, bn: str, path: tuple[str, ...]) -> Iterator[tuple[str, tuple, str]]:
    """(torch key, Flax variable path, kind) of one convolution and its BatchNorm."""
    yield f"{conv}.weight", ("params", *path, "Conv_0", "kernel"), "conv"
    yield f"{bn}.weight", ("params", *path, "BatchNorm_0", "scale"), "vector"
    yield f"{bn}.bias", ("params", *path, "BatchNorm_0", "bias"), "vector"
    yield f"{bn}.running_mean", ("batch_stats", *path, "BatchNorm_0", "mean"), "vector"
    yield f"{bn}.running_var", ("batch_stats", *path, "BatchNorm_0", "var"), "vector"


def torchvision_layout(params: dict[str, Any]) -> list[tuple[str, tuple, str]]:
    """``[(torch key, Flax variable path, kind), ...]`` in torchvision's state_dict order,
    for a Flax ``params`` tree (or its template) of a ResNet."""
    layout = list(_convbn("conv1", "bn1", ("stem", "ConvBN_0")))
    stages = sorted((k for k in params if k.startswith("stage")), key=lambda k: int(k[5:]))
    for stage in stages:
        blocks = sorted(params[stage], key=lambda b: int(b.rsplit("_", 1)[1]))
        for block in blocks:
            torch_block = f"layer{stage[5:]}.{block.rsplit('_', 1)[1]}"
            main = 3 if block.startswith("Bottleneck") else 2
            for i in range(len(params[stage][block])):
                conv, bn = (
                    (f"{torch_block}.conv{i + 1}", f"{torch_block}.bn{i + 1}")
                    if i < main
                    else (f"{torch_block}.downsample.0", f"{torch_block}.downsample.1")
                )
                layout += _convbn(conv, bn, (stage, block, f"ConvBN_{i}"))
    layout.append(("fc.weight", ("params", "head", "Dense_0", "kernel"), "dense"))
    layout.append(("fc.bias", ("params", "head", "Dense_0", "bias"), "vector"))
    return layout


def _to_flax(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return array.transpose(2, 3, 1, 0)
    return array.T if kind == "dense" else array


def _from_flax_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "conv":
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    return tuple(reversed(shape)) if kind == "dense" else tuple(shape)


def _shape_of(state: dict[str, np.ndarray], key: str, rank: int, what: str) -> tuple[int, ...]:
    if key not in state:
        raise StateDictMismatchError(f"missing key {key!r} ({what})")
    shape = tuple(np.shape(state[key]))
    if len(shape) != rank:
        raise StateDictMismatchError(f"key {key!r} has shape {shape}, expected {rank} dimensions")
    return shape


def infer_config(
    state: dict[str, np.ndarray],
    arch: str,
    stem: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ArchConfig:
    """The Flax architecture of a torchvision ResNet state_dict: width from ``conv1``'s
    output channels / 64, input channels, classes from ``fc``; the stem from ``conv1``'s
    kernel (7: ImageNet, 3: CIFAR) unless given. ``mean``/``std`` default to ImageNet's for
    3 channels, else 0 / 1."""
    if arch not in TORCHVISION_ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(TORCHVISION_ARCHS)}")
    out_channels, in_channels, kernel, _ = _shape_of(state, "conv1.weight", 4, "the stem conv")
    classes = _shape_of(state, "fc.weight", 2, "the classifier")[0]
    if stem is None:
        stem = "imagenet" if kernel == 7 else "cifar"
    if stem not in STEMS:
        raise UserError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    if mean is None:
        mean = IMAGENET_MEAN if in_channels == 3 else (0.0,) * in_channels
    if std is None:
        std = IMAGENET_STD if in_channels == 3 else (1.0,) * in_channels
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, in_channels):
            raise UserError(f"--{name} needs 1 or {in_channels} values, got {len(values)}")
    if min(std) <= 0:
        raise UserError(f"--std must be positive, got {list(std)}")
    return ArchConfig(
        model=arch if stem == "cifar" else f"{arch}_imagenet",
        num_classes=int(classes),
        in_channels=int(in_channels),
        width=out_channels / 64,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        padding="symmetric",
    )


def convert_state_dict(
    state: dict[str, np.ndarray], config: ArchConfig, image_shape: tuple[int, int, int]
) -> dict[str, Any]:
    """Flax ``{"params", "batch_stats"}`` (float32) of a torchvision state_dict.

    Raises `StateDictMismatchError` naming the first key, in the file's order, that the
    architecture does not have or has with another shape, else the first one it misses.
    """
    template = variables_template(config, image_shape)
    layout = torchvision_layout(template["params"])
    expected = {}
    for key, path, kind in layout:
        leaf = template
        for name in path:
            leaf = leaf[name]
        expected[key] = (path, kind, _from_flax_shape(kind, leaf.shape))
    arch = f"{config.model} (width {config.width:g})"
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key not in expected:
            raise StateDictMismatchError(
                f"unexpected key {key!r} with shape {tuple(np.shape(value))} for {arch}"
            )
        want = expected[key][2]
        if tuple(np.shape(value)) != want:
            raise StateDictMismatchError(
                f"key {key!r} has shape {tuple(np.shape(value))}, {arch} expects {want}"
            )
    for key, (_, _, want) in expected.items():
        if key not in state:
            raise StateDictMismatchError(f"missing key {key!r} (shape {want}) for {arch}")
    variables: dict[str, Any] = {}
    for key, (path, kind, _) in expected.items():
        node = variables
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(_to_flax(kind, np.asarray(state[key], np.float32)))
    return jax.tree.map(np.asarray, variables)


def import_torchvision_resnet(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    arch: str,
    *,
    stem: str | None = None,
    image_shape: tuple[int, int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dataset: str = "none",
    name: str | None = None,
) -> dict[str, Any]:
    """Convert a torchvision ResNet checkpoint into a teacher directory; returns its
    ``teacher.json``. ``image_shape`` defaults to 32×32 (CIFAR stem) or 224×224 (ImageNet
    stem) with the checkpoint's channels. Nothing is written when the file does not fit."""
    path = Path(path)
    state = read_state_dict(path)
    config = infer_config(state, arch, stem, mean, std)
    if image_shape is None:
        size = 224 if config.model.endswith("_imagenet") else 32
        image_shape = (size, size, config.in_channels)
    image_shape = tuple(int(n) for n in image_shape)
    if len(image_shape) != 3 or image_shape[-1] != config.in_channels or min(image_shape) < 1:
        raise UserError(
            f"image shape {image_shape} does not fit the checkpoint's "
            f"{config.in_channels} input channels (H W C)"
        )
    variables = convert_state_dict(state, config, image_shape)
    info = {
        "name": name or Path(out_dir).name,
        "dataset": dataset,
        "image_shape": list(image_shape),
        "num_classes": config.num_classes,
        "test_accuracy": None,
        "complete": True,
        "source": {
            "file": path.name,
            "sha256": file_sha256(path),
            "format": "safetensors" if path.suffix == ".safetensors" else "torch zip",
            "layout": f"torchvision {arch}",
            "stem": "imagenet" if config.model.endswith("_imagenet") else "cifar",
        },
    }
    return save_teacher(out_dir, config, variables, info)
