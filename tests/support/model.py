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


# The layers the original initialises at scale 1e-10 (pipeline.unet._init with scale=0): each
# residual block's last conv, each attention output and the final conv.
ZERO_INIT = ("conv2.weight", "proj_out.weight", "conv_out.weight")


def redraw_zero_init(model: UNet) -> UNet:
    """Re-draw the near-zero layers at scale 1 (xavier uniform, as `_init` with scale 1).

    A freshly built U-Net predicts ~1e-5 everywhere, so a test comparing two paths through it
    compares zeros; after this its eps prediction has std ~0.8 (real, input-dependent output)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(ZERO_INIT):
                torch.nn.init.xavier_uniform_(p)
    return model


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

    The original's near-zero layers are re-drawn (`redraw_zero_init`): the model's eps prediction
    has std ~0.8, so precision and layout comparisons of its samples measure real output."""
    recipe = recipe or tiny_recipe()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build.unet(recipe.model)
    redraw_zero_init(model)
    save_recipe(recipe, folder / "config.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "ema.safetensors"))
    return folder
