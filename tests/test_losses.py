"""What training optimises: every loss type of `GaussianDiffusion.training_loss` against the
paper's formulas written out here in float64, for a random U-Net with real output (eps std ~0.8)
at fixed t (the first step, the last, two between) and fixed noise, so both sides see the same
draws. A loss that only vanishes at the truth (a per-timestep weight, another target) fails here.

Ho et al. 2020: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4); L_simple = |eps -
eps_theta(x_t, t)|^2 (eq. 14); the bound's terms L_{t-1} = KL(q(x_{t-1} | x_t, x_0) ||
p_theta(x_{t-1} | x_t)) with q's mean and variance from eqs. 6-7, p's mean from eq. 11, and
L_0 = -log p_theta(x_0 | x_1) under the discretized decoder (eq. 13). Time steps are 0-based:
t = 0 here is the paper's t = 1 (the decoder term). Per-example values are the mean over
dimensions; the bound's terms are in bits.
"""

import math

import pytest
import torch

from pipeline.diffusion import GaussianDiffusion, linear_beta_schedule
from support.model import redraw_zero_init, tiny_unet

T = 1000
TS = torch.tensor([0, 1, 500, T - 1])


def schedule():
    """beta_t, alpha_t, abar_t, abar_{t-1} in float64, recomputed here (Sec. 4: linear 1e-4..0.02)."""
    betas = torch.tensor([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)], dtype=torch.float64)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return betas, alphas, abar, abar_prev


def at(a, t):
    return a[t].reshape(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def setup():
    """A random U-Net with its zero-init layers redrawn (out_channels 6 for the learned Sigma),
    x_0 on the 8-bit grid with both edge levels present, fixed eps."""
    g = torch.Generator().manual_seed(0)
    x0 = ((torch.rand(len(TS), 3, 16, 16, generator=g) * 2 - 1 + 1) * 127.5).round() / 127.5 - 1
    x0[:, 0, 0, :2] = torch.tensor([-1.0, 1.0])
    eps = torch.randn(x0.shape, generator=g)
    nets = {c: redraw_zero_init(tiny_unet(seed=1, out_channels=c)) for c in (3, 6)}
    return x0, eps, nets


def forward(net, x0, eps):
    """x_t by eq. 4 (float64) and the network's output on it (as float64)."""
    _, _, abar, _ = schedule()
    x_t = at(abar, TS).sqrt() * x0.double() + (1 - at(abar, TS)).sqrt() * eps.double()
    with torch.no_grad():
        out = net(x_t.float(), TS).double()
    return x_t, out


def posterior(x0, x_t):
    """q(x_{t-1} | x_t, x_0), eqs. 6-7: mu-tilde and beta-tilde."""
    betas, alphas, abar, abar_prev = schedule()
    b, a, ab, abp = at(betas, TS), at(alphas, TS), at(abar, TS), at(abar_prev, TS)
    mu = abp.sqrt() * b / (1 - ab) * x0.double() + a.sqrt() * (1 - abp) / (1 - ab) * x_t
    return mu, (1 - abp) / (1 - ab) * b


def model_mean(mean_type, out, x_t):
    """p_theta's mean for each parameterisation: eq. 11 for eps; eq. 7 with x_0 := the output
    for x0; the output itself for mu. No clipping (training does not clip)."""
    betas, alphas, abar, abar_prev = schedule()
    b, a, ab, abp = at(betas, TS), at(alphas, TS), at(abar, TS), at(abar_prev, TS)
    if mean_type == "eps":
        return (x_t - b / (1 - ab).sqrt() * out) / a.sqrt()
    if mean_type == "x0":
        return abp.sqrt() * b / (1 - ab) * out + a.sqrt() * (1 - abp) / (1 - ab) * x_t
    return out


def model_logvar(var_type, out):
    """log sigma_t^2: beta_t (fixed_large), beta-tilde_t (fixed_small), or the output's second half
    (learned). At t = 0 (beta-tilde is 0 there) both fixed types use beta-tilde of the next step,
    as the original does."""
    betas, _, abar, abar_prev = schedule()
    tilde = betas * (1 - abar_prev) / (1 - abar)
    tilde[0] = tilde[1]
    if var_type == "learned":
        return out[:, 3:]
    var = tilde if var_type == "fixed_small" else torch.cat([tilde[1:2], betas[1:]])
    return at(var, TS).log().expand(-1, 3, 16, 16)


def gaussian_kl(m1, lv1, m2, lv2):
    return 0.5 * (lv2 - lv1 + (lv1.exp() + (m1 - m2) ** 2) / lv2.exp() - 1)


def decoder_nll(x0, mean, logvar):
    """-log of eq. 13: N(mean, sigma^2) integrated over x_0's bin [x - 1/255, x + 1/255], the
    edge bins extended to -inf / +inf. Phi by its tanh approximation, the one the original
    uses (pipeline.diffusion's is checked against the exact Phi in test_diffusion.py)."""
    def phi(z):
        return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))

    x, sd = x0.double(), (0.5 * logvar).exp()
    hi = torch.where(x > 0.999, torch.ones_like(x), phi((x + 1 / 255 - mean) / sd))
    lo = torch.where(x < -0.999, torch.zeros_like(x), phi((x - 1 / 255 - mean) / sd))
    return -torch.log((hi - lo).clamp(min=1e-12))


