"""Training teachers: optax (SGD+momentum or AdamW), cosine schedule, light augmentation,
per-epoch evaluation and checkpoints, and resume after an interruption.

Files in the output directory, rewritten atomically after every finished epoch:

- ``train_state.msgpack``: params, batch stats, optimizer state and the epoch count;
- ``teacher.msgpack`` + ``teacher.json``: the teacher so far (loadable with
  `cvxdist.teachers.load_teacher`), with the training hyperparameters, per-epoch history and
  ``complete`` set once all epochs are done.

Re-running the same training into the same directory continues after the last finished
epoch; a different configuration is refused. Shuffling and augmentation are seeded per
epoch, so an interrupted and resumed run gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cvxdist.data import Dataset, load_dataset
from cvxdist.errors import UserError
from cvxdist.teachers.checkpoint import CheckpointError, file_sha256, load_tree, save_tree
from cvxdist.teachers.models import ArchConfig, build_model
from cvxdist.teachers.teacher import (
    METADATA_NAME,
    batched_apply,
    init_variables,
    save_teacher,
    segment_range_fn,
)

STATE_NAME = "train_state.msgpack"
PENDING_STATE_NAME = "train_state.next.msgpack"  # written, not yet named by teacher.json
OPTIMIZERS = ("sgd", "adamw")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a teacher training run (all recorded in ``teacher.json``).

    ``lr`` / ``weight_decay`` default per optimizer (SGD: 0.1 / 5e-4 at batch 128, scaled
    linearly with batch size; AdamW: 2e-3 / 0.05).
    """

    model: str
    dataset: str
    epochs: int
    width: float = 1.0
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float = 1.0
    augment: bool = True
    seed: int = 0

    def resolved(self) -> TrainConfig:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.width < math.inf:
            raise UserError("epochs, batch size and width must be positive")
        if self.seed < 0:
            raise UserError(f"the seed must be >= 0, got {self.seed}")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise UserError(f"the learning rate must be a finite positive number, got {self.lr}")
        if self.weight_decay is not None and not 0 <= self.weight_decay < math.inf:
            raise UserError(
                f"the weight decay must be a finite number >= 0, got {self.weight_decay}"
            )
        lr = self.lr
        if lr is None:
            lr = 0.1 * self.batch_size / 128 if self.optimizer == "sgd" else 2e-3
        wd = self.weight_decay
        if wd is None:
            wd = 5e-4 if self.optimizer == "sgd" else 0.05
        return dataclasses.replace(self, lr=float(lr), weight_decay=float(wd))


def _decay_mask(params: Any) -> Any:
    """Weight decay on conv / dense kernels only (not on biases or BatchNorm)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax optimizer with a warmup + cosine-decay learning rate."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), max(total - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total, 1), 0.0)
    if cfg.optimizer == "sgd":
        return optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask),
            optax.sgd(schedule, momentum=0.9, nesterov=True),
        )
    return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=_decay_mask)


def augment_batch(key: jax.Array, images: jnp.ndarray, pad: int, flip: bool) -> jnp.ndarray:
    """Random crop after zero padding by ``pad`` pixels, and random horizontal flips."""
    n, h, w, _ = images.shape
    if pad > 0:
        key, sub = jax.random.split(key)
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(sub, (n, 2), 0, 2 * pad + 1)
        images = jax.vmap(
            lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
        )(padded, offsets)
    if flip:
        flips = jax.random.bernoulli(key, 0.5, (n, 1, 1, 1))
        images = jnp.where(flips, images[:, :, ::-1, :], images)
    return images


@functools.lru_cache(maxsize=8)
def _train_step(
    arch: ArchConfig, cfg: TrainConfig, steps_per_epoch: int, pad: int, flip: bool
) -> Callable:
    """The jitted train step, cached so equal configurations compile once per process."""
    return _make_train_step(build_model(arch), make_optimizer(cfg, steps_per_epoch), pad, flip)


def _make_train_step(model, tx: optax.GradientTransformation, pad: int, flip: bool) -> Callable:
    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        return loss, (updates["batch_stats"], correct)

    @jax.jit
    def step(state, key, images, labels):
        params, batch_stats, opt_state = state
        if pad or flip:
            images = augment_batch(key, images, pad, flip)
        (loss, (batch_stats, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, images, labels
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, batch_stats, opt_state), loss, correct

    return step


def evaluate(apply: Callable, variables: Any, dataset: Dataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy on ``dataset`` of ``apply(variables, images) -> logits`` (jitted)."""
    logits = np.concatenate(list(batched_apply(apply, variables, dataset.images, batch_size)))
    return float(np.mean(logits.argmax(-1) == dataset.labels))


