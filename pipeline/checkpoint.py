"""Checkpoints in a run directory: written whole or not at all, newest k kept.

Layout (docs/interfaces.md):
    RUN/checkpoints/step-00001000/{accelerate/, model.safetensors, ema.safetensors,
                                   config.yaml, trainer_state.json}
    RUN/checkpoints/latest        text file naming the newest complete checkpoint

A checkpoint is written into `checkpoints/.tmp-step-XXXXXXXX`, fsynced, renamed into place and
only then named in `latest` (tmp file + os.replace). A process killed at any moment leaves
either the previous checkpoint or the new one, never a half one under a `step-*` name. Old
checkpoints are first renamed to `.trash-*` and then deleted, so a kill during deletion cannot
leave a partial `step-*` directory either. `trainer_state.json` is the last file written, and
a `step-*` directory without it is ignored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STEP_RE = re.compile(r"^step-(\d{8,})$")
STATE_FILE = "trainer_state.json"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(ckpt: Path) -> bool:
    return bool(STEP_RE.match(ckpt.name)) and (ckpt / STATE_FILE).is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    The `latest` pointer is the fast path; a directory renamed into place just before a kill
    (pointer not yet updated) is complete too, so the newest complete `step-*` wins.
    """
    d = checkpoints_dir(run_dir)
    candidates = list_checkpoints(run_dir)
    pointer = d / "latest"
    if pointer.is_file():
        named = d / pointer.read_text().strip()
        if named.is_dir() and is_complete(named) and named not in candidates:
            candidates.append(named)
    if not candidates:
        return None
    return max(candidates, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def read_trainer_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (data first, then the directory entries)."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def begin(run_dir: str | os.PathLike, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of `step` (main process only)."""
    d = checkpoints_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".tmp-{step_name(step)}"
    if tmp.exists():  # left by a process killed while writing: never used, start over
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(run_dir: str | os.PathLike, tmp: Path, step: int, keep: int) -> Path:
    """fsync `tmp`, rename it to step-XXXXXXXX, point `latest` at it, prune to the newest `keep`."""
    if not (tmp / STATE_FILE).is_file():
        raise RuntimeError(f"{tmp}: no {STATE_FILE}; refusing to commit an incomplete checkpoint")
    d = checkpoints_dir(run_dir)
    final = d / step_name(step)
    fsync_tree(tmp)
    if final.exists():  # the same step saved again (e.g. a stop signal right after a periodic save)
        _discard(final)
    os.replace(tmp, final)
    _fsync_path(d)
    pointer_tmp = d / ".latest.tmp"
    with open(pointer_tmp, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, d / "latest")
    _fsync_path(d)
    prune(run_dir, keep)
    return final


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        _discard(old)
    d = checkpoints_dir(run_dir)
    for trash in d.glob(".trash-*"):  # a previous kill during deletion
        shutil.rmtree(trash, ignore_errors=True)


def clean_stale(run_dir: str | os.PathLike) -> None:
    """Remove temporary and trash directories left by killed processes (main process, at start)."""
    d = checkpoints_dir(run_dir)
    if d.is_dir():
        for p in list(d.glob(".tmp-*")) + list(d.glob(".trash-*")):
            shutil.rmtree(p, ignore_errors=True)


def _discard(path: Path) -> None:
    trash = path.with_name(f".trash-{path.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)  # atomic: the step-* name disappears whole
    shutil.rmtree(trash, ignore_errors=True)
