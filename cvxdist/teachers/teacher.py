"""Trained teachers: loading, cut functions (prefix / block / suffix) and splicing.

A teacher directory holds ``teacher.json`` (architecture, dataset, accuracy, cuts, training
hyperparameters, checkpoint SHA-256) and ``teacher.msgpack`` (the Flax variables
``{"params", "batch_stats"}``), or ``teacher.f16.xz`` for ``float16`` storage (see
`cvxdist.teachers.checkpoint`; loaded as float32). Shipped teachers live in
``cvxdist/assets/teachers/<name>/``.

Cut semantics: a *block* is the run of segments from cut ``A`` to cut ``B`` inclusive
(``B = A`` by default); a cut is a stage (``stage3``), one residual block of a stage
(``stage3.block2``), ``stem`` or ``head``, and a stage stands for all of its blocks.
``prefix`` maps images to the block input (the identity when ``A = "stem"``), ``block``
maps the block input to its output, and ``suffix`` maps the block output to logits (the
identity when ``B = "head"``). All three are jitted pure functions
``f(variables, array) -> array`` with BatchNorm in inference mode, and
``suffix(v, block(v, prefix(v, x))) == teacher(v, x)``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvxdist.errors import UserError
from cvxdist.teachers.checkpoint import (
    CheckpointError,
    file_sha256,
    load_tree,
    save_tree,
    tree_sha256,
    write_atomic,
)
from cvxdist.teachers.models import (
    ArchConfig,
    CutNetwork,
    build_model,
    cut_spans,
    segment_names,
    variable_path,
)

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "teachers"
CHECKPOINT_NAME = "teacher.msgpack"
CHECKPOINT_NAMES = {"float32": CHECKPOINT_NAME, "float16": "teacher.f16.xz"}
METADATA_NAME = "teacher.json"

ArrayFn = Callable[[Any, jnp.ndarray], jnp.ndarray]


class UnknownCutError(UserError, ValueError):
    """A cut name that the teacher does not have; the message lists the valid ones."""


@dataclasses.dataclass(frozen=True)
class CutFunctions:
    """Jitted ``f(variables, array)`` functions around the block ``start..stop``."""

    start: str
    stop: str
    prefix: ArrayFn
    block: ArrayFn
    suffix: ArrayFn


def init_variables(
    config: ArchConfig,
    image_shape: tuple[int, int, int],
    seed: int = 0,
    prng_impl: str | None = None,
) -> Any:
    """Freshly initialized ``{"params", "batch_stats"}`` for images of ``(H, W, C)``.

    ``prng_impl="rbg"`` compiles much faster than the default threefry on CPU (many
    initializers unroll threefry); training keeps the default for reproducibility.
    """
    key = jax.random.key(seed, impl=prng_impl)
    return _jitted_init(config)(key, jnp.zeros((1, *image_shape), jnp.float32))


@functools.lru_cache(maxsize=32)
def _jitted_init(config: ArchConfig) -> Callable:
    """One compiled init per architecture (instead of one compilation per eager op)."""
    return jax.jit(build_model(config).init)


@functools.lru_cache(maxsize=256)
def segment_range_fn(config: ArchConfig, first: int, last: int, jit: bool = True) -> ArrayFn:
    """Pure ``f(variables, x)`` running segments ``first..last`` (indices into
    `segment_names`) of a model (identity if the range is empty); jitted functions are shared
    by every teacher of that architecture.
    """
    names = segment_names(config.model)
    model = build_model(config)

    def run(variables: Any, x: jnp.ndarray) -> jnp.ndarray:
        if first > last:
            return x
        return model.apply(variables, x, start=names[first], stop=names[last])

    return jax.jit(run) if jit else run


def variables_template(config: ArchConfig, image_shape: tuple[int, int, int]) -> Any:
    """Shapes/dtypes of the variables, without computing anything (for checkpoint checks)."""
    model = build_model(config)
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32))
    )


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree."""
    return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
    """A trained teacher: model, variables, metadata and cut functions.

    Attributes: ``name``; ``config`` (`ArchConfig`); ``variables`` (``{"params",
    "batch_stats"}``); ``info`` (the ``teacher.json`` dict); ``checkpoint_sha256``.
    """

    name: str
    config: ArchConfig
    variables: Any
    info: dict[str, Any]
    checkpoint_sha256: str
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def model(self) -> CutNetwork:
        return build_model(self.config)

    @property
    def cuts(self) -> tuple[str, ...]:
        """Stage-level cut names, in network order (``teacher.json``'s ``cuts``)."""
        return self.model.cuts

    @property
    def segments(self) -> tuple[str, ...]:
        """The finest cut names (``stem``, ``stage1.block1``, …, ``head``), in order."""
        return self.model.segments

    @property
    def valid_cuts(self) -> tuple[str, ...]:
        """Every name `resolve` accepts: stages and their blocks, in network order."""
        return tuple(cut_spans(self.config.model))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.info["image_shape"])  # type: ignore[return-value]

    @property
    def dataset(self) -> str:
        return self.info["dataset"]

    def resolve(self, cut: str, to: str | None = None) -> tuple[int, int]:
        """Segment indices ``(start, stop)`` of the block ``cut..to`` (inclusive: from the
        first segment of ``cut`` to the last of ``to``); validates the names."""
        spans = cut_spans(self.config.model)
        for name in (cut, to):
            if name is not None and name not in spans:
                raise UnknownCutError(
                    f"unknown cut {name!r} for {self.config.model}; valid cuts: " + ", ".join(spans)
                )
        start, stop = spans[cut][0], spans[to if to is not None else cut][1]
        if stop < start:
            raise UnknownCutError(
                f"cut {to!r} comes before {cut!r}; valid order: {', '.join(spans)}"
            )
        return start, stop

    def cut_functions(self, cut: str, to: str | None = None, jit: bool = True) -> CutFunctions:
        """Prefix / block / suffix functions for the block ``cut..to``.

        Jitted by default (each distinct segment range compiles once per input shape and
        is shared between cut pairs); ``jit=False`` gives the plain pure functions, to
        compose inside a caller's own ``jax.jit``.
        """
        start, stop = self.resolve(cut, to)
        last = len(self.segments) - 1
        ranges = ((0, start - 1), (start, stop), (stop + 1, last))
        prefix, block, suffix = (self._range_fn(a, b, jit) for a, b in ranges)
        return CutFunctions(self.segments[start], self.segments[stop], prefix, block, suffix)

    def _range_fn(self, first: int, last: int, jit: bool) -> ArrayFn:
        if first > last:
            first, last = 0, -1  # every empty range is the same identity function
        return segment_range_fn(self.config, first, last, jit)

    @property
    def apply(self) -> ArrayFn:
        """Jitted full forward ``f(variables, images) -> logits``."""
        return self._range_fn(0, len(self.segments) - 1, jit=True)

    def splice(
        self, replacement: Callable[[jnp.ndarray], jnp.ndarray], cut: str, to: str | None = None
    ) -> ArrayFn:
        """Jitted ``f(variables, images) -> logits`` with block ``cut..to`` replaced.

        ``replacement`` maps a block input to a block output (same shapes as the teacher's
        block). To keep student weights as traced arguments instead of constants, compose
        `cut_functions` yourself: ``fns.suffix(v, student(w, fns.prefix(v, x)))``.
        """
        fns = self.cut_functions(cut, to)
        return jax.jit(
            lambda variables, x: fns.suffix(variables, replacement(fns.prefix(variables, x)))
        )

    def block_variables(self, cut: str, to: str | None = None) -> dict[str, Any]:
        """The variables of block ``cut..to``, nested as in `variables`
        (``{collection: {stage: {layer: subtree}}}``)."""
        start, stop = self.resolve(cut, to)
        paths = [variable_path(self.config.model, n) for n in self.segments[start : stop + 1]]
        picked: dict[str, Any] = {}
        for col, tree in self.variables.items():
            for path in paths:
                node = _subtree(tree, path)
                if node is None:  # e.g. the head has no batch_stats
                    continue
                out = picked.setdefault(col, {})
                for k in path[:-1]:
                    out = out.setdefault(k, {})
                out[path[-1]] = node
        return picked

    def block_params(self, cut: str, to: str | None = None) -> int:
        """Trainable parameter count of block ``cut..to`` (BatchNorm scale/bias included)."""
        return count_params(self.block_variables(cut, to).get("params", {}))

    def predict(self, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Logits ``(N, classes)`` for images ``(N, H, W, C)``, in fixed-size jitted batches."""
        return np.concatenate(list(batched_apply(self.apply, self.variables, images, batch_size)))

    def accuracy(self, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
        """Top-1 accuracy on ``(images, labels)``."""
        return float(np.mean(self.predict(images, batch_size).argmax(-1) == labels))


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def untrained_teacher(
    config: ArchConfig,
    image_shape: tuple[int, int, int],
    seed: int = 0,
    name: str = "untrained",
    randomize_batch_stats: bool = True,
) -> Teacher:
    """A randomly initialized `Teacher` (for tests and examples; nothing is read from disk).

    With ``randomize_batch_stats`` the BatchNorm running statistics are drawn at random so
    inference-mode BatchNorm is not the identity.
    """
    variables = init_variables(config, image_shape, seed, prng_impl="rbg")
    if randomize_batch_stats:
        rng = np.random.default_rng(seed)  # numpy: no per-shape compilation

        def draw(path, leaf):
            noise = rng.standard_normal(leaf.shape).astype(np.float32)
            return jnp.asarray(np.exp(0.3 * noise) if path[-1].key == "var" else 0.2 * noise)

        stats = jax.tree_util.tree_map_with_path(draw, variables["batch_stats"])
        variables = {**variables, "batch_stats": stats}
    info = {
        "name": name,
        "model": config.model,
        "dataset": "none",
        "image_shape": list(image_shape),
        "num_classes": config.num_classes,
    }
    return Teacher(name, config, variables, info, checkpoint_sha256=tree_sha256(variables))


def batched_apply(
    fn: Callable[[Any, jnp.ndarray], Any],
    variables: Any,
    images: np.ndarray,
    batch_size: int,
    progress: bool = False,
    desc: str | None = None,
) -> Iterator[Any]:
    """Yield ``fn(variables, batch)`` as numpy (a pytree of arrays), batch by batch.

    The last batch is padded to ``batch_size`` and every output leaf is trimmed back to the
    valid examples along axis 0, so ``fn`` compiles once. The next batch is dispatched
    before the previous result is copied to host. ``progress`` shows a tqdm bar (images).
    """
    from tqdm.auto import tqdm

    n = len(images)
    batch_size = max(1, min(batch_size, n))
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    pending = None
    try:
        for begin in range(0, n, batch_size):
            batch = np.asarray(images[begin : begin + batch_size])
            valid = len(batch)
            if valid < batch_size:
                fill = np.zeros((batch_size - valid, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, fill])
            result = fn(variables, batch)
            if pending is not None:
                yield _trim(*pending)
                bar.update(pending[1])
            pending = (result, valid)
        if pending is not None:
            yield _trim(*pending)
            bar.update(pending[1])
    finally:
        bar.close()


def _trim(tree: Any, valid: int) -> Any:
    return jax.tree.map(lambda leaf: np.asarray(leaf)[:valid], tree)


# ----------------------------------------------------------------------------- files


def save_teacher(
    directory: str | os.PathLike,
    config: ArchConfig,
    variables: Any,
    info: dict[str, Any],
    storage: str = "float32",
) -> dict[str, Any]:
    """Write the checkpoint (``teacher.msgpack``, or ``teacher.f16.xz`` for ``float16``
    storage) and ``teacher.json`` into ``directory``; returns the json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    name = CHECKPOINT_NAMES.get(storage, CHECKPOINT_NAME)
    sha = save_tree(directory / name, variables, storage)
    model = build_model(config)
    meta = {
        **info,
        "model": config.model,
        "arch": config.to_json(),
        "params": count_params(variables["params"]),
        "cuts": list(model.cuts),
        "checkpoint": name,
        "checkpoint_sha256": sha,
    }
    if storage != "float32":
        meta["checkpoint_storage"] = storage
    write_atomic(directory / METADATA_NAME, (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def shipped_teachers() -> list[str]:
    """Names of the teachers shipped with the package."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / METADATA_NAME).is_file())


def teacher_dir(name_or_dir: str | os.PathLike) -> Path:
    """The directory of a shipped teacher name or a teacher directory path."""
    path = Path(name_or_dir)
    if (path / METADATA_NAME).is_file():
        return path
    shipped = SHIPPED_DIR / str(name_or_dir)
    if os.sep not in str(name_or_dir) and (shipped / METADATA_NAME).is_file():
        return shipped
    raise UserError(
        f"no teacher {str(name_or_dir)!r}: not a directory with {METADATA_NAME} nor a shipped "
        f"teacher ({', '.join(shipped_teachers()) or 'none shipped'})"
    )


@functools.lru_cache(maxsize=16)
def _load_cached(directory: str, sha: str) -> Teacher:
    path = Path(directory)
    info = json.loads((path / METADATA_NAME).read_text())
    config = ArchConfig.from_json(info["arch"])
    template = variables_template(config, tuple(info["image_shape"]))
    ckpt = path / info.get("checkpoint", CHECKPOINT_NAME)
    variables = load_tree(ckpt, template, sha, info.get("checkpoint_storage", "float32"))
    variables = jax.tree.map(jnp.asarray, variables)
    return Teacher(info.get("name", path.name), config, variables, info, sha)


def load_teacher(name_or_dir: str | os.PathLike) -> Teacher:
    """Load a shipped teacher by name, or a teacher directory written by ``teacher train``.

    Raises `CheckpointError` (one line) for a missing, truncated or corrupt checkpoint.
    """
    directory = teacher_dir(name_or_dir)
    try:
        info = json.loads((directory / METADATA_NAME).read_text())
        sha = info["checkpoint_sha256"]
        info["arch"], info["image_shape"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{directory / METADATA_NAME} is not a valid teacher file: {err}"
        ) from None
    ckpt = directory / info.get("checkpoint", CHECKPOINT_NAME)
    if ckpt.is_file() and file_sha256(ckpt) != sha:
        raise CheckpointError(
            f"checkpoint {ckpt} is corrupt or truncated: its SHA-256 does not match {METADATA_NAME}"
        )
    return _load_cached(str(directory.resolve()), sha)
