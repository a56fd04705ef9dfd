"""Teacher architectures, cut functions, splicing, checkpoints and the shipped teachers."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvxdist.cli import main
from cvxdist.data import find_dataset_folder, load_dataset
from cvxdist.teachers import (
    ArchConfig,
    CheckpointError,
    UnknownCutError,
    build_model,
    count_params,
    load_teacher,
    save_teacher,
    shipped_teachers,
    untrained_teacher,
)
from cvxdist.teachers.checkpoint import load_tree, save_tree
from cvxdist.teachers.teacher import variables_template

# (model, width, image shape): every architecture on a small input, with 1 and 3 channels.
TINY = [
    ("small_cnn", 0.5, (8, 8, 1)),
    ("resnet20", 0.25, (8, 8, 1)),
    ("resnet18", 0.0625, (8, 8, 3)),
    ("resnet18_imagenet", 0.0625, (16, 16, 1)),
]


@functools.cache
def _tiny(model, width, shape, seed=0):
    config = ArchConfig(model, num_classes=5, in_channels=shape[-1], width=width)
    return untrained_teacher(config, shape, seed=seed)


# Every cut pair of the ResNets compiles for minutes (slow); by default they check the stage
# pairs and every single block, and small_cnn checks every pair.
CUT_PAIRS = [
    (*TINY[0], True),
    *((*tiny, False) for tiny in TINY[1:]),
    *(pytest.param(*tiny, True, marks=pytest.mark.slow) for tiny in TINY[1:]),
]


@pytest.mark.parametrize(("model", "width", "shape", "every"), CUT_PAIRS)
def test_prefix_block_suffix_compose_to_the_teacher_for_every_cut_pair(model, width, shape, every):
    teacher = _tiny(model, width, shape)
    cuts = teacher.cuts
    assert cuts[0] == "stem" and cuts[-1] == "head"
    assert len(cuts) == (6 if model.startswith("resnet18") else 5)
    segments = teacher.segments  # the finest cuts: every block (stage names are their spans)
    assert len(segments) == {"small_cnn": 7, "resnet20": 11}.get(model, 10)
    pairs = [(a, b) for i, a in enumerate(cuts) for b in cuts[i:]]
    pairs += [(a, b) for i, a in enumerate(segments) for b in segments[i:] if every or a == b]

    @jax.jit  # all pairs in one compilation (the plain functions are what gets jitted)
    def compose_all(v, x):
        outputs = []
        for start, stop in pairs:
            fns = teacher.cut_functions(start, stop, jit=False)
            outputs.append(fns.suffix(v, fns.block(v, fns.prefix(v, x))))
        return jnp.stack(outputs)

    x = jax.random.uniform(jax.random.key(1), (3, *shape))
    v = teacher.variables
    logits = teacher.apply(v, x)
    assert logits.shape == (3, 5)
    composed = compose_all(v, x)
    for (start, stop), out in zip(pairs, composed):
        np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5, err_msg=f"{start}..{stop}")
    # the jitted functions of one pair, and the identity of an empty prefix / suffix
    fns = teacher.cut_functions("stem", "stage2")
    z = fns.prefix(v, x)
    np.testing.assert_array_equal(z, x)
    np.testing.assert_allclose(fns.suffix(v, fns.block(v, z)), logits, rtol=1e-5, atol=1e-5)
    head = teacher.cut_functions("head")
    assert head.block(v, teacher.cut_functions("stem", cuts[-2]).block(v, x)).shape == (3, 5)


def test_cut_shapes_follow_the_stages_for_any_input_size():
    for shape, sizes in (((28, 28, 1), (28, 28, 14, 7)), ((32, 32, 3), (32, 32, 16, 8))):
        config = ArchConfig("resnet20", num_classes=5, in_channels=shape[-1], width=0.25)
        template = variables_template(config, shape)
        x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
        model = build_model(config)
        for cut, size in zip(("stem", "stage1", "stage2", "stage3"), sizes):
            out = jax.eval_shape(partial(model.apply, stop=cut), template, x)
            assert out.shape[1:3] == (size, size)
        assert jax.eval_shape(model.apply, template, x).shape == (2, 5)


@pytest.mark.parametrize(
    ("model", "params"),
    # torchvision's parameter counts (3 channels, 1000 classes; BatchNorm scale and bias)
    [
        ("resnet18_imagenet", 11_689_512),
        ("resnet34_imagenet", 21_797_672),
        ("resnet50_imagenet", 25_557_032),
        ("resnet50", 25_557_032 - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64),  # the CIFAR stem's 3×3
    ],
)
def test_torchvision_layouts_have_torchvision_parameter_counts(model, params):
    config = ArchConfig(model, num_classes=1000, in_channels=3)
    template = variables_template(config, (32, 32, 3))
    assert count_params(template["params"]) == params
    # the ImageNet stem downsamples 4× (7×7 stride-2 conv, 3×3 stride-2 max pool)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    model_ = build_model(config)
    sizes = (8, 8, 4, 2, 1) if model.endswith("imagenet") else (32, 32, 16, 8, 4)
    for cut, size in zip(("stem", "stage1", "stage2", "stage3", "stage4"), sizes):
        assert jax.eval_shape(partial(model_.apply, stop=cut), template, x).shape[1:3] == (
            size,
            size,
        )


def test_bottleneck_blocks_are_cut_points_like_basic_blocks():
    teacher = _tiny("resnet50_imagenet", 0.0625, (16, 16, 1))
    v = teacher.variables
    assert len(teacher.segments) == 2 + 3 + 4 + 6 + 3
    assert teacher.block_variables("stage2.block3")["params"]["stage2"].keys() == {"Bottleneck_2"}
    total = count_params(v["params"])
    assert sum(teacher.block_params(s) for s in teacher.segments) == total
    x = jax.random.uniform(jax.random.key(5), (2, 16, 16, 1))
    logits = teacher.apply(v, x)
    for start, stop in [("stem", "stage1.block2"), ("stage2.block3", "stage3"), ("stage4", None)]:
        fns = teacher.cut_functions(start, stop)
        out = fns.suffix(v, fns.block(v, fns.prefix(v, x)))
        np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5, err_msg=f"{start}..{stop}")
    # a bottleneck stage expands its width 4×: stage1 maps 4 channels to 4 × 4
    z = teacher.cut_functions("stage1").prefix(v, x)
    assert z.shape[-1] == 4 and teacher.cut_functions("stage1").block(v, z).shape[-1] == 16


def test_symmetric_padding_differs_from_same_only_where_pytorch_does():
    """Stride-2 3×3 convolutions on even sizes: SAME pads (0, 1), PyTorch pads (1, 1)."""
    same = _tiny("resnet20", 0.25, (8, 8, 1))
    config = dataclasses.replace(same.config, padding="symmetric")
    sym = dataclasses.replace(same, config=config, _cache={})
    v = same.variables
    x = jax.random.uniform(jax.random.key(6), (2, 8, 8, 1))
    stage1 = same.cut_functions("stem", "stage1")
    np.testing.assert_array_equal(
        stage1.block(v, x), sym.cut_functions("stem", "stage1").block(v, x)
    )
    assert not np.allclose(same.apply(v, x), sym.apply(v, x), atol=1e-3)
    with pytest.raises(ValueError, match="unknown padding"):
        build_model(dataclasses.replace(config, padding="valid"))


def test_batchnorm_runs_in_inference_mode():
    teacher = _tiny("small_cnn", 0.5, (8, 8, 1))
    x = jax.random.uniform(jax.random.key(2), (4, 8, 8, 1))
    full = teacher.apply(teacher.variables, x)
    one_by_one = jnp.concatenate([teacher.apply(teacher.variables, x[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(full, one_by_one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("model", "width", "shape"), TINY)
def test_folded_batchnorm_is_the_same_network_with_one_op_per_layer(model, width, shape):
    """Under `folded_batchnorm` each ConvBN is one convolution with a bias computed as a
    constant (no BatchNorm arithmetic left in the trace), computing the same logits."""
    from cvxdist.teachers.models import folded_batchnorm

    teacher = _tiny(model, width, shape)
    whole = teacher.cut_functions(teacher.segments[0], teacher.segments[-1], jit=False).block
    x = jax.random.uniform(jax.random.key(3), (4, *shape))
    expected = teacher.apply(teacher.variables, x)
    plain = str(jax.make_jaxpr(lambda x: whole(teacher.variables, x))(x))
    with folded_batchnorm():
        folded = jax.make_jaxpr(lambda x: whole(teacher.variables, x))(x)
    assert "rsqrt" in plain and "rsqrt" not in str(folded)
    assert str(folded).count("conv_general_dilated") == plain.count("conv_general_dilated")
    got = jax.core.eval_jaxpr(folded.jaxpr, folded.consts, x)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_stage_is_the_span_of_its_blocks():
    teacher = _tiny("resnet20", 0.25, (8, 8, 1))
    assert teacher.resolve("stage2") == teacher.resolve("stage2.block1", "stage2.block3")
    assert teacher.resolve("stage1.block2", "stage2") == (2, 6)
    assert teacher.valid_cuts[:4] == ("stem", "stage1", "stage1.block1", "stage1.block2")
    v = teacher.variables
    assert teacher.block_params("stage2") == sum(
        teacher.block_params(f"stage2.block{i}") for i in (1, 2, 3)
    )
    # a block's variables are the stage's layer of that index, in the same nesting
    picked = teacher.block_variables("stage2.block2")
    assert set(picked) == {"params", "batch_stats"}
    assert list(picked["params"]) == ["stage2"]
    assert list(picked["params"]["stage2"]) == ["BasicBlock_1"]
    jax.tree.map(
        np.testing.assert_array_equal,
        picked["params"]["stage2"]["BasicBlock_1"],
        v["params"]["stage2"]["BasicBlock_1"],
    )
    # the first block strides: its output has the stage's resolution
    x = jax.random.uniform(jax.random.key(4), (2, 8, 8, 1))
    z = teacher.cut_functions("stage2.block1").prefix(v, x)
    out = teacher.cut_functions("stage2.block1").block(v, z)
    assert z.shape[1:3] == (8, 8) and out.shape[1:3] == (4, 4)


def test_unknown_cut_lists_the_valid_ones():
    teacher = _tiny("resnet20", 0.25, (8, 8, 1))
    with pytest.raises(
        UnknownCutError, match=re.escape("stem, stage1, stage1.block1, stage1.block2")
    ):
        teacher.cut_functions("stage4")
    with pytest.raises(UnknownCutError, match=re.escape("stage3.block3, head")):
        teacher.cut_functions("stage3.block4")
    with pytest.raises(UnknownCutError, match="valid cuts"):
        teacher.cut_functions("stage1", "layer9")
    with pytest.raises(UnknownCutError, match="comes before"):
        teacher.cut_functions("stage3", "stage1")


def test_splice_replaces_the_block():
    teacher = _tiny("resnet20", 0.25, (8, 8, 1))
    v = teacher.variables
    x = jax.random.uniform(jax.random.key(3), (2, 8, 8, 1))
    fns = teacher.cut_functions("stage2", "stage3")
    same = teacher.splice(lambda z: fns.block(v, z), "stage2", "stage3")
    np.testing.assert_allclose(same(v, x), teacher.apply(v, x), rtol=1e-5, atol=1e-5)
    zeros = teacher.splice(lambda z: jnp.zeros((z.shape[0], 2, 2, 16)), "stage2", "stage3")
    expected = teacher.cut_functions("head").block(v, jnp.zeros((2, 2, 2, 16)))
    np.testing.assert_allclose(zeros(v, x), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("model", "shape"), [("resnet18", (8, 8, 3)), ("resnet18_imagenet", (16, 16, 1))]
)
def test_block_params_partition_the_model(model, shape):
    teacher = _tiny(model, 0.0625, shape)
    total = count_params(teacher.variables["params"])
    per_segment = sum(teacher.block_params(cut) for cut in teacher.cuts)
    assert per_segment == total
    assert sum(teacher.block_params(s) for s in teacher.segments) == total
    assert teacher.block_params("stage2", "stage3") == (
        teacher.block_params("stage2") + teacher.block_params("stage3")
    )


def test_checkpoint_round_trip(tmp_path):
    teacher = _tiny("resnet20", 0.25, (8, 8, 1))
    info = {"dataset": "digits", "image_shape": [8, 8, 1], "test_accuracy": 0.5, "name": "rt"}
    meta = save_teacher(tmp_path, teacher.config, teacher.variables, info)
    assert meta["params"] == count_params(teacher.variables["params"])
    assert meta["cuts"] == list(teacher.cuts)
    loaded = load_teacher(tmp_path)
    assert loaded.config == teacher.config and loaded.name == "rt"
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, teacher.variables)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
    np.testing.assert_array_equal(
        loaded.apply(loaded.variables, x), teacher.apply(teacher.variables, x)
    )


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    teacher = _tiny("small_cnn", 0.5, (8, 8, 1))
    info = {"dataset": "digits", "image_shape": [8, 8, 1], "test_accuracy": 0.5}
    save_teacher(tmp_path, teacher.config, teacher.variables, info)
    ckpt = tmp_path / "teacher.msgpack"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_teacher(tmp_path)
    # without a recorded hash, the msgpack decoder's failure is still one clear line
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_tree(ckpt)


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    small = _tiny("small_cnn", 0.5, (8, 8, 1))
    other = _tiny("resnet20", 0.25, (8, 8, 1))
    path = tmp_path / "v.msgpack"
    save_tree(path, small.variables)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_tree(path, template=other.variables)


def test_missing_teacher_names_the_shipped_ones():
    with pytest.raises(Exception, match="digits-cnn"):
        load_teacher("no-such-teacher")


def test_teacher_list_prints_shipped_teachers_as_json_lines(capsys):
    assert main(["teacher", "list"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["name"] for line in lines} == set(shipped_teachers())
    for line in lines:
        assert {"name", "model", "dataset", "test_accuracy"} <= set(line)


@pytest.mark.parametrize(
    "name",
    # Fashion-MNIST's 10k test images through a ResNet-20: slow; the digits teacher covers the
    # code, and the Fashion-MNIST demo test (slow too) checks this accuracy again.
    [pytest.param(n, marks=pytest.mark.slow) if n.startswith("fashion") else n
     for n in shipped_teachers()],
)  # fmt: skip
def test_each_shipped_teacher_reaches_its_recorded_test_accuracy(name):
    """The full test split, in jitted batches; the result must equal teacher.json's."""
    teacher = load_teacher(name)
    if teacher.dataset == "fashion_mnist" and find_dataset_folder("fashion_mnist") is None:
        pytest.skip("Fashion-MNIST is not there: `make test` fetches it (`cvxdist data fetch`)")
    test = load_dataset(teacher.dataset, "test")
    accuracy = teacher.accuracy(test.images, test.labels, batch_size=1000)
    assert accuracy == pytest.approx(teacher.info["test_accuracy"], abs=2e-4)
    # the paper-configuration ResNet-18: 5 epochs, all an hour of this CPU allowed
    floors = {"digits": 0.97, "fashion_mnist": 0.93, "fashion-resnet18-imagenet": 0.89}
    assert accuracy >= floors.get(name, floors.get(teacher.dataset, 0.5))


