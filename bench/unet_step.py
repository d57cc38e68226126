"""One training step (forward + backward + Adam) of our U-Net vs diffusers' UNet2DModel.

Both models have the identical architecture and weights (loaded through pipeline/convert.py),
the same batch, the same threads and the same optimizer (Adam; fused or foreach, the same for
both). Runs alternate ours/diffusers so a busy machine slows both alike; the table reports
median step times and the median of the per-pair ratios (ours / diffusers, < 1 is faster);
on a shared machine the process CPU time per step (all threads) is printed too, as it is less
sensitive to waiting for a core than wall time.

    python bench/unet_step.py --preset cifar10 --batch 8 --threads 2 --pairs 12
    python bench/unet_step.py --ours-channels-last --ref-channels-last   # both NHWC

On a GPU add `--device cuda --dtype bf16` (autocast): img/s and MFU are printed too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.convert import diffusers_config, to_diffusers
from pipeline.presets import PRESETS
from pipeline.unet import UNet

# Training FLOPs per image (forward + backward = 3x forward) for the 256px models: 1.49 TFLOP.
TRAIN_FLOPS = {"lsun256": 1.49e12, "celebahq256": 1.49e12}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar10", choices=sorted(PRESETS))
    p.add_argument("--ch", type=int, default=None, help="override the preset's base channels")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--pairs", type=int, default=10, help="timed ours/diffusers pairs")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each model first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    p.add_argument("--optimizer", default="fused", choices=["fused", "foreach"])
    p.add_argument("--ours-channels-last", action="store_true")
    p.add_argument("--ref-channels-last", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 SXM bf16 dense)")
    return p.parse_args(argv)


def make_models(args):
    import diffusers  # a test/bench-only dependency, and slow to import: not for `--help`

    kwargs = dict(PRESETS[args.preset])
    if args.ch:
        kwargs["ch"] = args.ch
    torch.manual_seed(0)
    ours = UNet(**kwargs)
    ref = diffusers.UNet2DModel(**diffusers_config(kwargs))
    ref.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    return kwargs, ours, ref


class Runner:
    def __init__(self, model, call, args, channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(args.device, memory_format=fmt).train()
        self.call, self.args, self.fmt = call, args, fmt
        opt = {"fused": True} if args.optimizer == "fused" else {"foreach": True}
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-5, eps=1e-8, **opt)

    def step(self, x, t, target):
        x = x.contiguous(memory_format=self.fmt)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.args.dtype == "bf16"):
            out = self.call(self.model, x, t)
        loss = (out.float() - target).square().mean()  # L_simple, eq. 14
        loss.backward()
        self.opt.step()

    def timed(self, x, t, target):
        sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        self.step(x, t, target)
        sync()
        return time.perf_counter() - start, time.process_time() - cpu


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    kwargs, ours, ref = make_models(args)
    r = kwargs["resolution"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, r, r, generator=g).to(args.device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(args.device)
    target = torch.randn(x.shape, generator=g).to(args.device)
    runners = {
        "ours": Runner(ours, lambda m, a, b: m(a, b), args, args.ours_channels_last),
        "diffusers": Runner(ref, lambda m, a, b: m(a, b).sample, args, args.ref_channels_last),
    }
    for _ in range(args.warmup):
        for run in runners.values():
            run.step(x, t, target)
    times = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    for i in range(args.pairs):
        order = list(runners) if i % 2 == 0 else list(runners)[::-1]  # alternate who goes first
        for k in order:
            wall, c = runners[k].timed(x, t, target)
            times[k].append(wall)
            cpu[k].append(c)
    ratios = [a / b for a, b in zip(times["ours"], times["diffusers"])]
    cpu_ratios = [a / b for a, b in zip(cpu["ours"], cpu["diffusers"])]

    nparams = sum(p.numel() for p in ours.parameters())
    fmt = lambda cl: "NHWC" if cl else "NCHW"
    print(f"U-Net training step: preset {args.preset} (ch={kwargs['ch']}, {nparams / 1e6:.2f}M params), "
          f"batch {args.batch}, {args.dtype}, device {args.device}"
          + (f", {args.threads} threads" if args.device == "cpu" else "")
          + f", Adam ({args.optimizer}), {args.pairs} alternating pairs")
    print(f"{'model':<10} {'layout':<6} {'median s/step':>14} {'min':>8} {'CPU s/step':>11} {'img/s':>8}"
          + (f" {'MFU':>6}" if args.preset in TRAIN_FLOPS and args.device != "cpu" else ""))
    for k, cl in (("ours", args.ours_channels_last), ("diffusers", args.ref_channels_last)):
        med = statistics.median(times[k])
        line = (f"{k:<10} {fmt(cl):<6} {med:>14.3f} {min(times[k]):>8.3f} "
                f"{statistics.median(cpu[k]):>11.3f} {args.batch / med:>8.2f}")
        if args.preset in TRAIN_FLOPS and args.device != "cpu":
            line += f" {args.batch / med * TRAIN_FLOPS[args.preset] / (args.peak_tflops * 1e12):>6.1%}"
        print(line)
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    print(f"ratio ours/diffusers: median {statistics.median(ratios):.3f} "
          f"(quartiles {q[0]:.3f}-{q[2]:.3f}); CPU-time ratio median {statistics.median(cpu_ratios):.3f}")
    return statistics.median(ratios)


if __name__ == "__main__":
    main()
