"""Exact answers to check the method against: the eps of a one-image data set, the 8-bit grid."""

from __future__ import annotations

import torch


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
