"""Checkpoints in a run directory: written whole or not at all, restored exactly, newest k kept.

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

Reading the directory needs neither torch nor Accelerate (slurm/job.py and the Hub loader read
it); only `write_checkpoint` and `restore` do, and import them when called.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from pipeline import atomic, deepspeed_load, integrity
from pipeline.config import Recipe, RecipeError, load_recipe, save_recipe
from pipeline.errors import UserError

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d{8,})$")
STATE_FILE = "trainer_state.json"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


class CheckpointError(UserError):
    """A checkpoint that cannot be written (disk full) or none intact to resume from."""


def is_complete(ckpt: Path) -> bool:
    # Never a symlink: a checkpoint is a directory inside the run's checkpoints/ folder.
    return bool(STEP_RE.match(ckpt.name)) and not ckpt.is_symlink() and (ckpt / STATE_FILE).is_file()


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
    named = _pointer_target(d)
    if named is not None and named.is_dir() and is_complete(named) and named not in candidates:
        candidates.append(named)
    if not candidates:
        return None
    return max(candidates, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def _pointer_target(d: Path) -> Path | None:
    """The checkpoint `latest` names, or None. Only a plain `step-XXXXXXXX` name is followed: the
    pointer can never lead outside the checkpoints folder (`../x`, `/abs`, a long or binary file)."""
    pointer = d / "latest"
    if not pointer.is_file() or pointer.is_symlink():
        return None
    with open(pointer, "rb") as f:
        name = f.read(64).decode("ascii", "replace").strip()
    return d / name if STEP_RE.fullmatch(name) else None


def latest_intact(run_dir: str | os.PathLike, *, set_aside: bool = False, report=log.warning,
                  missing_ok: bool = False) -> Path | None:
    """The newest checkpoint whose files match the checksums recorded when it was written; each
    newer damaged one is reported in one line and, with `set_aside` (resume), renamed to
    `.damaged-step-*` so that it is neither resumed nor counted when pruning. None when the run
    has no checkpoint; CheckpointError when it has some and every one is damaged. `missing_ok`:
    see `integrity.damage` (loading weights needs only some of the files)."""
    d = checkpoints_dir(run_dir)
    pointer = d / "latest"
    if pointer.is_file() and _pointer_target(d) is None:
        report(f"{pointer}: damaged (does not name a step-XXXXXXXX checkpoint); ignored")
    found = list_checkpoints(run_dir)
    named = latest_checkpoint(run_dir)
    if named is not None and named not in found:
        found.append(named)
    damaged = []
    for ckpt in sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)), reverse=True):
        why = integrity.damage(ckpt, missing_ok)
        if why is None:
            if damaged:
                report(f"{damaged[-1][0]}: damaged ({damaged[-1][1]}); using the previous complete checkpoint {ckpt.name}")
            return ckpt
        damaged.append((ckpt, why))
        if set_aside:
            os.replace(ckpt, _set_aside_name(ckpt))
    if damaged:
        raise CheckpointError(f"{checkpoints_dir(run_dir)}: every checkpoint is damaged (newest: {damaged[0][0].name}: "
                              f"{damaged[0][1]}); nothing to resume from")
    return None


def _set_aside_name(ckpt: Path) -> Path:
    """`.damaged-step-N`, or `.damaged-step-N.2`, ... when an earlier damaged copy of the same step
    is already set aside: damage is kept for the user to look at, never deleted by the pipeline."""
    target, k = ckpt.with_name(f".damaged-{ckpt.name}"), 1
    while target.exists():
        k += 1
        target = ckpt.with_name(f".damaged-{ckpt.name}.{k}")
    return target


def set_aside_damage(run_dir: str | os.PathLike) -> list[Path]:
    """The damaged checkpoints an earlier resume set aside, newest name first."""
    d = checkpoints_dir(run_dir)
    return sorted(d.glob(".damaged-step-*"), reverse=True) if d.is_dir() else []


def resume_point(run_dir: str | os.PathLike, acc) -> Path | None:
    """The checkpoint every process resumes from: the main process verifies and sets damaged
    ones aside, then all read the same answer."""
    if acc.is_main_process:
        latest_intact(run_dir, set_aside=True, report=lambda m: print(m, flush=True))
    acc.wait_for_everyone()
    return latest_checkpoint(run_dir)


def check_resumable(ckpt: Path, recipe: Recipe) -> None:
    """Refuse, before anything is built or written, a recipe whose model or seed differs from the
    checkpoint's (its weights would not load; its data order would silently change)."""
    try:
        saved = load_recipe(Path(ckpt) / "config.yaml")
    except RecipeError:
        return  # an old or unreadable config: Accelerate's own load decides
    a, b = saved.model.unet_kwargs(), recipe.model.unet_kwargs()
    # The architecture; dropout changes no weight and may be changed on resume.
    changed = [f"model.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
               if k != "dropout" and a.get(k) != b.get(k)]
    if saved.train.seed != recipe.train.seed:
        changed.append(f"train.seed: {saved.train.seed} -> {recipe.train.seed}")
    if changed:
        raise RecipeError(f"{ckpt}: this run was trained with another recipe ({'; '.join(changed)[:300]}); "
                          "resume it with its own, or use a new run.output_dir")


