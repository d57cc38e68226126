"""Eval throughput on CPU for the quickstart-sized model: sampling img/s and NLL img/s.

Peers in the same run:
  sampling  our Algorithm 2 loop (pipeline.diffusion.p_sample_loop, per-sample generators)
            vs diffusers' DDPMPipeline on the same weights (converted with pipeline/convert.py)
            and the same T-step schedule;
  NLL       calc_bpd with t_batch time steps per model call vs one time step per call (the
            original code's loop).
Usage: python bench/eval_speed.py [--timesteps 1000] [--batch 8] [--nll-batch 4] [--t-batch 50]
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
