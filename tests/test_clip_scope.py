"""train.clip_scope: the original's clipping of each TPU core's gradient before the sum
(pipeline/clipping.py), against a hand computation, global clipping, and 1 vs 2 processes."""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed

from pipeline import build
from pipeline import checkpoint as ck
from pipeline.clipping import ReplicaClipper, clip_factor, make_clipper, replica_micro_batch
from pipeline.config import RecipeError, TrainConfig, load_recipe
from pipeline.trainer import train
from support.training import assert_bitwise_equal, assert_same_trajectory, make_tiny_shards, run_train, weights, write_recipe


def _original(net, xs, c):
    """The original's update for one step, core k fed xs[k]: sum_k clip(g_k / N, c / N); and ||g_k||."""
    N = len(xs)
    want = [torch.zeros_like(p) for p in net.parameters()]
    norms = []
    for x in xs:
        g = torch.autograd.grad(net(x).pow(2).mean(), list(net.parameters()))
        g = [gi / N for gi in g]  # CrossShardOptimizer's loss scaling
        n = torch.linalg.vector_norm(torch.cat([gi.flatten() for gi in g]))
        norms.append(n * N)  # ||g_k||
        f = (c / N) / max(n.item(), c / N)  # tf.clip_by_global_norm(grads, grad_clip / N)
        want = [w + gi * f for w, gi in zip(want, g)]
    return want, torch.stack(norms)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_clipper_is_the_mean_of_per_core_clipped_gradients(device):
    """Accelerate leaves g_k / accum in p.grad; the original's core k contributes
    clip(g_k / N, c / N) (CrossShardOptimizer's 1/N loss scaling, run_training's grad_clip / N),
    and the contributions are summed (cross_replica_sum): mean_k clip(g_k, c).
    The clipper adds the shares one way on CUDA and another off it: both are checked."""
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3).to(device)
    xs = [torch.randn(4, 5, device=device) * s for s in (0.1, 1.0, 10.0, 3.0)]  # some cores under c, some over
    N, c = len(xs), 0.5
    want, norms = _original(net, xs, c)
    assert min(norms) < c < max(norms)
    # the same, said as "each core's gradient clipped to norm c, then averaged"
    mean_clipped = [torch.zeros_like(p) for p in net.parameters()]
    for x, n in zip(xs, norms):
        g = torch.autograd.grad(net(x).pow(2).mean(), list(net.parameters()))
        mean_clipped = [m + gi * (c / max(n.item(), c)) / N for m, gi in zip(mean_clipped, g)]
    for w, m in zip(want, mean_clipped):
        torch.testing.assert_close(w, m, rtol=1e-6, atol=1e-8)
    assert float(clip_factor(torch.tensor(0.1), 1.0)) == 1.0 and float(clip_factor(torch.tensor(4.0), 1.0)) == 0.25

    # Steps as the trainer takes them: the optimizer sets p.grad to None after each, and step 1
    # is dropped before finish() (a non-finite loss). Off CUDA the clipper's tensors take turns
    # from step to step: none may carry one step's gradient into another.
    clipper = ReplicaClipper(net.parameters(), c, world=1, replicas=N)
    for step in range(4):
        batch = [x * (1 + step) for x in xs]
        clipper.begin()
        for x in batch:
            (net(x).pow(2).mean() / N).backward()  # accumulation over N micro-steps on one process
            clipper.take()
        if step != 1:
            mean_norm = clipper.finish()
            want, norms = _original(net, batch, c)
            for p, w in zip(net.parameters(), want):
                torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(mean_norm, norms.mean(), rtol=1e-6, atol=1e-7)
        net.zero_grad(set_to_none=True)


def test_layout_and_refusals():
    tc = TrainConfig(global_batch_size=128, clip_scope="replica", clip_replicas=8)
    assert replica_micro_batch(tc, 1) == 16 and replica_micro_batch(tc, 8) == 16
    with pytest.raises(RecipeError, match="clip_replicas=8 is not a multiple of the 3 processes"):
        replica_micro_batch(tc, 3)
    with pytest.raises(RecipeError, match="a micro-batch is one replica"):
        replica_micro_batch(TrainConfig(global_batch_size=128, micro_batch_size=8, clip_scope="replica"), 1)
    assert replica_micro_batch(TrainConfig(micro_batch_size=8), 1) == 8  # global scope: the recipe's
    net = torch.nn.Linear(2, 2)
    assert make_clipper(TrainConfig(), net, 1, False, "no") is None  # global: the trainer clips
    with pytest.raises(RecipeError, match="DeepSpeed clips inside its engine"):
        make_clipper(tc, net, 1, True, "no")
    with pytest.raises(RecipeError, match="fp16's loss scaling"):
        make_clipper(tc, net, 1, False, "fp16")
    assert isinstance(make_clipper(tc, net, 1, False, "bf16"), ReplicaClipper)
    with pytest.raises(RecipeError, match="train.clip_replicas: must be positive and divide"):
        from pipeline.config import Recipe

        Recipe.from_dict({"model": {"preset": "cifar10"}, "train": {"clip_replicas": 3, "clip_scope": "replica"}})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("shards") / "s")


