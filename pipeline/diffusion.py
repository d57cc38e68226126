"""The DDPM method as pure tensor math (Ho, Jain, Abbeel 2020): no I/O, no Accelerate.

Follows the original `diffusion_utils_2.py`. Time steps are 0-based: `t = 0` is the paper's
t = 1. The schedule and every coefficient are computed in float64 and cast to the data's
dtype when gathered. A model is any callable `model(x_t, t) -> Tensor` with `t` a LongTensor.

Sampling loops (Algorithm 2, progressive generation, DDIM, interpolation) live in
`pipeline/sampling.py` and are exposed here as methods.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from pipeline import sampling
from pipeline.rng import STREAM_DIFFUSION, Generator, randn_like_batch, stream_generators

MEAN_TYPES = ("eps", "x0", "mu")
# "learned": the original's learned diagonal Sigma (Table 2): the network outputs 2C channels,
# the mean parameterisation and log sigma^2 per dimension, trained with the true bound L.
VAR_TYPES = ("fixed_small", "fixed_large", "learned")
LOSS_TYPES = ("simple", "vlb", "mu_mse")


def linear_beta_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The paper's linear schedule beta_1..beta_T (Sec. 4), float64 [T]."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def draw_t_and_noise(positions: range, timesteps: int, shape: tuple, seed: int, device) -> tuple:
    """Algorithm 1, lines 3-4: t ~ Uniform({1..T}) (0-based here) and eps ~ N(0, I) for the
    samples at these positions of the global training stream. Returns (t [B], eps [B, *shape]).

    One generator per sample keeps a sample's draw independent of which rank, micro-batch or
    world size it lands in; that is what lets a 2-process checkpoint continue on 1 process."""
    ts, noise = [], []
    for g in stream_generators(seed, STREAM_DIFFUSION, positions, device):
        ts.append(torch.randint(timesteps, (1,), generator=g, device=device))
        noise.append(torch.randn(shape, generator=g, device=device))
    return torch.cat(ts), torch.stack(noise)


class NoiseDraw:
    """`draw_t_and_noise` on CPU for the training loader's workers (pipeline.data.TrainLoader's
    `draw`): (positions, x0 batch) -> (t [B], eps like x0, float32). CPU generators give the same
    draws on every device, and the workers take the per-sample loop off the training step."""

    def __init__(self, seed: int, timesteps: int):
        self.seed, self.timesteps = int(seed), int(timesteps)

    def __call__(self, positions: range, x0: torch.Tensor) -> tuple:
        return draw_t_and_noise(positions, self.timesteps, tuple(x0.shape[1:]), self.seed, "cpu")


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    # The tanh approximation of Phi used by the original code (and PixelCNN++).
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) under the decoder of eq. 13: a Gaussian integrated over each 8-bit bin.

    x is data in [-1, 1] on the 256-level grid (bin width 2/255); the edge bins extend to
    -inf / +inf (thresholds at +-0.999 as in the original). Returns nats, elementwise.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """The forward process q (eq. 4), the reverse process p_theta (eqs. 11-12) and the bound (eq. 5).

    The defaults are the recipe schema's (pipeline.config.DiffusionConfig): predict eps, train on
    L_simple (eq. 14), sample with sigma_t^2 = beta_t. Sec. 3.2: "both sigma_t^2 = beta_t and
    sigma_t^2 = beta-tilde_t had similar results"; the original samples CIFAR-10 with beta_t
    (fixed_large) and its 256x256 models with beta-tilde_t (fixed_small), as our recipes do.
    """

    def __init__(self, betas: torch.Tensor, mean_type: str = "eps", var_type: str = "fixed_large",
                 loss_type: str = "simple"):
        for name, value, allowed in (("mean_type", mean_type, MEAN_TYPES),
                                     ("var_type", var_type, VAR_TYPES),
                                     ("loss_type", loss_type, LOSS_TYPES)):
            if value not in allowed:
                raise ValueError(f"GaussianDiffusion: {name}={value!r}, expected one of {allowed}")
        if var_type == "learned" and loss_type != "vlb":
            # The original asserts this too: only the bound L has a gradient for Sigma.
            raise ValueError(f"GaussianDiffusion: var_type='learned' needs loss_type='vlb' (the bound L), "
                             f"got {loss_type!r}")
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        b = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
        if not ((b > 0).all() and (b <= 1).all()):
            raise ValueError("GaussianDiffusion: betas must lie in (0, 1]")
        self.num_timesteps = T = b.numel()
        alphas = 1.0 - b
        acp = torch.cumprod(alphas, 0)  # alpha-bar_t
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        post_var = b * (1.0 - acp_prev) / (1.0 - acp)  # beta-tilde_t, eq. 7
        # beta-tilde at t=0 is 0: the original clips the log by reusing beta-tilde_1.
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        # fixed_large: sigma^2 = beta_t, except beta-tilde_1 at t=0 (as the original does).
        large_var = torch.cat([post_var[1:2], b[1:]])
        self._c = {
            "betas": b, "alphas_cumprod": acp, "alphas_cumprod_prev": acp_prev,
            "sqrt_acp": acp.sqrt(), "sqrt_1m_acp": (1.0 - acp).sqrt(),
            "log_1m_acp": torch.log(1.0 - acp),
            "sqrt_recip_acp": (1.0 / acp).sqrt(), "sqrt_recipm1_acp": (1.0 / acp - 1.0).sqrt(),
            "post_var": post_var, "post_logvar": post_logvar,
            # eq. 7: mu-tilde = coef1 x_0 + coef2 x_t
            "post_coef1": b * acp_prev.sqrt() / (1.0 - acp),
            "post_coef2": (1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp),
            "large_var": large_var, "large_logvar": torch.log(large_var),
        }
        self._on_device: dict = {}
        assert all(v.shape == (T,) for v in self._c.values())

    # Coefficients live in float64 (on each device used, cached); gathered values are cast to
    # the data's dtype, as the original does.
    def coef(self, name: str) -> torch.Tensor:
        return self._c[name]

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        key = (name, t.device)
        arr = self._on_device.get(key)
        if arr is None:
            arr = self._on_device[key] = self._c[name].to(t.device)
        return arr[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    @property
    def betas(self) -> torch.Tensor:
        return self._c["betas"]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._c["alphas_cumprod"]

    # ----- forward process -------------------------------------------------------------
    def q_mean_variance(self, x0, t):
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), eq. 4."""
        mean = self._extract("sqrt_acp", t, x0) * x0
        return mean, self._extract("sqrt_1m_acp", t, x0) ** 2, self._extract("log_1m_acp", t, x0)

    def q_sample(self, x0, t, noise):
        """Sample x_t ~ q(x_t | x_0) by reparameterisation, eq. 4."""
        return self._extract("sqrt_acp", t, x0) * x0 + self._extract("sqrt_1m_acp", t, x0) * noise

    def q_posterior(self, x0, x_t, t):
        """q(x_{t-1} | x_t, x_0) = N(mu-tilde, beta-tilde): eqs. 6-7 -> (mean, var, log_var)."""
        mean = self._extract("post_coef1", t, x_t) * x0 + self._extract("post_coef2", t, x_t) * x_t
        return mean, self._extract("post_var", t, x_t), self._extract("post_logvar", t, x_t)

    def predict_x0_from_eps(self, x_t, t, eps):
        # Invert eq. 4: x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar).
        return self._extract("sqrt_recip_acp", t, x_t) * x_t - self._extract("sqrt_recipm1_acp", t, x_t) * eps

    def predict_eps_from_x0(self, x_t, t, x0):
        return (self._extract("sqrt_recip_acp", t, x_t) * x_t - x0) / self._extract("sqrt_recipm1_acp", t, x_t)

    def predict_x0_from_mu(self, x_t, t, mu):
        # Invert eq. 7 for x_0.
        return (mu - self._extract("post_coef2", t, x_t) * x_t) / self._extract("post_coef1", t, x_t)

    # ----- reverse process -------------------------------------------------------------
    def model_variance(self, t, x):
        if self.var_type == "fixed_small":
            return self._extract("post_var", t, x), self._extract("post_logvar", t, x)
        return self._extract("large_var", t, x), self._extract("large_logvar", t, x)

    def split_output(self, out, x_t):
        """A 2C-channel output -> (mean part, log sigma^2); a C-channel one -> (out, None).

        A learned-Sigma network's output scored with a fixed variance (eval's var_type override)
        keeps its mean part and drops the log-variance."""
        C = x_t.shape[1]
        if out.shape[1] == 2 * C:
            return out[:, :C], out[:, C:]
        if self.var_type == "learned":
            raise ValueError(f"var_type='learned' needs a model with {2 * C} output channels "
                             f"(mean and log-variance), got {out.shape[1]}")
        return out, None

    def p_mean_variance_from_output(self, out, x_t, t, clip_denoised: bool = True):
        """p(x_{t-1} | x_t) given the network output for this mean parameterisation."""
        out, learned_logvar = self.split_output(out, x_t)
        if self.var_type == "learned":
            # The original's `learned` type: the output is log sigma^2 itself (not an
            # interpolation between beta and beta-tilde as in later work).
            var, log_var = torch.exp(learned_logvar), learned_logvar
        else:
            var, log_var = self.model_variance(t, x_t)
        if self.mean_type == "mu":
            mean = out  # the network predicts mu-tilde itself (Table 2 ablation)
            pred_x0 = self.predict_x0_from_mu(x_t, t, out)
            if clip_denoised:
                pred_x0 = pred_x0.clamp(-1.0, 1.0)
        else:
            pred_x0 = out if self.mean_type == "x0" else self.predict_x0_from_eps(x_t, t, out)  # eq. 11
            if clip_denoised:
                pred_x0 = pred_x0.clamp(-1.0, 1.0)
            mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_x0": pred_x0}

    def p_mean_variance(self, model: Callable, x_t, t, clip_denoised: bool = True):
        """-> dict(mean, variance, log_variance, pred_x0) of p_theta(x_{t-1} | x_t)."""
        out = model(x_t, t).to(x_t.dtype)
        return self.p_mean_variance_from_output(out, x_t, t, clip_denoised)

    # ----- losses ----------------------------------------------------------------------
    def vb_terms_bpd(self, out, x0, x_t, t, clip_denoised: bool = False):
        """The bound's term L_{t-1} for each example in bits/dim (eq. 5); L_0 uses eq. 13.

        Returns (bpd [B], pred_x0).
        """
        true_mean, _, true_logvar = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance_from_output(out, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl), p["pred_x0"]

    def training_loss(self, model: Callable, x0, t, noise=None):
        """Per-example loss [B] for `loss_type`.

        simple: MSE to the parameterisation's target (eps: eq. 14, L_simple);
        vlb: the bound's term L_{t-1} in bits/dim (eq. 5; t uniform makes it unbiased for
        (L - L_T)/T); mu_mse: ||mu-tilde - mu_theta||^2 (the Table 2 ablation).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t).to(x0.dtype)
        if self.loss_type == "vlb":
            return self.vb_terms_bpd(out, x0, x_t, t, clip_denoised=False)[0]
        if self.loss_type == "mu_mse":
            true_mean = self.q_posterior(x0, x_t, t)[0]
            mean = self.p_mean_variance_from_output(out, x_t, t, clip_denoised=False)["mean"]
            return mean_flat((true_mean - mean) ** 2)
        target = {"eps": noise, "x0": x0, "mu": None}[self.mean_type]
        if target is None:
            target = self.q_posterior(x0, x_t, t)[0]
        return mean_flat((target - out) ** 2)

    # ----- likelihood ------------------------------------------------------------------
    def prior_bpd(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean, _, logvar = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean))) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd(self, model: Callable, x0, generator: Generator = None, t_batch: int = 1,
                 progress: bool = False, clip_denoised: bool = True):
        """The full bound (eq. 5) in bits/dim, every one of the T terms plus the prior.

        x0 must be on the 8-bit grid in [-1, 1]. `t_batch` time steps are evaluated in one
        model call (batch B * t_batch). Returns dict(total_bpd [B], prior_bpd [B],
        terms_bpd [B, T] with terms_bpd[:, 0] = L_0, mse [B, T] of the predicted x_0).
        """
        B, T = x0.shape[0], self.num_timesteps
        terms = torch.zeros(B, T, dtype=x0.dtype, device=x0.device)
        mse = torch.zeros_like(terms)
        steps = list(range(T - 1, -1, -1))
        chunks = [steps[i:i + t_batch] for i in range(0, T, max(1, t_batch))]
        for ts in sampling.maybe_tqdm(chunks, progress, desc="bpd"):
            k = len(ts)
            tt = torch.tensor(ts, dtype=torch.long, device=x0.device)
            noise = randn_like_batch((B, k, *x0.shape[1:]), generator, x0.device, x0.dtype)
            xb = x0.unsqueeze(1).expand(B, k, *x0.shape[1:]).reshape(B * k, *x0.shape[1:])
            tb = tt.repeat(B)  # sample-major: row i*k + j is sample i at time ts[j]
            x_t = self.q_sample(xb, tb, noise.reshape(B * k, *x0.shape[1:]))
            out = model(x_t, tb).to(x0.dtype)
            bpd, pred_x0 = self.vb_terms_bpd(out, xb, x_t, tb, clip_denoised=clip_denoised)
            terms[:, tt] = bpd.reshape(B, k)
            mse[:, tt] = mean_flat((pred_x0 - xb) ** 2).reshape(B, k)
        prior = self.prior_bpd(x0)
        return {"total_bpd": terms.sum(1) + prior, "prior_bpd": prior, "terms_bpd": terms, "mse": mse}

    # ----- sampling (pipeline/sampling.py) ---------------------------------------------
    def p_sample(self, model, x_t, t, noise, clip_denoised: bool = True):
        return sampling.p_sample(self, model, x_t, t, noise, clip_denoised)

    def p_sample_loop(self, model, shape, generator: Generator = None, progress: bool = False,
                      callback: Optional[Callable] = None, device=None, x_T=None):
        return sampling.p_sample_loop(self, model, shape, generator=generator, progress=progress,
                                      callback=callback, device=device, x_T=x_T)

    def ddim_sample_loop(self, model, shape, steps: int, eta: float = 0.0,
                         generator: Generator = None, progress: bool = False, device=None, x_T=None,
                         callback: Optional[Callable] = None):
        return sampling.ddim_sample_loop(self, model, shape, steps, eta=eta, generator=generator,
                                         progress=progress, device=device, x_T=x_T, callback=callback)

    def interpolate(self, model, x0_a, x0_b, lambdas, t: int = 499, generator: Generator = None,
                    progress: bool = False):
        return sampling.interpolate(self, model, x0_a, x0_b, lambdas, t=t, generator=generator,
                                    progress=progress)
