"""`cvxdist export`: the compressed network as ONNX, checked against JAX with onnxruntime."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvxdist.cli import main
from cvxdist.data import load_dataset
from cvxdist.distill import spliced_predict
from cvxdist.distill.io import load_students
from cvxdist.teachers import load_teacher

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")

TINY_DISTILL = ["--gates", "12", "--samples-per-class", "10", "--max-rows", "800"]
TINY_DISTILL += ["--reg", "coupled", "--lam-frac", "0.1", "--quiet"]


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _assert_same_network(got, expected, predict, images):
    """onnxruntime's logits within 1e-4 of JAX's with the same top-1, except on images (at
    most 1 %) within rounding distance of a gate boundary, where JAX's own logits jump when
    the pixels move by ±1e-6."""
    off = np.flatnonzero(
        (np.abs(got - expected).max(-1) > 1e-4) | (got.argmax(-1) != expected.argmax(-1))
    )
    assert len(off) <= 0.01 * len(images)
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(8, *images.shape[1:]))
    for i in off:
        nudged = predict((images[i] + 1e-6 * signs).astype(np.float32))
        assert np.abs(nudged - expected[i]).max() > 1e-4, f"image {i} differs off a boundary"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The digits teacher's last stage, one student per block: a strided block and an
    identity-shortcut one (several stages are exported in the imported-teacher test)."""
    out = tmp_path_factory.mktemp("export") / "run"
    args = ["distill", "--teacher", "digits-cnn", "--cut", "stage3"]
    assert main([*args, *TINY_DISTILL, "--per-block", "--identity", "--out", str(out)]) == 0
    return out


