"""Teacher training: resume after an interruption, refusing a changed configuration, CLI."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import kill_when_blocked

from cvxdist.cli import main
from cvxdist.errors import UserError
from cvxdist.teachers import CheckpointError, load_teacher
from cvxdist.training import STATE_NAME, TrainConfig, train_teacher

CONFIG = TrainConfig("small_cnn", "digits", epochs=3, width=0.25, batch_size=256, seed=1)
CONFIG_ARGS = [
    "teacher", "train", "--model", "small_cnn", "--dataset", "digits", "--epochs", "3",
    "--width", "0.25", "--batch-size", "256", "--seed", "1", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    epochs = []
    meta = train_teacher(CONFIG, out, progress=False, on_epoch_end=lambda e, r: epochs.append(e))
    return out, meta, epochs


def test_training_writes_a_loadable_teacher(uninterrupted):
    out, meta, epochs = uninterrupted
    assert epochs == [1, 2, 3]
    assert meta["complete"] and meta["epochs_done"] == 3 and len(meta["history"]) == 3
    for key in ("model", "dataset", "test_accuracy", "params", "cuts", "arch", "training"):
        assert key in meta
    assert meta["cuts"] == ["stem", "stage1", "stage2", "stage3", "head"]
    teacher = load_teacher(out)
    assert teacher.info["test_accuracy"] == meta["test_accuracy"]
    assert meta["test_accuracy"] > 0.2  # three short epochs learn something (chance is 0.1)
    losses = [h["train_loss"] for h in meta["history"]]
    assert losses[-1] < losses[0]


def test_interrupted_training_resumes_from_its_last_epoch(uninterrupted, tmp_path):
    full_dir, full_meta, _ = uninterrupted

    def interrupt(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_teacher(CONFIG, tmp_path, progress=False, on_epoch_end=interrupt)
    partial = json.loads((tmp_path / "teacher.json").read_text())
    assert partial["epochs_done"] == 1 and not partial["complete"]

    resumed_epochs = []
    meta = train_teacher(
        CONFIG, tmp_path, progress=False, on_epoch_end=lambda e, r: resumed_epochs.append(e)
    )
    assert resumed_epochs == [2, 3]
    assert meta["complete"] and [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    # seeded per epoch: the resumed run ends with exactly the uninterrupted weights
    resumed = load_teacher(tmp_path).variables
    full = load_teacher(full_dir).variables
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), resumed, full)
    assert meta["test_accuracy"] == pytest.approx(full_meta["test_accuracy"])

    # a finished run is not trained again
    again = []
    train_teacher(CONFIG, tmp_path, progress=False, on_epoch_end=lambda e, r: again.append(e))
    assert again == []


def test_changed_configuration_is_refused(uninterrupted):
    out, _, _ = uninterrupted
    with pytest.raises(UserError, match="different configuration"):
        train_teacher(TrainConfig(**{**CONFIG.__dict__, "epochs": 4}), out, progress=False)


def test_truncated_training_state_is_a_clear_error(tmp_path):
    def interrupt(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_teacher(CONFIG, tmp_path, progress=False, on_epoch_end=interrupt)
    state = tmp_path / STATE_NAME
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train_teacher(CONFIG, tmp_path, progress=False)


def test_teacher_train_and_eval_commands(uninterrupted, capsys):
    out, meta, _ = uninterrupted
    # re-running the finished command prints the summary without training
    assert main([*CONFIG_ARGS, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["test_accuracy"] == meta["test_accuracy"] and summary["model"] == "small_cnn"
    assert main(["teacher", "eval", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_accuracy"] == pytest.approx(meta["test_accuracy"], abs=1e-9)
    assert main(["teacher", "eval", str(out), "--limit", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["num_test"] == 50


# A kill (SIGKILL: no cleanup) of `cvxdist teacher train` at a point of epoch 2's checkpoint,
# then a rerun: it must train only the epochs not committed and end with the uninterrupted
# weights. (epochs committed at the kill, Python run before `main` to block there)
KILL_POINTS = {
    # the new training state is written beside the old one, teacher.json still names the old
    "state-written": (1, "block_after('cvxdist.training', 'save_teacher', 2, before=True)"),
    # teacher.json names the new state, which is not yet in place
    "metadata-committed": (2, "block_after('cvxdist.training', 'save_teacher', 2)"),
    # killed in the middle of writing the new state: half a file
    "half-written-state": (
        1,
        "import cvxdist.teachers.checkpoint as c\n"
        "real = c.write_atomic\n"
        "calls = [0]\n"
        "def half(path, data):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 4:  # epoch 2's first write: 3 files per epoch\n"
        "        open(str(path) + '.tmp', 'wb').write(data[: len(data) // 2])\n"
        "        _block()\n"
        "    real(path, data)\n"
        "c.write_atomic = half\n",
    ),
}
# Each SIGKILL costs a fresh process (imports, compilation): by default only the first; the
# in-process test below leaves the files of the two others and resumes from them.
SLOW_POINTS = ("metadata-committed", "half-written-state")


@pytest.mark.parametrize(
    "point",
    [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_POINTS else p for p in KILL_POINTS],
)
def test_killed_training_resumes_where_it_stopped(uninterrupted, tmp_path, point):
    committed, setup = KILL_POINTS[point]
    out = tmp_path / "teacher"
    kill_when_blocked(setup, [*CONFIG_ARGS, "--out", str(out)], tmp_path / "marker")
    _resume_and_compare(out, committed, uninterrupted)


@pytest.mark.parametrize("point", SLOW_POINTS)
def test_interrupted_training_leaves_files_a_rerun_resumes_from(
    uninterrupted, tmp_path, monkeypatch, point
):
    import cvxdist.training as training

    out, real = tmp_path / "teacher", training.save_teacher
    calls = []

    def interrupt_after_the_metadata(*args, **kwargs):  # epoch 2's, before the state moves
        meta = real(*args, **kwargs)
        calls.append(meta)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return meta

    def interrupt_after_epoch_1(epoch, record):
        raise KeyboardInterrupt

    if point == "metadata-committed":
        monkeypatch.setattr(training, "save_teacher", interrupt_after_the_metadata)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(
            CONFIG,
            out,
            progress=False,
            on_epoch_end=interrupt_after_epoch_1 if point == "half-written-state" else None,
        )
    monkeypatch.setattr(training, "save_teacher", real)
    if point == "half-written-state":  # what a kill while writing the next state leaves
        pending = out / training.PENDING_STATE_NAME
        pending.write_bytes(b"\x85\xa5state")
        pending.with_name(pending.name + ".tmp").write_bytes(b"\x85\xa5sta")
    _resume_and_compare(out, KILL_POINTS[point][0], uninterrupted)


def _resume_and_compare(out, committed, uninterrupted):
    full_dir, full_meta, _ = uninterrupted
    partial = json.loads((out / "teacher.json").read_text())
    assert partial["epochs_done"] == committed and not partial["complete"]
    resumed = []
    meta = train_teacher(CONFIG, out, progress=False, on_epoch_end=lambda e, r: resumed.append(e))
    assert resumed == list(range(committed + 1, 4))  # no finished epoch trained again
    assert meta["complete"] and [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    ours, full = load_teacher(out).variables, load_teacher(full_dir).variables
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), ours, full)
    assert meta["test_accuracy"] == pytest.approx(full_meta["test_accuracy"])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in full_dir.iterdir())
