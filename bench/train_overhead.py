"""What the training loop adds around the model's own step, each against a peer in the same run.

  ema        EMA update, fused torch._foreach_lerp_ (ours) vs a per-tensor Python loop
  noise      t + eps from one generator per sample (ours: world-size-free, exact resume)
             vs one batched torch.randn for the whole micro-batch
  step       one full training step of the loop's work (noise, forward, L_simple, backward,
             clip, Adam, EMA) vs the bare forward/backward/Adam of the same model
  checkpoint one atomic checkpoint write (tmp dir, fsync, rename, pointer) vs torch.save of
             the same model + optimizer state to one file

    python bench/train_overhead.py [--model cifar10|tiny] [--batch 16] [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project root

from pipeline import atomic
from pipeline import checkpoint as ck
from pipeline.diffusion import (
    GaussianDiffusion,
    draw_t_and_noise,
    linear_beta_schedule,
)
from pipeline.ema import EMA
from pipeline.unet import UNet, build_unet


def best_pair(a, b, repeat):
    """Best-of-`repeat` of two functions, interleaved so machine load hits both alike."""
    ta, tb = [], []
    for _ in range(repeat):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10", choices=["cifar10", "tiny"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_unet("cifar10") if args.model == "cifar10" else UNet(32, ch=32, ch_mult=(1, 2), num_res_blocks=1)
    n_params = sum(p.numel() for p in model.parameters())
    res = model.config["resolution"]
    B, shape = args.batch, (3, res, res)
    rows = []

    ema = EMA(model, 0.9999)

    def ema_loop():  # the textbook Python EMA: mul_ + add_ per tensor
        with torch.no_grad():
            for s, p in zip(ema.shadow, model.parameters()):
                s.mul_(ema.decay).add_(p.detach(), alpha=1 - ema.decay)

    rows.append(("EMA update: torch._foreach_lerp_ vs per-tensor mul_/add_ loop",
                 *best_pair(lambda: ema.update(model), ema_loop, args.repeat)))
    rows.append((f"t+eps for B={B}: per-sample generators vs one batched randn",
                 *best_pair(lambda: draw_t_and_noise(range(B), 1000, shape, 0, "cpu"),
                            lambda: (torch.randint(1000, (B,)), torch.randn((B, *shape))), args.repeat)))

    diffusion = GaussianDiffusion(linear_beta_schedule(1000), mean_type="eps")
    opt = torch.optim.Adam(model.parameters(), lr=1e-9, eps=1e-8)
    x0 = torch.rand(B, *shape) * 2 - 1

    def ours():
        t, noise = draw_t_and_noise(range(B), 1000, shape, 0, "cpu")
        loss = diffusion.training_loss(model, x0, t, noise).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)

    def bare():
        t, noise = torch.randint(1000, (B,)), torch.randn(B, *shape)
        x_t = diffusion.q_sample(x0, t, noise)
        ((model(x_t, t) - noise) ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ours(), bare()  # warm up (Adam state allocation)
    rows.append((f"training step B={B} {res}x{res}: loop's work vs bare fwd/bwd/Adam",
                 *best_pair(ours, bare, args.repeat)))

    tmp = Path(tempfile.mkdtemp(prefix="train-bench-"))
    def save_ours():
        d = ck.begin(tmp / "run", 1)
        torch.save(opt.state_dict(), d / "optimizer.bin")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
        save_file(ema.state_dict(), str(d / "ema.safetensors"))
        atomic.write_json(d / ck.STATE_FILE, {"step": 1})
        ck.commit(tmp / "run", d, 1, keep=1)

    def save_plain():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}, tmp / "plain.pt")

    rows.append(("checkpoint: atomic dir + fsync vs one torch.save", *best_pair(save_ours, save_plain, args.repeat)))
    shutil.rmtree(tmp)

    print(f"model {args.model}: {n_params:,} params; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; best of {args.repeat}\n")
    print("| measure | ours s | peer s | ratio |")
    print("|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.4f} | {b:.4f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
