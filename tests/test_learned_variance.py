"""The learned diagonal Sigma (the original's `learned` variance type, Table 2): the bound of the
analytic oracle with the true posterior log-variance, sampling and NLL through the CLIs with a
learned-Sigma checkpoint, the recipe checks, and the round trip through diffusers."""

import json
import math

import numpy as np
import pytest
import torch

from eval.common import load_model
from eval.nll import iter_float
from eval.sample import load_samples
from pipeline import build
from pipeline.config import DiffusionConfig, Recipe, RecipeError, save_recipe
from pipeline.convert import (
    ddpm_scheduler_config,
    diffusers_config,
    diffusion_settings_from_diffusers,
    from_diffusers,
    to_diffusers,
)
from pipeline.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.hub import load_pretrained
from pipeline.weights import LoadError
from support.cli import run_eval
from support.folder_shards import make_folder_shards
from support.model import TINY_UNET_8PX, make_checkpoint
from support.oracle import oracle_bpd


def learned_recipe(timesteps=20, shards="", **model) -> Recipe:
    return Recipe.from_dict({
        "model": {**TINY_UNET_8PX, "out_channels": 6, **model},
        "diffusion": {"timesteps": timesteps, "var_type": "learned", "loss_type": "vlb"},
        "data": {"shards": shards},
        "eval": {"num_samples": 4, "batch_size": 4, "nll_batch_size": 4, "nll_t_batch": 5},
    }, source="<learned>")


def test_learned_oracle_bound_is_the_fixed_small_closed_form(tmp_path):
    shards = make_folder_shards(tmp_path / "data", n=6, size=8, test_count=1, smooth=False)
    src = tmp_path / "oracle"
    src.mkdir()
    save_recipe(learned_recipe(timesteps=1000, shards=str(shards)), src / "config.yaml")
    out = tmp_path / "out"
    r = run_eval("nll", src, "--out", out, "--model-factory", "support.oracle:learned_oracle_factory",
                 "--t-batch", 250)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())["evaluations"]["nll"]
    m = res["metrics"]
    assert res["protocol"]["var_type"] == "learned"
    x_star = next(iter_float(str(shards), "test", 4))[0]
    fixed_small = GaussianDiffusion(linear_beta_schedule(1000), var_type="fixed_small")
    want = oracle_bpd(x_star, fixed_small)
    assert want["L_1_to_T-1"] == 0.0
    assert abs(m["L_1_to_T-1_bpd"]) < 1e-5  # the exact mean and the exact variance: no KL left
    assert abs(m["L_T_bpd"] - want["prior"]) < 1e-6
    assert abs(m["L_0_bpd"] - want["L_0"]) < 2e-3 * want["L_0"]
    assert abs(m["bpd"] - want["total"]) < 2e-3 * want["total"]


def _eps_model(x, t):
    return torch.tanh(x) * (1 + t.double().reshape(-1, 1, 1, 1) / 100).to(x.dtype)


def test_sampling_step_uses_the_learned_variance():
    """A learned model that outputs log beta_t samples exactly as fixed_large, and one that
    outputs log beta-tilde_t as fixed_small: the second half is log sigma^2, per dimension."""
    betas = linear_beta_schedule(50)
    learned = GaussianDiffusion(betas, var_type="learned", loss_type="vlb")
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for fixed_name, logvar in (("fixed_large", "large_logvar"), ("fixed_small", "post_logvar")):
        fixed = GaussianDiffusion(betas, var_type=fixed_name)

        def model(x_t, t, logvar=logvar):
            lv = learned.coef(logvar)[t].to(x_t.dtype).reshape(-1, 1, 1, 1).expand_as(x_t)
            return torch.cat([_eps_model(x_t, t), lv], 1)

        a = learned.p_sample_loop(model, x.shape, generator=torch.Generator().manual_seed(5), x_T=x)
        b = fixed.p_sample_loop(_eps_model, x.shape, generator=torch.Generator().manual_seed(5), x_T=x)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # per-dimension: doubling log sigma^2 in one channel changes only that channel's noise
    t = torch.full((3,), 10)

    def half(x_t, t):
        lv = torch.full_like(x_t, -4.0)
        lv[:, 0] = -2.0
        return torch.cat([_eps_model(x_t, t), lv], 1)

    p = learned.p_mean_variance(half, x, t)
    assert torch.allclose(p["log_variance"][:, 0], torch.tensor(-2.0)) and torch.allclose(
        p["log_variance"][:, 1:], torch.tensor(-4.0))
    with pytest.raises(ValueError, match="6 output channels"):
        learned.p_mean_variance(_eps_model, x, t)


def test_learned_loss_trains_both_halves():
    """The bound L gives a gradient to the mean and to the log-variance channels."""
    d = GaussianDiffusion(linear_beta_schedule(20), var_type="learned", loss_type="vlb")
    net = build.unet(learned_recipe().model)
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.02)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 3, 10, 19])
    loss = d.training_loss(net, x0, t, torch.randn_like(x0)).mean()
    loss.backward()
    g = net.conv_out.weight.grad
    assert torch.isfinite(loss) and g[:3].abs().sum() > 0 and g[3:].abs().sum() > 0
    with pytest.raises(ValueError, match="loss_type='vlb'"):
        GaussianDiffusion(linear_beta_schedule(20), var_type="learned", loss_type="simple")


