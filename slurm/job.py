"""The submitit job: one task per node starts the Accelerate launcher and survives interruptions.

Three ways a running job is interrupted, and what happens in each:
- Time limit or preemption (`--signal`, and `preempt_send_user_signal` on preemption): Slurm
  sends submitit's signal (SIGUSR2) to every task; submitit calls `checkpoint()` on rank 0. We
  forward SIGUSR1 to the training processes, which save after the current step and exit 75;
  then `checkpoint()` returns a `DelayedSubmission` and submitit requeues the job
  (`scontrol requeue`). Other nodes forward SIGUSR1 to their own processes.
- `scontrol requeue` / a cancel: Slurm sends SIGTERM to every process of the job (no
  checkpoint call). Training's own SIGTERM handler saves; Slurm itself requeues the job.
- Either way the next start resumes from the newest complete checkpoint in `run.output_dir`
  (training does that on every launch), so at most the steps since the last save are lost.

The training processes are started with SIGUSR1 and SIGUSR2 ignored (inherited through exec):
Slurm signals every process of the step, and the launcher (torch elastic agent) must neither
die of submitit's SIGUSR2 nor of our SIGUSR1; the training program installs its own handlers.
Requeues are counted in the job folder and capped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from pipeline.atomic import write_json
from pipeline.checkpoint import latest_checkpoint
from pipeline.errors import EXIT_REQUEUE
from slurm.launch import format_command, launch_command, node_launch_from_env


class _TrainingFinished(BaseException):
    """Raised from checkpoint() when training finished while we waited: the job succeeded."""


def log(msg: str) -> None:
    print(f"[slurm.job {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class JobSpec:
    job_dir: str  # the job folder: resolved recipe, launch commands, submitit's logs, requeue count
    recipe: str  # the resolved recipe inside job_dir (the job never rereads the user's file)
    output_dir: str  # run.output_dir, for the "resuming from" log line
    procs_per_node: int
    workdir: str  # the directory the job was submitted from (relative paths in the recipe)
    script: str = ""  # training script; "" = pipeline/train.py
    program: list | None = None  # instead of SCRIPT RECIPE: e.g. ["-m", "eval", "sample", ...]
    accelerate_config: str | None = None
    deepspeed_config: str | None = None
    env: dict = field(default_factory=dict)  # extra environment for training (ACCELERATE_USE_CPU=1)
    max_requeues: int = 20
    signal_delay_s: int = 120  # how long before the end of the time limit submitit's signal comes
    save_timeout_s: int = 300  # how long checkpoint() waits for training to save and exit
    time_limit_s: int | None = None  # the job's --time, to tell a time limit from a preemption


# ---------------------------------------------------------------------------- requeue count


def _counter_path(job_dir: str) -> Path:
    return Path(job_dir) / "requeues.json"


def read_requeues(job_dir: str) -> dict:
    p = _counter_path(job_dir)
    return json.loads(p.read_text()) if p.is_file() else {"count": 0, "events": []}


def record_requeue(job_dir: str, kind: str, job_id: str) -> int:
    """Add one interruption to the job folder's count (written atomically); return the new count."""
    state = read_requeues(job_dir)
    state["count"] += 1
    state["events"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "kind": kind, "job_id": job_id})
    write_json(_counter_path(job_dir), state, indent=1)
    return state["count"]


def interruption_kind(now: float, end_time: float | None, signal_delay_s: int, slack_s: int = 60) -> str:
    """'timeout' when the signal came near the scheduled end (SLURM_JOB_END_TIME), else 'preemption'.

    Slurm sends the time-limit signal `signal_delay_s` before the end; a preemption signal
    comes at any other time. Without an end time we cannot tell.
    """
    if end_time is None:
        return "timeout-or-preemption"
    return "timeout" if end_time - now <= signal_delay_s + slack_s else "preemption"


# ---------------------------------------------------------------------------- process tree


