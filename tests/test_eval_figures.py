"""eval figures: Figs. 5, 6, 8 written as PNG + JSON, with numbers that obey their definitions."""

import json
import re

import numpy as np
from PIL import Image

from eval.common import load_model
from eval.figures import interpolation, rate_distortion
from eval.nll import iter_float
from support.cli import run_eval
from support.folder_shards import make_folder_shards
from support.model import make_checkpoint, tiny_recipe


def test_rate_distortion_follows_its_definition(tmp_path):
    shards = make_folder_shards(tmp_path / "d", n=8, size=8, test_count=3)
    loaded = load_model(str(make_checkpoint(tmp_path / "ck", tiny_recipe(timesteps=30, shards=str(shards)))))
    x = next(iter_float(str(shards), "test", 3))
    rd = rate_distortion(loaded.diffusion, loaded.model, x, t_batch=10)
    T = 30
    rate, dist = np.array(rd["rate_bpd"]), np.array(rd["rmse_0_255"])
    assert rd["reverse_steps"] == list(range(T + 1)) and len(rate) == len(dist) == T + 1
    assert np.all(np.diff(rate) >= -1e-12)  # bits only accumulate
    assert abs(rate[-1] - rd["total_bpd"]) < 1e-9 and dist[-1] == 0.0  # lossless at the end
    # the independent pieces: rate at step 0 is the prior L_T alone; distortion at step k is
    # the RMSE of pred_x0 from x_t with t = T-1-k, from calc_bpd's own mse
    assert abs(rate[0] - float(loaded.diffusion.prior_bpd(x).mean())) < 1e-6
    assert 0 < dist[0] <= 255 and dist[0] > dist[-2]  # pure noise reconstructs worse than x_1


def test_cli_figures_writes_pngs_and_numbers(tmp_path):
    shards = make_folder_shards(tmp_path / "d", n=10, size=8, test_count=4)
    ck = make_checkpoint(tmp_path / "ck", tiny_recipe(timesteps=40, shards=str(shards)))
    out = tmp_path / "fig"
    r = run_eval("figures", ck, "--out", out, "--num-images", 4, "--rows", 3, "--interp-t", 20, "--lambdas", "0,0.5,1")
    assert r.returncode == 0, r.stderr[-3000:]
    # progress: a line per figure and a bar with its total (T = 40, 5 steps per call; t = 20)
    assert "figures: Fig. 5" in r.stderr and "figures: Fig. 6" in r.stderr and "figures: Fig. 8" in r.stderr
    for bar in (r"bpd: 100%.*\b8/8\b", r"sampling: 100%.*\b40/40\b", r"sampling: 100%.*\b20/20\b"):
        assert re.search(bar, r.stderr), (bar, r.stderr[-2000:])
    for name in ("fig5_rate_distortion", "fig6_progressive", "fig8_interpolation"):
        assert (out / f"{name}.png").stat().st_size > 500 and (out / f"{name}.json").is_file()
    fig6 = json.loads((out / "fig6_progressive.json").read_text())
    w, h = Image.open(out / "fig6_progressive.png").size
    cols = len(fig6["t_shown_0based"])
    assert fig6["t_shown_0based"][0] == 39 and fig6["t_shown_0based"][-1] == 0
    assert (w, h) == (2 + cols * (8 + 2), 2 + 3 * (8 + 2))
    fig8 = json.loads((out / "fig8_interpolation.json").read_text())
    # --interp-t counts as the paper does (from 1, like Fig. 9's steps): t = 20 is the 0-based index 19
    assert fig8["lambdas"] == [0.0, 0.5, 1.0] and fig8["t_paper"] == 20 and fig8["t_0based"] == 19
    loaded = load_model(str(ck))
    x = next(iter_float(str(shards), "test", 4))
    at = {t: interpolation(loaded.diffusion, loaded.model.eval(), x[:2], x[2:4], [0.0, 0.5, 1.0], t=t)
          for t in (19, 20)}
    rmse0 = {t: float(np.sqrt(((g[:, 1].astype(np.float64) - g[:, 0]) ** 2).mean())) for t, g in at.items()}
    assert abs(fig8["rmse_lambda0_vs_a"] - rmse0[19]) < 1e-9 and abs(rmse0[20] - rmse0[19]) > 1e-6
    w, h = Image.open(out / "fig8_interpolation.png").size
    assert (w, h) == (2 + 5 * 10, 2 + fig8["pairs"] * 10)
    res = json.loads((out / "results.json").read_text())["evaluations"]["figures"]
    assert set(res["metrics"]) == {"fig5", "fig6", "fig8"}
    # a wrong figure name, or a t outside 1..T, is a one-line error
    r = run_eval("figures", ck, "--out", out, "--which", 8, "--interp-t", 0, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--interp-t 0" in r.stderr
    r = run_eval("figures", ck, "--out", out, "--which", 11, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "'11'" in r.stderr
