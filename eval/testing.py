"""Small real things the eval tests (and a curious user) build: a tiny checkpoint in our layout,
a tiny seeded feature extractor for torch-fidelity, and the analytic oracle of a one-image
data set, whose NLL bound has a closed form (used through `--model-factory`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import build

TINY_MODEL = dict(resolution=8, ch=32, ch_mult=[1], num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def tiny_recipe(timesteps: int = 20, shards: str = "", var_type: str = "fixed_large", **model):
    from pipeline.config import Recipe

    return Recipe.from_dict({
        "model": {**TINY_MODEL, **model},
        "diffusion": {"timesteps": timesteps, "var_type": var_type},
        "data": {"shards": shards},
        "eval": {"num_samples": 16, "batch_size": 4, "nll_batch_size": 4, "nll_t_batch": 5},
    }, source="<tiny>")


def make_checkpoint(folder: str | os.PathLike, recipe=None, seed: int = 0) -> Path:
    """folder/config.yaml + folder/ema.safetensors with a randomly initialised (seeded) UNet.

    The last conv of the original U-Net starts near zero; it is re-drawn here so the tiny model
    gives non-trivial outputs (samples that differ from pure noise predictions)."""
    from safetensors.torch import save_file

    from pipeline.config import save_recipe

    recipe = recipe or tiny_recipe()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build.unet(recipe.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 and p.abs().max() < 1e-6:
                p.normal_(0, 0.02)
    save_recipe(recipe, folder / "config.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "ema.safetensors"))
    return folder


# ---------------------------------------------------------------------------- FID tests


def _feature_extractor_cls():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class TinyFeatures(FeatureExtractorBase):
        """A fixed random conv net (seed 0): uint8 [B, 3, H, W] -> 16 features. Not Inception;
        it lets fast tests run torch-fidelity's real code path in milliseconds."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            g = torch.Generator().manual_seed(0)
            self.w1 = torch.nn.Parameter(torch.randn(8, 3, 3, 3, generator=g) / 5, requires_grad=False)
            self.w2 = torch.nn.Parameter(torch.randn(16, 8, 3, 3, generator=g) / 8, requires_grad=False)

        def forward(self, x):
            x = x.double() / 127.5 - 1
            x = torch.tanh(torch.nn.functional.conv2d(x, self.w1.double(), padding=1))
            x = torch.tanh(torch.nn.functional.conv2d(x, self.w2.double(), padding=1))
            return (x.mean((2, 3)).float(),)

        @staticmethod
        def get_provided_features_list():
            return ("16",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "16"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    return TinyFeatures


def __getattr__(name):  # `eval.testing:TinyFeatures` for the CLI's hidden --feature-extractor
    if name == "TinyFeatures":
        return _feature_extractor_cls()
    raise AttributeError(name)


def register_tiny_features(name: str = "tiny-seeded") -> str:
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, _feature_extractor_cls())
    return name


# ---------------------------------------------------------------------------- NLL oracle


class OracleEps(torch.nn.Module):
    """The exact eps-prediction for data that is one fixed image x*: q(x_0 | x_t) is a point
    mass, so eps(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t) (eq. 4 solved for eps)."""

    def __init__(self, x_star: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("x_star", x_star.double()[None])
        self.register_buffer("acp", alphas_cumprod.double())

    def forward(self, x_t, t):
        a = self.acp.to(x_t.device)[t].reshape(-1, 1, 1, 1)
        eps = (x_t.double() - a.sqrt() * self.x_star.to(x_t.device)) / (1 - a).sqrt()
        return eps.to(x_t.dtype)


@dataclass
class _Oracle:
    model: Any
    diffusion: Any
    recipe: Any


def oracle_factory(src: str) -> _Oracle:
    """`--model-factory eval.testing:oracle_factory`: src is a folder with config.yaml whose
    data.shards hold exactly one test image x*; returns the exact model for that data."""
    from eval.nll import iter_float
    from pipeline.config import load_recipe

    recipe = load_recipe(Path(src) / "config.yaml")
    images = torch.cat(list(iter_float(recipe.data.shards, recipe.eval.nll_split, 4)))
    if len(images) != 1:
        raise ValueError(f"{src}: the oracle needs exactly one {recipe.eval.nll_split} image, found {len(images)}")
    d = build.diffusion(recipe.diffusion)
    return _Oracle(OracleEps(images[0], d.alphas_cumprod), d, recipe)


def oracle_bpd(x_star: torch.Tensor, diffusion, exact_cdf: bool = False) -> dict:
    """Closed form of the bound for the oracle, in bits/dim (float64, no sampling):
    L_T = KL(N(sqrt(abar_T) x*, 1 - abar_T) || N(0, 1));
    L_{t-1} = KL between two Gaussians with the same mean (the oracle's mean is exactly the
    posterior mean, eq. 7) = 0.5 (s/v - 1 - log(s/v)), s = beta-tilde_t, v = the model variance;
    L_0 = -log of the decoder bin probability (eq. 13) of each pixel under N(x*, sigma_1^2)."""
    from scipy.stats import norm

    b = diffusion.betas.double()
    acp = torch.cumprod(1 - b, 0)
    T = len(b)
    x = x_star.double().flatten()
    aT = acp[-1]
    prior = (0.5 * (-1 - torch.log(1 - aT) + (1 - aT) + aT * x ** 2)).mean() / math.log(2)
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    post = b * (1 - acp_prev) / (1 - acp)
    var = post.clone() if diffusion.var_type == "fixed_small" else b.clone()
    var[0] = post[1]  # the decoder's variance at t = 0 (the original's clipped log variance)
    ratio = post[1:] / var[1:]
    kl_terms = 0.5 * (ratio - 1 - torch.log(ratio)) / math.log(2)  # per dim, t = 1..T-1
    sd = float(var[0].sqrt())
    if exact_cdf:
        cdf = lambda z: torch.from_numpy(norm.cdf(z.numpy()))
    else:  # the tanh approximation of Phi that the original (and pipeline.diffusion) uses
        cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    hi = torch.where(x > 0.999, torch.ones_like(x), cdf(torch.full_like(x, 1 / 255 / sd)))
    lo = torch.where(x < -0.999, torch.zeros_like(x), cdf(torch.full_like(x, -1 / 255 / sd)))
    l0 = (-torch.log(hi - lo)).mean() / math.log(2)
    return {"prior": float(prior), "L_0": float(l0), "L_1_to_T-1": float(kl_terms.sum()),
            "total": float(prior + l0 + kl_terms.sum()), "T": T}


# ---------------------------------------------------------------------------- shards


def make_shards(folder: str | os.PathLike, n: int = 12, size: int = 8, test_count: int = 1, seed: int = 0,
                smooth: bool = True) -> Path:
    """Real shards through `python -m data_prep folder`: n PNG images (smooth random colour
    gradients, so a small model can learn them), `test_count` of them in the test split."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    for i in range(n):
        if smooth:
            c0, cx, cy = g.uniform(0, 255, 3), g.uniform(-120, 120, 3), g.uniform(-120, 120, 3)
            im = c0 + cx * xx[..., None] + cy * yy[..., None]
        else:
            im = g.uniform(0, 255, (size, size, 3))
        Image.fromarray(np.clip(im, 0, 255).round().astype(np.uint8)).save(images / f"img{i:04d}.png")
    out = folder / "shards"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "data_prep", "folder", "--images", str(images), "--out", str(out),
                        "--resolution", str(size), "--test-count", str(test_count), "--no-progress"],
                       cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    if r.returncode != 0:
        raise RuntimeError(f"data_prep failed: {r.stderr[-2000:]}")
    return out
