"""The training loop: Accelerate (DDP, multi-node, DeepSpeed ZeRO-1/2), EMA, exact resume.

As in the paper (Sec. 4, App. B): Adam (eps 1e-8), EMA of the weights, the L_simple objective of
eq. 14 (or the recipe's loss_type); as in the released run_*.py (not stated in the paper): linear
warmup over 5000 steps and gradient clipping at norm 1.0.

Determinism: every random draw is a function of (seed, position in the global sample stream)
or (seed, rank, step), never of how long the process has been running:
- t and the noise of eq. 14 for a sample come from a generator seeded with (seed, stream
  position of that sample), so they do not depend on the world size or the accumulation layout;
- dropout masks come from `torch.manual_seed((seed, rank, step, micro-step))` before the forward;
- the data order and flips are the loader's (seed, position) arithmetic, restored from the
  checkpoint; the learning rate is a function of the step.
A run killed and relaunched therefore computes exactly what the uninterrupted run computes.

`train()` reads top to bottom: runtime (`setup_runtime`), model and data (`build_parts`),
resume (`checkpoint.restore`), then the loop of `train_step`, `Progress`, sample grids and
`checkpoint.write_checkpoint`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from pipeline import build, checkpoint, fast_path, integrity, launcher, publish, resume, run_lock, snapshots, trackers
from pipeline.atomic import atomic_path
from pipeline.clipping import ReplicaClipper, make_clipper, replica_micro_batch
from pipeline.config import Recipe, RecipeError, TrainConfig, check_shards_fit, save_recipe
from pipeline.data import ShardSet, TrainLoader
from pipeline.diffusion import GaussianDiffusion, NoiseDraw
from pipeline.ema import EMA, warmup_decay
from pipeline.errors import EXIT_OK, EXIT_REQUEUE, UserError
from pipeline.hardware import precision_problem
from pipeline.hub import load_pretrained
from pipeline.remote_shards import is_remote
from pipeline.rng import STREAM_DROPOUT, STREAM_SAMPLE_GRID, mix_seed, stream_generators
from pipeline.unet import UNet
from pipeline.weights import load_state_dict

TORCH_EXTENSIONS_DIR = Path.home() / ".cache" / "ddpm-pipeline" / "torch_extensions"


class NonFiniteLossError(UserError):
    """Too many non-finite losses in a row: the run is diverging."""


@dataclass
class Hooks:
    """Callbacks into the loop for tests (in-process runs, or tests/support/train_with_hooks.py)."""
    loss: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None  # (step, loss) -> the loss to use
    in_save: Optional[Callable[[int, Path], None]] = None  # (step, tmp dir): main process, weights written
    batch: Optional[Callable[[int, int, torch.Tensor], None]] = None  # (step, micro-step, x0): every rank


# ------------------------------------------------------------------------------ pure pieces


def batch_layout(global_batch: int, world_size: int, micro_batch: Optional[int]) -> tuple[int, int]:
    """(per-process micro batch, gradient accumulation steps) with
    micro * world_size * accumulation == global batch (asserted)."""
    if micro_batch is None:
        if global_batch % world_size:
            # No micro batch can fix it: micro x processes x accumulation must equal the global batch.
            raise RecipeError(f"train.global_batch_size={global_batch} is not divisible by the "
                              f"{world_size} processes; choose a multiple of {world_size} "
                              f"(e.g. {global_batch - global_batch % world_size or world_size})")
        micro_batch = global_batch // world_size
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise RecipeError(f"train.global_batch_size={global_batch} is not a multiple of "
                          f"micro_batch_size {micro_batch} x {world_size} processes = {per_step}")
    accum = global_batch // per_step
    assert micro_batch * world_size * accum == global_batch
    return micro_batch, accum


def learning_rate(step: int, base_lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then constant (the original's schedule)."""
    if warmup <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup)