def test_a_fashion_mnist_resnet_teacher_is_shipped():
    names = [n for n in shipped_teachers() if load_teacher(n).dataset == "fashion_mnist"]
    if not names:
        pytest.skip("fashion-resnet20 is not shipped yet (see cvxdist/assets/teachers/README.md)")
    teacher = max(map(load_teacher, names), key=lambda t: t.info["test_accuracy"])
    assert teacher.config.model.startswith("resnet")
    assert teacher.info["complete"] and teacher.info["test_accuracy"] >= 0.93


def test_the_paper_configuration_teacher_is_shipped_under_5_mb():
    from cvxdist.teachers import teacher_dir

    teacher = load_teacher("fashion-resnet18-imagenet")
    assert teacher.config.model == "resnet18_imagenet" and teacher.config.width == 0.5
    assert teacher.info["checkpoint_storage"] == "float16"
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(teacher.variables))
    size = sum(p.stat().st_size for p in teacher_dir("fashion-resnet18-imagenet").iterdir())
    assert size < 5_000_000
    # the last stage holds most of the parameters, as in the paper's configuration
    assert teacher.block_params("stage4") > 0.7 * teacher.info["params"]


def test_teacher_eval_command_prints_the_accuracy(capsys):
    assert main(["teacher", "eval", "digits-cnn"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "small_cnn" and printed["num_test"] == 360
    assert printed["test_accuracy"] == load_teacher("digits-cnn").info["test_accuracy"]


def test_copied_teacher_directory_loads_by_path(tmp_path):
    from cvxdist.teachers import teacher_dir

    target = tmp_path / "copy"
    shutil.copytree(teacher_dir("digits-cnn"), target)
    assert load_teacher(target).checkpoint_sha256 == load_teacher("digits-cnn").checkpoint_sha256


def test_float16_storage_round_trips_through_the_loader_as_float32(tmp_path):
    teacher = _tiny("resnet18_imagenet", 0.0625, (16, 16, 1))
    info = {"dataset": "digits", "image_shape": [16, 16, 1], "test_accuracy": 0.5}
    plain = save_teacher(tmp_path / "f32", teacher.config, teacher.variables, info)
    meta = save_teacher(tmp_path / "f16", teacher.config, teacher.variables, info, "float16")
    assert meta["checkpoint"] == "teacher.f16.xz" and meta["checkpoint_storage"] == "float16"
    size = (tmp_path / "f16" / meta["checkpoint"]).stat().st_size
    assert size < 0.5 * (tmp_path / "f32" / plain["checkpoint"]).stat().st_size
    loaded = load_teacher(tmp_path / "f16")
    rounded = jax.tree.map(lambda a: np.asarray(a, np.float16), teacher.variables)
    for got, want in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(rounded)):
        assert got.dtype == jnp.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want.astype(np.float32))
    ckpt = tmp_path / "f16" / meta["checkpoint"]
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_teacher(tmp_path / "f16")
    # without the recorded hash, lzma's failure is still one clear line
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_tree(ckpt, teacher.variables, storage="float16")


