"""What a user's training step costs: `pipeline.trainer.train_step` as `pipeline/train.py` runs it.

The recipe is recipes/lsun_bedroom.yaml (lsun256, batch 64, bf16, replica clipping over 8
replicas) with only the options under test overridden, on data_prep shards at its resolution:
the loader with its workers and t/eps draws, the host-to-device copies, autocast, the clipper,
Adam, the EMA and the step's host syncs are all in the timed loop. bench/gpu_bench.py calls
`trainer_row` once per variant; `bench/gpu.sh --cpu-smoke` runs the same code on a tiny model.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from pipeline import trainer
from pipeline.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "lsun_bedroom.yaml"
# --cpu-smoke: the recipe's code paths on a model that steps in milliseconds on a CPU.
SMOKE = ["model.resolution=16", "model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
         "model.attn_resolutions=[8]", "train.mixed_precision=no", "train.global_batch_size=8", "data.num_workers=1"]


def recipe_for(shards: Path, out: Path, smoke: bool, **train):
    """lsun_bedroom.yaml on `shards` with `train` overrides; no sample grids, checkpoints or tracker."""
    overrides = [f"data.shards={shards}", f"run.output_dir={out}", "run.tracker=none", "train.sample_every=0",
                 "train.checkpoint_every=1000000000", "train.snapshot_every=0", "train.log_every=1000000000"]
    overrides += SMOKE if smoke else []
    overrides += [f"train.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in train.items()]
    return load_recipe(RECIPE, overrides)


def host_syncs(step) -> int:
    """CUDA synchronizations during one call of `step` (torch's sync debug mode warns at each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def timed(step, batch: int, device: torch.device, steps: int, warmup: int) -> dict:
    """Run `step` once (first-step time: compilation, autotuning), warm up, then time `steps`
    synchronised steps: img/s of the median step, the range, and peak memory on CUDA."""
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    res = {"img_per_s": batch / med, "step_ms": med * 1e3, "step_ms_range": [times[0] * 1e3, times[-1] * 1e3],
           "first_step_s": first}
    if cuda:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return res


def trainer_row(shards: Path, out: Path, *, smoke: bool, steps: int, warmup: int, cudnn_benchmark: bool = True,
                **train) -> dict:
    """img/s, step time, peak memory, first-step time and host syncs per step of the real
    train_step. `train`: recipe overrides (clip_scope, channels_last, compile, ...). The smoke
    compiles with dynamo's "eager" backend: the tracing code path without minutes of codegen."""
    from accelerate.state import AcceleratorState, GradientState

    from pipeline import fast_path

    recipe = recipe_for(shards, out, smoke, **train)
    rt = trainer.setup_runtime(recipe)
    compile_module = fast_path.compile_module
    if smoke:
        fast_path.compile_module = lambda m, fp, fallback=False, **kw: compile_module(m, fp, fallback, backend="eager")
    try:
        parts = trainer.build_parts(recipe, rt, init_weights=True)
    finally:
        fast_path.compile_module = compile_module
    torch.backends.cudnn.benchmark = cudnn_benchmark  # build_parts turned it on for CUDA
    state, stop, hooks, tc = trainer.TrainState(), trainer.StopFlag(), trainer.Hooks(), recipe.train
    cuda = rt.device.type == "cuda"

    def step():
        trainer.train_step(rt, parts, state, tc, stop, hooks)

    try:
        res = timed(step, tc.global_batch_size, rt.device, steps, warmup)
        res.update(micro_steps=rt.accum, micro_batch=rt.micro, fast_path=parts.fast.describe(),
                   host_syncs_per_step=host_syncs(step) if cuda else None)
        return res
    finally:
        parts.loader.close()
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        if getattr(parts.fast, "compile", False):
            torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
