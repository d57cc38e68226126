"""Issue 24 end to end: a real training run publishes itself to the localhost Hub
(scripts/hub_server.py) once, with nothing local in what it pushed; TensorBoard's own reader finds
the resumed step's logs; the model card's own snippets run against an exported folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess as sp
import sys
from io import BytesIO
from pathlib import Path

import pytest
from huggingface_hub import HfApi, snapshot_download

from eval.export import export
from pipeline.config import load_recipe, save_recipe
from support.hub import ROOT, eval_cli, fresh_cache, hub_env
from support.hub_models import make_run
from support.training import make_tiny_shards, run_train, train_cmd, write_recipe


def _local_markers(tmp_path) -> list[str]:
    """Strings that only this machine has: the test's folders, the project, the interpreter's."""
    home = os.path.expanduser("~")
    return [s for s in {str(tmp_path), str(ROOT), sys.prefix, str(Path(sys.executable).parent),
                        home if home not in ("/", "") else ""} if s]


def _assert_public(text: str, tmp_path, name: str) -> None:
    for s in _local_markers(tmp_path):
        assert s not in text, f"{name} holds the local path {s}"
    assert not re.search(r"(?<![\w:/.-])/(tmp|home|work|scratch|root)/", text), f"{name} holds an absolute path"


def _train(cmd, env, timeout=600):
    r = sp.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


@pytest.mark.slow
def test_training_pushes_once_and_the_repo_holds_no_local_path(hub, tmp_path, monkeypatch):
    shards = make_tiny_shards(tmp_path / "shards")
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, run,
                          train={"max_steps": 2, "checkpoint_every": 2, "sample_every": 2})
    cmd, env = train_cmd(recipe, "--push-to-hub", "alice/e2e")
    child = hub_env(hub, tmp_path / "hf-home")
    env.update({k: child[k] for k in ("HF_ENDPOINT", "HF_HUB_DISABLE_XET", "HF_HOME", "HF_TOKEN")})

    r = _train(cmd, env)
    assert "push: step 2 to alice/e2e" in r.stdout
    record = json.loads((run / "pushed.json").read_text())
    assert [(p["repo"], p["step"]) for p in record] == [("alice/e2e", 2)]
    commits = hub.commits("alice/e2e")
    assert len(commits) == 2 and commits[0].id == record[0]["commit"]  # one commit on top of the first

    fresh_cache(monkeypatch, tmp_path, "cache-1")
    folder = Path(snapshot_download("alice/e2e"))
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"README.md", "config.json", "config.yaml", "ema.safetensors", "samples/step-00000002.png"} <= files
    assert "results.json" not in files  # nothing was evaluated yet
    for name in ("README.md", "config.yaml", "config.json"):
        _assert_public((folder / name).read_text(), tmp_path, name)
    card = (folder / "README.md").read_text()
    assert "--push-to-hub alice/e2e" in card  # the command as run, recorded at launch

    # A requeue of the finished job (the same command again): exit 0, no second push.
    again = _train(cmd, env)
    assert "step 2 is already on alice/e2e" in again.stdout and "push: step 2 to" not in again.stdout
    assert len(hub.commits("alice/e2e")) == 2
    assert json.loads((run / "pushed.json").read_text()) == record

    # Evaluated, then published to another repo by a relaunch: results.json goes along, and the
    # absolute paths eval recorded (shards, checkpoint) stay on this machine.
    e = eval_cli(["nll", str(run), "--out", str(run / "eval"), "--limit", "2", "--batch-size", "2",
                  "--t-batch", "50", "--shards", str(shards)], {**env, "PYTHONPATH": str(ROOT)})
    assert e.returncode == 0, e.stderr[-3000:]
    assert str(shards) in (run / "eval" / "results.json").read_text()  # the check below means something
    cmd2, _ = train_cmd(recipe, "--push-to-hub", "alice/e2e-eval")
    _train(cmd2, env)
    fresh_cache(monkeypatch, tmp_path, "cache-2")
    folder = Path(snapshot_download("alice/e2e-eval"))
    for name in ("README.md", "config.yaml", "results.json"):
        _assert_public((folder / name).read_text(), tmp_path, name)
    assert json.loads((folder / "results.json").read_text())["evaluations"]["nll"]["metrics"]["bpd"] > 0
    assert [(p["repo"], p["step"]) for p in json.loads((run / "pushed.json").read_text())] == [
        ("alice/e2e", 2), ("alice/e2e-eval", 2)]
    assert HfApi().list_repo_files("alice/e2e") and len(hub.commits("alice/e2e")) == 2


@pytest.mark.slow
def test_tensorboard_keeps_the_resumed_steps_logs(tmp_path):
    """Steps 1..3 logged, checkpoints at 2 and 3; the process "dies" before step 3's checkpoint
    counts (it is removed), so the relaunch resumes at 2: TensorBoard's reader must show step 2's
    scalars and grid (logged before its checkpoint), and step 3 once, from the relaunch."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards = make_tiny_shards(tmp_path / "shards")
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", shards, run, run={"tracker": "tensorboard"},
                          train={"max_steps": 3, "checkpoint_every": 2, "sample_every": 2, "log_every": 1})
    r = run_train(recipe)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(run / "checkpoints" / "step-00000003")
    (run / "checkpoints" / "latest").write_text("step-00000002")
    r = run_train(recipe, "train.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 2" in r.stdout

    ev = EventAccumulator(str(run / "logs" / "t"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [s.step for s in ev.Scalars("loss")] == [1, 2, 3, 4]
    assert [i.step for i in ev.Images("samples")] == [2, 4]
    import numpy as np

    from pipeline.trackers import grid_array

    logged = np.asarray(Image.open(BytesIO(ev.Images("samples")[0].encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(logged, grid_array(run / "samples" / "step-00000002.png"))


def _python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def test_the_cards_own_snippets_run_on_the_exported_folder(tmp_path):
    """Each ```python block of the exported cards, run as written in a fresh interpreter from the
    folder's parent (the card names the model by the folder's name). T = 20, not 1000: a snippet
    that does not pass the model's own T fails in diffusers."""
    run = make_run(tmp_path / "run", results=False)
    ckpt = run / "checkpoints" / "step-00000040"
    recipe = load_recipe(ckpt / "config.yaml")
    recipe.diffusion.timesteps = 20
    save_recipe(recipe, ckpt / "config.yaml")
    export(run, tmp_path / "pipe", format="diffusers")
    export(run, tmp_path / "native")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}

    diffusers_card = (tmp_path / "pipe" / "README.md").read_text()
    blocks = [b for b in _python_blocks(diffusers_card) if "DDPMPipeline" in b]
    assert len(blocks) == 1 and "num_inference_steps=20" in blocks[0]
    code = blocks[0] + "\nprint('IMAGE', image.size, image.mode)\n"
    r = sp.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "IMAGE (8, 8) RGB" in r.stdout

    native = [b for b in _python_blocks((tmp_path / "native" / "README.md").read_text()) if "load_pretrained" in b]
    assert len(native) == 1
    code = native[0] + "\nprint('SAMPLES', tuple(x.shape), bool(x.abs().max() <= 1))\n"
    r = sp.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SAMPLES (16, 3, 8, 8) True" in r.stdout
