"""What every eval subcommand shares: the model to evaluate, the one rule for its settings, the
processes, autocast, the reference data's manifest and the image format of samples."""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError, one_line
from pipeline.hub import Pretrained, load_pretrained


class EvalError(UserError):
    """Bad input to an evaluation: the CLI prints the one-line message and exits 2."""


def resolve(value: Any, recipe, key: str, default: Any = None) -> Any:
    """The one rule for an eval setting: the command-line `value`, else the recipe's dotted `key`
    (e.g. "eval.seed"), else `default`. None means "not given" at every level."""
    if value is not None:
        return value
    section, _, name = key.partition(".")
    value = getattr(getattr(recipe, section), name)
    return default if value is None else value


def add_model_args(p: argparse.ArgumentParser, optional_src: bool = False) -> None:
    p.add_argument("src", nargs="?" if optional_src else None, default=None,
                   help="run directory (newest checkpoint), checkpoint directory, snapshot "
                   "(RUN/snapshots/step-N.safetensors), .safetensors file (config.yaml beside it) "
                   "or Hub repo id namespace/name")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--out", required=True, help="output directory (results.json is written here)")
    p.add_argument("--device", default=None, help="torch device; default: the process's accelerator device")
    # Testing hook: `module:function`, called as function(src) -> a Pretrained (model, diffusion,
    # recipe) instead of load_pretrained. The NLL test feeds the analytic oracle of a one-image
    # data set through the real CLI this way.
    p.add_argument("--model-factory", default=None, help=argparse.SUPPRESS)


def load_model(src: str, revision: str | None = None, factory: str | None = None) -> Pretrained:
    """The model to evaluate (eval mode, no gradients); its source is recorded as the user named it."""
    if factory:
        mod_name, _, fn_name = factory.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise EvalError(f"--model-factory {factory}: cannot import ({e})") from None
        got = fn(src)
    else:
        try:
            got = load_pretrained(src, revision=revision)
        except UserError as e:  # LoadError, or a RecipeError in the checkpoint's config.yaml
            msg = one_line(e)
            raise EvalError(msg if str(src) in msg else f"{src}: {msg}") from None
    return Pretrained(got.model.eval().requires_grad_(False), got.diffusion, got.recipe, str(src))


def accelerator():
    """The processes' Accelerator. Without a GPU it must be told `cpu=True`, or processes started
    by torchrun / `accelerate launch` would each believe they are alone (gloo over CPU)."""
    from accelerate import Accelerator  # imported here: `python -m eval --help` stays fast

    return Accelerator(cpu=not torch.cuda.is_available())


class Precision(torch.nn.Module):
    """Runs the wrapped model under autocast (bf16/fp16) and returns float32, so the sampler's
    arithmetic (eq. 11 / Algorithm 2) stays in float32; 'no' calls the model unchanged."""

    def __init__(self, model: torch.nn.Module, mode: str, device: torch.device):
        super().__init__()
        self.model, self.mode, self.device_type = model, mode, torch.device(device).type

    def forward(self, x, t):
        if self.mode in ("no", "fp32"):
            return self.model(x, t)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.mode]
        with torch.autocast(self.device_type, dtype=dtype):
            return self.model(x, t).float()


def manifest_path(shards: str | os.PathLike) -> Path:
    """The manifest.json of a data_prep shard directory (or the manifest itself): its hash names
    the reference data in every protocol."""
    p = Path(shards)
    m = p / "manifest.json" if p.is_dir() else p
    if not m.is_file():
        raise EvalError(f"{shards}: no manifest.json (the reference set is a data_prep shard directory)")
    return m


def check_resolution(shards: str | os.PathLike, split: str, recipe) -> None:
    """A split of another resolution than the model's is refused: its numbers would mean nothing."""
    want = recipe.model.unet_kwargs()["resolution"]
    try:
        got = json.loads(manifest_path(shards).read_text()).get("resolution")
    except ValueError as e:
        raise EvalError(f"{manifest_path(shards)}: unreadable manifest ({e})") from None
    if got is not None and int(got) != int(want):
        raise EvalError(f"{shards}: the '{split}' split is {got}x{got}, the model makes {want}x{want} images")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B, C, H, W] -> uint8 [B, H, W, C], rounding as the original code does."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