class StopFlag:
    """SIGTERM / SIGUSR1 set a flag; the loop saves after the current step (all ranks agree)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def install(self):
        for s in (signal.SIGTERM, signal.SIGUSR1):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signum = signum  # nothing else here: the handler runs between bytecodes

    def uninstall(self):
        for s, h in self._old.items():
            signal.signal(s, h)

    @property
    def set(self) -> bool:
        return self.signum is not None


# ------------------------------------------------------------------------------ runtime


@dataclass
class Runtime:
    """This process in the run: from `setup_runtime`."""
    acc: Accelerator
    world: int
    rank: int
    main: bool
    is_deepspeed: bool
    micro: int  # samples per process per micro-step
    accum: int  # micro-steps per optimizer step
    precision: str = "no"  # the effective one: the recipe's, or what a DeepSpeed JSON enables

    @property
    def device(self) -> torch.device:
        return self.acc.device


def setup_runtime(recipe: Recipe) -> Runtime:
    """Processes and device, the batch layout, DeepSpeed's JSON completed from the recipe, and the
    precision asked about before any work."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS_DIR))
    tc = recipe.train
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    micro, accum = batch_layout(tc.global_batch_size, world_env, replica_micro_batch(tc, world_env))
    acc = make_accelerator(recipe, accum)
    assert acc.num_processes == world_env, f"WORLD_SIZE={world_env} but Accelerate sees {acc.num_processes} processes"
    is_ds = acc.distributed_type == DistributedType.DEEPSPEED
    precision = acc.mixed_precision
    if is_ds:
        ds_cfg = acc.state.deepspeed_plugin.deepspeed_config
        if ds_cfg.get("zero_optimization", {}).get("stage", 0) == 3:
            raise RecipeError("DeepSpeed ZeRO-3 shards the weights; this trainer supports ZeRO-1/2")
        if "optimizer" in ds_cfg or "scheduler" in ds_cfg:
            raise RecipeError("the DeepSpeed JSON must not define an optimizer or scheduler: "
                              "the trainer passes Adam from code and sets the lr every step")
        ds_cfg["train_micro_batch_size_per_gpu"] = micro
        ds_cfg["gradient_clipping"] = tc.grad_clip  # DeepSpeed clips inside engine.step
        precision = next((p for p in ("fp16", "bf16") if ds_cfg.get(p, {}).get("enabled") is True), precision)
    # Ask before any work whether this device can run the precision (a recipe's, or a DeepSpeed
    # JSON that enables one itself), instead of failing inside deepspeed.initialize on every rank.
    problem = precision_problem(precision, acc.device.type, deepspeed=is_ds)
    if problem:
        raise RecipeError(f"train.mixed_precision={precision}: {problem}")
    if acc.is_main_process:
        print(f"precision: {precision} ({'the DeepSpeed JSON' if precision != tc.mixed_precision else 'train.mixed_precision'})",
              flush=True)
    return Runtime(acc, acc.num_processes, acc.process_index, acc.is_main_process, is_ds, micro, accum, precision)


def make_accelerator(recipe: Recipe, accum: int) -> Accelerator:
    run_dir = Path(recipe.run.output_dir)
    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DeepSpeed defaults to NCCL; on CPU every backend must be gloo.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    tracker = recipe.run.tracker
    if tracker == "wandb" and importlib.util.find_spec("wandb") is None:
        raise RecipeError("run.tracker: 'wandb' is not installed (pip install wandb) ")
    return Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=accum,
        log_with=None if tracker == "none" else tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=handlers,
    )


# ------------------------------------------------------------------------------ model and data


@dataclass
class Parts:
    """What the loop trains and reads: from `build_parts`."""
    model: torch.nn.Module  # as prepared by Accelerate (DDP module, DeepSpeed engine, or the U-Net)
    net: UNet  # the U-Net inside `model`
    optimizer: torch.optim.Optimizer
    ema: EMA
    diffusion: GaussianDiffusion
    loader: TrainLoader
    fast: fast_path.FastPath = fast_path.FastPath()  # the resolved train.channels_last/compile/...
    clipper: Optional[ReplicaClipper] = None  # train.clip_scope replica (pipeline/clipping.py)