def _config_json(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def train_teacher(
    config: TrainConfig,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Train (or resume training) a teacher into ``out_dir``; returns its ``teacher.json``.

    ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoint is written
    (epochs count from 1). Raises `UserError` if ``out_dir`` holds a run with a different
    configuration.
    """
    from tqdm.auto import tqdm

    cfg = config.resolved()
    out = Path(out_dir)
    previous = _committed_run(out)
    resume = previous is not None and (out / STATE_NAME).is_file()
    if resume and previous.get("training") != _config_json(cfg):
        raise UserError(
            f"{out} holds a training run with a different configuration; "
            "use another --out or delete it"
        )
    train = load_dataset(cfg.dataset, "train", data_dir)
    test = load_dataset(cfg.dataset, "test", data_dir)
    channels = train.image_shape[-1]
    arch = ArchConfig(
        model=cfg.model,
        num_classes=train.num_classes,
        in_channels=channels,
        width=cfg.width,
        mean=tuple(float(m) for m in train.images.mean(axis=(0, 1, 2))),
        std=tuple(float(s) for s in train.images.std(axis=(0, 1, 2)) + 1e-6),
    )
    model = build_model(arch)
    steps_per_epoch = max(len(train) // cfg.batch_size, 1)
    batch = min(cfg.batch_size, len(train))
    tx = make_optimizer(cfg, steps_per_epoch)
    variables = init_variables(arch, train.image_shape, cfg.seed)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    history: list[dict[str, Any]] = []
    start_epoch = 0
    elapsed = cpu_elapsed = 0.0
    if resume:
        saved = load_tree(
            out / STATE_NAME,
            {"state": state, "epoch": 0},
            previous.get("train_state_sha256"),
        )
        state, start_epoch = saved["state"], int(saved["epoch"])
        history = previous.get("history", [])[:start_epoch]
        elapsed = float(previous.get("train_time_s", 0.0))
        cpu_elapsed = float(previous.get("train_cpu_time_s", 0.0))
        if start_epoch >= cfg.epochs:
            return previous

    pad = max(1, train.image_shape[0] // 8) if cfg.augment else 0
    step = _train_step(arch, cfg, steps_per_epoch, pad, cfg.augment and train.hflip_ok)
    apply = segment_range_fn(arch, 0, len(model.segments) - 1)
    base_key = jax.random.key(cfg.seed)
    images, labels = train.images, train.labels
    meta: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        tic, cpu_tic = time.perf_counter(), time.process_time()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        epoch_key = jax.random.fold_in(base_key, epoch)
        loss_sum, correct_sum, seen = jnp.zeros(()), jnp.zeros((), jnp.int32), 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not progress,
            leave=False,
        )
        for i in bar:
            idx = order[i * batch : (i + 1) * batch]
            state, loss, correct = step(
                state, jax.random.fold_in(epoch_key, i), images[idx], labels[idx]
            )
            loss_sum, correct_sum, seen = loss_sum + loss, correct_sum + correct, seen + len(idx)
            if progress and (i % 20 == 19 or i == steps_per_epoch - 1):
                bar.set_postfix(
                    loss=f"{float(loss_sum) / (i + 1):.3f}",
                    acc=f"{float(correct_sum) / seen:.3f}",
                )
        bar.close()
        params, batch_stats, _ = state
        variables = {"params": params, "batch_stats": batch_stats}
        test_acc = evaluate(apply, variables, test)
        epoch_s, epoch_cpu_s = time.perf_counter() - tic, time.process_time() - cpu_tic
        elapsed += epoch_s
        cpu_elapsed += epoch_cpu_s
        record = {
            "epoch": epoch + 1,
            "train_loss": float(loss_sum) / steps_per_epoch,
            "train_accuracy": float(correct_sum) / max(seen, 1),
            "test_accuracy": test_acc,
            "time_s": round(epoch_s, 2),
            # CPU seconds of all this process's threads: on a shared machine, wall time
            # grows with other people's load; CPU time much less so.
            "cpu_time_s": round(epoch_cpu_s, 2),
        }
        history.append(record)
        if progress:
            print(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                f"train acc {record['train_accuracy']:.4f} test acc {test_acc:.4f} "
                f"({record['time_s']:.1f}s)",
                flush=True,
            )
        out.mkdir(parents=True, exist_ok=True)
        # teacher.json is the commit point: the new state waits beside the old one until
        # teacher.json names it, so a run killed at any moment resumes (_committed_run).
        state_sha = save_tree(out / PENDING_STATE_NAME, {"state": state, "epoch": epoch + 1})
        meta = save_teacher(
            out,
            arch,
            variables,
            {
                "name": name or out.name,
                "dataset": cfg.dataset,
                "image_shape": list(train.image_shape),
                "num_classes": train.num_classes,
                "test_accuracy": test_acc,
                "num_test": len(test),
                "epochs_done": epoch + 1,
                "complete": epoch + 1 == cfg.epochs,
                "train_time_s": round(elapsed, 2),
                "train_cpu_time_s": round(cpu_elapsed, 2),
                "training": _config_json(cfg),
                "train_state_sha256": state_sha,
                "history": history,
            },
        )
        os.replace(out / PENDING_STATE_NAME, out / STATE_NAME)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    return meta


def _committed_run(out: Path) -> dict[str, Any] | None:
    """The last committed ``teacher.json`` of a run in ``out`` (None if there is none), with
    its training state in place: a state that was written and named by ``teacher.json``
    before the run was killed is moved to ``STATE_NAME``; one that was not is ignored."""
    meta_path = out / METADATA_NAME
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{meta_path} is not a valid teacher file: {err}") from None
    pending = out / PENDING_STATE_NAME
    if pending.is_file() and file_sha256(pending) == meta.get("train_state_sha256"):
        os.replace(pending, out / STATE_NAME)
    return meta
