"""Algorithm 2, progressive generation, DDIM (beyond the paper) and x_t interpolation."""

import pytest
import torch

from pipeline.diffusion import GaussianDiffusion, linear_beta_schedule
from support.model import redraw_zero_init


def test_ancestral_sampling_is_reproducible_and_in_range(tiny_unet, gen):
    d = GaussianDiffusion(linear_beta_schedule(20), var_type="fixed_large")
    net = tiny_unet(seed=2)
    a = d.p_sample_loop(net, (2, 3, 16, 16), generator=gen(0))
    b = d.p_sample_loop(net, (2, 3, 16, 16), generator=gen(0))
    c = d.p_sample_loop(net, (2, 3, 16, 16), generator=gen(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1 and a.shape == (2, 3, 16, 16)


def test_per_sample_generators_make_samples_independent_of_the_batch(tiny_unet, gen):
    d = GaussianDiffusion(linear_beta_schedule(20))
    net = tiny_unet(seed=3)
    three = d.p_sample_loop(net, (3, 3, 16, 16), generator=[gen(s) for s in (7, 8, 9)])
    alone = d.p_sample_loop(net, (1, 3, 16, 16), generator=[gen(8)])
    torch.testing.assert_close(alone[0], three[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="generators"):
        d.p_sample_loop(net, (2, 3, 16, 16), generator=[gen(0)])


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_oracle_sampling_recovers_the_single_image(var_type, eps_oracle, grid, gen):
    """With the exact eps of a one-image data set, Algorithm 2 must end on that image."""
    d = GaussianDiffusion(linear_beta_schedule(), var_type=var_type)
    x_star = grid(torch.rand(1, 3, 8, 8, generator=gen(1)) * 2 - 1)
    seen = []
    out = d.p_sample_loop(eps_oracle(d, x_star), (2, 3, 8, 8), generator=gen(2),
                          callback=lambda t, x_t, x0: seen.append((t, x_t.shape, x0)))
    torch.testing.assert_close(out, x_star.expand(2, -1, -1, -1), rtol=0, atol=1e-4)
    assert [s[0] for s in seen] == list(range(999, -1, -1))  # progressive generation: every step
    assert all(s[1] == (2, 3, 8, 8) for s in seen)
    torch.testing.assert_close(seen[500][2], x_star.expand(2, -1, -1, -1), rtol=0, atol=1e-4)


def test_ddim_deterministic_and_oracle_exact(tiny_unet, eps_oracle, grid, gen):
    d = GaussianDiffusion(linear_beta_schedule())
    net = tiny_unet(seed=4)
    x_T = torch.randn(2, 3, 16, 16, generator=gen(3))
    a = d.ddim_sample_loop(net, x_T.shape, steps=10, x_T=x_T.clone())
    b = d.ddim_sample_loop(net, x_T.shape, steps=10, x_T=x_T.clone())
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    x_star = grid(torch.rand(1, 3, 8, 8, generator=gen(4)) * 2 - 1)
    for eta in (0.0, 1.0):
        out = d.ddim_sample_loop(eps_oracle(d, x_star), (2, 3, 8, 8), steps=25, eta=eta, generator=gen(5))
        torch.testing.assert_close(out, x_star.expand(2, -1, -1, -1), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="steps"):
        d.ddim_sample_loop(net, (1, 3, 16, 16), steps=0)


def test_interpolation_shares_the_reverse_noise(tiny_unet, gen):
    d = GaussianDiffusion(linear_beta_schedule(100))
    net = tiny_unet(seed=5)
    xa = torch.rand(2, 3, 16, 16, generator=gen(6)) * 2 - 1
    xb = torch.rand(2, 3, 16, 16, generator=gen(7)) * 2 - 1
    out = d.interpolate(net, xa, xb, [0.0, 0.0, 0.5, 1.0], t=20, generator=gen(8))
    assert out.shape == (2, 4, 3, 16, 16) and out.abs().max() <= 1
    assert torch.equal(out[:, 0], out[:, 1])  # same latent, same reverse noise -> same image
    assert not torch.allclose(out[:, 0], out[:, 3])


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small"])
def test_ancestral_sampling_is_algorithm_2_written_out(var_type, tiny_unet, gen):
    """Algorithm 2 by hand in float64, for a random U-Net with real output: x_T ~ N(0, I); for
    t = T..1, z ~ N(0, I) (z = 0 at the last step), x_{t-1} = mu + sigma_t z with sigma_t^2 =
    beta_t (fixed_large) or beta-tilde_t (fixed_small). mu is eq. 7's posterior mean at the
    predicted x_0 = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t) clipped to [-1, 1] (the
    original's clip_denoised; unclipped it is eq. 11). One generator draws x_T, then each z."""
    T = 20
    d = GaussianDiffusion(linear_beta_schedule(T), var_type=var_type)
    net = redraw_zero_init(tiny_unet(seed=6))
    betas = torch.tensor([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)], dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    var = betas * (1 - abar_prev) / (1 - abar) if var_type == "fixed_small" else betas
    g = gen(0)
    x = torch.randn(2, 3, 16, 16, generator=g).double()  # drawn in float32, as the sampler draws
    for t in range(T - 1, -1, -1):
        z = torch.randn(x.shape, generator=g).double() if t > 0 else torch.zeros_like(x)
        with torch.no_grad():
            eps = net(x.float(), torch.full((2,), t)).double()
        x0_hat = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
        mu = (abar_prev[t].sqrt() * betas[t] * x0_hat + (1 - betas[t]).sqrt() * (1 - abar_prev[t]) * x) / (1 - abar[t])
        x = mu + var[t].sqrt() * z
    got = d.p_sample_loop(net, (2, 3, 16, 16), generator=gen(0))
    torch.testing.assert_close(got.double(), x.clamp(-1, 1), rtol=0, atol=1e-4)