def per_example(x):
    return x.mean(dim=(1, 2, 3))


def loss_of(setup, mean_type="eps", var_type="fixed_large", loss_type="simple"):
    x0, eps, nets = setup
    net = nets[6 if var_type == "learned" else 3]
    d = GaussianDiffusion(linear_beta_schedule(T), mean_type=mean_type, var_type=var_type, loss_type=loss_type)
    got = d.training_loss(net, x0, TS, eps).double()
    x_t, out = forward(net, x0, eps)
    return got, x0, eps, x_t, out


def assert_per_example_close(got, want, rtol, atol=1e-9):
    assert got.shape == want.shape == (len(TS),)
    for i, t in enumerate(TS.tolist()):
        assert abs(got[i] - want[i]) <= rtol * abs(want[i]) + atol, (
            f"t={t}: loss {got[i].item():.6g}, formula {want[i].item():.6g}")


def test_the_network_output_is_real(setup):
    """The comparison means something only if eps_theta is neither ~0 nor the truth."""
    x0, eps, _ = setup
    _, out = forward(setup[2][3], x0, eps)
    assert 0.2 < out.std().item() < 3
    assert per_example((out - eps.double()) ** 2).min() > 0.3


@pytest.mark.parametrize("mean_type", ["eps", "x0", "mu"])
def test_simple_is_the_mse_to_the_parameterisations_target(setup, mean_type):
    """L_simple, eq. 14, for eps: mean((eps - eps_theta(sqrt(abar) x_0 + sqrt(1 - abar) eps, t))^2);
    the x0 and mu parameterisations regress x_0 and mu-tilde the same way (Table 2's ablations)."""
    got, x0, eps, x_t, out = loss_of(setup, mean_type=mean_type)
    target = {"eps": eps.double(), "x0": x0.double(), "mu": posterior(x0, x_t)[0]}[mean_type]
    assert_per_example_close(got, per_example((target - out) ** 2), rtol=1e-4)


@pytest.mark.parametrize("mean_type,var_type", [("eps", "fixed_large"), ("eps", "fixed_small"),
                                                ("x0", "fixed_small"), ("mu", "fixed_large"),
                                                ("eps", "learned")])
def test_vlb_is_the_bounds_term_at_each_t(setup, mean_type, var_type):
    """vlb: L_{t-1} = KL(N(mu-tilde, beta-tilde) || N(mu_theta, sigma_t^2)) per dim, in bits, for
    t > 0 (eq. 5 with eqs. 6-8, 11); at t = 0 the decoder's -log p(x_0 | x_1) (eq. 13)."""
    got, x0, eps, x_t, out = loss_of(setup, mean_type, var_type, "vlb")
    mu_q, var_q = posterior(x0, x_t)
    mean, logvar = model_mean(mean_type, out[:, :3], x_t), model_logvar(var_type, out)
    kl = per_example(gaussian_kl(mu_q, var_q.clamp(min=1e-300).log().expand_as(mu_q), mean, logvar))
    nll = per_example(decoder_nll(x0, mean, logvar))
    want = torch.where(TS == 0, nll, kl) / math.log(2)
    # atol: a KL near 0 is -1 + 1 + (small) in float32, resolved to ~1e-7 per dimension
    assert_per_example_close(got, want, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("mean_type", ["eps", "x0"])
def test_mu_mse_is_the_squared_error_of_the_mean(setup, mean_type):
    """mu_mse (Table 2's "mu-tilde MSE" ablation): mean((mu-tilde(x_t, x_0) - mu_theta(x_t, t))^2)."""
    got, x0, eps, x_t, out = loss_of(setup, mean_type, "fixed_large", "mu_mse")
    want = per_example((posterior(x0, x_t)[0] - model_mean(mean_type, out, x_t)) ** 2)
    assert_per_example_close(got, want, rtol=1e-3)