def build_parts(recipe: Recipe, rt: Runtime, init_weights: bool) -> Parts:
    """The same initial weights on every rank (DDP also broadcasts them; DeepSpeed relies on it),
    from train.init_from when `init_weights`; EMA, diffusion, Adam, this rank's loader."""
    tc, run_dir = recipe.train, Path(recipe.run.output_dir)
    set_seed(tc.seed)
    model = build.unet(recipe.model)
    if init_weights and tc.init_from:
        load_fitting(model, load_init_weights(tc.init_from), tc.init_from)
    fast = fast_path.resolve(tc, rt.device, rt.is_deepspeed)
    fast_path.apply_tf32(fast)
    fast_path.prepare_module(model, fast)  # the layout first: EMA and Adam state follow it
    ema = EMA(model, tc.ema_decay, device=rt.device)
    diffusion = build.diffusion(recipe.diffusion)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tc.adam_betas,
                                 eps=tc.adam_eps, weight_decay=tc.weight_decay, **fast_path.adam_kwargs(fast))
    if rt.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_stale(run_dir)
        print(f"U-Net on {rt.device}: {fast.describe()}", flush=True)
    rt.acc.wait_for_everyone()
    model, optimizer = rt.acc.prepare(model, optimizer)
    loader = TrainLoader(recipe.data.shards, batch_size=rt.micro, rank=rt.rank, world_size=rt.world,
                         seed=tc.seed, random_flip=recipe.data.random_flip,
                         num_workers=recipe.data.num_workers, max_corrupt=recipe.data.max_corrupt,
                         draw=NoiseDraw(tc.seed, diffusion.num_timesteps), pin_memory=rt.device.type == "cuda")
    clipper = make_clipper(tc, model, rt.world, rt.is_deepspeed, rt.acc.mixed_precision)
    net = rt.acc.unwrap_model(model)
    model = fast_path.compile_module(model, fast, fallback=tc.compile == "auto")
    return Parts(model, net, optimizer, ema, diffusion, loader, fast, clipper)


def load_fitting(model: torch.nn.Module, weights: dict, src: str) -> None:
    """Load `weights` into `model` when every key and shape matches; else one line saying what differs."""
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in weights], [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} != {tuple(own[k].shape)}" for k in own
              if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise RecipeError(f"train.init_from: {src}: weights do not fit the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}, shapes {shapes[:2]})")
    model.load_state_dict(weights)


def load_init_weights(src: str) -> dict:
    """Weights for fine-tuning: a run dir, a checkpoint dir (EMA preferred), a .safetensors file,
    or anything `pipeline.hub.load_pretrained` accepts (Hub ids)."""
    p = Path(src)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise RecipeError(f"train.init_from: {src}: expected a .safetensors file")
        return load_state_dict(p)
    if p.is_dir():
        if (p / "checkpoints").is_dir():
            found = checkpoint.latest_intact(p)
            if found is None:
                raise RecipeError(f"train.init_from: {src}: run directory has no complete checkpoint")
            p = found
        why = integrity.damage(p) if (p / checkpoint.STATE_FILE).is_file() else None
        if why is not None:
            raise RecipeError(f"train.init_from: {src}: damaged checkpoint: {why}")
        for name in ("ema.safetensors", "model.safetensors"):
            if (p / name).is_file():
                return load_state_dict(p / name)
        raise RecipeError(f"train.init_from: {src}: no ema.safetensors or model.safetensors there")
    return load_pretrained(src).model.state_dict()


# ------------------------------------------------------------------------------ the loop


