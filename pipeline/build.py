"""From the typed recipe (pipeline.config, no torch) to the objects it describes."""

from __future__ import annotations

from pipeline.config import DiffusionConfig, ModelConfig
from pipeline.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.unet import UNet


def unet(cfg: ModelConfig, **overrides) -> UNet:
    """The U-Net of a recipe's `model` section (preset and overrides resolved)."""
    return UNet(**{**cfg.unet_kwargs(), **overrides})


def diffusion(cfg: DiffusionConfig) -> GaussianDiffusion:
    """The forward and reverse process of a recipe's `diffusion` section (Sec. 4's linear schedule)."""
    betas = linear_beta_schedule(cfg.timesteps, cfg.beta_start, cfg.beta_end)
    return GaussianDiffusion(betas, mean_type=cfg.mean_type, var_type=cfg.var_type, loss_type=cfg.loss_type)
