"""Expected data-parallel efficiency for 8-64 GPUs, from step compute and gradient volume.

A model, not a measurement: it prints the assumptions with the table so each can be
replaced by a measured figure (bench/RESULTS.md says which ones were measured).

Per step and GPU:  compute = per_gpu_batch * FLOP/img / (MFU * peak)
                   all-reduce = 2 (n-1)/n * grad_bytes / bus_bandwidth      (ring)
DDP overlaps the all-reduce with the backward pass (~2/3 of compute), so only the part
that sticks out of it costs time:  efficiency = compute / (compute + max(0, comm - 2/3 compute)).
"""

from __future__ import annotations

import argparse

MODELS = {  # parameters, training FLOPs per 256x256 image (fwd + bwd, ~3x forward)
    "lsun256": (113.7e6, 1.49e12),
    "lsun256_large": (255.7e6, 1.49e12 * (192 / 128) ** 2),
}


def efficiency(n_gpus: int, per_gpu_batch: int, params: float, flop_per_img: float, *, peak: float,
               mfu: float, grad_bytes: int, nvlink_bw: float, net_bw: float, gpus_per_node: int = 8):
    compute = per_gpu_batch * flop_per_img / (mfu * peak)
    bw = nvlink_bw if n_gpus <= gpus_per_node else net_bw  # the slowest link sets a ring's speed
    comm = 2 * (n_gpus - 1) / n_gpus * params * grad_bytes / bw if n_gpus > 1 else 0.0
    exposed = max(0.0, comm - 2 / 3 * compute)
    return compute, comm, compute / (compute + exposed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peak", type=float, default=989e12, help="bf16 dense peak FLOP/s per GPU (H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.40, help="model FLOP utilisation of one GPU")
    ap.add_argument("--nvlink-bw", type=float, default=360e9, help="NCCL all-reduce bus bandwidth in a node, B/s")
    ap.add_argument("--net-gbit", type=float, default=400, help="network per GPU, Gb/s (one 400G NIC per GPU)")
    ap.add_argument("--net-eff", type=float, default=0.85, help="fraction of line rate NCCL reaches")
    args = ap.parse_args()
    net_bw = args.net_gbit / 8 * 1e9 * args.net_eff

    print(f"assumptions: peak {args.peak/1e12:.0f} TFLOP/s, MFU {args.mfu:.0%}, NVLink bus {args.nvlink_bw/1e9:.0f} GB/s, "
          f"network {args.net_gbit:.0f} Gb/s per GPU at {args.net_eff:.0%} = {net_bw/1e9:.1f} GB/s\n")
    print(f"{'model':<14} {'GPUs':>4} {'batch/GPU':>9} {'grads':>5} {'compute ms':>10} {'allreduce ms':>12} {'efficiency':>10}")
    for name, (params, flop) in MODELS.items():
        for n in (8, 16, 32, 64):
            options = {max(1, 64 // n): "paper's global batch 64", 8: "global batch 8 x GPUs"}
            for per_gpu, label in options.items():
                for grad_bytes, gname in ((4, "fp32"), (2, "bf16")):
                    c, m, e = efficiency(n, per_gpu, params, flop, peak=args.peak, mfu=args.mfu,
                                         grad_bytes=grad_bytes, nvlink_bw=args.nvlink_bw, net_bw=net_bw)
                    print(f"{name:<14} {n:>4} {per_gpu:>9} {gname:>5} {c*1e3:>10.1f} {m*1e3:>12.1f} {e:>10.0%}  ({label})")
        print()


if __name__ == "__main__":
    main()
