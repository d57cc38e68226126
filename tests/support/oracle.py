"""Exact answers to check the method against: the eps of a one-image data set, the closed form
of its bound, the 8-bit grid."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from eval.nll import iter_float
from pipeline import build
from pipeline.config import load_recipe
from pipeline.hub import Pretrained


def on_8bit_grid(x: torch.Tensor) -> torch.Tensor:
    """Snap data in [-1, 1] to the 256 levels of 8-bit images (what the decoder of eq. 13 models)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


class EpsOracle(torch.nn.Module):
    """The exact eps for a data set of one image x*: q(x_0 | x_t) is a point mass, so
    eps(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t) (eq. 4 solved for eps), in float64.

    A module (buffers, no parameters), so the eval code can move it, autocast it and hash it."""

    def __init__(self, diffusion, x_star: torch.Tensor):
        """x_star: one image [C, H, W], or [B, C, H, W] broadcast against the model's batch."""
        super().__init__()
        self.register_buffer("x_star", (x_star[None] if x_star.ndim == 3 else x_star).double())
        self.register_buffer("acp", diffusion.alphas_cumprod.double())

    def forward(self, x_t, t):
        a = self.acp.to(x_t.device)[t].reshape(-1, 1, 1, 1)
        eps = (x_t.double() - a.sqrt() * self.x_star.to(x_t.device)) / (1 - a).sqrt()
        return eps.to(x_t.dtype)


def oracle_factory(src: str) -> Pretrained:
    """`--model-factory support.oracle:oracle_factory`: src is a folder with config.yaml whose
    data.shards hold exactly one test image x*; returns the exact model for that data."""
    recipe = load_recipe(Path(src) / "config.yaml")
    images = torch.cat(list(iter_float(recipe.data.shards, recipe.eval.nll_split, 4)))
    if len(images) != 1:
        raise ValueError(f"{src}: the oracle needs exactly one {recipe.eval.nll_split} image, found {len(images)}")
    d = build.diffusion(recipe.diffusion)
    return Pretrained(EpsOracle(d, images[0]), d, recipe, str(src))


def oracle_bpd(x_star: torch.Tensor, diffusion, exact_cdf: bool = False) -> dict:
    """Closed form of the bound for the oracle, in bits/dim (float64, no sampling):
    L_T = KL(N(sqrt(abar_T) x*, 1 - abar_T) || N(0, 1));
    L_{t-1} = KL between two Gaussians with the same mean (the oracle's mean is exactly the
    posterior mean, eq. 7) = 0.5 (s/v - 1 - log(s/v)), s = beta-tilde_t, v = the model variance;
    L_0 = -log of the decoder bin probability (eq. 13) of each pixel under N(x*, sigma_1^2)."""
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
    if exact_cdf:  # Phi itself: erf is exact to float64 rounding
        cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    else:  # the tanh approximation of Phi that the original (and pipeline.diffusion) uses
        cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    hi = torch.where(x > 0.999, torch.ones_like(x), cdf(torch.full_like(x, 1 / 255 / sd)))
    lo = torch.where(x < -0.999, torch.zeros_like(x), cdf(torch.full_like(x, -1 / 255 / sd)))
    l0 = (-torch.log(hi - lo)).mean() / math.log(2)
    return {"prior": float(prior), "L_0": float(l0), "L_1_to_T-1": float(kl_terms.sum()),
            "total": float(prior + l0 + kl_terms.sum()), "T": T}


class LearnedVarianceOracle(torch.nn.Module):
    """A learned-Sigma model (2C output channels): the exact eps of `EpsOracle` and, as its
    log-variance, the true posterior log beta-tilde_t (eq. 7; at t = 0 the original's clipped
    value log beta-tilde_1). Its bound is the fixed_small oracle's closed form: every KL term is 0."""

    def __init__(self, diffusion, x_star: torch.Tensor):
        super().__init__()
        self.eps = EpsOracle(diffusion, x_star)
        self.register_buffer("logvar", diffusion.coef("post_logvar").double())

    def forward(self, x_t, t):
        lv = self.logvar.to(x_t.device)[t].reshape(-1, 1, 1, 1).expand_as(x_t)
        return torch.cat([self.eps(x_t, t), lv.to(x_t.dtype)], 1)


def learned_oracle_factory(src: str) -> Pretrained:
    """`--model-factory support.oracle:learned_oracle_factory`: as `oracle_factory`, for a recipe
    with diffusion.var_type learned."""
    p = oracle_factory(src)
    return Pretrained(LearnedVarianceOracle(p.diffusion, p.model.x_star[0]), p.diffusion, p.recipe, p.source)
