"""Progress on long evaluation work (issue 24): sampling ticks per denoising step over a total of
steps x batches, and the NLL and reference-statistics bars know their totals. What the user sees
is the CLI's stderr, so that is what is read."""

from __future__ import annotations

import re

import torch

from pipeline import build
from pipeline.config import DiffusionConfig
from support.cli import run_eval
from support.folder_shards import make_folder_shards
from support.model import make_checkpoint, tiny_recipe

TINY = "tiny-seeded=support.features:TinyFeatures"


def test_sampling_loops_report_every_step():
    d = build.diffusion(DiffusionConfig(timesteps=12))
    model = lambda x, t: torch.zeros_like(x)  # any model(x_t, t)
    seen = []
    d.p_sample_loop(model, (1, 3, 4, 4), generator=torch.Generator().manual_seed(0),
                    callback=lambda t, x, x0: seen.append(t))
    assert seen == list(range(11, -1, -1))
    seen.clear()
    d.ddim_sample_loop(model, (1, 3, 4, 4), 5, generator=torch.Generator().manual_seed(0),
                       callback=lambda t, x, x0: seen.append(t))
    assert len(seen) == 5 and seen[0] == 11 and seen[-1] == 0


def test_sample_bar_counts_denoising_steps_times_batches(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    r = run_eval("sample", ck, "--out", tmp_path / "s", "--num-samples", 5, "--batch-size", 2,
                 "--sampler", "ddim", "--steps", 4)
    assert r.returncode == 0, r.stderr[-3000:]
    # 5 images in batches of 2: 3 batches of 4 steps each
    assert re.search(r"sampling \[0\] 5 images: 3 batches x 4 steps: 100%.*\b12/12\b", r.stderr), r.stderr[-2000:]


def test_nll_and_reference_bars_have_totals(tmp_path):
    shards = make_folder_shards(tmp_path / "d", n=9, size=8, test_count=3)
    ck = make_checkpoint(tmp_path / "ck", tiny_recipe(shards=str(shards)))
    r = run_eval("nll", ck, "--out", tmp_path / "o", "--batch-size", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"nll \[0\] test: 100%.*\b3/3\b", r.stderr), r.stderr[-2000:]
    r = run_eval("ref-stats", shards, "--out", tmp_path / "ref.npz", "--feature-extractor", TINY,
                 "--feature-batch-size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"reference features \(train\): 100%.*\b6/6\b", r.stderr), r.stderr[-2000:]