@dataclass
class TrainState:
    """The loop's counters, saved in trainer_state.json and restored from it."""
    step: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    fp16_overflows: int = 0
    loss_sum: float = 0.0  # since the last checkpoint: its mean loss is saved with it (pruning)
    loss_steps: int = 0

    @classmethod
    def from_saved(cls, saved: dict) -> TrainState:
        return cls(step=int(saved["step"]), nonfinite_total=int(saved.get("nonfinite_total", 0)),
                   nonfinite_streak=int(saved.get("nonfinite_streak", 0)),
                   fp16_overflows=int(saved.get("fp16_overflows", 0)))


def train(recipe: Recipe, *, hooks: Optional[Hooks] = None, resume_from: Optional[str] = None,
          no_resume: bool = False) -> int:
    """Train until train.max_steps (exit 0) or a stop signal (save, exit EXIT_REQUEUE).
    `resume_from` / `no_resume`: see pipeline/resume.py (default: the run's newest checkpoint)."""
    try:
        return _train(recipe, hooks, resume_from, no_resume)
    finally:  # the run folder's lock, which _train takes on the main process, whatever ended it
        run_lock.release(recipe.run.output_dir)


def _train(recipe: Recipe, hooks: Optional[Hooks], resume_from: Optional[str], no_resume: bool) -> int:
    hooks = hooks or Hooks()
    tc, run_dir = recipe.train, Path(recipe.run.output_dir)
    ckpt = resume.choose_checkpoint(run_dir, resume_from, no_resume)  # every rank, before the rendezvous

    # Runtime: processes, device, batch layout, precision.
    rt = setup_runtime(recipe)
    if rt.main:  # before anything is written: one trainer per run folder (a second one exits 2)
        run_lock.acquire(run_dir)

    # Model, EMA, optimizer, loader; fine-tuning weights only for a fresh run.
    if ckpt is not None and ckpt.parent.resolve() == checkpoint.checkpoints_dir(run_dir).resolve():
        ckpt = checkpoint.resume_point(run_dir, rt.acc)  # the newest intact one; damaged ones reported
    if ckpt is not None:
        checkpoint.check_resumable(ckpt, recipe)
    if is_remote(recipe.data.shards):  # fetched (and verified) now: checked before the model is built
        shards = ShardSet(recipe.data.shards, "train")
        check_shards_fit(recipe, shards.manifest or {"splits": {"train": {"count": len(shards)}}},
                         "", f"data.shards={recipe.data.shards}")
    parts = build_parts(recipe, rt, init_weights=ckpt is None)

    # Resume: weights, optimizer, RNG states, EMA, loader position, counters.
    state = TrainState()
    if ckpt is not None:
        saved = checkpoint.restore(ckpt, acc=rt.acc, ema=parts.ema, loader=parts.loader,
                                   global_batch=tc.global_batch_size, deepspeed=rt.is_deepspeed)
        state = TrainState.from_saved(saved)
    if rt.main:  # only once the recipe is accepted: a refused resume leaves config.yaml as it was
        save_recipe(recipe, run_dir / "config.yaml")
        resume.record_origin(run_dir, ckpt)
        print(resume.describe(ckpt, state.step), flush=True)

    # The loop: an optimizer step, its log, a sample grid and a checkpoint when due.
    progress = Progress(recipe, rt.acc, state.step, parts.loader.position) if rt.main else None
    stop = StopFlag().install()
    code = EXIT_OK
    clock = fast_path.CompileClock(parts.fast, "the first training step", enabled=rt.main)
    try:
        while state.step < tc.max_steps:
            with clock:
                result = train_step(rt, parts, state, tc, stop, hooks)
            if progress is not None:
                progress.update(state.step, result, parts.loader.position, state.nonfinite_total)
            due = not result.skipped  # a non-finite step is not a step: nothing is due, nothing saved
            if due:
                state.loss_sum, state.loss_steps = state.loss_sum + result.loss, state.loss_steps + 1
            if due and rt.main and tc.sample_every > 0 and state.step % tc.sample_every == 0:
                grid = write_sample_grid(recipe, parts.ema, parts.diffusion, run_dir, state.step)
                progress.log_image("samples", grid, state.step)
            if due and rt.main and tc.snapshot_every > 0 and state.step % tc.snapshot_every == 0:
                snapshots.write_snapshot(run_dir, state.step, parts.ema.state_dict(), recipe)
            if result.stop:
                save(recipe, rt, parts, state, hooks)
                if rt.main:
                    print(f"stop signal: saved step {state.step}, exiting {EXIT_REQUEUE}", flush=True)
                code = EXIT_REQUEUE
                break
            if due and (state.step % tc.checkpoint_every == 0 or state.step == tc.max_steps):
                save(recipe, rt, parts, state, hooks)
                if rt.main and recipe.run.push_to_hub and recipe.run.hub_strategy == "checkpoint":
                    publish.push_step(recipe.run, state.step, final=False)
    except NonFiniteLossError as e:
        newest = checkpoint.latest_checkpoint(run_dir)
        e.args = (f"{e}; the newest good checkpoint is {newest or 'none (no checkpoint was saved)'}",)
        raise
    finally:
        stop.uninstall()
        parts.loader.close()
        if progress is not None:
            progress.close()
        shutdown(rt, parts, clean=sys.exc_info()[0] is None)
    if rt.main:
        print(outputs_line(recipe), flush=True)
        if code == EXIT_OK and recipe.run.push_to_hub:  # once per step: a requeued finished job skips it
            publish.push_step(recipe.run, state.step, final=True)
    return code