def read_trainer_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


# ------------------------------------------------------------------------------ write and restore


def write_checkpoint(run_dir: str | os.PathLike, step: int, *, acc, net, ema, recipe: Recipe, state: dict,
                     keep: int, in_save: Optional[Callable[[int, Path], None]] = None) -> Path:
    """Checkpoint `step`; every process calls it (the saves and the gather are collective).

    Accelerate's state (model, optimizer, scaler, RNG of every rank; DeepSpeed's shards), the
    float32 weights of `net` and of `ema`, the recipe, and last `state` plus every rank's EMA
    digest as trainer_state.json; then committed (fsync, rename, `latest`, prune to `keep`).
    `in_save(step, tmp_dir)` (tests) runs on the main process once the weights are written.
    """
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    tmp = _tmp_dir(run_dir, step)
    if acc.is_main_process:
        begin(run_dir, step)
    acc.wait_for_everyone()
    # A full disk can stop any rank's write; every rank learns of it (two all-gathers), so all of
    # them end with the same one line instead of one rank's traceback under a peer's hang.
    full = _unless_disk_full(lambda: acc.save_state(str(tmp / "accelerate"), safe_serialization=True))
    # Every rank's EMA digest: they must agree (DDP / ZeRO-2 keep the weights replicated).
    gathered = gather_object([(ema.digest(), full)])
    digests, full = [d for d, _ in gathered], next((f for _, f in gathered if f), None)
    if acc.is_main_process and full is None:
        if len(set(digests)) != 1:
            log.error("EMA differs between ranks at step %d: %s", step, digests)

        def write_main():
            weights = {k: v.detach().float().cpu().contiguous().clone() for k, v in net.state_dict().items()}
            save_file(weights, str(tmp / "model.safetensors"))
            save_file(ema.state_dict(), str(tmp / "ema.safetensors"))
            if in_save is not None:
                in_save(step, tmp)
            save_recipe(recipe, tmp / "config.yaml")
            # Last: marks the directory whole, with the checksums that resume verifies.
            # No fsync here: commit() fsyncs the whole directory.
            atomic.write_json(tmp / STATE_FILE, {**state, "ema_sha256_by_rank": digests,
                                                 "files": integrity.digests(tmp)})
            commit(run_dir, tmp, step, keep)

        full = _unless_disk_full(write_main)
    full = next((f for f in gather_object([full]) if f), None)
    if full is not None:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # the partial checkpoint; the previous one is untouched
        acc.wait_for_everyone()
        free = shutil.disk_usage(checkpoints_dir(run_dir)).free
        prev = latest_checkpoint(run_dir)
        raise CheckpointError(f"{checkpoints_dir(run_dir)}: no space to write checkpoint {step_name(step)} "
                              f"({free / 2**20:.0f} MiB free there; {full}); partial checkpoint "
                              f"removed, newest complete one: {prev.name if prev else 'none'}")
    return checkpoints_dir(run_dir) / step_name(step)


def _unless_disk_full(write: Callable[[], None]) -> Optional[str]:
    """Run `write`; the one-line reason if the disk was full (other errors propagate)."""
    try:
        write()
    except Exception as e:
        if not integrity.is_disk_full(e):
            raise
        return one_line_reason(e)
    return None


def one_line_reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:120]


