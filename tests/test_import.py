"""`cvxdist teacher import`: torchvision-layout ResNets from PyTorch files, checked against a
PyTorch forward of the same architecture (reference modules below, with torchvision's
parameter names; torchvision itself is not importable beside the test env's torch)."""

from __future__ import annotations

import json
import pickle
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from cvxdist.cli import main
from cvxdist.teachers import load_teacher
from cvxdist.teachers.importers import StateDictMismatchError, import_torchvision_resnet
from cvxdist.teachers.torch_files import TorchFileError, read_state_dict

torch = pytest.importorskip("torch")
nn = torch.nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """torchvision.models.ResNet (v1.5), with a width multiplier and the CIFAR stem option
    (``conv1`` 3×3 stride 1, ``maxpool`` removed), as CIFAR ports of it do."""

    def __init__(self, arch, width=1.0, in_channels=3, num_classes=10, stem="imagenet"):
        super().__init__()
        block, depths = ARCHS[arch]
        self.inplanes = round(64 * width)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU()
        for i, (base, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            planes, layers = round(base * width), []
            for j in range(depth):
                layers.append(block(self.inplanes, planes, 2 if i > 0 and j == 0 else 1))
                self.inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(self.inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def random_resnet(arch, seed=0, **kwargs):
    """A reference network in eval mode with random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    net = ResNet(arch, **kwargs)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return net.eval()


def torch_logits(net, images, mean, std):
    x = (torch.from_numpy(images) - torch.tensor(mean)) / torch.tensor(std)
    with torch.no_grad():
        return net(x.permute(0, 3, 1, 2).float()).numpy()


CASES = [
    # (arch, stem, width, image shape): both stems, basic and bottleneck blocks, 1 and 3
    # channels; odd sizes exercise PyTorch's symmetric padding against SAME's
    ("resnet18", "cifar", 0.125, (16, 16, 3)),
    ("resnet18", "imagenet", 0.125, (32, 32, 3)),
    ("resnet34", "imagenet", 0.0625, (36, 36, 1)),
    ("resnet50", "cifar", 0.0625, (16, 16, 3)),
    ("resnet50", "imagenet", 0.0625, (29, 29, 3)),
]


@pytest.mark.parametrize(("arch", "stem", "width", "shape"), CASES)
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_imported_teacher_matches_the_pytorch_forward(tmp_path, arch, stem, width, shape, fmt):
    channels = shape[-1]
    net = random_resnet(arch, width=width, in_channels=channels, num_classes=7, stem=stem)
    state = net.state_dict()
    path = tmp_path / f"{arch}.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    mean, std = (0.4,) * channels, (0.25,) * channels
    meta = import_torchvision_resnet(
        path, tmp_path / "teacher", arch, image_shape=shape, mean=mean, std=std, name="t"
    )
    assert meta["model"] == (arch if stem == "cifar" else f"{arch}_imagenet")
    assert meta["arch"]["padding"] == "symmetric" and meta["arch"]["width"] == width
    assert meta["params"] == sum(p.numel() for p in net.parameters())
    teacher = load_teacher(tmp_path / "teacher")
    assert teacher.cuts == ("stem", "stage1", "stage2", "stage3", "stage4", "head")
    images = np.random.default_rng(1).uniform(size=(4, *shape)).astype(np.float32)
    expected = torch_logits(net, images, mean, std)
    got = np.asarray(teacher.apply(teacher.variables, jnp.asarray(images)))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert np.abs(expected).max() > 0.1  # the comparison is not between two near-zero arrays


def test_mismatching_state_dict_names_the_first_bad_key(tmp_path):
    net = random_resnet("resnet18", width=0.125, stem="cifar")
    state = net.state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    out = tmp_path / "out"
    # basic blocks read as bottlenecks: conv1 of a bottleneck is 1×1
    with pytest.raises(
        StateDictMismatchError,
        match=r"key 'layer1\.0\.conv1\.weight' has shape \(8, 8, 3, 3\), .* expects \(8, 8, 1, 1\)",
    ):
        import_torchvision_resnet(path, out, "resnet50")
    with pytest.raises(StateDictMismatchError, match=r"missing key 'layer1\.2\.conv1\.weight'"):
        import_torchvision_resnet(path, out, "resnet34")  # too few blocks
    del state["fc.bias"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(StateDictMismatchError, match=r"unexpected key 'layer5\.0\.conv1\.weight'"):
        import_torchvision_resnet(path, out, "resnet18")
    del state["layer5.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(StateDictMismatchError, match=r"missing key 'fc\.bias'"):
        import_torchvision_resnet(path, out, "resnet18")
    state["fc.bias"] = torch.zeros(10)
    state["layer2.1.bn2.running_var"] = torch.ones(5)
    torch.save(state, path)
    with pytest.raises(
        StateDictMismatchError,
        match=r"key 'layer2\.1\.bn2\.running_var' has shape \(5,\), .* expects \(16,\)",
    ):
        import_torchvision_resnet(path, out, "resnet18")
    assert not out.exists()


def test_import_command_writes_a_teacher_and_fails_in_one_line(tmp_path, capsys):
    net = random_resnet("resnet18", width=0.125, in_channels=1, stem="cifar")
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    out = tmp_path / "imported"
    args = ["teacher", "import", str(path), "--arch", "resnet18", "--out", str(out)]
    assert main([*args, "--image-shape", "28", "28", "1", "--dataset", "fashion_mnist"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "resnet18" and printed["image_shape"] == [28, 28, 1]
    info = json.loads((out / "teacher.json").read_text())
    assert info["dataset"] == "fashion_mnist" and info["arch"]["mean"] == [0.0]
    assert info["source"]["stem"] == "cifar" and info["source"]["format"] == "torch zip"
    bad = tmp_path / "bad"
    assert main(["teacher", "import", str(path), "--arch", "resnet34", "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing key 'layer1.2.conv1.weight'" in err
    assert not bad.exists()


def test_reader_refuses_pickled_code_and_checks_tensor_bounds(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": Payload()}, path)
    with pytest.raises(TorchFileError, match=r"refusing to unpickle _*builtins?_*\.print"):
        read_state_dict(path)
    assert "pwned" not in capsys.readouterr().out
    # a tensor view reaching past its storage is rejected, not read from stray memory
    torch.save({"w": torch.arange(6.0)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    root = next(n for n in members if n.endswith("/data.pkl")).removesuffix("/data.pkl")
    pkl = members[f"{root}/data.pkl"]
    size = pickle.BININT1 + b"\x06" + pickle.TUPLE1  # the tensor's size (6,)
    assert pkl.count(size) == 1
    members[f"{root}/data.pkl"] = pkl.replace(size, pickle.BININT1 + b"\x40" + pickle.TUPLE1)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(TorchFileError, match="reads past its storage"):
        read_state_dict(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(TorchFileError, match="not a zip-format torch checkpoint"):
        read_state_dict(path)


def test_reader_unwraps_training_checkpoints_and_keeps_dtypes(tmp_path):
    base = torch.randn(3, 4)
    # views of one storage (strided, offset) are saved once and read back as separate arrays
    weights = {"module.a": base[:, 1:], "module.b": base[2], "module.c": torch.arange(4).half()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": weights, "epoch": 3}, path)
    state = read_state_dict(path)
    assert set(state) == {"a", "b", "c"} and state["c"].dtype == np.float16
    for key in ("a", "b", "c"):
        np.testing.assert_array_equal(state[key], weights[f"module.{key}"].numpy())
