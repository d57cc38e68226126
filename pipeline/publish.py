"""Publishing from training: `run.push_to_hub: NAMESPACE/NAME` (or `--push-to-hub`).

The push is `python -m eval push RUN --repo-id REPO` itself, run as a child process: the same
code, card and one-commit retries as a push by hand, and pipeline/ stays below eval/. When:
- hub_strategy end (default): once, when training finishes (exit 0);
- hub_strategy checkpoint: after every checkpoint as well (diffusers' `hub_strategy`), each one
  commit on main, so the repo's history holds every checkpoint.
Pushes are recorded in RUN/pushed.json by (repo, step): a requeued or relaunched job never
pushes a step twice. The token is checked at launch, before any work, not after days of training.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline import atomic
from pipeline.errors import UserError

RECORD = "pushed.json"  # RUN/pushed.json: [{"repo": ..., "step": ..., "commit": ...}]
ROOT = Path(__file__).resolve().parent.parent


class PushFromTrainingError(UserError):
    """The end-of-training push failed after its retries; the checkpoints are all there (exit 1)."""

    exit_code = 1


def _eval_push(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for k in [k for k in env if k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")]:
        del env[k]  # the push is one plain process, not a member of the training group
    return subprocess.run([sys.executable, "-m", "eval", "push", *args], env=env, capture_output=True, text=True)


def _last_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (r.stderr or r.stdout or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit {r.returncode}"


def check_token(run_cfg) -> None:
    """At launch: the token can write to run.push_to_hub (eval push --check-token), else exit 2."""
    if not run_cfg.push_to_hub:
        return
    r = _eval_push([run_cfg.output_dir, "--repo-id", run_cfg.push_to_hub, "--check-token"])
    if r.returncode != 0:
        raise UserError(f"run.push_to_hub={run_cfg.push_to_hub}: {_last_line(r)}")


def pushed(run_dir: str | os.PathLike) -> list[dict]:
    try:
        d = json.loads((Path(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return []
    return d if isinstance(d, list) else []


def push_step(run_cfg, step: int, *, final: bool) -> bool:
    """Push the run's newest checkpoint (step `step`) unless (repo, step) was pushed before.
    True when pushed now. A failed push raises at the end of training and only warns otherwise."""
    repo, run_dir = run_cfg.push_to_hub, Path(run_cfg.output_dir)
    done = next((p for p in pushed(run_dir) if p.get("repo") == repo and p.get("step") == step), None)
    if done is not None:
        print(f"push: step {step} is already on {repo} (commit {str(done.get('commit'))[:12]}); not pushed again",
              flush=True)
        return False
    args = [str(run_dir), "--repo-id", repo, "--format", run_cfg.push_format,
            "--message", f"Step {step}" + (" (end of training)" if final else " (checkpoint)")]
    print(f"push: step {step} to {repo} ({run_cfg.push_format} layout) ...", flush=True)
    r = _eval_push(args)
    if r.returncode != 0:
        retry = f"push it later with: python -m eval push {run_dir} --repo-id {repo} --format {run_cfg.push_format}"
        if final:
            raise PushFromTrainingError(f"training finished, but the push to {repo} failed: {_last_line(r)}; {retry}")
        print(f"warning: push of step {step} to {repo} failed: {_last_line(r)}; training goes on ({retry})",
              file=sys.stderr, flush=True)
        return False
    m = re.search(r"as commit (\w+)", r.stdout)
    atomic.write_json(run_dir / RECORD, pushed(run_dir) + [{"repo": repo, "step": step,
                                                             "commit": m.group(1) if m else None}])
    print(r.stdout.strip().splitlines()[0] if r.stdout.strip() else f"pushed step {step} to {repo}", flush=True)
    return True
