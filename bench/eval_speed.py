"""Eval throughput on CPU for the quickstart-sized model: sampling img/s and NLL img/s.

Peers in the same run:
  sampling  our Algorithm 2 loop (pipeline.diffusion.p_sample_loop, per-sample generators)
            vs diffusers' DDPMPipeline on the same weights (converted with pipeline/convert.py)
            and the same T-step schedule;
  NLL       calc_bpd with t_batch time steps per model call vs one time step per call (the
            original code's loop).
  Inception with --inception: FID feature extraction img/s (eval/features.py: each process its
            share, float64 moments gathered) for 1 vs 2 processes (torch.distributed.run, gloo on
            CPU, NCCL on GPUs); on a GPU machine --device cuda measures the GPU path.
Usage: python bench/eval_speed.py [--timesteps 1000] [--batch 8] [--nll-batch 4] [--t-batch 50]
       python bench/eval_speed.py --inception [--images 256] [--size 32] [--feature-batch 64]
           [--processes 1,2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline import build, convert
from pipeline.config import load_recipe
from pipeline.rng import eval_generators

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    ap.add_argument("--timesteps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--nll-batch", type=int, default=4)
    ap.add_argument("--t-batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inception", action="store_true", help="measure FID feature extraction instead")
    ap.add_argument("--images", type=int, default=256, help="--inception: images per measurement")
    ap.add_argument("--size", type=int, default=32, help="--inception: image side (resized to 299 inside)")
    ap.add_argument("--feature-batch", type=int, default=64, help="--inception: images per call per process")
    ap.add_argument("--processes", default="1,2", help="--inception: process counts to compare")
    ap.add_argument("--device", default="cpu", help="--inception: cpu or cuda")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return inception_worker(args)
    if args.inception:
        return inception_bench(args)
    torch.set_num_threads(args.threads)

    # diffusers is a test/bench-only dependency and slow to import: only a real run pays for it.
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    recipe = load_recipe(args.recipe, [f"diffusion.timesteps={args.timesteps}"])
    torch.manual_seed(0)
    model = build.unet(recipe.model).eval()
    d = build.diffusion(recipe.diffusion)
    kw = recipe.model.unet_kwargs()
    res, B, T = kw["resolution"], args.batch, args.timesteps

    # ---- sampling: ours vs diffusers' DDPMPipeline, same weights and schedule
    unet = UNet2DModel(**convert.diffusers_config(kw))
    unet.load_state_dict(convert.to_diffusers(model.state_dict()))
    sched = DDPMScheduler(num_train_timesteps=T, beta_start=recipe.diffusion.beta_start,
                          beta_end=recipe.diffusion.beta_end, beta_schedule="linear",
                          variance_type=recipe.diffusion.var_type, clip_sample=True)
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        ours = timed(lambda: d.p_sample_loop(model, (B, 3, res, res), generator=eval_generators(0, range(B), "cpu")))
        theirs = timed(lambda: pipe(batch_size=B, num_inference_steps=T, output_type="np",
                                    generator=torch.Generator().manual_seed(0)))
    # ---- NLL: calc_bpd with time-step chunks vs one step per model call
    x = ((torch.rand(args.nll_batch, 3, res, res, generator=torch.Generator().manual_seed(1)) * 255).round()
         / 127.5 - 1)
    with torch.inference_mode():
        chunked = timed(lambda: d.calc_bpd(model, x, generator=torch.Generator().manual_seed(0), t_batch=args.t_batch))
        single = timed(lambda: d.calc_bpd(model, x, generator=torch.Generator().manual_seed(0), t_batch=1))

    n_params = sum(p.numel() for p in model.parameters())
    print(f"quickstart U-Net {res}x{res}, ch={kw['ch']}, ch_mult={tuple(kw['ch_mult'])}, {n_params / 1e6:.2f}M params; "
          f"T={T}; CPU threads={args.threads}; torch {torch.__version__}")
    print(f"{'work':<44} {'seconds':>8} {'img/s':>8} {'ratio':>7}")
    rows = [
        (f"sampling, ours (Algorithm 2), batch {B}", ours, B / ours, theirs / ours),
        (f"sampling, diffusers DDPMPipeline, batch {B}", theirs, B / theirs, 1.0),
        (f"NLL calc_bpd, t_batch={args.t_batch}, batch {args.nll_batch}", chunked,
         args.nll_batch / chunked, single / chunked),
        (f"NLL calc_bpd, t_batch=1, batch {args.nll_batch}", single, args.nll_batch / single, 1.0),
    ]
    for name, s, ips, ratio in rows:
        print(f"{name:<44} {s:8.2f} {ips:8.3f} {ratio:6.2f}x")
    print("ratio = peer time / this time (peer: the row below it); > 1 means faster than the peer")


def inception_worker(args) -> None:
    """One process of a torch.distributed.run launch: its share of the images through the real
    Inception (eval/features.py), timed between barriers."""
    from eval.features import image_statistics, load_extractor
    from eval.inception import resolve_weights

    torch.set_num_threads(1)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    fe = load_extractor(weights=resolve_weights(None), device=device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, args.size, args.size, 3), generator=g, dtype=torch.uint8).numpy()
    image_statistics(images[: args.feature_batch * torch.distributed.get_world_size()], fe,
                     batch_size=args.feature_batch, device=device)  # warm-up (first-call allocations)
    torch.distributed.barrier()
    t0 = time.perf_counter()
    stats = image_statistics(images, fe, batch_size=args.feature_batch, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    torch.distributed.barrier()
    dt = time.perf_counter() - t0
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({"processes": torch.distributed.get_world_size(), "seconds": dt,
                                      "img_per_s": args.images / dt, "n": stats["n"]}), flush=True)
    torch.distributed.destroy_process_group()


def inception_bench(args) -> None:
    rows = []
    for k in [int(p) for p in args.processes.split(",")]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(k), __file__, "--worker",
               "--images", str(args.images), "--size", str(args.size), "--feature-batch", str(args.feature_batch),
               "--device", args.device]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    print(f"Inception (torch-fidelity inception-v3-compat, fp32) features, {args.images} images "
          f"{args.size}x{args.size} -> 299x299, batch {args.feature_batch}/process, device {args.device}, "
          f"1 thread/process; torch {torch.__version__}")
    print(f"{'processes':>9} {'seconds':>8} {'img/s':>8} {'ratio':>7}")
    for r in rows:
        print(f"{r['processes']:>9} {r['seconds']:8.2f} {r['img_per_s']:8.2f} {r['img_per_s'] / rows[0]['img_per_s']:6.2f}x")
    print("ratio = img/s / img/s of the first row")


if __name__ == "__main__":
    main()
