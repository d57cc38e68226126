"""t and eps of Algorithm 1 drawn in the training loader's workers (pipeline.diffusion.NoiseDraw
through TrainLoader(draw=...)): the same values as `draw_t_and_noise` at each sample's global
stream position, whatever the worker count, rank layout or resume point."""

from __future__ import annotations

import torch

from pipeline.data import TrainLoader
from pipeline.diffusion import NoiseDraw, draw_t_and_noise
from support.training import make_tiny_shards


def test_loader_draws_match_the_stream_positions(tmp_path):
    shards = make_tiny_shards(tmp_path / "s")
    draw = NoiseDraw(seed=7, timesteps=100)
    plain = TrainLoader(shards, batch_size=3, rank=1, world_size=2, seed=7, num_workers=0)
    noisy = TrainLoader(shards, batch_size=3, rank=1, world_size=2, seed=7, num_workers=2, draw=draw)
    for step in range(3):
        x0, t, eps = next(noisy)
        first = step * 6 + 3  # rank 1 takes positions 3..5 of each global batch of 6
        want_t, want_eps = draw_t_and_noise(range(first, first + 3), 100, (3, 16, 16), 7, "cpu")
        assert torch.equal(x0, next(plain)) and torch.equal(t, want_t) and torch.equal(eps, want_eps)
        assert eps.dtype == torch.float32 and t.dtype == torch.long
    assert noisy.position == plain.position == 18


def test_loader_draws_do_not_depend_on_world_size_or_resume(tmp_path):
    shards = make_tiny_shards(tmp_path / "s")
    draw = NoiseDraw(seed=3, timesteps=50)
    one = TrainLoader(shards, batch_size=4, seed=3, num_workers=1, draw=draw)
    batches = [next(one) for _ in range(3)]
    ranks = [TrainLoader(shards, batch_size=2, rank=r, world_size=2, seed=3, num_workers=0, draw=draw) for r in range(2)]
    resumed = TrainLoader(shards, batch_size=4, seed=3, num_workers=0, draw=draw)
    resumed.load_state_dict({**one.state_dict(), "position": 4})
    for step, (x0, t, eps) in enumerate(batches):
        halves = [next(r) for r in ranks]
        for k in range(3):
            assert torch.equal(torch.cat([h[k] for h in halves]), batches[step][k])
        if step >= 1:
            assert all(torch.equal(a, b) for a, b in zip(next(resumed), (x0, t, eps)))
