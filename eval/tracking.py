"""Evaluation outputs into the training run's tracker (TensorBoard / W&B, pipeline/trackers.py):
when `python -m eval figures` runs on a run directory (or one of its checkpoints), the figures it
draws are logged as images to that run's tracker run, at the checkpoint's step."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.errors import UserError
from pipeline.hub import find_checkpoint
from pipeline.trackers import log_images_to_run, read_state

log = logging.getLogger(__name__)


def run_folder(src: str) -> tuple[Path, int | None] | None:
    """(run folder, checkpoint step) when `src` is a local run, one of its checkpoints or their weights."""
    p = Path(src)
    if not p.exists():
        return None
    try:
        ckpt = find_checkpoint(p.parent if p.is_file() else p)
    except UserError:
        return None
    if ckpt.parent.name != "checkpoints":
        return None
    try:
        step = int(json.loads((ckpt / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        step = None
    return ckpt.parent.parent, step


def log_figures_to_run(src: str, out) -> bool:
    found = run_folder(src)
    try:
        if found is None or not read_state(found[0]):
            return False
    except UserError as e:  # a damaged RUN/tracker.json: the figures are written, not logged
        log.warning("not logging the figures to the run's tracker: %s", e)
        return False
    figures = {f"eval/{p.stem}": p for p in sorted(Path(out).glob("fig*.png"))}
    try:
        return bool(figures) and log_images_to_run(found[0], figures, found[1])
    except Exception as e:  # the figures are written either way: a tracker problem is a warning
        log.warning("could not log the figures to %s's tracker: %s", found[0], e)
        return False
