"""eval figures --which 7,9,10: Figs. 7 (one reverse chain split at several x_t), 9 (coarse-to-fine
interpolation) and 10 (quality of the predicted x_0 along the reverse process) as PNG + JSON, with
numbers that obey their definitions; Fig. 7's split points lie on one chain; Fig. 10's last point
is the FID of the finished samples."""

import json

import numpy as np
import torch
from PIL import Image

from eval.common import load_model, to_uint8
from eval.fid import compute_fid
from eval.figures_more import split_chain_samples
from pipeline.rng import eval_generators, randn_like_batch
from support.cli import eval_env, run_eval
from support.features import register_tiny_features
from support.folder_shards import make_folder_shards
from support.model import make_checkpoint, tiny_recipe

T = 40


def test_cli_figures_7_9_10(tmp_path, monkeypatch):
    shards = make_folder_shards(tmp_path / "d", n=12, size=8, test_count=3)
    ck = make_checkpoint(tmp_path / "ck", tiny_recipe(timesteps=T, shards=str(shards)))
    out, cache = tmp_path / "fig", tmp_path / "cache"
    r = run_eval("figures", ck, "--out", out, "--which", "7,9,10", "--fig7-samples", 3, "--lambdas", "0,0.5,1",
                 "--fig10-samples", 6, "--fig10-points", 3, "--batch-size", 4,
                 "--feature-extractor", "tiny-seeded=support.features:TinyFeatures",
                 env=eval_env(DDPM_CACHE=str(cache)))
    assert r.returncode == 0, r.stderr[-3000:]

    # Fig. 7: rows at the paper's t = T, 3T/4, T/2, T/4; columns x_t, 3 draws, the chain's own x_0
    f7 = json.loads((out / "fig7_shared_latent.json").read_text())
    assert f7["t_paper"] == [40, 30, 20, 10] and f7["t_0based"] == [39, 29, 19, 9] and f7["samples_per_t"] == 3
    assert Image.open(out / "fig7_shared_latent.png").size == (2 + 5 * 10, 2 + 4 * 10)
    # the later the split, the more the draws agree with each other and with the chain's own x_0
    assert f7["pairwise_rmse_0_255"][-1] < f7["pairwise_rmse_0_255"][0]
    assert f7["rmse_to_chain_x0_0_255"][-1] < f7["rmse_to_chain_x0_0_255"][0]
    assert all(v > 0 for v in f7["pairwise_rmse_0_255"])  # independent draws differ

    # Fig. 9: rows 0, T/4, T/2, 3T/4, T diffusion steps; columns a, 3 lambdas, b
    f9 = json.loads((out / "fig9_coarse_to_fine.json").read_text())
    assert f9["diffusion_steps"] == [0, 10, 20, 30, 40] and f9["lambdas"] == [0.0, 0.5, 1.0]
    assert Image.open(out / "fig9_coarse_to_fine.png").size == (2 + 5 * 10, 2 + 5 * 10)
    assert f9["rmse_lambda0_vs_a"][0] == 0.0 and f9["rmse_lambda1_vs_b"][0] == 0.0  # pixels: exact ends
    assert f9["rmse_lambda0_vs_a"][-1] > f9["rmse_lambda0_vs_a"][1] > 0  # more steps, coarser mixing

    # Fig. 10: FID at 3 evenly spaced steps; no IS without the Inception classifier
    f10 = json.loads((out / "fig10_progressive_quality.json").read_text())
    assert f10["t_0based"] == [39, 20, 0] and f10["reverse_steps"] == [1, 20, 40] and f10["num_samples"] == 6
    assert len(f10["fid"]) == 3 and all(np.isfinite(f10["fid"])) and f10["is"] is None and f10["is_unavailable"]
    # 6 samples, not the paper's 50,000: the FID's upward bias is said in the JSON and results
    assert "FID from 6 samples is biased upward" in f10["fid_bias"]
    assert (out / "fig10_progressive_quality.png").stat().st_size > 1000
    # the last point is the FID of the finished samples (pred_x0 at t = 0 is x_0), computed here
    # independently with the same per-sample noise streams as `eval sample`
    loaded = load_model(str(ck))
    x = loaded.diffusion.p_sample_loop(loaded.model, (6, 3, 8, 8), generator=eval_generators(0, range(6), "cpu"))
    monkeypatch.setenv("DDPM_CACHE", str(cache))
    want = compute_fid(to_uint8(x), str(shards), name=register_tiny_features())["fid"]
    assert abs(f10["fid"][-1] - want) < 1e-6 * max(1.0, want)

    res = json.loads((out / "results.json").read_text())["evaluations"]["figures"]
    assert set(res["metrics"]) == {"fig7", "fig9", "fig10"}
    assert res["metrics"]["fig10"]["fid_bias"] == f10["fid_bias"]
    for bad in ("41", "0"):  # the paper's t runs 1..T
        r = run_eval("figures", ck, "--out", out, "--which", "7", "--fig7-t", bad)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "--fig7-t" in r.stderr


def test_fig7_split_points_lie_on_one_chain(tmp_path):
    """App. D's Fig. 7: every frozen x_t is the state of ONE reverse chain from one prior draw, the
    prefix that all rows share; an independent run of Algorithm 2 on the chain's noise stream passes
    through each of them exactly and ends at the chain's own x_0 (the last column)."""
    ck = make_checkpoint(tmp_path / "ck", tiny_recipe(timesteps=T))
    loaded = load_model(str(ck))
    d, model = loaded.diffusion, loaded.model.eval()
    ts = [39, 29, 19, 9]
    grid, info, frozen = split_chain_samples(d, model, (1, 3, 8, 8), ts, n_samples=2, seed=5)
    seen = {}
    x0 = d.p_sample_loop(model, (1, 3, 8, 8), generator=eval_generators(5, range(1), "cpu"),
                         callback=lambda t, x_t, _: seen.__setitem__(t, x_t.clone()))
    for t in ts:
        assert torch.equal(frozen[t], seen[t]), t
        assert np.array_equal(grid[ts.index(t), 0], to_uint8(seen[t])[0])
        assert np.array_equal(grid[ts.index(t), -1], to_uint8(x0)[0])
    # the first split is the prior draw itself: x_T ~ N(0, I) on stream 0, not a noised image
    assert torch.equal(frozen[39], randn_like_batch((1, 3, 8, 8), eval_generators(5, range(1), "cpu"), "cpu"))
    # the draws are fresh noise: they differ from each other and from the chain's own continuation
    assert info["t_paper"] == [40, 30, 20, 10] and all(v > 0 for v in info["pairwise_rmse_0_255"])
    assert all(v > 0 for v in info["rmse_to_chain_x0_0_255"])
