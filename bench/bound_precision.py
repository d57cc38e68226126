"""The bf16 floor under the bound L (eq. 5) for the Table 2 rows, and what training in float32 removes.

Under `train.mixed_precision: bf16` the U-Net's last convolution returns bf16: its output carries
8 significant bits. Whatever the network learns, L is then measured on an output rounded to bf16,
and for a parameterisation whose target must be resolved finer than that (mu-tilde, a learned
log sigma^2) the rounding alone adds to L. This measures that floor with a perfect network of each
row (its output is the row's exact target, computed in float64 from the true x_0 and x_t: eps,
or mu-tilde of eq. 7, and log beta-tilde_t for a learned Sigma) emitted through a real output
layer (an identity 1x1 `nn.Conv2d`) under the row's precision:

  bf16     torch.autocast(bf16), as Accelerate runs the recipes before this change
  fp32     no autocast: the recipes trained on L (and the mu-tilde rows) after it
  fp32+tf32  fp32 with the convolution's inputs rounded to TF32's 10-bit mantissa (emulated):
           what a GPU does with `train.tf32: auto`, the recipes' default

L is the full bound (all T = 1000 terms plus L_T, `calc_bpd`, bits/dim) of a fixed batch of real
images; the median and range are over `--batches` disjoint batches (the spread is the images',
the precision effect is the paired difference). Deterministic on CPU: valid on a loaded machine.

Usage: python bench/bound_precision.py [--shards quickstart_out/shards] [--batches 5] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from eval.nll import iter_float
from pipeline.diffusion import GaussianDiffusion, linear_beta_schedule

ROWS = {  # Table 2: row -> (mean_type, var_type, loss_type), as recipes/ablations/
    "mu_L_learned": ("mu", "learned", "vlb"), "mu_L_fixed": ("mu", "fixed_large", "vlb"),
    "mu_mse": ("mu", "fixed_large", "mu_mse"), "eps_L_learned": ("eps", "learned", "vlb"),
    "eps_L_fixed": ("eps", "fixed_large", "vlb"), "eps_simple": ("eps", "fixed_large", "simple"),
}
MODES = ("bf16", "fp32", "fp32+tf32")


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest value with TF32's 10-bit mantissa (what tensor cores read)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


class PerfectNet(torch.nn.Module):
    """The row's exact target for the fixed batch x0, through an identity 1x1 output convolution."""

    def __init__(self, d: GaussianDiffusion, x0: torch.Tensor, mode: str):
        super().__init__()
        self.d, self.x0, self.mode = d, x0.double(), mode
        C = x0.shape[1]
        out_c = 2 * C if d.var_type == "learned" else C
        self.out = torch.nn.Conv2d(out_c, out_c, 1, bias=False)
        with torch.no_grad():
            self.out.weight.copy_(torch.eye(out_c).reshape(out_c, out_c, 1, 1))

    def forward(self, x_t, t):
        d, x0, xt = self.d, self.x0, x_t.double()
        if d.mean_type == "mu":
            target = d.q_posterior(x0, xt, t)[0]  # eq. 7
        else:
            target = (xt - d._extract("sqrt_acp", t, xt) * x0) / d._extract("sqrt_1m_acp", t, xt)  # eq. 4's eps
        if d.var_type == "learned":
            target = torch.cat([target, d._extract("post_logvar", t, xt).expand_as(target)], 1)
        h = target.float()
        if self.mode == "fp32+tf32":
            h = tf32_round(h)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.mode == "bf16" else nullcontext()
        with ctx:
            return self.out(h)


def bound(row: str, x0: torch.Tensor, mode: str, T: int = 1000) -> float:
    mean, var, loss = ROWS[row]
    d = GaussianDiffusion(linear_beta_schedule(T), mean, var, loss)
    g = torch.Generator().manual_seed(0)  # the same x_t for every row and precision
    r = d.calc_bpd(PerfectNet(d, x0, mode), x0, generator=g, t_batch=1, clip_denoised=False)
    return float(r["total_bpd"].double().mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="quickstart_out/shards", help="data_prep output (real images)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    if not (Path(args.shards) / "manifest.json").is_file():
        print(f"bound_precision: {args.shards}: no data_prep output (run `make quickstart` or pass --shards)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    batches = []
    for x in iter_float(args.shards, args.split, args.batch_size):
        if len(x) == args.batch_size:
            batches.append(x)
        if len(batches) == args.batches:
            break
    # L depends on the mean parameterisation and Sigma only: rows sharing both share the figure
    groups: dict[tuple, list[str]] = {}
    for row, (mean, var, _) in ROWS.items():
        groups.setdefault((mean, var), []).append(row)
    res = {" = ".join(rows): {m: np.array([bound(rows[0], x, m) for x in batches]) for m in MODES}
           for rows in groups.values()}
    fmt = lambda a: f"{np.median(a):.4f} ({a.min():.4f} .. {a.max():.4f})"
    print(f"L of a perfect network, bits/dim, median (min .. max) over {len(batches)} batches of "
          f"{args.batch_size} {args.split} images of {args.shards}, T = 1000")
    print("| Table 2 row(s) | L, bf16 output | L, fp32 | bf16 - fp32 | fp32+tf32 - fp32 |")
    print("|---|---|---|---|---|")
    for row, r in res.items():
        print(f"| {row} | {fmt(r['bf16'])} | {fmt(r['fp32'])} | {fmt(r['bf16'] - r['fp32'])} | "
              f"{np.median(r['fp32+tf32'] - r['fp32']):.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
