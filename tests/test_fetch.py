"""`cvxdist data fetch` and the dataset lookup order, without network: a tiny .deb built here
holds small IDX files, and a fake `apt-get` on PATH serves it (and logs how it was called)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_data import _write_idx_folder

from cvxdist import data
from cvxdist.cli import main
from cvxdist.data import cache_dir, find_dataset_folder, load_dataset, user_dataset_dir

PACKAGE = "dataset-fashion-mnist"
pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian/Ubuntu)"
)

FAKE_APT = """#!/bin/sh
echo "$*" >> "$FAKE_APT_LOG"
case " $* " in
  *" update "*) exit 0 ;;
  *" download "*)
    if [ -n "$FAKE_APT_NO_LISTS" ] && ! echo "$*" | grep -q "Dir::State::Lists="; then
      echo "E: Unable to locate package $PACKAGE" >&2; exit 100
    fi
    if [ -n "$FAKE_APT_OFFLINE" ]; then echo "E: Failed to fetch $PACKAGE" >&2; exit 100; fi
    cp "$FAKE_DEB" . ;;
  *" install "*)
    if [ -n "$FAKE_APT_OFFLINE" ]; then echo "E: Unable to fetch some archives" >&2; exit 100; fi
    dpkg-deb -x "$FAKE_DEB" "$FAKE_ROOT" ;;
  *) exit 64 ;;
esac
"""


def _build_deb(tmp: Path, n_train: int) -> tuple[Path, dict]:
    """A real .deb (dpkg-deb --build) installing small IDX files in the package's folder."""
    pkg = tmp / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: tiny IDX files\n"
    )
    folder = pkg / "usr/share/datasets/fashion-mnist"
    folder.mkdir(parents=True)
    arrays = _write_idx_folder(folder, n_train=n_train)
    deb = tmp / f"{PACKAGE}_1.0_all.deb"
    build = ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(pkg), str(deb)]
    subprocess.run(build, check=True, capture_output=True)
    return deb, arrays


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """Fake apt-get on PATH, a fake system root and a private user cache; yields a reader of
    the apt-get calls (one string per call)."""
    deb, arrays = _build_deb(tmp_path, n_train=9)
    bin_dir, root, log = tmp_path / "bin", tmp_path / "root", tmp_path / "apt.log"
    bin_dir.mkdir()
    root.mkdir()
    apt = bin_dir / "apt-get"
    apt.write_text(FAKE_APT.replace("$PACKAGE", PACKAGE))
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name, value in (("FAKE_DEB", deb), ("FAKE_ROOT", root), ("FAKE_APT_LOG", log)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("CVXDIST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_ROOT", root)
    system = root / "usr/share/datasets/fashion-mnist"
    return FakeApt(log, system, arrays)


@dataclasses.dataclass
class FakeApt:
    log: Path
    system: Path  # the package's folder under the fake system root
    arrays: dict  # what the package's IDX files hold: split prefix -> (images, labels)

    def __call__(self) -> list[str]:
        """The apt-get calls so far, one string of arguments each."""
        return self.log.read_text().splitlines() if self.log.exists() else []


def _fetch(capsys, *extra) -> tuple[int, dict | None, str]:
    code = main(["data", "fetch", "fashion_mnist", "--quiet", *extra])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err


def _assert_reads_the_package(calls) -> None:
    train = load_dataset("fashion_mnist", "train")
    images, labels = calls.arrays["train"]
    np.testing.assert_allclose(train.images[..., 0], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(train.labels, labels)


def test_fetch_without_root_extracts_the_package_into_the_user_cache(fake_apt, capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, printed, _ = _fetch(capsys)
    target = user_dataset_dir("fashion_mnist")
    assert code == 0 and printed == {
        "dataset": "fashion_mnist",
        "folder": str(target),
        "how": "extracted",
    }
    assert fake_apt() == [f"download {PACKAGE}"]  # no root: neither update nor install
    assert target == cache_dir() / "datasets" / "fashion-mnist" and not fake_apt.system.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["fashion-mnist"]  # no leftovers
    assert find_dataset_folder("fashion_mnist") == target
    _assert_reads_the_package(fake_apt)
    code, printed, _ = _fetch(capsys)  # already there: nothing runs
    assert code == 0 and printed["how"] == "present" and len(fake_apt()) == 1


def test_fetch_updates_private_package_lists_when_the_system_has_none(
    fake_apt, capsys, monkeypatch
):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("FAKE_APT_NO_LISTS", "1")
    code, printed, _ = _fetch(capsys)
    assert code == 0 and printed["how"] == "extracted"
    first, update, download = fake_apt()
    assert first == f"download {PACKAGE}"
    assert update.startswith("-o Dir::State::Lists=") and update.endswith(" update")
    assert download.startswith(update.removesuffix(" update")) and download.endswith(PACKAGE)
    _assert_reads_the_package(fake_apt)


def test_fetch_as_root_updates_then_installs_with_apt(fake_apt, capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    code, printed, _ = _fetch(capsys)
    assert code == 0 and printed["how"] == "installed"
    assert printed["folder"] == str(fake_apt.system)
    assert fake_apt() == ["update", f"install -y --no-install-recommends {PACKAGE}"]
    assert not user_dataset_dir("fashion_mnist").exists()
    _assert_reads_the_package(fake_apt)
    # --user extracts into the cache although the system has it.
    code, printed, _ = _fetch(capsys, "--user")
    assert code == 0 and printed["how"] == "extracted" and fake_apt()[-1] == f"download {PACKAGE}"


def test_fetch_failures_are_one_line_and_leave_nothing(fake_apt, capsys, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("FAKE_APT_OFFLINE", "1")
    code, _, err = _fetch(capsys)
    assert code == 2 and err.count("\n") == 1
    assert "apt-get" in err and "download dataset-fashion-mnist" in err
    assert not fake_apt.system.exists() and not user_dataset_dir("fashion_mnist").exists()
    assert list(user_dataset_dir("fashion_mnist").parent.iterdir()) == []
    monkeypatch.setenv("PATH", str(Path(fake_apt.system.anchor) / "nonexistent"))
    code, _, err = _fetch(capsys)
    assert code == 2 and "apt-get and dpkg-deb are needed" in err
    assert main(["data", "fetch", "mnist"]) == 2
    assert "only fashion_mnist" in capsys.readouterr().err


def test_load_dataset_looks_in_data_dir_then_system_then_user_cache(fake_apt, tmp_path):
    system = fake_apt.system
    cached = user_dataset_dir("fashion_mnist")
    given = tmp_path / "given"
    for folder, n_train in ((system, 9), (cached, 7), (given, 5)):
        folder.mkdir(parents=True)
        _write_idx_folder(folder, n_train=n_train)
    assert len(load_dataset("fashion_mnist", "train", data_dir=given)) == 5
    assert len(load_dataset("fashion_mnist", "train")) == 9
    (system / "t10k-labels-idx1-ubyte.gz").unlink()  # an incomplete folder is skipped
    assert find_dataset_folder("fashion_mnist") == cached
    assert len(load_dataset("fashion_mnist", "train")) == 7
    shutil.rmtree(cached)
    with pytest.raises(data.DatasetNotFoundError, match="cvxdist data fetch fashion_mnist"):
        load_dataset("fashion_mnist", "train")


def test_the_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CVXDIST_CACHE_DIR", str(tmp_path / "mine"))
    assert user_dataset_dir("fashion_mnist") == tmp_path / "mine" / "datasets" / "fashion-mnist"
    monkeypatch.delenv("CVXDIST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "cvxdist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "cvxdist"
