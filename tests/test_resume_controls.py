"""Resume controls of pipeline/train.py (pipeline/resume.py): the newest checkpoint by default,
--resume-from CKPT (and its requeue), --no-resume only into an empty folder; the launch says
where it started."""

from __future__ import annotations

import json

import pytest

from pipeline.config import RecipeError
from pipeline.integrity import REQUIRED, digests
from pipeline.resume import MARKER, choose_checkpoint, record_origin
from support.training import assert_bitwise_equal, make_tiny_shards, run_train, weights, write_recipe


def _ckpt(run, step):
    """A checkpoint as far as choosing one looks: its required files and their checksums."""
    d = run / "checkpoints" / f"step-{step:08d}"
    d.mkdir(parents=True)
    for name in REQUIRED:
        (d / name).write_text(f"{name} of step {step}")
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "files": digests(d)}))
    return d


def test_choice_of_checkpoint(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    assert choose_checkpoint(run) is None  # nothing yet: a fresh start
    assert choose_checkpoint(run, no_resume=True) is None
    a2, a4 = _ckpt(other, 2), _ckpt(other, 4)
    assert choose_checkpoint(run, str(other)) == a4  # a run directory: its newest
    assert choose_checkpoint(run, str(a2)) == a2
    (run / "checkpoints").mkdir(parents=True)
    record_origin(run, a2)  # the launch resumed a2 into `run` ...
    assert (run / MARKER).read_text().strip() == str(a2.resolve())
    own = _ckpt(run, 6)  # ... and saved step 6; a requeue of the same command continues step 6
    assert choose_checkpoint(run, str(a2)) == own
    with pytest.raises(RecipeError, match=r"already holds its own checkpoints \(newest step-00000006\).*fork"):
        choose_checkpoint(run, str(a4))
    assert choose_checkpoint(run, str(own)) == own and choose_checkpoint(run) == own
    with pytest.raises(RecipeError, match="is not empty and --no-resume starts fresh"):
        choose_checkpoint(run, no_resume=True)
    with pytest.raises(RecipeError, match="no such checkpoint"):
        choose_checkpoint(tmp_path / "x", str(tmp_path / "nope"))
    (other / "checkpoints" / "step-00000009").mkdir()  # no trainer_state.json: not whole
    with pytest.raises(RecipeError, match="not a complete checkpoint"):
        choose_checkpoint(tmp_path / "x", str(other / "checkpoints" / "step-00000009"))
    record_origin(run, own)  # resuming the run's own newest records nothing new
    assert (run / MARKER).read_text().strip() == str(a2.resolve())


def test_cli_refuses_before_any_work(tmp_path):
    shards = make_tiny_shards(tmp_path / "shards")
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    recipe = write_recipe(tmp_path / "r.yaml", shards, run)
    r = run_train(recipe, "--no-resume")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "--no-resume" in r.stderr
    r = run_train(recipe, "--resume-from", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "no such checkpoint" in r.stderr
    h = run_train(recipe, "--help")
    assert h.returncode == 0 and "--resume-from" in h.stdout and "--no-resume" in h.stdout


@pytest.mark.slow
def test_resume_from_a_checkpoint_into_a_new_run_is_exact(tmp_path):
    """Resuming step 2 of a run into another folder ends with the uninterrupted run's weights;
    a relaunch of the same command continues the new run, not step 2 again."""
    shards = make_tiny_shards(tmp_path / "shards")
    ref = write_recipe(tmp_path / "ref.yaml", shards, tmp_path / "ref", train={"max_steps": 4, "keep_checkpoints": 5})
    r = run_train(ref, "--no-resume")
    assert r.returncode == 0, r.stderr
    assert "starting a fresh run at step 0" in r.stdout
    step2 = tmp_path / "ref" / "checkpoints" / "step-00000002"
    branch = write_recipe(tmp_path / "b.yaml", shards, tmp_path / "branch", train={"max_steps": 4, "keep_checkpoints": 5})
    r = run_train(branch, "--resume-from", str(step2))
    assert r.returncode == 0, r.stderr
    assert f"resumed from {step2} at step 2" in r.stdout
    end = "checkpoints/step-00000004"
    assert_bitwise_equal(weights(tmp_path / "branch" / end), weights(tmp_path / "ref" / end))
    assert_bitwise_equal(weights(tmp_path / "branch" / end, "ema.safetensors"),
                         weights(tmp_path / "ref" / end, "ema.safetensors"))
    again = run_train(branch, "--resume-from", str(step2))  # a requeue of the same command
    assert again.returncode == 0 and f"resumed from {tmp_path / 'branch' / end} at step 4" in again.stdout
