"""CPU proxies of the GPU step's cost: ops and host reads per optimizer step of the real trainer.

`pipeline.trainer.train_step` on recipes/cifar10.yaml (the cifar10 U-Net at 32x32), global batch
16, fused Adam, in three layouts: global clipping over 1 micro-batch of 16, global over 8
micro-batches of 2, replica over 8 micro-batches (replicas) of 2. Per optimizer step, as the
difference between a 6-step and a 3-step count (so set-up and the first step drop out):
- ops: every aten op dispatched (a TorchDispatchMode), forward, backward and optimizer alike;
  on a GPU each is at least one kernel launch;
- host reads: calls that copy a device value to the host (`.item()`, `.tolist()`, `.cpu()`,
  `float(t)`, `bool(t)`, ... seen by a TorchFunctionMode), each a sync on a GPU;
then the step time of replica vs global over the same micro-batches (median of alternating
pairs). Goals (issue 22): replica <= 1.2x the ops of global over the same micro-batches, <= 1
host read per step in every layout, replica vs global step time within 3%.

    python bench/train_step_ops.py [--pairs 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import trainer
from pipeline.config import load_recipe

HOST_READS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"}
LAYOUTS = {"global, 1 micro-batch of 16": dict(clip_scope="global"),
           "global, 8 micro-batches of 2": dict(clip_scope="global", micro_batch_size=2),
           "replica, 8 micro-batches of 2": dict(clip_scope="replica", clip_replicas=8)}


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.n += 1
        return func(*args, **(kwargs or {}))


class Trainer:
    """One layout's runtime and parts, stepping on demand."""

    def __init__(self, shards: Path, out: Path, **train):
        overrides = [f"data.shards={shards}", f"run.output_dir={out}", "run.tracker=none", "train.sample_every=0",
                     "train.global_batch_size=16", "train.mixed_precision=no", "train.fused_adam=true",
                     "data.num_workers=1"] + [f"train.{k}={v}" for k, v in train.items()]
        self.recipe = load_recipe(ROOT / "recipes" / "cifar10.yaml", overrides)
        self.rt = trainer.setup_runtime(self.recipe)
        self.parts = trainer.build_parts(self.recipe, self.rt, init_weights=True)
        self.state, self.stop, self.hooks = trainer.TrainState(), trainer.StopFlag(), trainer.Hooks()

    def step(self):
        trainer.train_step(self.rt, self.parts, self.state, self.recipe.train, self.stop, self.hooks)

    def count(self, steps: int) -> tuple[int, int]:
        ops, reads = Ops(), HostReads()
        with ops, reads:
            for _ in range(steps):
                self.step()
        return ops.n, reads.n

    def close(self):
        from accelerate.state import AcceleratorState, GradientState

        self.parts.loader.close()
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=7, help="alternating timed pairs, replica vs global (8 x 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import train_rng

    tmp = Path(tempfile.mkdtemp(prefix="ddpm-ops-"))
    shards = train_rng.make_shards(tmp / "data", 32, 64)
    rows = {}
    print("| layout | ops per step | host reads per step |\n|---|---|---|")
    for name, train in LAYOUTS.items():
        t = Trainer(shards, tmp / name.replace(" ", "_").replace(",", ""), **train)
        t.step()  # the first step's one-time work stays out of the counts
        a, b = t.count(3), t.count(6)
        rows[name] = ((b[0] - a[0]) / 3, (b[1] - a[1]) / 3)
        t.close()
        print(f"| {name} | {rows[name][0]:,.0f} | {rows[name][1]:.2f} |", flush=True)
    g8, r8 = rows["global, 8 micro-batches of 2"], rows["replica, 8 micro-batches of 2"]
    print(f"\nreplica / global ops over the same 8 micro-batches: {r8[0] / g8[0]:.3f}x (goal <= 1.2x)")
    # Step time: both layouts built once, stepped in alternating pairs (the load drifts alike).
    glob = Trainer(shards, tmp / "tg", **LAYOUTS["global, 8 micro-batches of 2"])
    rep = Trainer(shards, tmp / "tr", **LAYOUTS["replica, 8 micro-batches of 2"])
    ratios, step_s = [], {"global": [], "replica": []}
    for i in range(args.pairs + 1):
        times = []
        for t in (glob, rep) if i % 2 else (rep, glob):
            t0 = time.perf_counter()
            t.step()
            times.append(time.perf_counter() - t0)
        if i:  # the first pair warms up
            g, r = (times[0], times[1]) if i % 2 else (times[1], times[0])
            ratios.append(r / g)
            step_s["global"].append(g)
            step_s["replica"].append(r)
    ratios.sort()
    print(f"replica / global step time (8 x 2, median of {len(ratios)} pairs): {statistics.median(ratios):.3f}x "
          f"(range {ratios[0]:.3f}-{ratios[-1]:.3f}; goal within 3%); median step: "
          + ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in step_s.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
