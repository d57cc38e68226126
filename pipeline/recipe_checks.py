"""The ranges of recipe values, checked at load before any work (pipeline.config calls `check`).

Types are the schema's business (pipeline/config.py); here every value is checked to make
sense: finite floats, positive counts and intervals, probabilities in [0, 1), Adam's betas
in [0, 1), and a U-Net that can be built (widths divisible by the 32 GroupNorm groups, a
non-empty ch_mult, a resolution that the down-sampling divides). No torch here.
"""

from __future__ import annotations

import math
import re
from typing import Callable

from pipeline.presets import PRESETS

MAX_TIMESTEPS = 100_000
# Counts of modules a config (also a downloaded one) makes the U-Net build, one Python object each:
# the paper's largest model has 4 levels of 2 blocks.
MAX_COUNT = 64
GN_GROUPS = 32  # pipeline.unet.GN_GROUPS (the paper's GroupNorm(32)); unet.py imports torch


def check(r, need: Callable[[bool, str, str], None]) -> None:
    """`r` is a pipeline.config.Recipe; `need(ok, key, what)` raises the RecipeError."""
    _floats_finite(r, need)
    _model(r.model, need)
    # Bounded: the schedule's tables are built before anything else is checked (the paper's T is 1000).
    need(0 < r.diffusion.timesteps <= MAX_TIMESTEPS, "diffusion.timesteps", f"must be in 1..{MAX_TIMESTEPS}")
    need(0 < r.diffusion.beta_start < r.diffusion.beta_end < 1, "diffusion.beta_end",
         "need 0 < beta_start < beta_end < 1")
    _learned_variance(r, need)
    d = r.data
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    need(d.max_corrupt >= 0, "data.max_corrupt", "must be >= 0")
    _train(r.train, need)
    hub = r.run.push_to_hub
    need(hub is None or re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", hub) is not None, "run.push_to_hub",
         f"{hub!r} is not a Hub repo id (namespace/name)")
    e = r.eval
    need(e.num_samples > 0, "eval.num_samples", "must be positive")
    for key in ("batch_size", "ddim_steps", "nll_batch_size", "nll_t_batch"):
        need(getattr(e, key) >= 1, f"eval.{key}", "must be at least 1")
    if e.sampler == "ddim":
        need(e.ddim_steps <= r.diffusion.timesteps, "eval.ddim_steps", "must be <= diffusion.timesteps")
    need(e.fid_reference_count is None or e.fid_reference_count >= 2, "eval.fid_reference_count",
         "must be at least 2 (a covariance needs two images)")


def _train(t, need) -> None:
    need(t.global_batch_size > 0, "train.global_batch_size", "must be positive")
    need(t.micro_batch_size is None or t.micro_batch_size > 0, "train.micro_batch_size", "must be positive")
    need(t.max_steps > 0, "train.max_steps", "must be positive")
    need(t.lr > 0, "train.lr", "must be positive")
    need(t.grad_clip > 0, "train.grad_clip", "must be positive (the paper clips at 1.0)")
    need(all(0.0 <= b < 1.0 for b in t.adam_betas), "train.adam_betas", "each must be in [0, 1)")
    need(t.adam_eps > 0, "train.adam_eps", "must be positive")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
    need(t.log_every >= 1, "train.log_every", "must be at least 1")
    need(t.sample_every >= 0, "train.sample_every", "must be >= 0 (0: no sample grids)")
    need(t.sample_count >= 1, "train.sample_count", "must be at least 1")
    need(t.checkpoint_every > 0, "train.checkpoint_every", "must be positive")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1")
    need(t.snapshot_every >= 0, "train.snapshot_every", "must be 0 (off) or positive")
    need(t.max_nonfinite >= 1, "train.max_nonfinite", "must be at least 1")
    need(t.clip_replicas > 0 and (t.clip_scope == "global" or t.global_batch_size % t.clip_replicas == 0),
         "train.clip_replicas", f"must be positive and divide global_batch_size {t.global_batch_size}")


def _floats_finite(r, need) -> None:
    for section in ("model", "diffusion", "data", "train", "eval"):
        for key, value in vars(getattr(r, section)).items():
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                need(False, f"{section}.{key}", f"must be finite, got {value}")


def _model(m, need) -> None:
    if m.preset is None and m.resolution is None:
        return  # reported by the caller, with the preset
    if m.preset is not None and m.preset not in PRESETS:
        return  # reported by the caller, with the closest preset
    k = m.unet_kwargs()
    need(k["resolution"] >= 1, "model.resolution", "must be positive")
    for key in ("in_channels", "out_channels", "num_res_blocks"):
        if key in k:
            need(1 <= k[key] <= MAX_COUNT, f"model.{key}", f"must be in 1..{MAX_COUNT}")
    if "ch" in k:
        need(k["ch"] >= 1 and k["ch"] % GN_GROUPS == 0, "model.ch",
             f"must be a positive multiple of {GN_GROUPS} (GroupNorm groups), got {k['ch']}")
    if "ch_mult" in k:
        mult = k["ch_mult"]
        need(len(mult) >= 1, "model.ch_mult", "must not be empty")
        need(len(mult) <= MAX_COUNT, "model.ch_mult", f"must hold at most {MAX_COUNT} levels")
        need(all(x >= 1 for x in mult), "model.ch_mult", "every multiplier must be at least 1")
        need(k["resolution"] % 2 ** (len(mult) - 1) == 0, "model.resolution",
             f"{k['resolution']} is not divisible by 2**{len(mult) - 1} (one halving per ch_mult level after the first)")
    if "dropout" in k:
        need(0.0 <= k["dropout"] < 1.0, "model.dropout", "must be in [0, 1)")


def _learned_variance(r, need) -> None:
    """A learned Sigma is trained by the bound only, and its network outputs mean and log-variance."""
    d = r.diffusion
    if d.var_type == "learned":
        need(d.loss_type == "vlb", "diffusion.loss_type",
             f"var_type 'learned' is trained with the bound L: set loss_type: vlb (got '{d.loss_type}')")
    if r.model.preset not in PRESETS and r.model.resolution is None:
        return  # reported above
    k = r.model.unet_kwargs()
    c_in, c_out = k.get("in_channels", 3), k.get("out_channels", 3)
    want = 2 * c_in if d.var_type == "learned" else c_in
    need(c_out == want, "model.out_channels",
         f"var_type '{d.var_type}' needs {want} output channels for {c_in} input channels, got {c_out}"
         + (" (set model.out_channels: 6 for a learned Sigma on RGB)" if d.var_type == "learned" else ""))
