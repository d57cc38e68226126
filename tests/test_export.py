"""Exports (`python -m eval export`, eval/export.py) and diffusers' pipeline layout
(eval/diffusers_layout.py): what `DDPMPipeline.from_pretrained` opens, locally and from the Hub
(scripts/hub_server.py), generates the image our Algorithm 2 generates from the same noise."""

from __future__ import annotations

import json
import os
import subprocess as sp
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from eval.export import ExportError, export
from eval.hub_push import push_to_hub
from pipeline.hub import load_pretrained
from support.hub import ROOT, eval_cli, fresh_cache
from support.hub_models import make_run, outputs
from support.training import make_tiny_shards, train_cmd, write_recipe


def _ours(run, seed, n=1):
    p = load_pretrained(run)
    res = p.recipe.model.unet_kwargs()["resolution"]
    x = p.diffusion.p_sample_loop(p.model, (n, 3, res, res), generator=torch.Generator().manual_seed(seed))
    return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy(), p


def _pipeline_image(src, seed, n=1):
    from diffusers import DDPMPipeline  # the test extra, and slow to import

    pipe = DDPMPipeline.from_pretrained(src)
    pipe.set_progress_bar_config(disable=True)
    steps = pipe.scheduler.config.num_train_timesteps
    out = pipe(batch_size=n, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
               output_type="np")
    return out.images, pipe


def _check_same_image(run, src, seed=3):
    """DDPMPipeline draws x_T and then one noise per step t > 0 from its generator, as our
    p_sample_loop does: the same seed gives the same image, if the U-Net, betas, variance and
    clipping all carried over."""
    ours, p = _ours(run, seed)
    theirs, pipe = _pipeline_image(src, seed)
    assert theirs.shape == ours.shape and np.isfinite(theirs).all()
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=0)
    assert pipe.scheduler.config.variance_type == p.recipe.diffusion.var_type
    assert pipe.scheduler.config.clip_sample is True
    return pipe


def test_export_diffusers_layout_opens_in_ddpm_pipeline(tmp_path):
    run = make_run(tmp_path / "run")
    files = export(run, tmp_path / "out", format="diffusers")
    assert files == ["README.md", "config.yaml", "model_index.json", "results.json", "samples/step-00000040.png",
                     "scheduler/scheduler_config.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    _check_same_image(run, tmp_path / "out")

    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "unconditional-image-generation"
    # the folder's name, never a local path; the model's own T (issue 24)
    assert 'DDPMPipeline.from_pretrained("out")' in card.text and str(tmp_path) not in card.text
    assert "num_inference_steps=" in card.text
    fid = next(r for r in card.data.eval_results if r.metric_type == "fid")
    assert fid.metric_value == 123.4 and fid.metric_args["num_samples"] == 64
    assert fid.metric_args["reference"] == "train split, 50k" and fid.metric_args["sampler"] == "ancestral"

    # Our loader reads the pipeline folder back, with the training recipe kept beside it.
    back = load_pretrained(tmp_path / "out")
    assert back.recipe.run.name == "cifar10-tiny" and back.recipe.data.shards == "data/cifar10"
    torch.testing.assert_close(outputs(back.model), outputs(load_pretrained(run).model), rtol=0, atol=1e-5)


def test_export_native_and_refusals(tmp_path):
    run = make_run(tmp_path / "run", results=False)
    files = export(run, tmp_path / "native")
    assert files == ["README.md", "config.json", "config.yaml", "ema.safetensors", "samples/step-00000040.png"]
    torch.testing.assert_close(outputs(load_pretrained(tmp_path / "native").model),
                               outputs(load_pretrained(run).model), rtol=0, atol=0)
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(run, tmp_path / "native")
    assert export(run, tmp_path / "native", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_export_cli(tmp_path):
    run = make_run(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = eval_cli(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "e")], env)
    assert r.returncode == 0, r.stderr
    assert "8 files" in r.stdout and (tmp_path / "e" / "unet" / "config.json").is_file()
    again = eval_cli(["export", str(run), "--out", str(tmp_path / "e")], env)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "exists and is not empty" in again.stderr and "Traceback" not in again.stderr
    h = eval_cli(["export", "--help"], env)
    assert h.returncode == 0 and "DDPMPipeline" in h.stdout and "--format" in h.stdout


def test_pushed_diffusers_repo_opens_in_ddpm_pipeline_from_the_hub(hub, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    out = push_to_hub(run, "alice/tiny-pipe", format="diffusers")
    assert "model_index.json" in out["files"] and "unet/diffusion_pytorch_model.safetensors" in out["files"]
    assert len(hub.commits("alice/tiny-pipe")) == 2  # one commit on top of the repo's first
    _check_same_image(run, "alice/tiny-pipe")  # diffusers pulls from the local Hub itself
    fresh_cache(monkeypatch, tmp_path, "other-cache")
    back = load_pretrained("alice/tiny-pipe")
    assert back.recipe.run.name == "cifar10-tiny"  # config.yaml came down with the pipeline
    torch.testing.assert_close(outputs(back.model), outputs(load_pretrained(run).model), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_trained_run_exports_to_ddpm_pipeline(hub, tmp_path):
    """A run of the real trainer (the quickstart's tiny U-Net, T = 100), exported in the diffusers
    layout by the CLI and pushed to the Hub: DDPMPipeline generates our image from both."""
    shards = make_tiny_shards(tmp_path / "shards")
    recipe = write_recipe(tmp_path / "r.yaml", shards, tmp_path / "run", train={"max_steps": 2, "checkpoint_every": 2})
    cmd, env = train_cmd(recipe)
    r = sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    e = eval_cli(["export", str(tmp_path / "run"), "--format", "diffusers", "--out", str(tmp_path / "pipe")],
                 {**os.environ, "PYTHONPATH": str(ROOT)})
    assert e.returncode == 0, e.stderr
    _check_same_image(tmp_path / "run", tmp_path / "pipe")
    push_to_hub(tmp_path / "run", "alice/trained-pipe", format="diffusers")
    _check_same_image(tmp_path / "run", "alice/trained-pipe")
    assert Path(tmp_path / "pipe" / "config.yaml").is_file()
