"""recipes/ablations/: the CIFAR-10 rows of Table 2. Each differs from recipes/cifar10.yaml only in
the lines that define its row, cites its row and the paper's IS/FID, and trains for a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState

from pipeline import checkpoint as ck
from pipeline.config import load_recipe
from pipeline.trainer import train
from support.training import make_tiny_shards, weights

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "recipes" / "ablations"
# Table 2: row -> (mean_type, var_type, loss_type), and the IS / FID the paper reports ("-": unstable).
ROWS = {
    "mu_L_learned": (("mu", "learned", "vlb"), ("7.28", "23.69")),
    "mu_L_fixed": (("mu", "fixed_large", "vlb"), ("8.06", "13.22")),
    "mu_mse": (("mu", "fixed_large", "mu_mse"), ("-", "-")),
    "eps_L_learned": (("eps", "learned", "vlb"), ("-", "-")),
    "eps_L_fixed": (("eps", "fixed_large", "vlb"), ("7.67", "13.51")),
    "eps_simple": (("eps", "fixed_large", "simple"), ("9.46", "3.17")),
}
DEFINING = {"diffusion.mean_type", "diffusion.var_type", "diffusion.loss_type", "model.out_channels",
            "run.name", "run.output_dir"}
# Rows trained on the bound L or predicting mu-tilde train in float32 (a bf16 output puts a floor
# under L: bench/bound_precision.py); eps with L_simple keeps cifar10.yaml's bf16.
FP32_ROWS = {"mu_L_learned", "mu_L_fixed", "mu_mse", "eps_L_learned", "eps_L_fixed"}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_the_rows_are_there_and_differ_only_in_their_defining_lines():
    assert {p.stem for p in ABLATIONS.glob("*.yaml")} == set(ROWS)
    base = flat(yaml.safe_load((ROOT / "recipes" / "cifar10.yaml").read_text()))
    for name, ((mean, var, loss), (is_, fid)) in ROWS.items():
        path = ABLATIONS / f"{name}.yaml"
        text = path.read_text()
        row = flat(yaml.safe_load(text))
        changed = {k for k in base.keys() | row.keys() if base.get(k) != row.get(k)}
        allowed = DEFINING | ({"train.mixed_precision"} if name in FP32_ROWS else set())
        assert changed <= allowed, (name, changed - allowed)
        r = load_recipe(path)
        assert r.train.mixed_precision == ("no" if name in FP32_ROWS else "bf16"), name
        assert (name in FP32_ROWS) == (r.diffusion.loss_type == "vlb" or r.diffusion.mean_type == "mu"), name
        assert (r.diffusion.mean_type, r.diffusion.var_type, r.diffusion.loss_type) == (mean, var, loss), name
        assert r.model.unet_kwargs().get("out_channels", 3) == (6 if var == "learned" else 3)
        header = text.split("\nmodel:")[0]
        assert "Table 2" in header and f"IS {is_}" in header and f"FID {fid}" in header, name


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("shards") / "s")


TINY = ["model.resolution=16", "model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
        "model.attn_resolutions=[8]", "model.dropout=0.0", "diffusion.timesteps=20",
        "train.global_batch_size=4", "train.clip_replicas=2", "train.max_steps=3", "train.warmup_steps=1", "train.lr=1e-3",
        "train.mixed_precision=no", "train.checkpoint_every=3", "train.sample_every=0",
        "train.log_every=1", "data.num_workers=0", "run.tracker=none"]


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_row_trains_a_few_steps_on_cpu(tmp_path, shards, name):
    run = tmp_path / "run"
    recipe = load_recipe(ABLATIONS / f"{name}.yaml", [*TINY, f"data.shards={shards}", f"run.output_dir={run}"])
    try:
        assert train(recipe) == 0
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    c = ck.latest_checkpoint(run)
    assert c.name == "step-00000003"
    w = weights(c)
    assert all(torch.isfinite(v).all() for v in w.values())
    assert w["conv_out.weight"].shape[0] == (6 if ROWS[name][0][1] == "learned" else 3)
