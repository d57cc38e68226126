"""Shared fixtures: small and generic (tiny U-Nets, seeded generators, oracle models)."""

import pytest
import torch

# The tests run on a few shared CPU cores: small shapes, float32, deterministic seeds.
TINY_UNET = dict(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(8,), dropout=0.0)


@pytest.fixture
def tiny_unet():
    """A factory: tiny_unet(seed=0, **overrides) -> UNet in eval mode (16x16, ch 32)."""
    from pipeline.unet import UNet

    def make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return UNet(**{**TINY_UNET, **overrides}).eval()

    return make


@pytest.fixture
def gen():
    """A factory: gen(seed) -> a CPU torch.Generator seeded with `seed`."""
    return lambda seed=0: torch.Generator().manual_seed(seed)


def on_8bit_grid(x: torch.Tensor) -> torch.Tensor:
    """Snap data in [-1, 1] to the 256 levels of 8-bit images (what the decoder of eq. 13 models)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


class EpsOracle:
    """The exact eps for a data set of one image x*: eps = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""

    def __init__(self, diffusion, x_star: torch.Tensor):
        self.d, self.x_star = diffusion, x_star

    def __call__(self, x_t, t):
        acp = self.d.alphas_cumprod.to(x_t.device)[t].reshape(-1, 1, 1, 1)
        return ((x_t.double() - acp.sqrt() * self.x_star.double()) / (1 - acp).sqrt()).to(x_t.dtype)


@pytest.fixture
def eps_oracle():
    """The class EpsOracle: eps_oracle(diffusion, x_star) is a model(x_t, t)."""
    return EpsOracle


@pytest.fixture
def grid():
    """on_8bit_grid(x): snap to the 8-bit grid in [-1, 1]."""
    return on_8bit_grid
