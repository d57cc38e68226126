"""Equivalence with the reference model: diffusers' UNet2DModel in the paper's layout."""

import pytest
import torch

from pipeline.config import DiffusionConfig
from pipeline.convert import (
    ddpm_scheduler_config,
    diffusers_config,
    diffusion_settings_from_diffusers,
    from_diffusers,
    to_diffusers,
    unet_kwargs_from_diffusers,
)
from pipeline.presets import PRESETS
from pipeline.unet import UNet

diffusers = pytest.importorskip("diffusers")

# Small-channel variants of the paper's two layouts (ch=32 keeps GroupNorm(32) valid).
VARIANTS = {
    "cifar10_layout": dict(PRESETS["cifar10"], ch=32),
    "256_layout_at_64": dict(PRESETS["lsun256"], resolution=64, ch=32, num_res_blocks=1),
    "attn_at_two_levels": dict(resolution=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                               attn_resolutions=(16, 4), dropout=0.0),
}


def randomised(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere: near-zero init would hide a wrong key map."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def pair(kwargs, seed=0):
    torch.manual_seed(seed)
    ours = randomised(UNet(**kwargs), seed)
    ref = diffusers.UNet2DModel(**diffusers_config(kwargs)).eval()
    return ours, ref


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_our_weights_in_diffusers_give_the_same_output(name):
    kwargs = VARIANTS[name]
    ours, ref = pair(kwargs)
    ref.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    r = kwargs["resolution"]
    x = torch.randn(2, 3, r, r, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 917])
    with torch.no_grad():
        err = (ours(x, t) - ref(x, t).sample).abs().max().item()
    assert err <= 1e-5, err


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_diffusers_weights_load_into_ours(name):
    kwargs = VARIANTS[name]
    ours, ref = pair(kwargs, seed=3)
    randomised(ref, seed=4)
    sd = from_diffusers(ref.state_dict())
    ours.load_state_dict(sd, strict=True)
    # and back again, bit for bit
    again = to_diffusers(sd)
    assert again.keys() == ref.state_dict().keys()
    assert all(torch.equal(again[k], v) for k, v in ref.state_dict().items())
    r = kwargs["resolution"]
    x = torch.randn(1, 3, r, r, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        err = (ours(x, torch.tensor([42])) - ref(x, torch.tensor([42])).sample).abs().max().item()
    assert err <= 1e-5, err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trip(name):
    cfg = diffusers_config(PRESETS[name])
    assert unet_kwargs_from_diffusers(cfg) == {**dict(in_channels=3, out_channels=3), **PRESETS[name]}
    with torch.device("meta"):
        n_ref = sum(p.numel() for p in diffusers.UNet2DModel(**cfg).parameters())
        n_ours = sum(p.numel() for p in UNet(**PRESETS[name]).parameters())
    assert n_ref == n_ours


@pytest.mark.parametrize("key,value", [("flip_sin_to_cos", True), ("freq_shift", 0),
                                       ("downsample_padding", 1), ("norm_eps", 1e-5),
                                       ("attention_head_dim", 8)])
def test_other_layouts_are_refused_by_name(key, value):
    cfg = dict(diffusers_config(PRESETS["cifar10"]), **{key: value})
    with pytest.raises(ValueError, match=key):
        unet_kwargs_from_diffusers(cfg)


def test_full_size_cifar10_matches_diffusers():
    torch.manual_seed(6)
    ours = UNet(**PRESETS["cifar10"]).eval()
    ref = diffusers.UNet2DModel(**diffusers_config(PRESETS["cifar10"])).eval()
    # N(0, 0.05^2) weights on 35.7M parameters blow activations up: keep the real init, but
    # wake the near-zero layers (block outputs, attention outputs, conv_out) so all contribute.
    with torch.no_grad():
        for p in ours.parameters():
            if p.abs().max() < 1e-4:
                p.normal_(0, 0.02)
    ref.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([10, 600])
    with torch.no_grad():
        a, b = ours(x, t), ref(x, t).sample
    assert a.abs().mean() > 1e-2  # a real signal, not the near-zero init
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradients_match_diffusers(channels_last):
    """Backward through ours (in-place residual adds, fused q/k/v) equals diffusers' gradients."""
    kwargs = VARIANTS["attn_at_two_levels"]
    ours, ref = pair(kwargs, seed=8)
    ref.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    t = torch.tensor([3, 400])
    ours(x, t).square().mean().backward()
    ref(x.contiguous(), t).sample.square().mean().backward()
    ours_grads = to_diffusers({k: p.grad for k, p in ours.named_parameters()})
    for k, p in ref.named_parameters():
        torch.testing.assert_close(ours_grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("mean_type", ["eps", "x0"])
@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_scheduler_config_round_trip(mean_type, var_type):
    """Our diffusion section -> a DDPMScheduler config diffusers accepts as is -> the same section."""
    ours = DiffusionConfig(timesteps=500, beta_start=2e-4, beta_end=0.03, mean_type=mean_type, var_type=var_type)
    cfg = ddpm_scheduler_config(ours)
    sched = diffusers.DDPMScheduler.from_config(cfg)
    assert sched.config.prediction_type == {"eps": "epsilon", "x0": "sample"}[mean_type]
    back = diffusion_settings_from_diffusers({}, dict(sched.config))
    assert back == {"timesteps": 500, "beta_start": 2e-4, "beta_end": 0.03, "mean_type": mean_type, "var_type": var_type}
    torch.testing.assert_close(sched.betas.double(), torch.linspace(2e-4, 0.03, 500, dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_schedulers_we_cannot_represent_are_refused_by_name():
    with pytest.raises(ValueError, match="mean_type='mu'"):
        ddpm_scheduler_config(DiffusionConfig(mean_type="mu"))
    for key, value in [("beta_schedule", "scaled_linear"), ("variance_type", "learned"),
                       ("prediction_type", "v_prediction"), ("beta_start", "small")]:
        with pytest.raises(ValueError, match=key):
            diffusion_settings_from_diffusers({}, {key: value})
