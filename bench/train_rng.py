"""The training step's critical path for its inputs: x0, t and eps of Algorithm 1 (lines 2-4).

  before  the loader yields x0 (its workers prefetch); the training process then draws t and eps
          with one torch.Generator per sample on the training device (two calls per sample)
  after   the loader's workers draw t and eps too (pipeline.diffusion.NoiseDraw, CPU, the same
          per-position streams); the training process only copies the batch (pinned and
          non-blocking on CUDA)

Both read the same data_prep shards with the same workers. The model step is stood in for by a
sleep of --step-ms (on a GPU the host waits for the device then, and the workers prefetch), so
the table shows only what the host spends on the inputs per step: median ms over --steps steps.

    python bench/train_rng.py                       # cifar10-sized (32px, batch 128) and 256px batch 64
    python bench/train_rng.py --device cuda         # on a GPU host
    python bench/train_rng.py --smoke               # tiny, seconds: proves it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the project root
from data_prep.shards import prepare
from data_prep.sources import FolderSource
from pipeline.data import TrainLoader
from pipeline.diffusion import NoiseDraw, draw_t_and_noise

T = 1000


def make_shards(folder: Path, res: int, n: int) -> Path:
    """n smooth random RGB images (PNG) -> data_prep shards at `res`."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((res, res), Image.BILINEAR).save(folder / "img" / f"{i:05d}.png")
    prepare(FolderSource(folder / "img"), folder / "shards", resolution=res, shard_size=max(n // 4, 1), progress=False)
    return folder / "shards"


def critical_path(loader: TrainLoader, device: torch.device, steps: int, step_s: float, before: bool) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(steps + 2):  # two warm-up steps: workers start, pinned buffers allocate
        t0 = time.perf_counter()
        if before:
            first = loader.position
            x0 = next(loader).to(device, non_blocking=True)
            t, eps = draw_t_and_noise(range(first, first + loader.batch_size), T, tuple(x0.shape[1:]), 0, device)
        else:
            x0, t, eps = (v.to(device, non_blocking=True) for v in next(loader))
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
        time.sleep(step_s)  # the model's step
    return times


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2, help="loader worker processes")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--step-ms", type=float, default=200.0, help="the stand-in model step")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few steps")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    configs = [(32, 128), (256, 64)] if not args.smoke else [(16, 4)]
    steps = 3 if args.smoke else args.steps
    step_s = 0.01 if args.smoke else args.step_ms / 1000
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-rng-") as tmp:
        for res, batch in configs:
            shards = make_shards(Path(tmp) / f"r{res}", res, n=2 * batch)
            got = {}
            for name, before in (("before", True), ("after", False)):
                kw = dict(batch_size=batch, seed=0, num_workers=args.workers, pin_memory=device.type == "cuda")
                loader = TrainLoader(shards, **kw, draw=None if before else NoiseDraw(0, T))
                got[name] = statistics.median(critical_path(loader, device, steps, step_s, before)) * 1e3
                loader.close()
            rows.append({"resolution": res, "batch": batch, "device": str(device), "workers": args.workers,
                         "before_ms": got["before"], "after_ms": got["after"], "ratio": got["after"] / got["before"]})
    print(f"host time per step for x0, t, eps (median of {steps} steps; stand-in model step "
          f"{step_s * 1e3:.0f} ms; {args.workers} workers; torch {torch.__version__})")
    print("| images | batch | device | before ms | after ms | after/before |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['resolution']}x{r['resolution']} | {r['batch']} | {r['device']} | {r['before_ms']:.2f} | "
              f"{r['after_ms']:.2f} | {r['ratio']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
