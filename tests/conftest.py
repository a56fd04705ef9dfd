from __future__ import annotations

import jax
import pytest


@pytest.fixture
def x64():
    """Run a test with 64-bit JAX arrays (for checks at high precision)."""
    with jax.enable_x64(True):
        yield
