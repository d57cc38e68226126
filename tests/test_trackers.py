"""Trackers (pipeline/trackers.py): TensorBoard event files hold the sample grids as images and
the scalars; a W&B run (offline mode) killed by SIGTERM and relaunched is one W&B run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from pipeline.config import Recipe
from pipeline.errors import EXIT_REQUEUE
from pipeline.trackers import grid_array, init_arguments, read_state
from support.training import ROOT, make_tiny_shards, run_train, train_cmd, write_recipe


def test_identity_is_made_once_and_env_fills_the_project(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    run = Recipe.from_dict({"model": {"resolution": 8}, "run": {"name": "r", "tracker": "wandb"}}).run
    project, kw = init_arguments(run, tmp_path, 0)
    assert project == "from-env" and kw["wandb"]["resume"] == "allow" and "entity" not in kw["wandb"]
    again = init_arguments(run, tmp_path, 10)  # a relaunch: the same id, whatever the env says now
    monkeypatch.setenv("WANDB_PROJECT", "changed")
    assert init_arguments(run, tmp_path, 20) == again == (project, kw)
    assert read_state(tmp_path)["run_id"] == kw["wandb"]["id"]
    recipe_set = Recipe.from_dict({"model": {"resolution": 8}, "run": {"name": "r", "tracker": "wandb",
                                                                      "wandb_project": "p", "wandb_entity": "team"}}).run
    project, kw = init_arguments(recipe_set, tmp_path / "other", 0)
    assert project == "p" and kw["wandb"]["entity"] == "team"
    tb = Recipe.from_dict({"model": {"resolution": 8}, "run": {"name": "r"}}).run
    assert init_arguments(tb, tmp_path / "tb", 0) == ("r", {"tensorboard": {}})
    assert init_arguments(tb, tmp_path / "tb", 6) == ("r", {"tensorboard": {"purge_step": 7}})  # step 6 stays


@pytest.mark.slow
def test_tensorboard_events_hold_sample_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards = make_tiny_shards(tmp_path / "shards")
    recipe = write_recipe(tmp_path / "r.yaml", shards, tmp_path / "run",
                          run={"tracker": "tensorboard"}, train={"max_steps": 2, "sample_every": 2, "log_every": 1})
    r = run_train(recipe)
    assert r.returncode == 0, r.stderr[-3000:]
    logdir = tmp_path / "run" / "logs" / "t"
    ev = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert "samples" in ev.Tags()["images"] and "loss" in ev.Tags()["scalars"]
    img = ev.Images("samples")[-1]
    assert img.step == 2
    from io import BytesIO

    from PIL import Image

    logged = np.asarray(Image.open(BytesIO(img.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(logged, grid_array(tmp_path / "run" / "samples" / "step-00000002.png"))
    assert [s.step for s in ev.Scalars("loss")] == [1, 2]


@pytest.mark.slow
def test_wandb_offline_run_resumed_after_sigterm_is_one_run(tmp_path):
    pytest.importorskip("wandb")
    shards = make_tiny_shards(tmp_path / "shards")
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, run_dir, run={"tracker": "wandb", "wandb_project": "ddpm-test"},
                          train={"max_steps": 6, "checkpoint_every": 100, "sample_every": 2, "log_every": 1})
    cmd, env = train_cmd(recipe)
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")})
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.time() + 300
        while not re.search(r"\b2/6 \[", log.read_text(errors="replace")) and proc.poll() is None:
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, log.read_text()[-3000:]
    first_id = json.loads((run_dir / "tracker.json").read_text())["run_id"]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run_dir / "tracker.json").read_text())["run_id"] == first_id
    runs = sorted((run_dir / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # two launches ...
    assert {p.name.rsplit("-", 1)[1] for p in runs} == {first_id}  # ... of one W&B run
    assert all((p / f"run-{first_id}.wandb").is_file() for p in runs)
    images = sorted(p.name for p in (runs[-1] / "files" / "media" / "images").glob("samples_*.png"))
    assert images and images[-1].startswith("samples_6_")  # the grid of step 6, logged at step 6


def test_eval_figures_of_a_run_go_to_its_tensorboard(tmp_path):
    """`python -m eval figures RUN` logs the figures to the run's tracker at the checkpoint's step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from support.hub import eval_cli
    from support.hub_models import make_run

    run = make_run(tmp_path / "run", results=False)  # a checkpoint at step 40
    recipe = Recipe.from_dict({"model": {"resolution": 8}, "run": {"name": "tiny", "output_dir": str(run)}})
    init_arguments(recipe.run, run, 0)  # what the trainer's first launch writes
    shards = make_tiny_shards(tmp_path / "shards")
    r = eval_cli(["figures", str(run), "--out", str(tmp_path / "fig"), "--which", "6", "--rows", "1",
                  "--shards", str(shards)], {**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    ev = EventAccumulator(str(run / "logs" / "tiny"), size_guidance={"images": 0}).Reload()
    assert ev.Tags()["images"] == ["eval/fig6_progressive"]
    img = ev.Images("eval/fig6_progressive")[0]
    assert img.step == 40
    from io import BytesIO

    from PIL import Image

    logged = np.asarray(Image.open(BytesIO(img.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(logged, grid_array(tmp_path / "fig" / "fig6_progressive.png"))
