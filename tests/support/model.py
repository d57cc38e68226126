"""The one tiny U-Net configuration of the tests: fast on a few shared CPU cores."""

from __future__ import annotations

import torch

# 16x16 images, ch 32, one res block per level, attention at 8x8.
TINY_UNET = dict(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)


def tiny_unet(seed: int = 0, **overrides):
    """A UNet of TINY_UNET (with overrides) in eval mode, initialised from `seed`."""
    from pipeline.unet import UNet

    torch.manual_seed(seed)
    return UNet(**{**TINY_UNET, **overrides}).eval()