def _recipe(tmp_path, shards, name, **train_cfg):
    return load_recipe(write_recipe(tmp_path / f"{name}.yaml", shards, tmp_path / name, model={"dropout": 0.0},
                                    train={"max_steps": 2, "checkpoint_every": 2, **train_cfg}))


def _initial(recipe) -> dict:
    """The weights every run of `recipe` starts from (build_parts: set_seed, then the U-Net)."""
    set_seed(recipe.train.seed)
    return build.unet(recipe.model).state_dict()


def _train(tmp_path, shards, name, **train_cfg):
    recipe = _recipe(tmp_path, shards, name, **train_cfg)
    try:
        assert train(recipe) == 0
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return weights(ck.latest_checkpoint(tmp_path / name))


def test_replica_equals_global_without_clipping_and_differs_with_it(tmp_path, shards):
    # No replica reaches the threshold: mean_k g_k is the averaged gradient, as in global.
    a = _train(tmp_path, shards, "g_big", grad_clip=1e6)
    b = _train(tmp_path, shards, "r_big", grad_clip=1e6, clip_scope="replica", clip_replicas=2)
    assert_same_trajectory(b, a, _initial(_recipe(tmp_path, shards, "g_big")))
    # Every replica over the threshold: mean_k c g_k / |g_k| is another direction than the mean.
    c = _train(tmp_path, shards, "g_small", grad_clip=1e-4)
    d = _train(tmp_path, shards, "r_small", grad_clip=1e-4, clip_scope="replica", clip_replicas=2)
    assert max((c[k] - d[k]).abs().max().item() for k in c) > 1e-4


def test_replica_scope_resume_is_bitwise_exact(tmp_path, shards):
    """Off CUDA the clipper's tensors carry over from step to step (ReplicaClipper._add_host):
    a run stopped at step 2 and resumed (fresh tensors) ends bitwise equal to one that was not."""
    clipped = dict(grad_clip=1e-4, clip_scope="replica", clip_replicas=2, checkpoint_every=2)
    whole = _train(tmp_path, shards, "whole", max_steps=4, **clipped)
    _train(tmp_path, shards, "halves", max_steps=2, **clipped)
    assert ck.latest_checkpoint(tmp_path / "halves").name == "step-00000002"
    halves = _train(tmp_path, shards, "halves", max_steps=4, **clipped)
    assert ck.latest_checkpoint(tmp_path / "halves").name == "step-00000004"
    assert_bitwise_equal(halves, whole)


@pytest.mark.slow
def test_replica_scope_same_weights_on_one_and_two_processes(tmp_path, shards):
    runs = {}
    for procs in (1, 2):
        recipe = write_recipe(tmp_path / f"r{procs}.yaml", shards, tmp_path / f"r{procs}", model={"dropout": 0.0},
                              train={"max_steps": 3, "checkpoint_every": 3, "grad_clip": 0.05,
                                     "clip_scope": "replica", "clip_replicas": 2})
        r = run_train(recipe, procs=procs)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[procs] = weights(ck.latest_checkpoint(tmp_path / f"r{procs}"))
    start = _initial(load_recipe(tmp_path / "r1.yaml"))
    assert_same_trajectory(runs[2], runs[1], start)
    g = write_recipe(tmp_path / "g.yaml", shards, tmp_path / "g", model={"dropout": 0.0},
                     train={"max_steps": 3, "checkpoint_every": 3, "grad_clip": 0.05})
    assert run_train(g).returncode == 0
    glob = weights(ck.latest_checkpoint(tmp_path / "g"))
    diff_procs = max((runs[1][k] - runs[2][k]).abs().max().item() for k in glob)
    diff_scope = max((runs[1][k] - glob[k]).abs().max().item() for k in glob)
    assert diff_scope > 20 * diff_procs
