"""eval nll: the analytic oracle's bound through the real CLI equals its closed form; the split is
read exactly once over processes; a (briefly) trained model beats the uniform 8 bits/dim."""

import json

import numpy as np
import pytest
import torch

from eval.common import load_model
from eval.nll import iter_float, run_nll
from pipeline.config import save_recipe
from support.cli import PY, run_eval
from support.folder_shards import make_folder_shards
from support.model import make_checkpoint, tiny_recipe
from support.oracle import oracle_bpd, oracle_factory


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    """Shards whose test split is one image, with a non-trivial picture (edge bins included)."""
    return make_folder_shards(tmp_path_factory.mktemp("one") / "data", n=6, size=8, test_count=1, smooth=False)


def _oracle_dir(tmp_path, shards, var_type):
    d = tmp_path / f"oracle-{var_type}"
    d.mkdir()
    save_recipe(tiny_recipe(timesteps=1000, shards=str(shards), var_type=var_type), d / "config.yaml")
    return d


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small"])
def test_oracle_nll_through_the_cli_matches_the_closed_form(tmp_path, one_image, var_type):
    src = _oracle_dir(tmp_path, one_image, var_type)
    out = tmp_path / "out"
    r = run_eval("nll", src, "--out", out, "--model-factory", "support.oracle:oracle_factory", "--t-batch", 250)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    m, proto = res["evaluations"]["nll"]["metrics"], res["evaluations"]["nll"]["protocol"]
    x_star = next(iter_float(str(one_image), "test", 4))[0]
    want = oracle_bpd(x_star, oracle_factory(str(src)).diffusion)
    assert m["num_images"] == 1 and proto["split"] == "test" and proto["timesteps"] == 1000
    assert abs(m["L_T_bpd"] - want["prior"]) < 1e-6
    assert abs(m["L_1_to_T-1_bpd"] - want["L_1_to_T-1"]) < 1e-4 * max(1, want["L_1_to_T-1"])
    assert abs(m["L_0_bpd"] - want["L_0"]) < 2e-3 * want["L_0"]
    assert abs(m["bpd"] - want["total"]) < 2e-3 * want["total"]
    if var_type == "fixed_small":
        assert want["L_1_to_T-1"] == 0.0  # the exact mean and variance: every KL term vanishes
    else:
        assert want["L_1_to_T-1"] > 0.01
    # the decoder's Phi approximation (tanh, as in the original) is close to the exact Phi
    exact = oracle_bpd(x_star, oracle_factory(str(src)).diffusion, exact_cdf=True)
    assert abs(exact["L_0"] - want["L_0"]) < 5e-3 * want["L_0"]
    assert res["checkpoint"]["weights_sha256"] and "torch" in res["versions"]


def test_nll_reads_every_test_image_once_and_reports_terms(tmp_path):
    shards = make_folder_shards(tmp_path / "d", n=10, size=8, test_count=5)
    loaded = load_model(str(make_checkpoint(tmp_path / "ck", tiny_recipe(shards=str(shards)))))
    m = run_nll(loaded, str(shards), batch_size=2, t_batch=7, progress=False)
    assert m["num_images"] == 5
    assert abs(m["bpd"] - (m["L_0_bpd"] + m["L_1_to_T-1_bpd"] + m["L_T_bpd"])) < 1e-6 * m["bpd"]
    # noise is keyed by image: another batch size gives the same number
    again = run_nll(loaded, str(shards), batch_size=5, t_batch=7, progress=False)
    assert again["num_images"] == 5 and abs(again["bpd"] - m["bpd"]) < 1e-5 * m["bpd"]
    # ... and so does a prefix: image k's bound is k m_k - (k - 1) m_{k-1} from the means over the
    # first k. Their spread gives the standard error of the mean, std(ddof=1) / sqrt(n).
    prefixes = [run_nll(loaded, str(shards), batch_size=2, t_batch=7, limit=k, progress=False) for k in range(1, 5)]
    assert [p["num_images"] for p in prefixes] == [1, 2, 3, 4]
    means = [0.0] + [p["bpd"] for p in prefixes] + [m["bpd"]]
    per_image = np.array([k * means[k] - (k - 1) * means[k - 1] for k in range(1, 6)])
    assert per_image.std() > 1e-3  # a real spread between images, not a constant
    assert m["bpd_sem"] == pytest.approx(per_image.std(ddof=1) / np.sqrt(5), rel=1e-4)


def test_nll_cli_bad_input_is_one_line(tmp_path):
    ck = make_checkpoint(tmp_path / "ck", tiny_recipe(shards=str(tmp_path / "missing")))
    r = run_eval("nll", ck, "--out", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "manifest.json" in r.stderr


@pytest.mark.slow
def test_nll_two_processes_cover_the_split_once(tmp_path):
    shards = make_folder_shards(tmp_path / "d", n=12, size=8, test_count=5)
    ck = make_checkpoint(tmp_path / "ck", tiny_recipe(shards=str(shards)))
    launcher = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m"]
    r = run_eval("nll", ck, "--out", tmp_path / "o2", "--batch-size", 2, launcher=launcher)
    assert r.returncode == 0, r.stderr[-3000:]
    m2 = json.loads((tmp_path / "o2" / "results.json").read_text())["evaluations"]["nll"]
    assert m2["metrics"]["num_images"] == 5 and m2["protocol"]["processes"] == 2
    m1 = run_nll(load_model(str(ck)), str(shards), batch_size=3, t_batch=5, progress=False)
    # each image's noise is keyed by the image, not by rank or batch: the same number
    assert abs(m1["bpd"] - m2["metrics"]["bpd"]) < 1e-5 * m1["bpd"]


@pytest.mark.slow
def test_briefly_trained_model_beats_uniform_8_bits(tmp_path):
    shards = make_folder_shards(tmp_path / "d", n=40, size=8, test_count=4)
    recipe = tiny_recipe(timesteps=1000, shards=str(shards))
    ck = make_checkpoint(tmp_path / "ck", recipe)
    loaded = load_model(str(ck))
    model, d = loaded.model.train().requires_grad_(True), loaded.diffusion
    x = torch.cat(list(iter_float(str(shards), "train", 64)))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(400):  # L_simple (eq. 14) on the training split
        idx = torch.randint(0, len(x), (32,), generator=g)
        t = torch.randint(0, d.num_timesteps, (32,), generator=g)
        loss = d.training_loss(model, x[idx], t, torch.randn(x[idx].shape, generator=g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    m = run_nll(loaded, str(shards), batch_size=4, t_batch=100, progress=False)
    assert m["num_images"] == 4
    assert m["bpd"] < 8.0, m
