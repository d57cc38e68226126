"""The one tiny U-Net configuration of the tests (fast on a few shared CPU cores), and the tiny
recipes and checkpoints built from it that the eval tests load."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline import build
from pipeline.config import Recipe, save_recipe
from pipeline.unet import UNet

# 16x16 images, ch 32, one res block per level, attention at 8x8.
TINY_UNET = dict(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
# The same blocks at 8x8 on a single level, no attention: what the eval tests sample, score and
# bound (up to T = 1000 steps) on 8x8 shards.
TINY_UNET_8PX = dict(TINY_UNET, resolution=8, ch_mult=(1,), attn_resolutions=())


def tiny_unet(seed: int = 0, **overrides) -> UNet:
    """A UNet of TINY_UNET (with overrides) in eval mode, initialised from `seed`."""
    torch.manual_seed(seed)
    return UNet(**{**TINY_UNET, **overrides}).eval()


def tiny_recipe(timesteps: int = 20, shards: str = "", var_type: str = "fixed_large", **model) -> Recipe:
    """A recipe of the 8x8 tiny U-Net (model overrides as keywords) with small eval settings."""
    return Recipe.from_dict({
        "model": {**TINY_UNET_8PX, **model},
        "diffusion": {"timesteps": timesteps, "var_type": var_type},
        "data": {"shards": shards},
        "eval": {"num_samples": 16, "batch_size": 4, "nll_batch_size": 4, "nll_t_batch": 5},
    }, source="<tiny>")


def make_checkpoint(folder: str | os.PathLike, recipe: Recipe | None = None, seed: int = 0) -> Path:
    """folder/config.yaml + folder/ema.safetensors with a randomly initialised (seeded) UNet.

    The last conv of the original U-Net starts near zero; it is re-drawn here so the tiny model
    gives non-trivial outputs (samples that differ from pure noise predictions)."""
    recipe = recipe or tiny_recipe()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build.unet(recipe.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and p.abs().max() < 1e-6:
                p.normal_(0, 0.02)
    save_recipe(recipe, folder / "config.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "ema.safetensors"))
    return folder