def test_teacher_pack_records_the_accuracy_of_the_stored_weights(tmp_path, capsys):
    out = tmp_path / "packed"
    assert main(["teacher", "pack", "digits-cnn", "--out", str(out), "--name", "d16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    packed, source = load_teacher(out), load_teacher("digits-cnn")
    assert packed.name == "d16" and packed.info["checkpoint_storage"] == "float16"
    assert printed["source_test_accuracy"] == source.info["test_accuracy"]
    test = load_dataset("digits", "test")
    assert packed.info["test_accuracy"] == packed.accuracy(test.images, test.labels)
    assert abs(packed.info["test_accuracy"] - source.info["test_accuracy"]) < 0.01
    assert sorted(p.name for p in out.iterdir()) == ["teacher.f16.xz", "teacher.json"]


@pytest.mark.parametrize("shape", [(2, 14, 14, 3), (1, 7, 8, 2), (1, 1, 1, 1)])
def test_the_stems_max_pool_equals_flax_max_pool(shape):
    import flax.linen as nn

    from cvxdist.teachers.models import max_pool

    x = jax.random.normal(jax.random.key(7), shape)
    for padding, flax_padding in (("same", "SAME"), ("symmetric", ((1, 1), (1, 1)))):
        expected = nn.max_pool(x, (3, 3), strides=(2, 2), padding=flax_padding)
        np.testing.assert_array_equal(max_pool(x, 3, 2, padding), expected)