def shutdown(rt: Runtime, parts: Parts, clean: bool) -> None:
    """End the process group while the interpreter is whole. After a clean finish every rank first
    waits for the others, so no rank tears its connections down under a peer that is still
    writing. The prepared model (DDP's reducer holds the process group; DeepSpeed's engine needs
    it to tear down) is released and collected before the group ends, here and not by the
    interpreter's finalizer, where gloo's threads can abort a finished run ("terminate called
    without an active exception")."""
    if clean:
        rt.acc.wait_for_everyone()
    rt.acc.free_memory()
    parts.model = parts.optimizer = None
    gc.collect()
    rt.acc.end_training()


# ------------------------------------------------------------------------------ one optimizer step


@dataclass
class StepResult:
    lr: float
    loss: float  # mean over ranks and micro-batches; 0.0 for a skipped step
    grad_norm: torch.Tensor | float  # before clipping, on the device (read when logged); nan for a skipped step
    skipped: bool  # a non-finite loss on some rank: weights, optimizer and EMA unchanged
    stop: bool  # some rank got SIGTERM / SIGUSR1: every rank saves and exits after this step


def train_step(rt: Runtime, parts: Parts, state: TrainState, tc: TrainConfig, stop: StopFlag, hooks: Hooks) -> StepResult:
    """One optimizer step of Algorithm 1 over the global batch: gradients of this rank's `accum`
    micro-batches (averaged over ranks by Accelerate), clipped, Adam, then the EMA. A non-finite
    loss on any rank skips the step on every rank; too many in a row raise NonFiniteLossError."""
    acc, model, optimizer, step = rt.acc, parts.model, parts.optimizer, state.step
    lr = learning_rate(step, tc.lr, tc.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    bad, loss_sum, stop_any = accumulate_gradients(rt, parts, step, tc.seed, stop, hooks)
    gnorm = float("nan")
    if bad:
        optimizer.zero_grad(set_to_none=True)
        state.nonfinite_total += 1
        state.nonfinite_streak += 1
        if rt.main:
            print(f"step {step}: non-finite loss, step skipped "
                  f"({state.nonfinite_streak} in a row, {state.nonfinite_total} total)", flush=True)
        if state.nonfinite_streak >= tc.max_nonfinite:
            raise NonFiniteLossError(
                f"{state.nonfinite_streak} non-finite losses in a row at step {step} "
                f"(train.max_nonfinite={tc.max_nonfinite}); lower train.lr or check the data")
    else:
        state.nonfinite_streak = 0
        if rt.is_deepspeed:  # engine.step (with clipping) already ran inside acc.backward
            g = model.get_global_grad_norm()
            gnorm = float(g) if g is not None else float("nan")
        else:
            gnorm = parts.clipper.finish() if parts.clipper else acc.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if acc.optimizer_step_was_skipped:  # fp16 scaler found inf/nan gradients
            state.fp16_overflows += 1
        else:
            parts.ema.update(parts.net, warmup_decay(tc.ema_decay, step) if tc.ema_warmup else None)
    if not bad:  # a skipped step is not counted: the step number, lr and schedule stay where they were
        state.step = step + 1
    return StepResult(lr, 0.0 if bad else loss_sum / rt.accum, gnorm, bad, stop_any)


def accumulate_gradients(rt: Runtime, parts: Parts, step: int, seed: int, stop: StopFlag,
                         hooks: Hooks) -> tuple[bool, float, bool]:
    """Algorithm 1 for this rank's micro-batches: x0 from the data (line 2), t ~ Uniform and
    eps ~ N(0, I) drawn per sample position (lines 3-4), the gradient of line 5's loss (eq. 14)
    accumulated; `train_step` takes the step.
    Returns (some rank's loss was non-finite, sum of the rank-mean losses, some rank must stop).

    The ranks agree once per step, after the last backward (one small all-reduce, the step's one
    host sync): a non-finite loss has only spoilt gradients that the caller drops. DeepSpeed's
    engine steps inside the last backward, so there the ranks agree before every backward."""
    acc, model, net, diffusion = rt.acc, parts.model, parts.net, parts.diffusion
    param_dtype = next(net.parameters()).dtype

    def forward(x, t):
        # Under DeepSpeed bf16/fp16 the weights themselves are 16-bit: cast the input to them.
        return model(fast_path.to_format(x.to(param_dtype), parts.fast), t)

    bad, loss_sum, stop_any = False, 0.0, False
    losses = []  # this rank's micro-step losses, on the device until the step's one read
    sync_off = contextlib.ExitStack()
    if parts.clipper:  # each replica's gradient stays local until ReplicaClipper.finish sums them
        parts.clipper.begin()
        sync_off.enter_context(acc.no_sync(model))
    for k in range(rt.accum):
        # x0 and, drawn by the loader's workers per global stream position (NoiseDraw), t and eps.
        x0, t, noise = (v.to(rt.device, non_blocking=True) for v in next(parts.loader))
        if hooks.batch is not None:
            hooks.batch(step, k, x0)
        torch.manual_seed(mix_seed(seed, STREAM_DROPOUT, rt.rank, step, k))
        with acc.accumulate(model):
            with acc.autocast():
                loss = diffusion.training_loss(forward, x0, t, noise).mean()
            if hooks.loss is not None:
                loss = hooks.loss(step, loss)
            if not rt.is_deepspeed:
                acc.backward(loss)
                if parts.clipper:
                    parts.clipper.take()
                losses.append(loss.detach())
                continue
            mean_loss, bad_here, stop_here = agree_across_ranks(acc, loss.detach().reshape(1), stop.set)
            stop_any = stop_any or stop_here
            if bad_here:
                bad = True
                if rt.accum > 1:
                    # Keep DeepSpeed's micro-step count in lock-step with a zero gradient; the
                    # step is dropped by the caller.
                    acc.backward(sum(p.sum() for p in model.parameters()) * 0.0)
            else:
                loss_sum += mean_loss
                acc.backward(loss)
    sync_off.close()
    if losses:
        loss_sum, bad, stop_any = agree_across_ranks(acc, torch.stack(losses), stop.set)
    return bad, loss_sum, stop_any


def agree_across_ranks(acc: Accelerator, losses: torch.Tensor, stop_requested: bool) -> tuple[float, bool, bool]:
    """One small all-reduce and one host read: the loss for logging, and agreement on
    "non-finite" and "stop" so every rank takes the same branch (no deadlock).
    `losses`: this rank's micro-step losses. Returns (the sum over micro-steps of the mean loss
    over ranks, 0.0 when non-finite somewhere; some rank's loss was non-finite; some rank must stop)."""
    lv = losses.double()
    finite = torch.isfinite(lv)
    # The stop flag is filled on the device (new_full): a tensor built from a host value would be
    # a copy that waits for the queue, a second sync.
    flags = torch.stack([torch.where(finite, lv, torch.zeros_like(lv)).sum(), (~finite).sum().double(),
                         lv.new_full((), float(stop_requested))])
    total, nonfinite, stop_any = acc.reduce(flags, reduction="sum").tolist()  # one device-to-host copy
    return (0.0 if nonfinite else total / acc.num_processes), nonfinite > 0, stop_any > 0


# ------------------------------------------------------------------------------ outputs


def save(recipe: Recipe, rt: Runtime, parts: Parts, state: TrainState, hooks: Hooks) -> Path:
    """Checkpoint the current step (every process takes part); never non-finite weights."""
    tc, loader = recipe.train, parts.loader
    bad = nonfinite_weights(parts)
    if bad is not None:
        raise NonFiniteLossError(f"step {state.step}: {bad} holds non-finite values; not saved")
    trainer_state = {
        "step": state.step, "samples_seen": loader.position, "data": loader.state_dict(),
        "world_size": rt.world, "global_batch_size": tc.global_batch_size,
        "micro_batch_size": rt.micro, "grad_accum": rt.accum, "seed": tc.seed,
        "nonfinite_total": state.nonfinite_total, "nonfinite_streak": state.nonfinite_streak,
        "fp16_overflows": state.fp16_overflows, "mixed_precision": rt.precision,
        "distributed_type": str(rt.acc.distributed_type), "device": _device_name(rt.device),
        "command": launcher.recorded_command(),
        # The mean training loss since the previous checkpoint: pruning keeps the last sane
        # checkpoint when the newest ones diverged (pipeline/checkpoint.py, prune).
        "loss": state.loss_sum / state.loss_steps if state.loss_steps else None,
        "time": time.time()}
    state.loss_sum, state.loss_steps = 0.0, 0
    return checkpoint.write_checkpoint(recipe.run.output_dir, state.step, acc=rt.acc, net=parts.net, ema=parts.ema,
                                       recipe=recipe, state=trainer_state, keep=tc.keep_checkpoints,
                                       in_save=hooks.in_save)


def outputs_line(recipe: Recipe) -> str:
    """The closing line: where this run's checkpoints, sample grids and logs are."""
    run = Path(recipe.run.output_dir)
    logs = {"tensorboard": f"{run / 'logs' / recipe.run.name} (tensorboard --logdir {run / 'logs'})",
            "wandb": f"{os.environ.get('WANDB_DIR') or run / 'logs'} (W&B)", "none": "none (run.tracker: none)"}
    return (f"outputs: checkpoints {run / 'checkpoints'}, samples {run / 'samples'}, "
            f"snapshots {run / 'snapshots' if recipe.train.snapshot_every else 'off'}, logs {logs[recipe.run.tracker]}")


def nonfinite_weights(parts: Parts) -> Optional[str]:
    """The name of the first weight (or EMA weight) with a NaN or inf, or None."""
    for name, p in parts.net.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            return name
    for i, p in enumerate(parts.ema.shadow):
        if not bool(torch.isfinite(p).all()):
            return f"EMA weight {i}"
    return None


class Progress:
    """Main process only: the tracker, the progress bar, and every log_every steps the means
    since the last log (loss and grad norm over the steps taken), lr and throughput."""

    def __init__(self, recipe: Recipe, acc: Accelerator, step: int, position: int):
        self.tc, self.acc, self.tracker = recipe.train, acc, recipe.run.tracker
        self.tracking = self.tracker != "none"
        if self.tracking:  # the same tracker run on every launch of this run folder (pipeline/trackers.py)
            project, kwargs = trackers.init_arguments(recipe.run, recipe.run.output_dir, step)
            acc.init_trackers(project, config=_flat(recipe.to_dict()), init_kwargs=kwargs)
        self.bar = tqdm(total=self.tc.max_steps, initial=step, desc="train", dynamic_ncols=True)
        self.time, self.position = time.time(), position
        self.loss_sum, self.steps = 0.0, 0
        self.gnorm_sum: torch.Tensor | float = 0.0  # on the device: read only when logged

    def update(self, step: int, r: StepResult, position: int, nonfinite_total: int) -> None:
        """After the optimizer step that made the step count `step`."""
        if not r.skipped:
            self.loss_sum, self.steps = self.loss_sum + r.loss, self.steps + 1
            g = torch.as_tensor(r.grad_norm).detach().double()
            self.gnorm_sum = self.gnorm_sum + torch.where(torch.isfinite(g), g, torch.zeros_like(g))
        self.bar.update(0 if r.skipped else 1)
        if r.skipped or (step % self.tc.log_every and step != self.tc.max_steps):
            return
        now = time.time()
        n = max(self.steps, 1)
        logs = {"loss": self.loss_sum / n, "grad_norm": float(self.gnorm_sum) / n,
                "lr": r.lr, "img_per_s": (position - self.position) / max(now - self.time, 1e-9),
                "samples_seen": position, "nonfinite_total": nonfinite_total}
        if self.tracking:
            self.acc.log(logs, step=step)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{r.lr:.2e}")
        self.time, self.position = now, position
        self.loss_sum, self.steps, self.gnorm_sum = 0.0, 0, 0.0

    def log_image(self, name: str, path: Path, step: int) -> None:
        if self.tracking:
            trackers.log_image(self.acc, self.tracker, name, trackers.grid_array(path), step)

    def close(self) -> None:
        self.bar.close()


def write_sample_grid(recipe: Recipe, ema: EMA, diffusion: GaussianDiffusion, run_dir: Path, step: int) -> Path:
    """samples/step-XXXXXXXX.png: a grid of EMA samples (Algorithm 2), fixed seeds per slot."""
    # Imported here: torchvision takes seconds to import, and only sample grids need it.
    from torchvision.utils import save_image

    tc = recipe.train
    model = build.unet(recipe.model).to(ema.shadow[0].device)
    ema.copy_to(model)
    model.eval()
    n = tc.sample_count
    res, ch = model.config["resolution"], model.config["in_channels"]
    gens = stream_generators(tc.seed, STREAM_SAMPLE_GRID, range(n), ema.shadow[0].device)
    # The run's layout, float32, not compiled: a fresh compile for each grid costs more than it saves.
    fast = fast_path.resolve(tc, ema.shadow[0].device)
    sampler = fast_path.sampling_model(model, fast_path.FastPath(channels_last=fast.channels_last))
    with torch.no_grad():
        x = diffusion.p_sample_loop(sampler, (n, ch, res, res), generator=gens)
    out = run_dir / "samples" / f"step-{step:08d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # keeps the .png suffix: save_image picks the format by it
        save_image((x.float().cpu() + 1) / 2, str(tmp), nrow=max(1, int(math.sqrt(n))))
    return out


def _device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return torch.device(device).type


def _flat(d: dict, prefix: str = "") -> dict:
    """Tracker hyper-parameters must be scalars: flatten sections, stringify lists."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out