def restore(ckpt: Path, *, acc, ema, loader, global_batch: int, deepspeed: bool) -> dict:
    """Load a checkpoint of `write_checkpoint` into the live Accelerate state, EMA and loader;
    returns its trainer state. A DeepSpeed checkpoint needs the world size it was written with
    (its optimizer state is sharded per rank); DDP state resumes on any world size."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    saved = read_trainer_state(ckpt)
    world = acc.num_processes
    if deepspeed and saved.get("world_size", world) != world:
        raise RecipeError(f"{ckpt}: DeepSpeed checkpoint from {saved['world_size']} processes; "
                          f"resume it with the same number (now {world})")
    if saved.get("global_batch_size", global_batch) != global_batch:
        log.warning("global batch size changed from %s to %s on resume", saved["global_batch_size"], global_batch)
    try:
        with deepspeed_load.weights_only(getattr(acc, "_models", []) if deepspeed else []):
            acc.load_state(str(Path(ckpt) / "accelerate"))  # DeepSpeed's files: nothing in them runs
        ema.load_state_dict(load_file(str(Path(ckpt) / "ema.safetensors")))
    except SafetensorError as e:  # a checkpoint from before checksums were recorded, truncated since
        raise CheckpointError(f"{ckpt}: unreadable weights ({one_line_reason(e)})") from None
    loader.load_state_dict(saved["data"])
    return saved


# ------------------------------------------------------------------------------ the directory protocol


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (data first, then the directory entries)."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for f in files:
            atomic.fsync_path(Path(dirpath) / f)
        atomic.fsync_path(dirpath)


def _tmp_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_dir(run_dir) / f".tmp-{step_name(step)}"


def begin(run_dir: str | os.PathLike, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of `step` (main process only)."""
    checkpoints_dir(run_dir).mkdir(parents=True, exist_ok=True)
    tmp = _tmp_dir(run_dir, step)
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
    atomic.fsync_path(d)
    atomic.write_text(d / "latest", final.name + "\n", fsync=True)
    prune(run_dir, keep)
    return final


SPIKE = 2.0  # the kept checkpoints' loss above this multiple of an older one's: diverged


def prune(run_dir: str | os.PathLike, keep: int, report=print) -> None:
    """Remove all but the newest `keep` checkpoints, except the last sane one: when every kept
    checkpoint's recorded training loss is above SPIKE x the lowest one among those to remove
    (a run that blew up with finite weights, e.g. lr 1e6), that one stays and is named."""
    found = list_checkpoints(run_dir)
    drop, kept = (found[:-keep], found[-keep:]) if keep > 0 else ([], found)
    pin = _last_sane(drop, kept)
    if pin is not None:
        report(f"{pin.parent / kept[-1].name}: training loss {_loss(kept[-1]):.4g}, above {SPIKE:g}x the "
               f"{_loss(pin):.4g} of {pin.name}: the run may have diverged; {pin.name} is kept "
               f"(resume it with --resume-from {pin})")
    for old in drop:
        if old != pin:
            _discard(old)
    d = checkpoints_dir(run_dir)
    for trash in d.glob(".trash-*"):  # a previous kill during deletion
        shutil.rmtree(trash, ignore_errors=True)


def _loss(ckpt: Path) -> float | None:
    try:
        v = read_trainer_state(ckpt).get("loss")
    except (OSError, ValueError, AttributeError):
        return None
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _last_sane(drop: list[Path], kept: list[Path]) -> Path | None:
    losses = {c: _loss(c) for c in drop}
    candidates = [c for c in drop if losses[c] is not None]
    kept_losses = [v for v in map(_loss, kept) if v is not None]
    if not candidates or not kept_losses:
        return None  # checkpoints written before losses were recorded: prune as before
    best = min(candidates, key=losses.get)
    return best if min(kept_losses) > SPIKE * losses[best] else None


def clean_stale(run_dir: str | os.PathLike) -> None:
    """Remove what killed processes left: temporary and trash directories, a temporary
    `latest` pointer (main process, at start)."""
    d = checkpoints_dir(run_dir)
    if d.is_dir():
        for p in list(d.glob(".tmp-*")) + list(d.glob(".trash-*")):
            shutil.rmtree(p, ignore_errors=True)
        atomic.remove_temporaries(d)


def _discard(path: Path) -> None:
    trash = path.with_name(f".trash-{path.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)  # atomic: the step-* name disappears whole
    shutil.rmtree(trash, ignore_errors=True)
