"""Training through `python -m slurm.submit` on a real single-node Slurm (slurm/local_cluster.sh).

The cluster is started by the fixture (install with apt-get on first use, ~1 min; then ~2 s).
Where it cannot be started the tests are skipped with the reason, except in CI (CI set),
where that is a failure. Each job trains the quickstart U-Net for 40 steps with 2 CPU
processes on tiny shards made by data_prep, checkpointing every 10 steps:
1. an uninterrupted job finishes with a checkpoint (and is the reference for 2 and 3);
2. a job in the higher-priority partition preempts a training job: it saves, requeues and
   resumes, and its final weights equal the uninterrupted run's, bit for bit;
3. `scontrol requeue` (SIGTERM, no checkpoint call) of a running job: it resumes from at
   least the last periodic checkpoint, and its final weights equal the reference too;
4. a job that reaches its time limit saves at the signal, requeues itself and resumes.
`DDPM_TEST_TRAIN_SCRIPT` may name another training script that honours the same contract.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_recipe
from support.datasets import make_shards
from support.slurm_jobs import (
    ROOT,
    assert_same_weights,
    job_info,
    latest_step,
    local_cluster,
    log_text,
    resumed_steps,
    submit_training,
    train_overrides,
    wait_done,
    wait_until,
)
from support.slurm_jobs import final_weights as _final_weights

pytestmark = pytest.mark.slow

STEPS, EVERY = 40, 10


@pytest.fixture(scope="module")
def slurm_env():
    with local_cluster(nodes=1) as env:
        yield env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    make_shards(d / "shards", n_train=32, n_test=4)
    return d


def overrides(workdir: Path, name: str, steps: int = STEPS) -> list[str]:
    return train_overrides(workdir, name, steps, EVERY)


def submit(env, workdir: Path, name: str, *extra: str, steps: int = STEPS) -> tuple[str, Path]:
    return submit_training(env, workdir, name, *extra, steps=steps, every=EVERY)


def final_weights(run: Path) -> dict:
    return _final_weights(run, STEPS)


@pytest.fixture(scope="module")
def reference(slurm_env, workdir):
    job_id, job_dir = submit(slurm_env, workdir, "ref")
    info = wait_done(slurm_env, job_id, job_dir)
    return job_id, job_dir, info, workdir / "ref"


def test_training_job_finishes_with_checkpoint(reference):
    job_id, job_dir, info, run = reference
    assert info["Restarts"] == "0"
    assert latest_step(run) == STEPS
    # The job folder: resolved recipe, the launch command, submitit's logs and result.
    assert load_recipe(job_dir / "recipe.yaml").train.max_steps == STEPS
    launch = (job_dir / f"{job_id}_node0_launch.sh").read_text()
    assert "--num_processes 2" in launch and "--multi_gpu" in launch and "pipeline/train.py" in launch or \
        os.environ.get("DDPM_TEST_TRAIN_SCRIPT")
    assert "accelerate.commands.launch" in (job_dir / "launch_command.txt").read_text()
    log = log_text(job_dir, job_id)
    assert "training finished" in log and "resuming from: None" in log
    assert (job_dir / f"{job_id}_0_result.pkl").is_file()
    assert not (job_dir / "requeues.json").exists()


def test_preemption_saves_requeues_and_resumes_to_the_same_weights(slurm_env, workdir, reference):
    job_id, job_dir = submit(slurm_env, workdir, "preempted")
    run = workdir / "preempted"
    wait_until(lambda: latest_step(run) >= EVERY, 180, "the first periodic checkpoint")
    assert job_info(slurm_env, job_id)["JobState"] == "RUNNING"
    # A job in the partition of higher PriorityTier needs a core: Slurm preempts ours.
    r = subprocess.run(["sbatch", "-p", "high", "-c", "1", "-o", str(workdir / "preemptor.out"),
                        "--wrap", "sleep 1"], env=slurm_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = wait_done(slurm_env, job_id, job_dir)
    log = log_text(job_dir, job_id)
    assert int(info["Restarts"]) >= 1
    assert "preemption signal: asking training to save" in log
    events = json.loads((job_dir / "requeues.json").read_text())["events"]
    assert [e["kind"] for e in events] == ["preemption"]
    resumed = resumed_steps(log)
    assert len(resumed) == 1 and resumed[0] >= EVERY, log[-2000:]
    assert latest_step(run) == STEPS
    assert_same_weights(final_weights(run), final_weights(reference[3]))


def test_scontrol_requeue_resumes_from_the_last_checkpoint(slurm_env, workdir, reference):
    job_id, job_dir = submit(slurm_env, workdir, "requeued")
    run = workdir / "requeued"
    seen = wait_until(lambda: (s := latest_step(run)) >= EVERY and s, 180, "the first periodic checkpoint")
    r = subprocess.run(["scontrol", "requeue", job_id], env=slurm_env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = wait_done(slurm_env, job_id, job_dir)
    log = log_text(job_dir, job_id)
    assert int(info["Restarts"]) >= 1
    assert "SIGTERM" in log
    events = json.loads((job_dir / "requeues.json").read_text())["events"]
    assert any(e["kind"].startswith("terminated") for e in events)
    resumed = resumed_steps(log)
    assert resumed and resumed[0] >= seen, f"resumed from {resumed}, but step {seen} was saved before the requeue"
    assert_same_weights(final_weights(run), final_weights(reference[3]))


@pytest.mark.parametrize("extra, reason", [
    (["--cpu", "--gpus-per-node", "2", "--cpus-per-task", "64"], "more processors requested than permitted"),
    (["--gpus-per-node", "16"], "invalid generic resource"),  # this node has no GPUs at all
    (["--cpu", "--gpus-per-node", "2", "--partition", "nope"], "invalid partition"),
])
def test_impossible_request_is_a_clear_error(slurm_env, workdir, extra, reason):
    # Slurm refuses at submission; we report its reason in one line and exit 2.
    cmd = [sys.executable, "-m", "slurm.submit", str(ROOT / "recipes" / "quickstart.yaml"),
           *overrides(workdir, "impossible"), *extra]
    r = subprocess.run(cmd, cwd=workdir, env=slurm_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "Slurm refused the job" in line[0] and reason in line[0].lower(), r.stderr
    assert "Traceback" not in r.stderr
    assert not (workdir / "impossible" / "slurm").exists() or not any((workdir / "impossible" / "slurm").iterdir())


def test_time_limit_saves_requeues_and_resumes(slurm_env, workdir):
    # A 2-minute limit with the signal 60 s before it (Slurm sends it up to 30 s earlier still).
    # The job has far more steps than one start can do, whatever the machine's speed: it must
    # save at the signal, requeue itself and resume in the next start; then we cancel it.
    job_id, job_dir = submit(slurm_env, workdir, "timed", "--time", "00:02:00", "--signal-delay-s", "60",
                             steps=1_000_000)
    run = workdir / "timed"

    def resumed_and_progressed():
        r = resumed_steps(log_text(job_dir, job_id))
        return r and latest_step(run) > r[0] and r

    try:
        resumed = wait_until(resumed_and_progressed, 400, "a resumed start that saves a newer checkpoint")
        info = job_info(slurm_env, job_id)
    finally:
        subprocess.run(["scancel", job_id], env=slurm_env)
    log = log_text(job_dir, job_id)
    events = json.loads((job_dir / "requeues.json").read_text())["events"]
    assert int(info["Restarts"]) >= 1 and events and {e["kind"] for e in events} == {"timeout"}, log[-3000:]
    assert "timeout signal: asking training to save" in log
    assert resumed[0] > 0
