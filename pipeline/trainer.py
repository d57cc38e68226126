"""The training loop: Accelerate (DDP, multi-node, DeepSpeed ZeRO-1/2), EMA, exact resume.

As in the paper (Sec. 4, App. B): Adam (eps 1e-8), linear warmup, global-norm clipping at 1.0,
EMA of the weights, the L_simple objective of eq. 14 (or the recipe's loss_type).

Determinism: every random draw is a function of (seed, position in the global sample stream)
or (seed, rank, step), never of how long the process has been running:
- t and the noise of eq. 14 for a sample come from a generator seeded with (seed, stream
  position of that sample), so they do not depend on the world size or the accumulation layout;
- dropout masks come from `torch.manual_seed((seed, rank, step, micro-step))` before the forward;
- the data order and flips are the loader's (seed, position) arithmetic, restored from the
  checkpoint; the learning rate is a function of the step.
A run killed and relaunched therefore computes exactly what the uninterrupted run computes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from pipeline import build
from pipeline import checkpoint as ckpt_io
from pipeline.config import Recipe, RecipeError, save_recipe
from pipeline.diffusion import draw_t_and_noise
from pipeline.ema import EMA
from pipeline.errors import UserError
from pipeline.hardware import precision_problem
from pipeline.rng import STREAM_DROPOUT, STREAM_SAMPLE_GRID, mix_seed, stream_generators

log = logging.getLogger("pipeline.train")

EXIT_OK = 0
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving; relaunch to resume
KILL_IN_SAVE_ENV = "DDPM_PIPELINE_TEST_KILL_IN_SAVE"  # tests only: SIGKILL inside the save of this step
TORCH_EXTENSIONS_DIR = Path.home() / ".cache" / "ddpm-pipeline" / "torch_extensions"


class NonFiniteLossError(UserError, RuntimeError):
    """Too many non-finite losses in a row: the run is diverging."""


# ------------------------------------------------------------------------------ helpers


def batch_layout(global_batch: int, world_size: int, micro_batch: Optional[int]) -> tuple[int, int]:
    """(per-process micro batch, gradient accumulation steps) with
    micro * world_size * accumulation == global batch (asserted)."""
    if micro_batch is None:
        if global_batch % world_size:
            raise RecipeError(f"train.global_batch_size={global_batch} is not divisible by the "
                              f"{world_size} processes; set train.micro_batch_size")
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

    def _handle(self, signum, frame):
        self.signum = signum  # nothing else here: the handler runs between bytecodes

    def uninstall(self):
        for s, h in self._old.items():
            signal.signal(s, h)

    @property
    def set(self) -> bool:
        return self.signum is not None


# ------------------------------------------------------------------------------ setup


def make_accelerator(recipe: Recipe, accum: int):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    run_dir = Path(recipe.run.output_dir)
    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DeepSpeed defaults to NCCL; on CPU every backend must be gloo.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    tracker = recipe.run.tracker
    if tracker == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise RecipeError("run.tracker: 'wandb' is not installed (pip install wandb) ")
    return Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=accum,
        log_with=None if tracker == "none" else tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=handlers,
    )


def load_init_weights(src: str) -> dict:
    """Weights for fine-tuning: a run dir, a checkpoint dir (EMA preferred), a .safetensors file,
    or anything `pipeline.hub.load_pretrained` accepts (Hub ids)."""
    from safetensors.torch import load_file

    p = Path(src)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise RecipeError(f"train.init_from: {src}: expected a .safetensors file")
        return load_file(str(p))
    if p.is_dir():
        if (p / "checkpoints").is_dir():
            found = ckpt_io.latest_checkpoint(p)
            if found is None:
                raise RecipeError(f"train.init_from: {src}: run directory has no complete checkpoint")
            p = found
        for name in ("ema.safetensors", "model.safetensors"):
            if (p / name).is_file():
                return load_file(str(p / name))
        raise RecipeError(f"train.init_from: {src}: no ema.safetensors or model.safetensors there")
    try:
        from pipeline.hub import load_pretrained
    except ImportError:
        raise RecipeError(f"train.init_from: {src}: no such file or directory") from None
    return load_pretrained(src).model.state_dict()


# ------------------------------------------------------------------------------ the loop


@dataclass
class TrainState:
    step: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    fp16_overflows: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class Fault:
    """Test hooks (in-process runs only): change the loss at a step, or stop like a signal."""
    loss: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None


def train(recipe: Recipe, *, source: str = "<recipe>", fault: Optional[Fault] = None) -> int:
    """Train until train.max_steps (exit 0) or a stop signal (save, exit EXIT_REQUEUE)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS_DIR))
    from accelerate.utils import DistributedType, set_seed
    from safetensors.torch import load_file, save_file

    from pipeline.data import TrainLoader

    tc, run_dir = recipe.train, Path(recipe.run.output_dir)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    micro, accum = batch_layout(tc.global_batch_size, world_env, tc.micro_batch_size)
    acc = make_accelerator(recipe, accum)
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    assert world == world_env, f"WORLD_SIZE={world_env} but Accelerate sees {world} processes"
    is_ds = acc.distributed_type == DistributedType.DEEPSPEED
    if is_ds:
        ds_cfg = acc.state.deepspeed_plugin.deepspeed_config
        stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
        if stage == 3:
            raise RecipeError("DeepSpeed ZeRO-3 shards the weights; this trainer supports ZeRO-1/2")
        if "optimizer" in ds_cfg or "scheduler" in ds_cfg:
            raise RecipeError("the DeepSpeed JSON must not define an optimizer or scheduler: "
                              "the trainer passes Adam from code and sets the lr every step")
        ds_cfg["train_micro_batch_size_per_gpu"] = micro
        ds_cfg["gradient_clipping"] = tc.grad_clip  # DeepSpeed clips inside engine.step

    # Ask before any work whether this device can run the precision (a recipe's, or a DeepSpeed
    # JSON that enables one itself), instead of failing inside deepspeed.initialize on every rank.
    precision = acc.mixed_precision
    if is_ds:
        precision = next((p for p in ("fp16", "bf16") if ds_cfg.get(p, {}).get("enabled") is True), precision)
    problem = precision_problem(precision, acc.device.type, deepspeed=is_ds)
    if problem:
        raise RecipeError(f"train.mixed_precision={precision}: {problem}")

    # Same initial weights on every rank (DDP also broadcasts them; DeepSpeed relies on it).
    set_seed(tc.seed)
    model = build.unet(recipe.model)
    ckpt = ckpt_io.latest_checkpoint(run_dir)
    if ckpt is None and tc.init_from:
        missing, unexpected = model.load_state_dict(load_init_weights(tc.init_from), strict=False)
        if missing or unexpected:
            raise RecipeError(f"train.init_from: {tc.init_from}: weights do not fit model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    ema = EMA(model, tc.ema_decay, device=acc.device)
    diffusion = build.diffusion(recipe.diffusion)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tc.adam_betas,
                                 eps=tc.adam_eps, weight_decay=tc.weight_decay)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_io.clean_stale(run_dir)
        save_recipe(recipe, run_dir / "config.yaml")
    acc.wait_for_everyone()
    model, optimizer = acc.prepare(model, optimizer)
    net = acc.unwrap_model(model)

    state = TrainState()
    loader = TrainLoader(recipe.data.shards, batch_size=micro, rank=rank, world_size=world,
                         seed=tc.seed, random_flip=recipe.data.random_flip,
                         num_workers=recipe.data.num_workers, max_corrupt=recipe.data.max_corrupt)
    if ckpt is not None:
        saved = ckpt_io.read_trainer_state(ckpt)
        if is_ds and saved.get("world_size", world) != world:
            raise RecipeError(f"{ckpt}: DeepSpeed checkpoint from {saved['world_size']} processes; "
                              f"resume it with the same number (now {world})")
        if saved.get("global_batch_size", tc.global_batch_size) != tc.global_batch_size:
            log.warning("global batch size changed from %s to %s on resume",
                        saved["global_batch_size"], tc.global_batch_size)
        acc.load_state(str(ckpt / "accelerate"))
        ema.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
        loader.load_state_dict(saved["data"])
        state.step = int(saved["step"])
        state.nonfinite_total = int(saved.get("nonfinite_total", 0))
        state.nonfinite_streak = int(saved.get("nonfinite_streak", 0))
        state.fp16_overflows = int(saved.get("fp16_overflows", 0))
        if main:
            print(f"resumed from {ckpt} at step {state.step}", flush=True)

    if main and recipe.run.tracker != "none":
        acc.init_trackers(recipe.run.name, config=_flat(recipe.to_dict()))
    stop = StopFlag().install()
    param_dtype = next(net.parameters()).dtype
    shape = (net.config["in_channels"], net.config["resolution"], net.config["resolution"])
    T = diffusion.num_timesteps
    params = [p for p in model.parameters()]

    def forward(x, t):
        # Under DeepSpeed bf16/fp16 the weights themselves are 16-bit: cast the input to them.
        return model(x.to(param_dtype), t)

    def save(step: int) -> Path:
        tmp = run_dir / "checkpoints" / f".tmp-{ckpt_io.step_name(step)}"
        if main:
            ckpt_io.begin(run_dir, step)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
        # Every rank's EMA digest: they must agree (DDP / ZeRO-2 keep the weights replicated).
        from accelerate.utils import gather_object

        digests = gather_object([ema.digest()])
        acc.wait_for_everyone()
        if main:
            if len(set(digests)) != 1:
                log.error("EMA differs between ranks at step %d: %s", step, digests)
            weights = {k: v.detach().float().cpu().contiguous().clone() for k, v in net.state_dict().items()}
            save_file(weights, str(tmp / "model.safetensors"))
            save_file(ema.state_dict(), str(tmp / "ema.safetensors"))
            if os.environ.get(KILL_IN_SAVE_ENV) == str(step):  # tests: die half-way through a save
                os.kill(os.getpid(), signal.SIGKILL)
            save_recipe(recipe, tmp / "config.yaml")
            ckpt_io.write_json_atomic(tmp / ckpt_io.STATE_FILE, {  # last: marks the directory whole
                "step": step, "samples_seen": loader.position, "data": loader.state_dict(),
                "world_size": world, "global_batch_size": tc.global_batch_size,
                "micro_batch_size": micro, "grad_accum": accum, "seed": tc.seed,
                "nonfinite_total": state.nonfinite_total, "nonfinite_streak": state.nonfinite_streak,
                "fp16_overflows": state.fp16_overflows, "ema_sha256_by_rank": digests,
                "mixed_precision": tc.mixed_precision,
                "distributed_type": str(acc.distributed_type), "device": _device_name(acc.device),
                "command": "accelerate launch " + " ".join(shlex.quote(a) for a in sys.argv),
                "time": time.time()})
            ckpt_io.commit(run_dir, tmp, step, tc.keep_checkpoints)
        acc.wait_for_everyone()
        return run_dir / "checkpoints" / ckpt_io.step_name(step)

    bar = None
    if main:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.max_steps, initial=state.step, desc="train", dynamic_ncols=True)
    t_log, samples_log, last_saved = time.time(), loader.position, state.step
    stats_log = torch.zeros(3, dtype=torch.float64)  # loss sum, grad-norm sum, steps
    code = EXIT_OK
    try:
        while state.step < tc.max_steps:
            step = state.step
            lr = learning_rate(step, tc.lr, tc.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            bad, loss_sum, stop_any = False, 0.0, False
            for k in range(accum):
                first = loader.position + rank * micro  # this rank's samples in the global stream
                x0 = next(loader).to(acc.device, non_blocking=True)
                t, noise = draw_t_and_noise(range(first, first + micro), T, shape, tc.seed, acc.device)
                torch.manual_seed(mix_seed(tc.seed, STREAM_DROPOUT, rank, step, k))
                with acc.accumulate(model):
                    with acc.autocast():
                        loss = diffusion.training_loss(forward, x0, t, noise).mean()
                    if fault is not None and fault.loss is not None:
                        loss = fault.loss(step, loss)
                    # One small all-reduce per micro-step: the loss for logging, and agreement on
                    # "non-finite" and "stop" so every rank takes the same branch (no deadlock).
                    lv = loss.detach().double()
                    finite = torch.isfinite(lv)
                    flags = torch.stack([torch.where(finite, lv, torch.zeros_like(lv)), (~finite).double(),
                                         torch.tensor(float(stop.set), dtype=torch.float64, device=lv.device)])
                    flags = acc.reduce(flags, reduction="sum")
                    nonfinite, stop_any = flags[1].item() > 0, flags[2].item() > 0
                    if nonfinite:
                        bad = True
                        if not (is_ds and accum == 1):
                            # Keep the gradient hooks (DDP buckets, DeepSpeed micro-step count) in
                            # lock-step with a zero gradient; the step is dropped below.
                            acc.backward(sum(p.sum() for p in params) * 0.0)
                    else:
                        loss_sum += flags[0].item() / world
                        acc.backward(loss)
            gnorm = float("nan")
            if bad:
                optimizer.zero_grad(set_to_none=True)
                state.nonfinite_total += 1
                state.nonfinite_streak += 1
                if main:
                    print(f"step {step}: non-finite loss, step skipped "
                          f"({state.nonfinite_streak} in a row, {state.nonfinite_total} total)", flush=True)
                if state.nonfinite_streak >= tc.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{state.nonfinite_streak} non-finite losses in a row at step {step} "
                        f"(train.max_nonfinite={tc.max_nonfinite}); lower train.lr or check the data")
            else:
                state.nonfinite_streak = 0
                if is_ds:  # engine.step (with clipping) already ran inside acc.backward
                    g = model.get_global_grad_norm()
                    gnorm = float(g) if g is not None else float("nan")
                else:
                    gnorm = float(acc.clip_grad_norm_(model.parameters(), tc.grad_clip))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if acc.optimizer_step_was_skipped:  # fp16 scaler found inf/nan gradients
                    state.fp16_overflows += 1
                else:
                    ema.update(net)
            state.step = step + 1
            stats_log += torch.tensor([loss_sum / accum if not bad else 0.0,
                                       gnorm if math.isfinite(gnorm) else 0.0, 0.0 if bad else 1.0],
                                      dtype=torch.float64)
            if bar is not None:
                bar.update(1)
            if main and (state.step % tc.log_every == 0 or state.step == tc.max_steps):
                now = time.time()
                n = max(stats_log[2].item(), 1.0)
                logs = {"loss": stats_log[0].item() / n, "grad_norm": stats_log[1].item() / n,
                        "lr": lr, "img_per_s": (loader.position - samples_log) / max(now - t_log, 1e-9),
                        "samples_seen": loader.position, "nonfinite_total": state.nonfinite_total}
                if recipe.run.tracker != "none":
                    acc.log(logs, step=state.step)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
                t_log, samples_log = now, loader.position
                stats_log.zero_()
            if main and tc.sample_every > 0 and state.step % tc.sample_every == 0:
                write_sample_grid(recipe, ema, diffusion, run_dir, state.step)
            if stop_any:
                save(state.step)
                last_saved = state.step
                if main:
                    print(f"stop signal: saved step {state.step}, exiting {EXIT_REQUEUE}", flush=True)
                code = EXIT_REQUEUE
                break
            if state.step % tc.checkpoint_every == 0 or state.step == tc.max_steps:
                save(state.step)
                last_saved = state.step
        if code == EXIT_OK and last_saved != state.step:
            save(state.step)  # max_steps lowered below the last checkpoint, or reached exactly
    finally:
        stop.uninstall()
        loader.close()
        if bar is not None:
            bar.close()
        acc.end_training()
    return code


def write_sample_grid(recipe: Recipe, ema: EMA, diffusion, run_dir: Path, step: int) -> Path:
    """samples/step-XXXXXXXX.png: a grid of EMA samples (Algorithm 2), fixed seeds per slot."""
    from torchvision.utils import save_image

    tc = recipe.train
    model = build.unet(recipe.model).to(ema.shadow[0].device)
    ema.copy_to(model)
    model.eval()
    n = tc.sample_count
    res, ch = model.config["resolution"], model.config["in_channels"]
    gens = stream_generators(tc.seed, STREAM_SAMPLE_GRID, range(n), ema.shadow[0].device)
    with torch.no_grad():
        x = diffusion.p_sample_loop(model, (n, ch, res, res), generator=gens)
    out = run_dir / "samples" / f"step-{step:08d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    save_image((x.float().cpu() + 1) / 2, str(tmp), nrow=max(1, int(math.sqrt(n))))
    os.replace(tmp, out)
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
