"""The EMA the trainer keeps is the recipe's: ema_k = d ema_{k-1} + (1 - d) w_k after every
optimizer step k, with d = train.ema_decay (or its warm-up), read from a checkpoint per step
of a real in-process run on real shards. pipeline/ema.py's arithmetic itself is checked
against a per-tensor reference in test_train.py; this ties it to the recipe and the loop."""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from pipeline import checkpoint as ck
from pipeline.config import load_recipe
from pipeline.ema import warmup_decay
from pipeline.train import EXIT_OK
from pipeline.trainer import train
from support.training import make_tiny_shards, weights, write_recipe

STEPS = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("shards") / "s")


def run_and_read(tmp_path, shards, **train_cfg) -> list[tuple[dict, dict]]:
    """(raw weights, EMA) after each of STEPS optimizer steps, from a checkpoint at every step."""
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", shards, tmp_path / "run", train={
        "max_steps": STEPS, "checkpoint_every": 1, "keep_checkpoints": STEPS, **train_cfg}))
    try:
        assert train(recipe) == EXIT_OK
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    ckpts = ck.list_checkpoints(tmp_path / "run")
    assert [c.name for c in ckpts] == [ck.step_name(s) for s in range(1, STEPS + 1)]
    return [(weights(c, "model.safetensors"), weights(c, "ema.safetensors")) for c in ckpts]


def assert_recurrence(states, decay_of_update):
    """ema_k == d_k ema_{k-1} + (1 - d_k) w_k for k = 2..STEPS (update k - 1, 0-based), in float64,
    and the EMA moved enough that another decay would be seen."""
    for k in range(1, len(states)):
        (_, ema_prev), (w, ema) = states[k - 1], states[k]
        d = decay_of_update(k)
        for name in ema:
            want = d * ema_prev[name].double() + (1 - d) * w[name].double()
            torch.testing.assert_close(ema[name].double(), want, rtol=0, atol=1e-7, msg=lambda m: f"step {k + 1}, {name}: {m}")
        gap = max((w[n].double() - ema_prev[n].double()).abs().max().item() for n in ema)
        assert gap > 1e-4, f"step {k + 1}: weights and EMA too close ({gap:.2g}) to tell decays apart"


@pytest.mark.parametrize("decay", [0.83])  # not the schema's 0.9999 nor the tiny recipe's 0.9
def test_trainer_ema_follows_the_recipes_decay(tmp_path, shards, decay):
    assert_recurrence(run_and_read(tmp_path, shards, ema_decay=decay), lambda n: decay)


def test_trainer_ema_warmup_follows_its_schedule(tmp_path, shards):
    """train.ema_warmup: update n uses min(ema_decay, (1 + n) / (10 + n)); with ema_decay 0.15
    the cap is reached at update 1 (2/11 > 0.15), so both branches of the min are exercised."""
    decays = [warmup_decay(0.15, n) for n in range(STEPS)]
    assert decays[0] == pytest.approx(0.1) and decays[1] == decays[3] == 0.15
    assert_recurrence(run_and_read(tmp_path, shards, ema_decay=0.15, ema_warmup=True), lambda n: decays[n])