def _ignore_user_signals() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (torch elastic puts workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def signal_tree(pid: int, sig: int) -> None:
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------- the job


class TrainingJob(submitit.helpers.Checkpointable):
    """`accelerate launch pipeline/train.py RECIPE` on every node of the allocation."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self._proc: subprocess.Popen | None = None
        self._terminated = False
        self._asked_to_save = False
        self._started = time.time()

    @property
    def is_training(self) -> bool:
        return not self.spec.program

    @property
    def what(self) -> str:  # for the log lines: "training", or "eval sample" for an --eval job
        return "training" if self.is_training else f"eval {self.spec.program[2]}"

    def _newest(self) -> str:
        """The log line's "; newest checkpoint: X" for training; an eval job writes no checkpoints."""
        return f"; newest checkpoint: {_latest(self.spec.output_dir)}" if self.is_training else ""

    def __getstate__(self):  # the requeued submission pickles only the spec
        return {"spec": self.spec}

    def __setstate__(self, state):
        self.__init__(state["spec"])

    def command(self, env=os.environ) -> list[str]:
        s = self.spec
        node = node_launch_from_env(env, s.procs_per_node)
        kw = {"script": s.script} if s.script else {}
        return launch_command(node, s.recipe, accelerate_config=s.accelerate_config,
                              deepspeed_config=s.deepspeed_config, program=s.program, **kw)

    def __call__(self) -> dict:
        s = self.spec
        job_env = submitit.JobEnvironment()
        count = read_requeues(s.job_dir)["count"]
        if count > s.max_requeues:
            raise RuntimeError(f"requeue cap reached ({count} > {s.max_requeues}); see {s.job_dir}/requeues.json")
        cmd = self.command()
        node_id = os.environ.get("SLURM_NODEID", "0")
        exact = Path(s.job_dir) / f"{job_env.job_id}_node{node_id}_launch.sh"
        exact.write_text(f"cd {s.workdir}\n{format_command(cmd)}\n")
        log(f"{job_env}; start {count + 1} (requeues so far: {count})"
            + (f"; resuming from: {_latest(s.output_dir)}" if self.is_training else ""))
        log(f"launch: {format_command(cmd)}")

        prev_usr2 = signal.getsignal(signal.SIGUSR2)
        prev_term = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGUSR2, lambda n, f: self._on_usr2(n, f, prev_usr2))
        try:
            self._proc = subprocess.Popen(cmd, cwd=s.workdir, env={**os.environ, **s.env},
                                          preexec_fn=_ignore_user_signals)
            try:
                rc = self._wait(None)
            except _TrainingFinished:  # the signal came, but training reached max_steps first
                rc = 0
        finally:
            signal.signal(signal.SIGUSR2, prev_usr2)
            signal.signal(signal.SIGTERM, prev_term)
        if rc == 0:
            log(f"{self.what} finished{self._newest()}")
            return {"output_dir": s.output_dir, "checkpoint": str(_latest(s.output_dir))}
        if self._terminated or self._asked_to_save:
            # SIGTERM: `scontrol requeue` (Slurm requeues us) or scancel; or, on a node other than
            # the first, the time-limit/preemption signal (rank 0 requeues). Leave without a
            # result file: the job is not over, and submitit should not read it as failed.
            why = "SIGTERM" if self._terminated else "the requeue signal"
            if job_env.global_rank == 0 and self._terminated:  # count each interruption once
                n = record_requeue(s.job_dir, "terminated (SIGTERM: scontrol requeue or cancel)", job_env.job_id)
                log(f"interruptions so far: {n}")
            log(f"{self.what} stopped after {why} (exit {rc}){self._newest()}")
            sys.exit(EXIT_REQUEUE)
        # Accelerate's launchers exit 1 whenever a process fails (training's 75 included), so
        # the signals we saw, not the exit code, tell an interruption from a failure.
        raise RuntimeError(f"{self.what} failed with exit code {rc} (command in {exact})")

    def _wait(self, timeout: float | None) -> int | None:
        # Poll rather than block in wait(): a blocking wait holds Popen's lock, and the signal
        # handler that runs on this same thread would then never see the exit.
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            rc = self._proc.poll() if self._proc else 0
            if rc is not None or (end is not None and time.monotonic() > end):
                return rc
            time.sleep(0.2)

    def _on_sigterm(self, _signum, _frame) -> None:
        self._terminated = True
        log(f"SIGTERM (scontrol requeue, cancel or the end of a grace time): {self.what} saves and exits")

    def _on_usr2(self, signum, frame, prev) -> None:
        # Every node tells its own training processes to save; only rank 0 then requeues.
        self._ask_to_save()
        if callable(prev):
            prev(signum, frame)

    def _ask_to_save(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._asked_to_save = True
            signal_tree(self._proc.pid, signal.SIGUSR1)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 at the time-limit / preemption signal."""
        s = self.spec
        # Slurm >= 23.02 exports the scheduled end; before that, start of this run + time limit.
        end = os.environ.get("SLURM_JOB_END_TIME")
        end = float(end) if end else (self._started + s.time_limit_s if s.time_limit_s else None)
        kind = interruption_kind(time.time(), end, s.signal_delay_s)
        job_id = submitit.JobEnvironment().job_id
        log(f"{kind} signal: asking {self.what} to save after its current step")
        # Ask again every few seconds: a signal that comes while training is still starting
        # (before its handler is installed) is ignored by it.
        deadline = time.monotonic() + s.save_timeout_s
        rc = None
        while rc is None and time.monotonic() < deadline:
            self._ask_to_save()
            rc = self._wait(min(5.0, max(0.0, deadline - time.monotonic())))
        if rc == 0:  # training exits 75 when stopped early; 0 only when it reached max_steps
            log(f"{self.what} finished before it could be stopped{self._newest()}")
            raise _TrainingFinished()
        n = record_requeue(s.job_dir, kind, job_id)
        if rc is None:
            log(f"{self.what} did not exit within {s.save_timeout_s}s; requeueing anyway{self._newest()}")
        else:
            log(f"{self.what} exited with {rc}{self._newest()}")
        if n > s.max_requeues:
            log(f"requeue cap reached ({n} > {s.max_requeues}): not requeueing")
            return None
        log(f"requeueing after {kind} (interruption {n} of at most {s.max_requeues})")
        return submitit.helpers.DelayedSubmission(TrainingJob(s), *args, **kwargs)


def _latest(output_dir: str):
    try:
        return latest_checkpoint(output_dir)
    except Exception:  # only for a log line; never stop a job over it
        return None
