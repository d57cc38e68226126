"""The experiment tracker of a run (`run.tracker`: tensorboard, wandb or none), through Accelerate.

One run folder is one tracker run, however often it is killed and relaunched:
- W&B: the run id is made once and kept in RUN/tracker.json; every launch calls wandb.init with
  that id and resume="allow", so a Slurm requeue continues the same W&B run. The project is
  run.wandb_project, else $WANDB_PROJECT, else run.name; the entity run.wandb_entity, else
  $WANDB_ENTITY (wandb reads it), else the account's default. WANDB_MODE=offline works as usual.
- TensorBoard: events go to RUN/logs/<run.name>/, the same folder on every launch; a resumed
  launch opens its writer with purge_step = the resumed step + 1, so steps logged after the last
  checkpoint by a killed process are hidden instead of drawn twice, and the resumed step's own
  logs stay.
Sample grids (and any other image) go to the tracker as images (`log_image`).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.errors import UserError
from pipeline.safe_names import name_problem, shown

STATE_FILE = "tracker.json"  # RUN/tracker.json: {"tracker": ..., "run_id": ..., "project": ..., "entity": ...}


class TrackerStateError(UserError):
    """RUN/tracker.json is not what the trainer writes (exit 2, naming the file and key)."""


_WANDB_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # W&B ids, projects, entities: no '/', '#', '?', ':'
MAX_STATE = 64 << 10  # bytes: a handful of names


def read_state(run_dir: str | os.PathLike) -> dict:
    """RUN/tracker.json, checked ({} when there is none): a file that is not what the trainer
    writes is refused in one line, not a traceback on every relaunch, and not silently replaced
    (that would start another W&B run and lose the link to this one)."""
    p = Path(run_dir) / STATE_FILE
    if not os.path.lexists(p):
        return {}

    def bad(why: str):
        return TrackerStateError(f"{p}: {why}; fix it, or move it away to start a new tracker run")

    if p.is_symlink() or not p.is_file():
        raise bad("not a regular file")
    if p.stat().st_size > MAX_STATE:
        raise bad(f"more than {MAX_STATE} bytes")
    try:
        d = json.loads(p.read_bytes())
    except (ValueError, RecursionError) as e:
        raise bad(f"unreadable ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise bad(f"expected a JSON object, got {type(d).__name__}")
    tracker = d.get("tracker")
    if tracker not in ("wandb", "tensorboard"):
        raise bad(f"tracker: {str(tracker)[:40]!r} is neither 'wandb' nor 'tensorboard'")
    if not isinstance(d.get("run_id"), str) or not d["run_id"]:
        raise bad("run_id: expected a non-empty string")
    if tracker == "wandb":
        for key in ("run_id", "project", "entity"):
            v = d.get(key)
            if (v is not None or key == "run_id") and not (isinstance(v, str) and _WANDB_NAME.fullmatch(v)):
                raise bad(f"{key}: {str(v)[:60]!r} is not a W&B name (letters, digits, '_', '.', '-')")
    elif name_problem(d["run_id"], subfolders=True):  # the folder under RUN/logs that eval writes to
        raise bad(f"run_id: {shown(d['run_id'])} {name_problem(d['run_id'], subfolders=True)}")
    return d


def wandb_identity(run_cfg, run_dir: str | os.PathLike) -> dict:
    """{"run_id", "project", "entity"} of this run folder's W&B run, made once and then read back
    (main process: the trainer's Progress)."""
    saved = read_state(run_dir)
    if saved.get("tracker") == "wandb" and saved.get("run_id"):
        return {k: saved.get(k) for k in ("run_id", "project", "entity")}
    ident = {"run_id": uuid.uuid4().hex[:16],
             "project": run_cfg.wandb_project or os.environ.get("WANDB_PROJECT") or run_cfg.name,
             "entity": run_cfg.wandb_entity or os.environ.get("WANDB_ENTITY") or None}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic.write_json(Path(run_dir) / STATE_FILE, {"tracker": "wandb", **ident}, fsync=True)
    return ident


def init_arguments(run_cfg, run_dir: str | os.PathLike, step: int) -> tuple[str, dict]:
    """(project name, init_kwargs) for `Accelerator.init_trackers` of run.tracker."""
    if run_cfg.tracker == "wandb":
        ident = wandb_identity(run_cfg, run_dir)
        logs = Path(run_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        # $WANDB_DIR, when set, is where the user keeps W&B's files; else the run's logs folder.
        kwargs = {"id": ident["run_id"], "resume": "allow", "name": run_cfg.name,
                  "dir": os.environ.get("WANDB_DIR") or str(logs)}
        if ident["entity"]:
            kwargs["entity"] = ident["entity"]
        return ident["project"], {"wandb": kwargs}
    if run_cfg.tracker == "tensorboard":
        if read_state(run_dir).get("tracker") != "tensorboard":
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            atomic.write_json(Path(run_dir) / STATE_FILE,
                              {"tracker": "tensorboard", "run_id": run_cfg.name,
                               "logdir": str(Path(run_dir) / "logs" / run_cfg.name)})
        # The resumed step's own scalars and grid were logged before its checkpoint was saved:
        # they stay; only what a killed process logged after it (steps > `step`) is hidden.
        return run_cfg.name, {"tensorboard": {"purge_step": step + 1} if step > 0 else {}}
    return run_cfg.name, {}


def grid_array(path: str | os.PathLike) -> np.ndarray:
    """A saved image as uint8 [H, W, 3]."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def log_image(acc, tracker: str, name: str, image: np.ndarray, step: int) -> None:
    """One uint8 [H, W, 3] image to the run's tracker at `step` (main process)."""
    if tracker == "tensorboard":
        acc.get_tracker("tensorboard", unwrap=True).add_image(name, image, global_step=step, dataformats="HWC")
    elif tracker == "wandb":
        import wandb

        acc.get_tracker("wandb", unwrap=True).log({name: wandb.Image(image)}, step=step)


def log_images_to_run(run_dir: str | os.PathLike, images: dict, step: int | None = None) -> bool:
    """Log image files {name: path} to the tracker run of a run folder, outside training (e.g. the
    eval figures of one of its checkpoints, at that checkpoint's `step`). False when the run has
    no tracker. W&B: the run's own id is resumed (best after training ended: W&B keeps one writer
    per run) and the images are logged with `checkpoint_step`, since W&B steps only grow."""
    state = read_state(run_dir)
    arrays = {name: grid_array(path) for name, path in images.items()}
    if state.get("tracker") == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter  # what Accelerate's TensorBoard tracker writes with

        # Where Accelerate's tracker writes (RUN/logs/<run.name>); not the recorded absolute
        # `logdir`, which a moved run folder or an edited file would point elsewhere.
        writer = SummaryWriter(str(Path(run_dir) / "logs" / state["run_id"]))
        try:
            for name, arr in arrays.items():
                writer.add_image(name, arr, global_step=step, dataformats="HWC")
        finally:
            writer.close()
        return True
    if state.get("tracker") == "wandb" and state.get("run_id"):
        import wandb

        run = wandb.init(id=state["run_id"], resume="allow", project=state.get("project"),
                         entity=state.get("entity") or None, dir=str(Path(run_dir) / "logs"))
        try:
            run.log({**{name: wandb.Image(arr) for name, arr in arrays.items()},
                     **({"checkpoint_step": step} if step is not None else {})})
        finally:
            run.finish()
        return True
    return False
