"""Sampling from a GaussianDiffusion: Algorithm 2 (ancestral), progressive generation,
DDIM (beyond the paper), and interpolation in x_t space (Fig. 8).

Functions take the diffusion object first; `GaussianDiffusion` exposes them as methods.
A `generator` is one `torch.Generator` or a list of B generators (one noise stream per sample,
so a sample does not depend on the batch it is drawn in).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from pipeline.rng import randn_like_batch


def maybe_tqdm(it, progress: bool, **kw):
    # mininterval: a bar in a log file (Slurm) adds a line per refresh; every 2 s is enough
    return tqdm(it, mininterval=2.0, **kw) if progress else it


def _device_of(generator, device, model=None):
    """Where to draw x_T: `device`, else the generator's device, else the model's, else CPU."""
    if device is not None:
        return torch.device(device)
    g = generator[0] if isinstance(generator, (list, tuple)) else generator
    if g is not None:
        return g.device
    params = getattr(model, "parameters", None)
    first = next(params(), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def p_sample(diffusion, model, x_t, t, noise, clip_denoised: bool = True):
    """One step of Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z (no noise at t = 0).

    Returns (x_{t-1}, pred_x0).
    """
    p = diffusion.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise, p["pred_x0"]


@torch.no_grad()
def sample_from(diffusion, model, x_t, t_start: int, generator=None, progress: bool = False,
                callback: Optional[Callable] = None, noise_fn: Optional[Callable] = None):
    """Run the reverse process from x_t at (0-based) step t_start down to x_0."""
    x = x_t
    B = x.shape[0]
    for i in maybe_tqdm(range(t_start, -1, -1), progress, desc="sampling", total=t_start + 1):
        t = torch.full((B,), i, dtype=torch.long, device=x.device)
        if i > 0:
            noise = noise_fn(x.shape) if noise_fn else randn_like_batch(x.shape, generator, x.device, x.dtype)
        else:
            noise = torch.zeros_like(x)  # the last step is the noiseless mean
        x_prev, pred_x0 = p_sample(diffusion, model, x, t, noise)
        if callback is not None:
            callback(i, x, pred_x0)  # progressive generation (Fig. 6): x_t and its predicted x_0
        x = x_prev
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def p_sample_loop(diffusion, model, shape, generator=None, progress: bool = False,
                  callback: Optional[Callable] = None, device=None, x_T=None):
    """Algorithm 2: x_T ~ N(0, I), then T ancestral steps. Returns x_0 in [-1, 1].

    `callback(t, x_t, pred_x0)` is called at every step t = T-1 .. 0.
    """
    device = _device_of(generator, device, model)
    x = x_T if x_T is not None else randn_like_batch(tuple(shape), generator, device)
    return sample_from(diffusion, model, x, diffusion.num_timesteps - 1, generator, progress, callback)


@torch.no_grad()
def ddim_sample_loop(diffusion, model, shape, steps: int, eta: float = 0.0, generator=None,
                     progress: bool = False, device=None, x_T=None, callback: Optional[Callable] = None):
    """DDIM (Song et al. 2021), BEYOND THE PAPER: `steps` evenly spaced steps, eta=0 deterministic,
    eta=1 matches the ancestral variance (beta-tilde) on the sub-sequence.

    `callback(t, x_t, pred_x0)` is called at every step taken, as in `p_sample_loop`."""
    T = diffusion.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"ddim_sample_loop: steps={steps} must lie in [1, {T}]")
    device = _device_of(generator, device, model)
    x = x_T if x_T is not None else randn_like_batch(tuple(shape), generator, device)
    ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().unique().tolist()[::-1]
    acp = diffusion.coef("alphas_cumprod")
    B = x.shape[0]
    for j, i in enumerate(maybe_tqdm(ts, progress, desc="ddim")):
        t = torch.full((B,), i, dtype=torch.long, device=x.device)
        p = diffusion.p_mean_variance(model, x, t, clip_denoised=True)
        x0 = p["pred_x0"]
        if callback is not None:
            callback(i, x, x0)
        eps = diffusion.predict_eps_from_x0(x, t, x0)
        a_t = float(acp[i])
        a_prev = float(acp[ts[j + 1]]) if j + 1 < len(ts) else 1.0
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev ** 0.5 * x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * randn_like_batch(x.shape, generator, x.device, x.dtype)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def interpolate(diffusion, model, x0_a, x0_b, lambdas, t: int = 499, generator=None,
                progress: bool = False):
    """Fig. 8: encode x0_a, x0_b to x_t ~ q(x_t | x_0), decode (1 - l) x_t + l x_t' for each l.

    `t` is 0-based like every step index here: the default 499 is the paper's t = 500.

    x0_a, x0_b: [N, C, H, W] pairs. The reverse-process noise is shared across the lambdas
    of a pair (as in the paper's figure), so rows differ only by the interpolated latent.
    Returns [N, L, C, H, W] in [-1, 1].
    """
    lam = torch.as_tensor(lambdas, dtype=x0_a.dtype, device=x0_a.device)
    N, L = x0_a.shape[0], lam.numel()
    tt = torch.full((N,), t, dtype=torch.long, device=x0_a.device)
    x_a = diffusion.q_sample(x0_a, tt, randn_like_batch(x0_a.shape, generator, x0_a.device, x0_a.dtype))
    x_b = diffusion.q_sample(x0_b, tt, randn_like_batch(x0_b.shape, generator, x0_b.device, x0_b.dtype))
    lam = lam.reshape(1, L, 1, 1, 1)
    x = ((1 - lam) * x_a[:, None] + lam * x_b[:, None]).reshape(N * L, *x0_a.shape[1:])

    def shared_noise(shape):
        z = randn_like_batch((N, *shape[1:]), generator, x.device, x.dtype)
        return z[:, None].expand(N, L, *shape[1:]).reshape(shape)

    out = sample_from(diffusion, model, x, t, progress=progress, noise_fn=shared_noise)
    return out.reshape(N, L, *x0_a.shape[1:])
