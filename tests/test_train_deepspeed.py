"""Multi-process training on CPU over gloo: 2-process DDP and 2-process DeepSpeed ZeRO-2 runs of
the tiny model finish with identical EMA weights on both ranks; ZeRO-2 (resumed half-way) follows
the DDP trajectory; the bf16 and fp16 DeepSpeed paths (16-bit weights, inputs cast to them) train.

The first DeepSpeed launch on a machine compiles a small op (~50 s, cached under
~/.cache/ddpm-pipeline/torch_extensions)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pipeline import checkpoint as ck
from pipeline.config import load_recipe
from pipeline.hardware import precision_problem
from pipeline.unet import UNet
from support.training import assert_same_trajectory, make_tiny_shards, run_train, weights, write_recipe

pytestmark = pytest.mark.slow
STEPS = 4


def ema_digest(ckpt) -> str:
    """EMA.digest() of the saved ema.safetensors (same name order: the model's parameters)."""
    names = [n for n, _ in UNet(**load_recipe(ckpt / "config.yaml").model.unet_kwargs()).named_parameters()]
    ema = weights(ckpt, "ema.safetensors")
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode())
        h.update(ema[n].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_ranks_agree(run_dir, world=2):
    cks = ck.list_checkpoints(run_dir)
    assert cks
    for c in cks:
        digests = ck.read_trainer_state(c)["ema_sha256_by_rank"]
        assert len(digests) == world and len(set(digests)) == 1, (c, digests)
        assert digests[0] == ema_digest(c)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    shards = make_tiny_shards(root / "shards")
    recipe = write_recipe(root / "ddp.yaml", shards, root / "ddp", model={"dropout": 0.0},
                          train={"max_steps": STEPS, "checkpoint_every": 2})
    r = run_train(recipe, procs=2)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, shards, root / "ddp"


def test_ddp_two_processes_identical_ema(ddp_run):
    root, shards, run = ddp_run
    assert ck.latest_checkpoint(run).name == f"step-{STEPS:08d}"
    assert_ranks_agree(run)
    state = ck.read_trainer_state(ck.latest_checkpoint(run))
    assert state["world_size"] == 2 and state["micro_batch_size"] == 2 and state["grad_accum"] == 1


def test_deepspeed_zero2_two_processes_resume_and_match_ddp(ddp_run):
    root, shards, ddp = ddp_run
    run = root / "ds"
    recipe = write_recipe(root / "ds.yaml", shards, run, model={"dropout": 0.0},
                          train={"max_steps": STEPS // 2, "checkpoint_every": 2})
    r = run_train(recipe, deepspeed=True, procs=2, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (c,) = ck.list_checkpoints(run)
    assert (c / "accelerate" / "pytorch_model").is_dir()  # DeepSpeed's sharded layout
    assert len(list((c / "accelerate" / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    r = run_train(recipe, f"train.max_steps={STEPS}", deepspeed=True, procs=2, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert_ranks_agree(run)
    final, ref = ck.latest_checkpoint(run), ck.latest_checkpoint(ddp)
    assert final.name == ref.name
    for name in ("model.safetensors", "ema.safetensors"):
        start = weights(ddp / "checkpoints" / f"step-{STEPS // 2:08d}", name)
        assert_same_trajectory(weights(final, name), weights(ref, name), start)


def _ds_precision_problem(precision: str) -> str | None:
    """What the trainer asks before a DeepSpeed run (DeepSpeed's CPU accelerator here)."""
    return precision_problem(precision, "cpu", deepspeed=True)


def _needs_support(precision: str):
    problem = _ds_precision_problem(precision)
    return pytest.param(precision, marks=pytest.mark.skipif(problem is not None, reason=problem or ""))


@pytest.mark.parametrize("precision", [_needs_support("bf16"), _needs_support("fp16")])
def test_deepspeed_16bit_weights_train(ddp_run, precision):
    """DeepSpeed keeps 16-bit weights (fp32 master copy in the optimizer); fp16 with its loss scaler."""
    root, shards, _ = ddp_run
    run = root / f"ds-{precision}"
    recipe = write_recipe(root / f"{precision}.yaml", shards, run,
                          train={"max_steps": 2, "checkpoint_every": 2, "mixed_precision": precision})
    r = run_train(recipe, deepspeed=True, procs=2, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_ranks_agree(run)
    c = ck.latest_checkpoint(run)
    w, ema = weights(c), weights(c, "ema.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in w.values())
    assert ck.read_trainer_state(c)["nonfinite_total"] == 0
    assert any(not torch.equal(w[k], ema[k]) for k in w)  # it trained (EMA lags the weights)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_unsupported_deepspeed_precision_is_refused_in_one_line(ddp_run, precision):
    """Where DeepSpeed's accelerator cannot run the precision, the trainer says so before any
    work (exit 2, one line naming it) instead of a traceback from deepspeed.initialize."""
    problem = _ds_precision_problem(precision)
    if problem is None:
        pytest.skip(f"{precision} is supported by DeepSpeed's accelerator on this CPU: nothing to refuse")
    root, shards, _ = ddp_run
    run = root / f"refused-{precision}"
    recipe = write_recipe(root / f"refused-{precision}.yaml", shards, run,
                          train={"max_steps": 2, "mixed_precision": precision})
    r = run_train(recipe, deepspeed=True, procs=2, timeout=600)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors and all(problem in ln and f"train.mixed_precision={precision}" in ln for ln in errors), r.stderr[-3000:]
    # The launcher still reports the failed ranks; nothing comes from inside DeepSpeed.
    assert "deepspeed/runtime" not in r.stderr and "is not supported on your device" not in r.stderr
    assert not (run / "checkpoints").exists()
