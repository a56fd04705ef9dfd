from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import pytest

from cvxdist.cli import main
from cvxdist.solvers.costs import RATES_ENV

# `auto` chooses from measured speeds, which vary with this machine's load: pin them, so that
# two runs compared by a test (and the subprocesses they start) choose the same solver.
os.environ[RATES_ENV] = "reference"
# The tests' programs are small and mostly compiled once: skip LLVM's costly optimisations
# (the suite takes about 20 % less CPU; IEEE semantics are kept, XLA's CPU code is not
# fast-math). Subprocesses inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    ]
).strip()


@pytest.fixture(autouse=True, scope="module")
def _drop_compilation_caches():
    """Drop JAX's compilation caches after each test module: one pytest process compiles
    thousands of programs (a whole run once aborted inside native code after ~520 tests, a
    crash no single test reproduces); later modules never reuse another module's programs."""
    yield
    jax.clear_caches()


@pytest.fixture
def x64():
    """Run a test with 64-bit JAX arrays (for checks at high precision)."""
    with jax.enable_x64(True):
        yield


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """``cli(*args)`` runs ``cvxdist ARGS`` in this process: exit status, stdout, stderr."""

    def run(*argv: object) -> CliResult:
        capsys.readouterr()  # only this command's output
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a hash of its bytes (folders: ``"dir"``)."""
    root = Path(root)
    if not root.exists():
        return {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    snapshot = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_dir():
            snapshot[key] = "dir"
        else:
            snapshot[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return snapshot


def without_timings(value: object) -> object:
    """A JSON-like tree without the entries that measure time (equal across reruns)."""
    if isinstance(value, dict):
        return {
            k: without_timings(v)
            for k, v in value.items()
            if not any(word in k for word in ("time", "latency", "utc", "load_average"))
            and not k.endswith(("_s", "_ms"))
        }
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


# A Python prelude for `kill_when_blocked`: `block_after(module, name, calls)` replaces
# module.name by a wrapper that, once the real function has returned `calls` times, writes
# the marker file and sleeps (the parent then kills the process), or with before=True
# blocks on the `calls`-th call before running it.
KILL_PRELUDE = """
import functools, importlib, os, sys, time

def block_after(module, name, calls, before=False):
    target = importlib.import_module(module)
    real = getattr(target, name)
    count = [0]

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        count[0] += 1
        if before and count[0] == calls:
            _block()
        result = real(*args, **kwargs)
        if not before and count[0] == calls:
            _block()
        return result

    setattr(target, name, wrapper)

def _block():
    with open(os.environ["KILL_MARKER"], "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(3600)
"""


def kill_when_blocked(setup: str, argv: list[str], marker: Path, timeout: float = 600) -> None:
    """Run ``cvxdist ARGV`` in a subprocess after ``setup`` (Python using ``block_after``);
    SIGKILL it as soon as it blocks (the marker appears). Fails if it ends by itself."""
    script = KILL_PRELUDE + setup + "\nfrom cvxdist.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = dict(os.environ, KILL_MARKER=str(marker), JAX_PLATFORMS="cpu")
    log = marker.with_name(marker.name + ".log")
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", script, *argv], env=env, stdout=output, stderr=output
        )
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"ended by itself ({process.returncode}):\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail("never blocked")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
