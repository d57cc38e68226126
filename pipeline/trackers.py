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
import uuid
from pathlib import Path

import numpy as np

from pipeline import atomic

STATE_FILE = "tracker.json"  # RUN/tracker.json: {"tracker": ..., "run_id": ..., "project": ..., "entity": ...}


def read_state(run_dir: str | os.PathLike) -> dict:
    p = Path(run_dir) / STATE_FILE
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


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
    if state.get("tracker") == "tensorboard" and state.get("logdir"):
        from torch.utils.tensorboard import SummaryWriter  # what Accelerate's TensorBoard tracker writes with

        writer = SummaryWriter(state["logdir"])
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
