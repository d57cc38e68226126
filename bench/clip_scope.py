"""What `train.clip_scope: replica` costs against `global`, on one process.

Both arms run the same R micro-steps (forward, L_simple, backward) of R replicas; `global`
then clips the accumulated gradient once (clip_grad_norm_), `replica` clips each micro-step's
gradient as the original clipped each TPU core's (pipeline/clipping.py: ReplicaClipper.take
per micro-step, finish once). The difference is the price of reproducing the original.

    python bench/clip_scope.py [--model cifar10|tiny] [--replica-batch 16] [--replicas 8] [--repeat 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project root

from pipeline.clipping import ReplicaClipper
from pipeline.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.unet import UNet, build_unet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10", choices=["cifar10", "tiny"])
    ap.add_argument("--replica-batch", type=int, default=16, help="samples per replica (the original: 16 on CIFAR-10)")
    ap.add_argument("--replicas", type=int, default=8, help="virtual replicas (the original's 8 TPU cores)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = (build_unet("cifar10") if args.model == "cifar10" else UNet(32, ch=32, ch_mult=(1, 2), num_res_blocks=1)).to(dev)
    d = GaussianDiffusion(linear_beta_schedule(1000))
    res = model.config["resolution"]
    x = torch.rand(args.replica_batch, 3, res, res, device=dev) * 2 - 1
    t = torch.randint(1000, (args.replica_batch,), device=dev)
    noise = torch.randn_like(x)
    clipper = ReplicaClipper(model.parameters(), 1.0, world=1, replicas=args.replicas)

    def micro_step():
        (d.training_loss(model, x, t, noise).mean() / args.replicas).backward()

    def global_scope():
        for _ in range(args.replicas):
            micro_step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        model.zero_grad(set_to_none=True)

    def replica_scope():
        clipper.begin()
        for _ in range(args.replicas):
            micro_step()
            clipper.take()
        clipper.finish()
        model.zero_grad(set_to_none=True)

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    global_scope(), replica_scope()  # warm-up
    tg, tr = [], []
    for _ in range(args.repeat):  # interleaved, so machine load hits both alike
        tg.append(timed(global_scope))
        tr.append(timed(replica_scope))
    g, r = min(tg), min(tr)
    print(f"{args.model}, {args.replicas} replicas x {args.replica_batch} samples on {dev}: "
          f"global {g * 1e3:.1f} ms, replica {r * 1e3:.1f} ms per step ({(r / g - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
