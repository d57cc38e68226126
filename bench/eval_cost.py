"""What the paper's FID protocol costs on 8 GPUs: 50,000 ancestral samples (T = 1000) of a 256x256
model plus the Inception features of those samples and of 50,000 reference images.

FLOPs are measured here (torch.utils.flop_counter on the real modules: our U-Net preset at
256x256 and torch-fidelity's InceptionV3 with its resize to 299x299, batch 1; a multiply-add
counts 2); the GPU throughput is an assumption (flags), so the table says what the hardware
must do and how long that takes at a stated utilisation. Where a measured img/s is known
(--sample-ips / --inception-ips, per GPU) it replaces the FLOP-based time.

Usage: python bench/eval_cost.py [--preset lsun256] [--gpus 8] [--peak 989e12] [--mfu 0.4]
       [--fp32-peak 67e12] [--sample-ips X] [--inception-ips Y]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.presets import PRESETS
from pipeline.unet import UNet


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def unet_flops(preset: str) -> tuple[float, float]:
    """(forward FLOPs of one image, parameters) of the preset's U-Net."""
    kw = PRESETS[preset]
    model = UNet(**kw).eval()
    x = torch.zeros(1, kw.get("in_channels", 3), kw["resolution"], kw["resolution"])
    with torch.inference_mode():
        f = flops(lambda: model(x, torch.zeros(1, dtype=torch.long)))
    return f, sum(p.numel() for p in model.parameters())


def inception_flops(side: int) -> float:
    """Forward FLOPs of torch-fidelity's InceptionV3 (random weights: FLOPs do not depend on them)
    on one side x side uint8 image, its resize to 299 included."""
    import torch_fidelity.feature_extractor_inceptionv3 as mod

    saved = mod.load_state_dict_from_url
    mod.load_state_dict_from_url = lambda *a, **k: {}

    class Skeleton(mod.FeatureExtractorInceptionV3):
        def load_state_dict(self, *a, **k):
            return None

    try:
        net = Skeleton("inception-v3-compat", ["2048"]).eval()
    finally:
        mod.load_state_dict_from_url = saved
    x = torch.zeros(1, 3, side, side, dtype=torch.uint8)
    with torch.inference_mode():
        return flops(lambda: net(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lsun256", choices=sorted(PRESETS))
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--reference", type=int, default=50_000)
    ap.add_argument("--timesteps", type=int, default=1000)
    ap.add_argument("--peak", type=float, default=989e12, help="bf16 dense peak FLOP/s per GPU (H100 SXM)")
    ap.add_argument("--fp32-peak", type=float, default=67e12, help="fp32 (non-tensor-core) peak FLOP/s per GPU")
    ap.add_argument("--tf32-peak", type=float, default=495e12, help="TF32 tensor-core peak FLOP/s per GPU")
    ap.add_argument("--mfu", type=float, default=0.40, help="fraction of peak reached by the convolutions")
    ap.add_argument("--sample-ips", type=float, default=None, help="measured sampling img/s per GPU, if known")
    ap.add_argument("--inception-ips", type=float, default=None, help="measured Inception img/s per GPU, if known")
    args = ap.parse_args()

    f_unet, params = unet_flops(args.preset)
    res = PRESETS[args.preset]["resolution"]
    f_inc = inception_flops(res)
    sample_flops = args.samples * args.timesteps * f_unet
    inc_flops = (args.samples + args.reference) * f_inc
    print(f"measured: U-Net {args.preset} ({params / 1e6:.1f}M params) {f_unet / 1e9:.1f} GFLOP per forward at "
          f"{res}x{res}; Inception {f_inc / 1e9:.2f} GFLOP per image ({res}x{res} -> 299x299)")
    print(f"work: sampling {args.samples:,} x T={args.timesteps} forwards = {sample_flops / 1e18:.2f} EFLOP; "
          f"Inception on {args.samples:,} samples + {args.reference:,} reference images = {inc_flops / 1e15:.2f} PFLOP "
          f"({inc_flops / sample_flops:.3%} of sampling)")
    print(f"assumptions: {args.gpus} GPUs, {args.mfu:.0%} of peak; peaks per GPU: bf16 {args.peak / 1e12:.0f}, "
          f"TF32 {args.tf32_peak / 1e12:.0f}, fp32 {args.fp32_peak / 1e12:.0f} TFLOP/s; data-parallel, no "
          "communication but the final gather of 2048x2048 moments (negligible)\n")
    print(f"{'stage':<44} {'precision':>9} {'GPU-hours':>10} {'hours on ' + str(args.gpus):>12}")
    for prec, peak in (("bf16", args.peak), ("tf32", args.tf32_peak), ("fp32", args.fp32_peak)):
        gpu_h = sample_flops / (args.mfu * peak) / 3600
        print(f"{'sampling (Algorithm 2), from FLOPs':<44} {prec:>9} {gpu_h:10.1f} {gpu_h / args.gpus:12.2f}")
    if args.sample_ips:
        gpu_h = args.samples / args.sample_ips / 3600
        print(f"{'sampling, from measured img/s per GPU':<44} {'':>9} {gpu_h:10.1f} {gpu_h / args.gpus:12.2f}")
    gpu_h = inc_flops / (args.mfu * args.tf32_peak) / 3600
    print(f"{'Inception features, from FLOPs (fp32 model)':<44} {'tf32':>9} {gpu_h:10.3f} {gpu_h / args.gpus:12.3f}")
    gpu_h = inc_flops / (args.mfu * args.fp32_peak) / 3600
    print(f"{'Inception features, from FLOPs (fp32 model)':<44} {'fp32':>9} {gpu_h:10.3f} {gpu_h / args.gpus:12.3f}")
    if args.inception_ips:
        gpu_h = (args.samples + args.reference) / args.inception_ips / 3600
        print(f"{'Inception, from measured img/s per GPU':<44} {'':>9} {gpu_h:10.3f} {gpu_h / args.gpus:12.3f}")


if __name__ == "__main__":
    main()
