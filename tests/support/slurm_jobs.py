"""Shared by the real-Slurm tests (test_slurm_cluster.py, test_slurm_multinode.py): the local
cluster of slurm/local_cluster.sh as a context manager, submitting training through
`python -m slurm.submit`, waiting for jobs, reading their logs and checkpoints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "local_cluster.sh"
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def cluster_cmd(nodes: int, command: str, *args: str, timeout: float = 120, check: bool = False):
    nodes_arg = ["--nodes", str(nodes)] if nodes > 1 and command not in ("exec", "install") else []
    return subprocess.run(["bash", str(SCRIPT), command, *nodes_arg, *args], capture_output=True, text=True,
                          timeout=timeout, check=check)


@contextmanager
def local_cluster(nodes: int = 1):
    """Start the local cluster (install with apt-get on first use); yield the clients' environment.
    Where it cannot be started the test is skipped with the reason, except in CI (CI set), where
    that is a failure. A cluster that was already up is left up; one started here is stopped."""
    was_up = cluster_cmd(nodes, "status").returncode == 0
    r = cluster_cmd(nodes, "start", timeout=900)
    if r.returncode != 0:
        reason = f"local Slurm cluster could not be started: {(r.stderr or r.stdout).strip()[-400:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    conf = cluster_cmd(nodes, "env", check=True).stdout.strip().split("=", 1)[1]
    env = {**os.environ, "SLURM_CONF": conf, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        yield env
    finally:
        if not was_up:
            cluster_cmd(nodes, "stop")


def train_overrides(workdir: Path, name: str, steps: int, every: int) -> list[str]:
    # The quickstart's model at 32x32, not its 8x8: steps slow enough for a preemption to land mid-run.
    return ["model.resolution=32", f"data.shards={workdir / 'shards'}", f"run.output_dir={workdir / name}", f"train.max_steps={steps}",
            f"train.checkpoint_every={every}", "train.sample_every=1000", "train.global_batch_size=8",
            "train.log_every=5", "data.num_workers=0", "run.tracker=none"]


def submit(env, workdir: Path, args: list[str]) -> tuple[str, Path]:
    """`python -m slurm.submit ARGS` from `workdir`; returns (job id, job folder)."""
    r = subprocess.run([sys.executable, "-m", "slurm.submit", *args], cwd=workdir, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = re.search(r"submitted job (\d+); job folder (\S+)", r.stdout)
    assert m, r.stdout
    return m.group(1), Path(m.group(2))


def submit_training(env, workdir: Path, name: str, *extra: str, steps: int, every: int) -> tuple[str, Path]:
    cmd = [str(ROOT / "recipes" / "quickstart.yaml"), *train_overrides(workdir, name, steps, every), "--cpu",
           "--gpus-per-node", "2", "--time", "00:10:00", "--signal-delay-s", "60", *extra]
    if os.environ.get("DDPM_TEST_TRAIN_SCRIPT"):
        cmd += ["--script", os.environ["DDPM_TEST_TRAIN_SCRIPT"]]
    return submit(env, workdir, cmd)


def job_info(env, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_until(pred, timeout: float, what: str, poll: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def log_text(job_dir: Path, job_id: str, task: int = 0) -> str:
    """submitit's log of one task (one node) of the job; requeued starts append to it."""
    p = job_dir / f"{job_id}_{task}_log.out"
    return p.read_text(errors="replace") if p.exists() else ""


def wait_done(env, job_id: str, job_dir: Path, timeout: float = 300) -> dict:
    try:
        info = wait_until(lambda: (i := job_info(env, job_id)).get("JobState") in DONE_STATES and i,
                          timeout, f"job {job_id} to end")
    except AssertionError:
        subprocess.run(["scancel", job_id], env=env)
        raise AssertionError(f"job {job_id} did not end; log tail:\n{log_text(job_dir, job_id)[-3000:]}")
    assert info["JobState"] == "COMPLETED", f"job {job_id}: {info['JobState']}\n{log_text(job_dir, job_id)[-3000:]}"
    return info


def latest_step(run: Path) -> int:
    ckpt = latest_checkpoint(run)
    return int(ckpt.name.split("-")[1]) if ckpt else -1


def final_weights(run: Path, step: int) -> dict:
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    return {f: load_file(str(ckpt / f)) for f in ("model.safetensors", "ema.safetensors")}


def assert_same_weights(a: dict, b: dict) -> None:
    for f in a:
        assert a[f].keys() == b[f].keys()
        diff = [k for k in a[f] if not (a[f][k] == b[f][k]).all()]
        assert not diff, f"{f}: {len(diff)} tensors differ from the reference run, e.g. {diff[:3]}"


def resumed_steps(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"resuming from: \S*step-(\d+)", log)]
