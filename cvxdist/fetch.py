"""Fetch datasets that a Debian/Ubuntu package ships (`cvxdist data fetch`, the Makefile).

As root: ``apt-get update`` then ``apt-get install -y PACKAGE`` (the system folder, e.g.
``/usr/share/datasets/fashion-mnist``). Otherwise, or when that fails: ``apt-get download``
then ``dpkg-deb -x`` into the user cache (`cvxdist.data.user_dataset_dir`), with private
package lists (``apt-get update`` without root) when the system's lists cannot find the
package. `cvxdist.data.load_dataset` looks in both places. Only the package registry is
contacted; nothing is written until the extracted files are complete (one rename).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from cvxdist.data import (
    DEBIAN_DATASETS,
    find_dataset_folder,
    holds_idx_dataset,
    system_dataset_dir,
    user_dataset_dir,
)
from cvxdist.errors import UserError

#: Seconds one apt-get or dpkg-deb call may take.
COMMAND_TIMEOUT_S = 900


class FetchError(UserError):
    """A dataset could not be installed nor extracted; the message names the failing step."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fetch_dataset(
    name: str, *, user: bool = False, log: Callable[[str], None] = _stderr
) -> tuple[Path, str]:
    """Make dataset ``name`` readable by `load_dataset`; returns ``(folder, how)``.

    As root the package is installed with apt-get; otherwise, or with ``user``, it is
    extracted into the user cache (with ``user`` even when the system folder has it).
    ``how`` is ``"present"``, ``"installed"`` or ``"extracted"``.
    """
    if name not in DEBIAN_DATASETS:
        raise UserError(
            f"cannot fetch {name!r}: only {', '.join(DEBIAN_DATASETS)} comes from a package"
        )
    package, inside = DEBIAN_DATASETS[name]
    system_dir, cached = system_dataset_dir(name), user_dataset_dir(name)
    present = (cached if holds_idx_dataset(cached) else None) if user else find_dataset_folder(name)
    if present is not None:
        log(f"{name} is already in {present}")
        return present, "present"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FetchError(
            f"apt-get and dpkg-deb are needed to fetch {package} (Debian/Ubuntu); "
            "pass --data-dir with the IDX files instead"
        )
    if not user and os.geteuid() == 0:
        try:
            _run(["apt-get", "update"], log)
            _run(["apt-get", "install", "-y", "--no-install-recommends", package], log)
        except FetchError as err:
            log(f"{err}; extracting {package} into {cached} instead")
        else:
            if holds_idx_dataset(system_dir):
                return system_dir, "installed"
            log(f"{package} installed no IDX files in {system_dir}; extracting it instead")
    return _extract_to_cache(package, inside, cached, log), "extracted"


def _extract_to_cache(package: str, inside: str, target: Path, log) -> Path:
    """``apt-get download`` + ``dpkg-deb -x``; the package's folder ``inside`` (relative to
    the root) becomes ``target``."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent)
    except OSError as err:
        raise FetchError(f"cannot write the user cache {target.parent}: {err.strerror}") from None
    with staging as tmp:
        work = Path(tmp)
        deb = _download(package, work, log)
        root = work / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)], log)
        extracted = root / inside
        if not holds_idx_dataset(extracted):
            raise FetchError(f"{deb.name} holds no train and test IDX files in /{inside}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(extracted, target)
    log(f"extracted {package} into {target}")
    return target


def _download(package: str, work: Path, log) -> Path:
    """The package's ``.deb`` in ``work``; private package lists when the system's fail."""
    try:
        _run(["apt-get", "download", package], log, cwd=work)
    except FetchError as err:
        # A machine whose lists were never updated (a fresh container): update a private
        # copy of them, which needs no root.
        log(f"{err}; updating private package lists")
        lists, cache = work / "lists", work / "cache"
        (lists / "partial").mkdir(parents=True)
        (cache / "archives" / "partial").mkdir(parents=True)
        options = ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache}"]
        _run(["apt-get", *options, "update"], log, cwd=work)
        _run(["apt-get", *options, "download", package], log, cwd=work)
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        raise FetchError(f"apt-get download {package} left no .deb file")
    return debs[-1]


def _run(command: list[str], log, cwd: Path | None = None) -> None:
    """Run one command quietly; a failure raises `FetchError` with its last error line."""
    shown = " ".join(w for w in command if w != "-o" and not w.startswith("Dir::"))
    log("running " + shown)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FetchError(f"`{shown}` failed: {err}") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise FetchError(f"`{shown}` failed: {reason}")
