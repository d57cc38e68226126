"""What every eval subcommand shares: loading the model, processes, seeds, precision, errors."""

from __future__ import annotations

import argparse
import contextlib
import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError


class EvalError(UserError, ValueError):
    """Bad input to an evaluation: the CLI prints the one-line message and exits 2."""


@dataclass
class Loaded:
    model: torch.nn.Module
    diffusion: Any
    recipe: Any
    source: str


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="run directory (newest checkpoint), checkpoint directory, "
                   ".safetensors file (config.yaml beside it) or Hub repo id namespace/name")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--out", required=True, help="output directory (results.json is written here)")
    p.add_argument("--device", default=None, help="torch device; default: the process's accelerator device")
    # Testing hook: `module:function`, called as function(src) -> Loaded-like object with
    # .model, .diffusion, .recipe instead of load_pretrained. The NLL test feeds the analytic
    # oracle of a one-image data set through the real CLI this way.
    p.add_argument("--model-factory", default=None, help=argparse.SUPPRESS)


def load_model(src: str, revision: str | None = None, factory: str | None = None) -> Loaded:
    if factory:
        mod_name, _, fn_name = factory.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise EvalError(f"--model-factory {factory}: cannot import ({e})") from None
        got = fn(src)
        return Loaded(got.model, got.diffusion, got.recipe, str(src))
    from pipeline.hub import load_pretrained

    try:
        got = load_pretrained(src, revision=revision)
    except (FileNotFoundError, ValueError, KeyError) as e:  # hub.LoadError, RecipeError
        msg = str(e).splitlines()[0] if str(e) else repr(e)
        raise EvalError(msg if str(src) in msg else f"{src}: {msg}") from None
    model = got.model.eval().requires_grad_(False)
    return Loaded(model, got.diffusion, got.recipe, str(src))


def accelerator():
    """The processes' Accelerator. Without a GPU it must be told `cpu=True`, or processes started
    by torchrun / `accelerate launch` would each believe they are alone (gloo over CPU)."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


class Precision(torch.nn.Module):
    """Runs the wrapped model under autocast (bf16/fp16) and returns float32, so the sampler's
    arithmetic (eq. 11 / Algorithm 2) stays in float32; 'no' calls the model unchanged."""

    def __init__(self, model: torch.nn.Module, mode: str, device: torch.device):
        super().__init__()
        self.model, self.mode, self.device_type = model, mode, torch.device(device).type

    def forward(self, x, t):
        if self.mode == "no":
            return self.model(x, t)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.mode]
        with torch.autocast(self.device_type, dtype=dtype):
            return self.model(x, t).float()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B, C, H, W] -> uint8 [B, H, W, C], rounding as the original code does."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@contextlib.contextmanager
def no_grad_eval(model):
    model.eval()
    with torch.inference_mode():
        yield