def test_exported_network_reproduces_the_spliced_logits(run_dir, tmp_path, capsys):
    capsys.readouterr()
    path = tmp_path / "model.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["checked_on"] == "digits test split" and printed["top1_identical"]
    assert printed["ok"] and printed["max_abs_diff_continuous"] <= 1e-4
    assert printed["bytes"] == path.stat().st_size
    # BatchNorm folded into the convolutions, the students' products 2-D
    onnx = pytest.importorskip("onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and not ops & {"Sqrt", "Einsum", "BatchNormalization"}, ops
    # independently of the command's own check: the pipeline's spliced forward on the test set
    students, info = load_students(run_dir)
    assert [s.module.identity for s in students] == [False, True]
    teacher = load_teacher("digits-cnn")
    test = load_dataset("digits", "test")
    predict = spliced_predict(teacher, info["cut"], info["to"], students)
    expected = predict(test.images)
    session = _session(path)
    got = session.run(None, {"images": test.images.astype(np.float32)})[0]
    _assert_same_network(got, expected, predict, test.images)
    # the compressed network differs from the teacher, so the check above is not vacuous
    assert np.abs(expected - teacher.predict(test.images)).max() > 1e-2
    # any batch size
    one = session.run(None, {"images": test.images[:1].astype(np.float32)})[0]
    np.testing.assert_allclose(one, expected[:1], atol=1e-4, rtol=0)


def test_teacher_export_size_and_latency(tmp_path):
    from cvxdist.export import export_onnx, onnx_latencies_ms, onnx_latency_ms, onnx_size_bytes

    teacher = load_teacher("digits-cnn")
    path = tmp_path / "teacher.onnx"
    record = export_onnx(teacher, [], None, None, path)
    assert record["max_abs_diff"] <= 1e-4 and record["images_checked"] == 16  # no gates
    assert onnx_size_bytes(path) == path.stat().st_size == record["bytes"]
    # float32 initializers: the file holds at least the teacher's variables
    n_vars = sum(np.size(v) for v in jax.tree.leaves(teacher.variables))
    assert 4 * n_vars <= record["bytes"] < 4 * n_vars + 100_000
    assert onnx_latency_ms(path, 1, repeats=3) > 0
    latencies = onnx_latencies_ms({"a": path, "b": path}, (1, 8), repeats=3)
    assert set(latencies) == {"a", "b"} and set(latencies["a"]) == {1, 8}


def test_export_that_does_not_reproduce_writes_nothing(tmp_path, monkeypatch):
    import cvxdist.export

    predict = cvxdist.export.onnx_predict
    monkeypatch.setattr(cvxdist.export, "onnx_predict", lambda *a: predict(*a) + 1e-3)
    path = tmp_path / "teacher.onnx"
    with pytest.raises(cvxdist.export.ExportError, match="onnxruntime does not reproduce"):
        cvxdist.export.export_onnx(load_teacher("digits-cnn"), [], None, None, path)
    assert os.listdir(tmp_path) == []


class _FixedSession:
    """Stands in for onnxruntime: returns given logits, batch by batch."""

    def __init__(self, logits):
        self.logits, self.seen = logits, 0

    def run(self, _, feeds):
        n = len(next(iter(feeds.values())))
        self.seen += n
        return [self.logits[self.seen - n : self.seen]]


def test_only_images_at_a_gate_boundary_may_differ():
    """A step function of the pixel sum, with image 1 exactly on the step: a flipped output
    there is rounding (JAX itself jumps within ±1e-6 of the image); anywhere else it is not."""
    from cvxdist.export import compare_logits

    images = np.random.default_rng(3).uniform(size=(4, 2, 2, 1)).astype(np.float32)
    edge = images[1].sum()

    def fn(x):
        step = (x.sum(axis=(1, 2, 3)) >= edge).astype(jnp.float32)
        return jnp.stack([jnp.full_like(step, 0.5), step], axis=-1)

    expected = np.asarray(fn(jnp.asarray(images)))
    flipped = expected.copy()
    flipped[1, 1] = 1.0 - flipped[1, 1]
    check = compare_logits(fn, _FixedSession(flipped), images)
    assert check["ok"] and check["rounding_sensitive_images"] == 1
    assert check["max_abs_diff"] == 1.0 and check["max_abs_diff_continuous"] == 0.0
    assert check["top1_mismatches"] == 1 and not check["top1_identical"]
    flipped[2, 1] = 1.0 - flipped[2, 1]  # an image away from the step
    check = compare_logits(fn, _FixedSession(flipped), images)
    assert not check["ok"] and check["max_abs_diff_continuous"] == 1.0


def test_students_that_do_not_cover_the_cut_are_refused(run_dir):
    """Bad input to the command is in tests/test_cli.py; here, a run folder whose students do
    not cover its teacher's blocks exactly (another teacher's layout, or a student missing)."""
    from cvxdist.export import ExportError, _check_coverage

    students, info = load_students(run_dir)
    cut, to = info["cut"], info["to"]
    _check_coverage(load_teacher("digits-cnn"), students, cut, to)
    with pytest.raises(ExportError, match=r"do not cover its stage3\.\.stage3 exactly"):
        _check_coverage(load_teacher("fashion-resnet20"), students, cut, to)
    with pytest.raises(ExportError, match="do not cover"):
        _check_coverage(load_teacher("digits-cnn"), students[:-1], cut, to)


def test_imported_pytorch_teacher_goes_through_distill_evaluate_and_export(
    tmp_path, capsys, monkeypatch
):
    """A random-weight CIFAR-stem ResNet-18 (width 1/8) from a .pth, on digits (8×8×1), its
    BatchNorm statistics measured on digits so that its logits depend on the image."""
    torch = pytest.importorskip("torch")
    from test_import import random_resnet

    net = random_resnet("resnet18", width=0.125, in_channels=1, num_classes=10, stem="cifar")
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches seen
    train = load_dataset("digits", "train")
    with torch.no_grad():
        net.train()(torch.from_numpy(train.images[:500]).permute(0, 3, 1, 2))
    torch.save(net.eval().state_dict(), tmp_path / "r18.pth")
    monkeypatch.chdir(tmp_path)  # the run records the teacher's name: a folder found from here
    args = ["teacher", "import", "r18.pth", "--arch", "resnet18", "--out", "imported"]
    assert main([*args, "--image-shape", "8", "8", "1", "--dataset", "digits"]) == 0
    capsys.readouterr()
    distill = ["distill", "--teacher", "imported", "--cut", "stage3", "--to", "stage4"]
    assert main([*distill, *TINY_DISTILL, "--out", "run"]) == 0
    distilled = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "run"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["teacher"] == "imported"
    assert evaluated["accuracy"] == pytest.approx(distilled["accuracy"])
    assert main(["export", "run", "--format", "onnx", "--out", "imported.onnx"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ok"] and printed["top1_identical"]
    students, _ = load_students(tmp_path / "run")
    assert [s.stage for s in students] == ["stage3", "stage4"]
    teacher = load_teacher("imported")
    test = load_dataset("digits", "test")
    predict = spliced_predict(teacher, "stage3", "stage4", students)
    expected = predict(test.images)
    got = _session("imported.onnx").run(None, {"images": test.images})[0]
    _assert_same_network(got, expected, predict, test.images)
    assert len(np.unique(expected.argmax(-1))) >= 3  # not a constant network


def test_bottleneck_blocks_get_students_and_export(tmp_path):
    """ResNet-50 blocks (1×1, 3×3, 1×1 expanding 4×): one student per block, the strided
    first block of stage 2 and an identity-shortcut second block; then ONNX."""
    from cvxdist.distill import DistillConfig, distill
    from cvxdist.export import export_onnx
    from cvxdist.teachers import ArchConfig, untrained_teacher

    teacher = untrained_teacher(ArchConfig("resnet50", 10, 1, width=0.0625), (16, 16, 1))
    images = np.random.default_rng(0).uniform(size=(64, 16, 16, 1)).astype(np.float32)
    config = DistillConfig(
        cut="stage2.block1",
        to="stage2.block2",
        per_block=True,
        identity=True,
        gates=8,
        max_rows=600,
        objective="activations",  # the blocks' structure is under test, not the objective
    )
    students = distill(teacher, images, config, progress=False)
    assert [s.stage for s in students] == ["stage2.block1", "stage2.block2"]
    first, second = (s.module for s in students)
    assert (first.in_channels, first.out_channels, first.stride) == (16, 32, 2)
    assert (second.in_channels, second.out_channels, second.identity) == (32, 32, True)
    record = export_onnx(teacher, students, "stage2.block1", "stage2.block2", tmp_path / "r50.onnx")
    assert record["ok"] and record["top1_identical"]
