"""eval figures --which 7,9,10: Figs. 7 (shared x_t), 9 (coarse-to-fine interpolation) and 10
(quality of the predicted x_0 along the reverse process) as PNG + JSON, with numbers that obey
their definitions; Fig. 10's last point is the FID of the finished samples."""

import json

import numpy as np
from PIL import Image

from eval.common import load_model, to_uint8
from eval.fid import compute_fid
from pipeline.rng import eval_generators
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

    # Fig. 7: rows t = T-1, 3T/4-1, T/2-1, T/4-1; columns source, x_t, 3 samples
    f7 = json.loads((out / "fig7_shared_latent.json").read_text())
    assert f7["t_0based"] == [39, 29, 19, 9] and f7["samples_per_t"] == 3
    assert Image.open(out / "fig7_shared_latent.png").size == (2 + 5 * 10, 2 + 4 * 10)
    # the less noisy the shared x_t, the more the samples agree with each other and the source
    assert f7["pairwise_rmse_0_255"][-1] < f7["pairwise_rmse_0_255"][0]
    assert f7["rmse_to_source_0_255"][-1] < f7["rmse_to_source_0_255"][0]
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
    r = run_eval("figures", ck, "--out", out, "--which", "7", "--fig7-t", "99")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--fig7-t" in r.stderr
