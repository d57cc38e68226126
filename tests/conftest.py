"""Shared fixtures: small and generic (tiny U-Nets, seeded generators, oracle models).
The helpers behind them live in tests/support/."""

import pytest
import torch

from support.model import tiny_unet as _tiny_unet
from support.oracle import EpsOracle, on_8bit_grid

# The `hub` fixture: a real Hub server on localhost for the Hub tests.
pytest_plugins = ["support.hub"]


@pytest.fixture
def tiny_unet():
    """A factory: tiny_unet(seed=0, **overrides) -> UNet in eval mode (16x16, ch 32)."""
    return _tiny_unet


@pytest.fixture
def gen():
    """A factory: gen(seed) -> a CPU torch.Generator seeded with `seed`."""
    return lambda seed=0: torch.Generator().manual_seed(seed)


@pytest.fixture
def eps_oracle():
    """The class EpsOracle: eps_oracle(diffusion, x_star) is a model(x_t, t)."""
    return EpsOracle


@pytest.fixture
def grid():
    """on_8bit_grid(x): snap to the 8-bit grid in [-1, 1]."""
    return on_8bit_grid


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip cleanly on a machine without a CUDA GPU (CI)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
