r"""Baselines on the same block, rows and loss as the convex student.

All of them start from a :class:`~cvxdist.distill.pipeline.PreparedBlock` (the reduced rows and
targets the convex problem sees), are matched to a parameter budget (the convex student's
count, gates and reductions included) and return a
:class:`~cvxdist.distill.student.BlockStudent` that
:func:`~cvxdist.distill.evaluation.evaluate_spliced` splices into the teacher.

* **Learned ReLU** (:func:`relu_block_student`): the same two-layer shape with a *learned*
  ReLU instead of fixed gates::

      a = conv_k,s(z; W_proj) + b_proj      (the convex student's reduced patch features)
      o = relu(a W_in + b_in) W_out + b + a V
      y = o E + e

  trained with Adam (optax) on :math:`\frac{1}{2N}\|\hat y - y\|^2` in the reduced output space,
  full batch or mini-batch. Its hidden width is chosen to match the budget.
* **Fixed gates, Adam** (:func:`fixed_gate_block_student`): the convex student's own network
  (same gates, same masks, same neurons, so exactly the same parameter count) with its
  trainable weights ``W_in, W_out, V, b`` re-initialised at random and trained by Adam on the
  same squared loss. It is non-convex (``W_in W_out`` is bilinear) but has the fixed gates:
  the difference to the convex student isolates *convexity*, the difference to the learned
  ReLU isolates *fixed gates*.
* **Logit knowledge distillation** (:func:`kd_students`, Hinton et al. 2015): learned-ReLU
  blocks spliced into the teacher and trained end to end by Adam to match the teacher's
  logits softened by a temperature ``T`` (loss ``T² KL(softmax(t/T) ‖ softmax(s/T))``),
  label-free; only the students' parameters train (the reductions start from the PCA bases).
* **Magnitude pruning** (:func:`pruned_block`): the teacher block with its smallest
  convolution weights (global magnitude over every conv kernel of the block) set to zero so
  that the non-zero parameters meet the budget; no fine-tuning. BatchNorm scale and bias
  count as parameters and are never pruned; the achieved count is reported.

Adam runs are timed without compilation and log a loss curve ``[{step, time_s, loss}]``
(full-data loss, evaluated outside the timed region) for time-to-quality comparisons.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cvxdist.distill.objectives import TermData, objective_loss
from cvxdist.distill.student import (
    Reduction,
    ReluStudent,
    input_reduction_params,
    parameter_count,
)
from cvxdist.mapping import gated_forward


@dataclasses.dataclass(frozen=True)
class AdamConfig:
    """Adam settings for the non-convex students.

    ``batch_size=None`` is full batch; otherwise each step draws a mini-batch of rows (with
    replacement). The loss curve gets one point every ``log_every`` steps.
    """

    steps: int = 2000
    learning_rate: float = 3e-3
    batch_size: int | None = 1024  # None: full batch
    seed: int = 0
    log_every: int = 100


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """Logit distillation settings (Hinton et al. 2015): Adam on ``T² KL`` of softened logits."""

    steps: int = 1000
    learning_rate: float = 1e-3
    batch_size: int | None = 128  # images per step; None: all training images
    temperature: float = 4.0
    seed: int = 0
    log_every: int = 100


def matched_hidden(budget: int, d: int, c: int, shared: int) -> int:
    """Hidden width whose parameter count ``shared + K (d + 1 + c)`` is closest to ``budget``."""
    return max(1, round((budget - shared) / (d + 1 + c)))


def _init_mlp(
    seed: int | np.random.Generator, d: int, K: int, c: int, skip: bool
) -> dict[str, np.ndarray]:
    """He-normal ``W_in``, ``1/K``-scaled ``W_out``, zero biases and skip (numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    params = {
        "w_in": (rng.standard_normal((d, K)) * np.sqrt(2.0 / d)).astype(np.float32),
        "b_in": np.zeros((K,), np.float32),
        "w_out": (rng.standard_normal((K, c)) * np.sqrt(1.0 / max(K, 1))).astype(np.float32),
        "bias": np.zeros((c,), np.float32),
    }
    if skip:
        params["skip"] = np.zeros((d, c), np.float32)
    return params


def _mlp(params: dict[str, jnp.ndarray], a: jnp.ndarray) -> jnp.ndarray:
    out = jax.nn.relu(a @ params["w_in"] + params["b_in"]) @ params["w_out"] + params["bias"]
    if "skip" in params:
        out = out + a @ params["skip"]
    return out


def _gated(
    params: dict[str, jnp.ndarray], a: jnp.ndarray, gates: jnp.ndarray, neuron_gate: jnp.ndarray
) -> jnp.ndarray:
    return gated_forward(
        a, gates, params["w_in"], params["w_out"], neuron_gate, params.get("skip"), params["bias"]
    )


def adam_fit(
    loss_fn: Callable[..., jnp.ndarray],
    params: Any,
    data: Sequence[Sequence[jnp.ndarray]],
    *,
    steps: int,
    learning_rate: float,
    batch_sizes: Sequence[int | None],
    seed: int,
    log_every: int = 100,
    progress: bool = False,
    desc: str = "Adam",
    keep_params: bool = False,
    eval_limit: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Adam on ``loss_fn(params, batches)`` over groups of arrays.

    ``data`` is a sequence of groups (one per data term), each a sequence of arrays sharing
    their leading axis; every step draws, per group, ``batch_sizes[g]`` entries (with
    replacement; ``None``: the whole group) and calls ``loss_fn(params, batches)`` with
    ``batches`` shaped like ``data``. Runs ``log_every`` steps per compiled call (a
    ``lax.scan``) and records, after each call, the full-data loss (on the first
    ``eval_limit`` entries of every group) and the training wall time so far (compilation and
    loss evaluations excluded). Returns the final parameters and a report with ``loss``
    (final full-data loss), ``time_s`` (everything, compilation included), ``train_time_s``,
    ``compile_time_s``, ``steps``, ``history`` (the last mini-batch loss of each call) and
    ``curve`` (a list of ``{"step", "time_s", "loss"}``; with ``keep_params`` also
    ``snapshots``: the parameters at each curve point).
    """
    from tqdm.auto import tqdm

    total_start = time.perf_counter()
    data = tuple(tuple(jnp.asarray(a) for a in group) for group in data)
    sizes = [int(group[0].shape[0]) for group in data]
    batches = [n if b is None else max(1, min(int(b), n)) for n, b in zip(sizes, batch_sizes)]
    every = max(1, min(int(log_every), int(steps)))
    rounds = max(1, int(steps) // every)
    optimizer = optax.adam(learning_rate)
    state = optimizer.init(params)

    def draw(key: jax.Array, data: tuple) -> tuple:
        out = []
        for g, (group, n, batch) in enumerate(zip(data, sizes, batches)):
            if batch < n:
                idx = jax.random.randint(jax.random.fold_in(key, g), (batch,), 0, n)
                group = tuple(a[idx] for a in group)
            out.append(group)
        return tuple(out)

    def run(params: Any, state: Any, key: jax.Array, data: tuple) -> tuple:
        def step(carry: tuple, key: jax.Array) -> tuple:
            params, state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, draw(key, data))
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, state), losses = jax.lax.scan(step, (params, state), jax.random.split(key, every))
        return params, state, losses[-1]

    key = jax.random.key(seed + 1)
    compile_start = time.perf_counter()
    compiled = jax.jit(run).lower(params, state, key, data).compile()
    held = tuple(tuple(a[:eval_limit] for a in group) for group in data)
    compiled_loss = jax.jit(loss_fn).lower(params, held).compile()
    compile_time = time.perf_counter() - compile_start

    def full_loss(p: Any) -> float:
        return float(compiled_loss(p, held))

    curve = [{"step": 0, "time_s": 0.0, "loss": full_loss(params)}]
    snapshots = [params] if keep_params else []
    history = []
    elapsed = 0.0
    for r in tqdm(range(rounds), desc=desc, disable=not progress, leave=False):
        key, sub = jax.random.split(key)
        start = time.perf_counter()
        params, state, last = jax.block_until_ready(compiled(params, state, sub, data))
        elapsed += time.perf_counter() - start
        history.append(float(last))
        curve.append({"step": (r + 1) * every, "time_s": elapsed, "loss": full_loss(params)})
        if keep_params:
            snapshots.append(params)
    report: dict[str, Any] = {
        "loss": curve[-1]["loss"],
        "time_s": time.perf_counter() - total_start,
        "train_time_s": elapsed,
        "compile_time_s": compile_time,
        "steps": rounds * every,
        "batch_size": batch_sizes[0] if len(batch_sizes) == 1 else list(batch_sizes),
        "learning_rate": learning_rate,
        "history": history,
        "curve": curve,
    }
    if keep_params:
        report["snapshots"] = snapshots
    return params, report


def fit_terms(
    predict: Callable[[Any, jnp.ndarray], jnp.ndarray],
    params: Any,
    terms: Sequence[TermData],
    config: AdamConfig,
    *,
    progress: bool = False,
    desc: str = "Adam",
    keep_params: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Adam on the objective of ``terms`` (:func:`~cvxdist.distill.objectives.objective_loss`)
    for a student ``predict(params, rows (n, d')) -> outputs (n, c')``.

    A mini-batch holds about ``config.batch_size`` rows of every term (whole images for the
    downstream terms); the loss curve is evaluated on at most 4096 groups per term.
    """
    objective = objective_loss(terms, predict)
    data = [
        (t.rows, t.targets) if t.jacobian is None else (t.rows, t.targets, t.jacobian)
        for t in terms
    ]

    def loss_fn(p: Any, batches: tuple) -> jnp.ndarray:
        return objective(p, [(b[0], b[1], b[2] if len(b) > 2 else None) for b in batches])

    sizes = [
        None if config.batch_size is None else math.ceil(config.batch_size / t.rows.shape[1])
        for t in terms
    ]
    return adam_fit(
        loss_fn,
        params,
        data,
        steps=config.steps,
        learning_rate=config.learning_rate,
        batch_sizes=sizes,
        seed=config.seed,
        log_every=config.log_every,
        progress=progress,
        desc=desc,
        keep_params=keep_params,
        eval_limit=4096,
    )


def train_relu_head(
    terms: Sequence[TermData],
    hidden: int,
    config: AdamConfig,
    *,
    skip: bool = True,
    progress: bool = False,
    keep_params: bool = False,
) -> tuple[dict[str, jnp.ndarray], dict[str, Any]]:
    """Adam on the terms' objective of ``relu(a W_in + b_in) W_out + b + a V``.

    Returns the parameters and the report of :func:`adam_fit` (plus ``hidden``).
    """
    d, c = terms[0].rows.shape[-1], terms[0].output_width
    params = _init_mlp(config.seed, d, hidden, c, skip)
    params, report = fit_terms(
        _mlp, params, terms, config, progress=progress, desc="Adam (ReLU)", keep_params=keep_params
    )
    report["hidden"] = hidden
    return params, report


def train_fixed_gate_head(
    terms: Sequence[TermData],
    gates: np.ndarray,
    neuron_gate: Sequence[int],
    config: AdamConfig,
    *,
    skip: bool = True,
    progress: bool = False,
    keep_params: bool = False,
) -> tuple[dict[str, jnp.ndarray], dict[str, Any]]:
    """Adam on the terms' objective of ``((a W_in) ⊙ 1[a G ≥ 0][:, gate of neuron]) W_out
    + b + a V``.

    ``gates (d, Q)`` are fixed; neuron ``k`` uses gate ``neuron_gate[k]``. Random init as the
    learned ReLU (He for ``W_in``), zero skip and bias.
    """
    d, c = terms[0].rows.shape[-1], terms[0].output_width
    G = jnp.asarray(gates, jnp.float32)
    index = jnp.asarray(np.asarray(neuron_gate, np.int32))
    K = int(index.shape[0])
    params = _init_mlp(config.seed, d, max(K, 1), c, skip)
    params.pop("b_in")
    if K == 0:  # the convex student kept no neuron: only the linear part trains
        params["w_in"] = np.zeros((d, 0), np.float32)
        params["w_out"] = np.zeros((0, c), np.float32)
        index = jnp.zeros((0,), jnp.int32)

    def predict(p: dict[str, jnp.ndarray], a: jnp.ndarray) -> jnp.ndarray:
        return _gated(p, a, G, index)

    params, report = fit_terms(
        predict,
        params,
        terms,
        config,
        progress=progress,
        desc="Adam (fixed gates)",
        keep_params=keep_params,
    )
    report["neurons"] = K
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
    channels = reduction.channel_basis
    module = ReluStudent(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        stride=stride,
        reduced_in=reduced_in,
        reduced_out=reduced_out,
        hidden=int(params["w_in"].shape[1]),
        skip="skip" in params,
        reduced_channels=None if channels is None else channels.shape[1],
    )
    variables = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    variables.update(input_reduction_params(reduction, in_channels, kernel_size))
    if reduced_out is not None:
        variables["expand"] = jnp.asarray(reduction.out_basis.T, jnp.float32)
        variables["expand_bias"] = jnp.asarray(reduction.out_mean, jnp.float32)
    else:
        variables["bias"] = variables["bias"] + jnp.asarray(reduction.out_mean, jnp.float32)
    return module, {"params": variables}


# ----------------------------------------------------------------------------- block students


def _shape_kwargs(block: Any) -> dict[str, int]:
    info = block.row_info
    return {
        "in_channels": int(info["input_shape"][-1]),
        "out_channels": int(info["output_shape"][-1]),
        "kernel_size": int(info["kernel_size"]),
        "stride": int(info["stride"]),
    }


def relu_params_for(block: Any, hidden: int, skip: bool = True) -> int:
    """Parameter count of a learned-ReLU student of width ``hidden`` on ``block``."""
    d, c = block.rows.shape[1], block.targets.shape[1]
    shape = _shape_kwargs(block)
    k, red = shape["kernel_size"], block.reduction
    count = hidden * (d + 1 + c) + c + (d * c if skip else 0)
    in_channels = shape["in_channels"]
    if red.channel_basis is not None:
        count += red.channel_basis.size
        in_channels = red.channel_basis.shape[1]
    if red.in_basis is not None:
        count += max(k, 1) ** 2 * in_channels * d + d
    if red.out_basis is not None:
        count += c * shape["out_channels"] + shape["out_channels"]
    return count


def relu_hidden_for(block: Any, budget: int, skip: bool = True) -> int:
    """The hidden width whose learned-ReLU student on ``block`` is closest to ``budget``."""
    one, two = relu_params_for(block, 1, skip), relu_params_for(block, 2, skip)
    per_neuron = two - one
    return max(1, round((budget - (one - per_neuron)) / per_neuron))


def relu_block_student(
    block: Any,
    budget: int,
    config: AdamConfig,
    *,
    skip: bool | None = None,
    progress: bool = False,
    keep_params: bool = False,
) -> Any:
    """Learned-ReLU student of ``block`` (a PreparedBlock) with about ``budget`` parameters
    (with the linear skip when the convex student has one, unless ``skip`` says otherwise)."""
    from cvxdist.distill.student import BlockStudent

    skip = block.skip if skip is None else skip
    hidden = relu_hidden_for(block, budget, skip)
    params, report = train_relu_head(
        block.terms,
        hidden,
        config,
        skip=skip,
        progress=progress,
        keep_params=keep_params,
    )
    module, variables = relu_student_variables(params, block.reduction, **_shape_kwargs(block))
    info = {"method": "relu-adam", "params": parameter_count(variables), "budget": budget}
    return BlockStudent(block.stage, module, variables, {**info, "adam": report})


def relu_variables_like(student: Any, params: dict[str, jnp.ndarray], reduction: Reduction) -> Any:
    """Variables of the learned-ReLU ``student`` with head ``params`` (e.g. an Adam snapshot)."""
    m = student.module
    _, variables = relu_student_variables(
        params,
        reduction,
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        kernel_size=m.kernel_size,
        stride=m.stride,
    )
    return variables


def fixed_gate_block_student(
    block: Any,
    convex: Any,
    config: AdamConfig,
    *,
    progress: bool = False,
    keep_params: bool = False,
) -> Any:
    """The convex student's network (same gates, masks, neurons) trained by Adam on ``block``.

    ``convex`` is the convex BlockStudent solved on ``block`` (or on rows in the same reduced
    coordinates). The result has exactly the convex student's parameter count.
    """
    from cvxdist.distill.student import BlockStudent

    module = convex.module
    source = convex.variables["params"]
    skip = "skip" in source
    params, report = train_fixed_gate_head(
        block.terms,
        np.asarray(source["gates"]),
        module.neuron_gate,
        config,
        skip=skip,
        progress=progress,
        keep_params=keep_params,
    )
    variables = fixed_gate_variables(convex, params, block.reduction)
    info = {"method": "fixed-gate-adam", "params": parameter_count(variables)}
    return BlockStudent(block.stage, module, variables, {**info, "adam": report})


def fixed_gate_variables(
    convex: Any, params: dict[str, jnp.ndarray], reduction: Reduction
) -> dict[str, Any]:
    """The convex student's variables with ``w_in, w_out, bias, skip`` replaced by ``params``."""
    out = dict(convex.variables["params"])
    for name in ("w_in", "w_out", "skip"):
        if name in params:
            out[name] = jnp.asarray(params[name], jnp.float32)
    bias = jnp.asarray(params["bias"], jnp.float32)
    if convex.module.reduced_out is None:  # targets were centred: the mean goes in the bias
        bias = bias + jnp.asarray(reduction.out_mean, jnp.float32)
    out["bias"] = bias
    return {"params": out}


# ----------------------------------------------------------------------------- logit KD


def kd_loss(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray, temperature: float) -> Any:
    """``T² · mean KL(softmax(t/T) ‖ softmax(s/T))`` (Hinton et al. 2015)."""
    t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return temperature**2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def kd_students(
    teacher: Any,
    images: np.ndarray,
    cut: str,
    to: str | None,
    blocks: Sequence[Any],
    budgets: Sequence[int],
    config: KDConfig,
    *,
    skip: bool = True,
    progress: bool = False,
    precompute_bytes: int = 256 * 2**20,
    teacher_logits: np.ndarray | None = None,
    keep_params: bool = False,
) -> list[Any]:
    """Learned-ReLU students of the stages ``cut..to`` trained by logit distillation.

    ``blocks`` are the PreparedBlocks of the stages (their reductions initialise the students'
    projections; their rows are not used) and ``budgets`` the parameter budget of each stage.
    The students are spliced into the teacher and trained jointly by Adam on the softened-logit
    KL over ``images`` (no labels); the teacher's prefix and suffix are frozen. The block input
    ``prefix(images)`` is precomputed when it fits in ``precompute_bytes``; ``teacher_logits``
    (the teacher's logits on ``images``) may be passed to skip computing them. With
    ``keep_params`` the report (shared by the students) holds ``snapshots``: the students'
    variables at each point of its loss curve.
    """
    from cvxdist.distill.pipeline import stages_of
    from cvxdist.distill.student import BlockStudent
    from cvxdist.teachers.teacher import batched_apply

    stages = stages_of(teacher, cut, to)
    if len(blocks) != len(stages) or len(budgets) != len(stages):
        raise ValueError(f"need one block and one budget per stage of {stages}")
    rng = np.random.default_rng(config.seed)
    modules, trainable = [], []
    for block, budget in zip(blocks, budgets):
        hidden = relu_hidden_for(block, budget, skip)
        d, c = block.rows.shape[1], block.targets.shape[1]
        head = _init_mlp(rng, d, hidden, c, skip)
        module, variables = relu_student_variables(head, block.reduction, **_shape_kwargs(block))
        modules.append(module)
        trainable.append(variables)
    fns = teacher.cut_functions(cut, stages[-1], jit=False)
    tv = teacher.variables
    if teacher_logits is None:
        teacher_logits = np.concatenate(list(batched_apply(teacher.apply, tv, images, 500)))
    elif len(teacher_logits) != len(images):
        raise ValueError("teacher_logits must have one row per image")
    probe = jax.eval_shape(lambda x: fns.prefix(tv, x), jnp.zeros((1, *images.shape[1:])))
    precompute = len(images) * math.prod(probe.shape[1:]) * 4 <= precompute_bytes
    if precompute:
        prefix = jax.jit(fns.prefix)
        inputs = np.concatenate(list(batched_apply(prefix, tv, images, 250)))
    else:
        inputs = np.asarray(images, np.float32)

    def loss_fn(variables: list[Any], batches: tuple) -> jnp.ndarray:
        ((x, t),) = batches
        z = x if precompute else jax.lax.stop_gradient(fns.prefix(tv, x))
        for module, v in zip(modules, variables):
            z = module.apply(v, z)
        return kd_loss(fns.suffix(tv, z), t, config.temperature)

    trained, report = adam_fit(
        loss_fn,
        trainable,
        [(inputs, teacher_logits)],
        steps=config.steps,
        learning_rate=config.learning_rate,
        batch_sizes=[config.batch_size],
        seed=config.seed,
        log_every=config.log_every,
        progress=progress,
        desc="Adam (logit KD)",
        eval_limit=2048,
        keep_params=keep_params,
    )
    report["temperature"] = config.temperature
    students = []
    for stage, module, variables, budget in zip(stages, modules, trained, budgets):
        info = {"method": "logit-kd", "params": parameter_count(variables), "budget": budget}
        students.append(BlockStudent(stage, module, variables, {**info, "kd": report}))
    return students


# ----------------------------------------------------------------------------- pruning


class PrunedBlock:
    """The teacher block ``cut..to`` with masked weights, with a Flax-like ``apply``.

    ``apply(variables, z)`` runs the teacher's block function on the teacher's variables
    with the block's own subtrees replaced by ``variables`` (``{collection: {segment: ...}}``),
    so it composes with :func:`~cvxdist.distill.student.chain` like a student module.
    """

    def __init__(self, teacher: Any, cut: str, to: str | None) -> None:
        self.cut, self.to = cut, to
        self._block = teacher.cut_functions(cut, to, jit=False).block
        self._base = teacher.variables

    def apply(self, variables: Any, z: jnp.ndarray) -> jnp.ndarray:
        merged = {col: {**tree, **variables.get(col, {})} for col, tree in self._base.items()}
        return self._block(merged, z)


def _is_conv_kernel(path: tuple, leaf: Any) -> bool:
    name = getattr(path[-1], "key", str(path[-1]))
    return name == "kernel" and np.ndim(leaf) == 4


def pruned_block(teacher: Any, cut: str, to: str | None, budget: int) -> Any:
    """Global magnitude pruning of the block's conv kernels to ``budget`` parameters.

    The kept count is ``budget - (parameters that are not conv kernels)`` (BatchNorm scale and
    bias, which are never pruned), clipped to ``[0, all kernel weights]``; the report holds
    the achieved non-zero count in ``params`` (it exceeds ``budget`` when the budget is
    below the unprunable parameters) and the kernel sparsity. No fine-tuning.
    """
    from cvxdist.distill.pipeline import stages_of
    from cvxdist.distill.student import BlockStudent

    stages = stages_of(teacher, cut, to)
    block_vars = teacher.block_variables(cut, stages[-1])
    params = block_vars["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = [np.asarray(leaf) for path, leaf in leaves if _is_conv_kernel(path, leaf)]
    kernel_total = sum(k.size for k in kernels)
    other = parameter_count(params) - kernel_total
    keep = int(min(max(budget - other, 0), kernel_total))
    magnitudes = np.concatenate([np.abs(k).ravel() for k in kernels]) if kernels else np.zeros(0)
    chosen = np.zeros(kernel_total, bool)
    if keep:
        chosen[np.argpartition(-magnitudes, keep - 1)[:keep]] = True
    offsets = np.cumsum([0] + [k.size for k in kernels])
    masks = iter(chosen[a:b] for a, b in itertools.pairwise(offsets))

    def prune(path: tuple, leaf: Any) -> Any:
        if not _is_conv_kernel(path, leaf):
            return leaf
        mask = next(masks).reshape(np.shape(leaf))
        return jnp.where(jnp.asarray(mask), leaf, jnp.zeros_like(leaf))

    pruned = jax.tree_util.tree_map_with_path(prune, params)
    nonzero = int(sum(np.count_nonzero(np.asarray(leaf)) for leaf in jax.tree.leaves(pruned)))
    variables = {"params": pruned}
    report = {
        "method": "magnitude-pruning",
        "budget": int(budget),
        "params": keep + other,
        "nonzero_params": nonzero,
        "kernel_weights": kernel_total,
        "kept_kernel_weights": keep,
        "kernel_sparsity": 1.0 - keep / max(kernel_total, 1),
        "unprunable_params": other,
    }
    return BlockStudent(f"{cut}..{stages[-1]}", PrunedBlock(teacher, cut, to), variables, report)
