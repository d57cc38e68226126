"""EMA-only snapshots: the weights one evaluates, kept apart from the resumable checkpoints.

Every `train.snapshot_every` steps the main process writes

    RUN/snapshots/step-00010000.safetensors   the EMA weights (float32, UNet state_dict keys)
    RUN/snapshots/config.yaml                 the resolved recipe (so each file loads alone)

A snapshot is 4 bytes a parameter (143 MB at 35.7M, 455 MB at 114M; no optimizer, no raw
weights; every paper recipe's total is in the README), and `train.keep_checkpoints` pruning
never touches this folder, so the checkpoint with the best FID, the one the paper reports every
metric at (App. B), is still there when `python -m eval sweep RUN` looks for it. Each file is renamed into place when whole (pipeline/atomic.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from safetensors.torch import save_file

from pipeline import atomic
from pipeline.config import Recipe, save_recipe

FOLDER = "snapshots"
_NAME = re.compile(r"^step-(\d{8,})\.safetensors$")


def snapshot_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / FOLDER / f"step-{step:08d}.safetensors"


def write_snapshot(run_dir: str | os.PathLike, step: int, ema_state: dict, recipe: Recipe) -> Path:
    """Write the EMA weights of `step` (main process only) and the recipe beside them."""
    path = snapshot_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, path.parent / "config.yaml")
    with atomic.atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp), metadata={"step": str(step)})
    return path


def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every whole snapshot of the run, by step."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)
