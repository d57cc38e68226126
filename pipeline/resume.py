"""Which checkpoint a launch resumes from (torch-free: decided on every rank before any work).

    default          the newest complete checkpoint of run.output_dir, or a fresh start
    --resume-from X  X (a checkpoint directory, or a run directory: its newest checkpoint), into
                     run.output_dir. RUN/resumed_from records X, so a requeued launch with the same
                     command continues the run's own newest checkpoint instead of going back to X;
                     a run folder that holds other checkpoints is refused (it would fork the run).
    --no-resume      a fresh start, only into an empty (or missing) run.output_dir
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline import atomic
from pipeline.checkpoint import is_complete, latest_checkpoint, set_aside_damage
from pipeline.config import RecipeError
from pipeline.integrity import damage
from pipeline.run_lock import LOCK_NAME

MARKER = "resumed_from"  # RUN/resumed_from: the checkpoint a --resume-from launch started from


def choose_checkpoint(run_dir: str | os.PathLike, resume_from: str | None = None,
                      no_resume: bool = False) -> Path | None:
    """The checkpoint to resume from (None: a fresh start); RecipeError when the choice would
    lose or mix up work."""
    run_dir = Path(run_dir)
    if no_resume and resume_from:
        raise RecipeError("--no-resume and --resume-from exclude each other")
    if no_resume:
        # A lock file alone is what a trainer killed before its first write leaves: nothing to lose.
        if run_dir.exists() and (not run_dir.is_dir() or any(p.name != LOCK_NAME for p in run_dir.iterdir())):
            raise RecipeError(f"run.output_dir={run_dir} is not empty and --no-resume starts fresh: "
                              "choose an empty folder (e.g. run.output_dir=runs/new), or drop --no-resume to resume")
        return None
    own = latest_checkpoint(run_dir)
    if not resume_from:
        damaged = set_aside_damage(run_dir) if own is None else []
        if damaged:  # every checkpoint was damaged: a fresh start here would follow silently from it
            raise RecipeError(f"run.output_dir={run_dir}: no intact checkpoint, and {len(damaged)} damaged one(s) set "
                              f"aside ({', '.join(p.name for p in damaged[:3])}); starting over at step 0 here "
                              "would hide that: repair or remove them, --resume-from a good checkpoint, or "
                              "choose a new run.output_dir")
        return own
    src = _checkpoint_of(Path(resume_from))
    if own is None or own.resolve() == src.resolve():
        _verify(src, resume_from)
        return src
    marker = run_dir / MARKER
    if marker.is_file() and marker.read_text().strip() == str(src.resolve()):
        return own  # a requeue of the launch that started from `src`: continue where it got to
    raise RecipeError(f"--resume-from {resume_from}: run.output_dir={run_dir} already holds its own checkpoints "
                      f"(newest {own.name}); resuming {src.name} there would fork the run: choose another "
                      "run.output_dir, or drop --resume-from to continue it")


def _checkpoint_of(path: Path) -> Path:
    if not path.exists():
        raise RecipeError(f"--resume-from {path}: no such checkpoint or run directory")
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise RecipeError(f"--resume-from {path}: the run directory has no complete checkpoint")
        return found
    if not is_complete(path):
        raise RecipeError(f"--resume-from {path}: not a complete checkpoint (want a step-XXXXXXXX directory "
                          "with trainer_state.json, or a run directory)")
    return path


def _verify(ckpt: Path, resume_from: str) -> None:
    """The checksums recorded when `ckpt` was written, checked as an automatic resume checks them:
    an explicitly chosen checkpoint that is damaged is refused (not replaced by another one)."""
    why = damage(ckpt)
    if why is not None:
        raise RecipeError(f"--resume-from {resume_from}: damaged checkpoint {ckpt.name}: {why}; "
                          "name an intact checkpoint (or restore this one)")


def record_origin(run_dir: str | os.PathLike, ckpt: Path | None) -> None:
    """Main process, after resuming: remember a checkpoint taken from outside the run's own ones."""
    own = latest_checkpoint(run_dir)
    if ckpt is not None and (own is None or Path(own).resolve() != Path(ckpt).resolve()):
        atomic.write_text(Path(run_dir) / MARKER, str(Path(ckpt).resolve()) + "\n")


def describe(ckpt: Path | None, step: int) -> str:
    """The line a launch prints: where it starts."""
    if ckpt is None:
        return "starting a fresh run at step 0"
    return f"resumed from {ckpt} at step {step}"