def test_recipe_checks_name_the_key():
    with pytest.raises(RecipeError, match=r"diffusion.loss_type: var_type 'learned' is trained with the bound"):
        Recipe.from_dict({"model": {**TINY_UNET_8PX, "out_channels": 6},
                          "diffusion": {"var_type": "learned"}})
    with pytest.raises(RecipeError, match=r"model.out_channels: .*needs 6 output channels.*out_channels: 6"):
        Recipe.from_dict({"model": TINY_UNET_8PX, "diffusion": {"var_type": "learned", "loss_type": "vlb"}})
    with pytest.raises(RecipeError, match=r"model.out_channels: var_type 'fixed_large' needs 3"):
        Recipe.from_dict({"model": {**TINY_UNET_8PX, "out_channels": 6}})


def test_sample_and_nll_through_the_clis_with_a_learned_checkpoint(tmp_path):
    shards = make_folder_shards(tmp_path / "data", n=6, size=8, test_count=2)
    ckpt = make_checkpoint(tmp_path / "ck", learned_recipe(shards=str(shards)))
    loaded = load_model(str(ckpt))
    assert loaded.diffusion.var_type == "learned" and loaded.model.config["out_channels"] == 6
    r = run_eval("sample", ckpt, "--out", tmp_path / "s", "--num-samples", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    x = load_samples(tmp_path / "s")
    assert x.shape == (3, 8, 8, 3) and len({im.tobytes() for im in x}) == 3
    # the same model with a fixed variance (eval's override) keeps the mean, drops log sigma^2
    r = run_eval("sample", ckpt, "--out", tmp_path / "f", "--num-samples", 3, "--var-type", "fixed_large")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not np.array_equal(load_samples(tmp_path / "f"), x)
    r = run_eval("nll", ckpt, "--out", tmp_path / "n")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "n" / "results.json").read_text())["evaluations"]["nll"]
    assert res["protocol"]["var_type"] == "learned" and res["metrics"]["num_images"] == 2
    assert np.isfinite(res["metrics"]["bpd"]) and res["metrics"]["bpd"] > 0


def test_diffusers_round_trip_and_scheduler_step(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    recipe = learned_recipe(timesteps=1000)
    torch.manual_seed(0)
    ours = build.unet(recipe.model)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    ours.eval()
    # weights and config: ours -> diffusers -> ours is the identity
    cfg = diffusers_config(ours.config)
    assert cfg["out_channels"] == 6
    ref = diffusers.UNet2DModel(**cfg).eval()
    ref.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    back = from_diffusers(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    # diffusers' "learned" is sigma^2, ours log sigma^2: no scheduler config says what ours is,
    # and a diffusers "learned" model (a third party's sigma^2) is refused, not misread
    with pytest.raises(ValueError, match="log sigma\\^2"):
        ddpm_scheduler_config(recipe.diffusion)
    sched_cfg = {**ddpm_scheduler_config(DiffusionConfig(timesteps=1000)), "variance_type": "learned"}
    with pytest.raises(ValueError, match="reads the second half of the output as sigma\\^2"):
        diffusion_settings_from_diffusers(cfg, sched_cfg)
    folder = tmp_path / "diffusers"
    ref.save_pretrained(folder)
    (folder / "scheduler_config.json").write_text(json.dumps(sched_cfg))
    with pytest.raises(LoadError, match="scheduler_config.json: variance_type 'learned'"):
        load_pretrained(folder)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([7, 400])
    with torch.no_grad():
        out = ours(x, t)
        torch.testing.assert_close(ref(x, t).sample, out, rtol=0, atol=1e-5)
    # DDPMScheduler's "learned" reads sigma^2 where the original outputs log sigma^2: with the
    # second half exponentiated, its step is our ancestral step
    # (in float64: diffusers keeps its schedule in float32, which alone differs by 1e-5)
    sched = diffusers.DDPMScheduler.from_config(sched_cfg)
    d = build.diffusion(recipe.diffusion)
    sched.alphas_cumprod = d.alphas_cumprod.clone()
    x1 = x[:1].double()
    for step in (400, 1):
        tt = torch.tensor([step])
        with torch.no_grad():
            o = ours(x1.float(), tt).double()
        noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        mine, _ = d.p_sample(lambda *_: o, x1, tt, noise)
        o_diff = torch.cat([o[:, :3], o[:, 3:].exp()], 1)
        theirs = sched.step(o_diff, step, x1, generator=torch.Generator().manual_seed(9)).prev_sample
        torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="a learned one twice as many"):
        diffusion_settings_from_diffusers(cfg, {**sched_cfg, "variance_type": "fixed_large"})


def test_the_bound_is_minimised_by_the_posterior_variance():
    """With the exact mean, the KL term L_{t-1} in the learned log sigma^2 is
    0.5 (e^-d - 1 + d) for an offset d from log beta-tilde_t (eq. 7): zero at d = 0, a minimum."""
    from support.oracle import EpsOracle

    d = GaussianDiffusion(linear_beta_schedule(100), var_type="learned", loss_type="vlb")
    x0 = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    oracle = EpsOracle(d, x0)
    t = torch.tensor([30, 30])
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
    true_lv = d.coef("post_logvar")[t].float().reshape(-1, 1, 1, 1).expand_as(x0)
    for offset in (-0.2, 0.0, 0.1):
        out = torch.cat([oracle(x_t, t), true_lv + offset], 1)
        bpd, _ = d.vb_terms_bpd(out, x0, x_t, t)
        want = 0.5 * (math.exp(-offset) - 1 + offset) / math.log(2)
        torch.testing.assert_close(bpd, torch.full_like(bpd, want), rtol=1e-4, atol=1e-6)


def test_diffusers_pipeline_export_is_refused(tmp_path):
    """DDPMPipeline would treat log sigma^2 as sigma^2: the pipeline layout refuses a learned Sigma."""
    from eval.diffusers_layout import stage_diffusers_pipeline
    with pytest.raises(ValueError, match="outputs log sigma\\^2"):
        stage_diffusers_pipeline(learned_recipe(), {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
