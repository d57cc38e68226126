"""How far bf16 (or fp16) sampling moves the samples and the FID from fp32, with the same seeds.

Runs `python -m eval fid RUN --precision P` for fp32 and for the other precision into OUT/P
(same seed, so sample i starts from the same noise and sees the same z at every step; only the
U-Net's arithmetic differs: autocast for the U-Net, float32 for eq. 11 / Algorithm 2), then
compares the two sample sets pixel by pixel. Deterministic on CPU, so it can be measured on a
loaded machine. Resumable (the eval outputs are).

Usage: python bench/sampling_precision.py RUN --out OUT [--num-samples 128] [--other bf16]
       [--reference-count 1000] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from eval.sample import load_samples

ROOT = Path(__file__).resolve().parents[1]


def fid_run(run: str, out: Path, precision: str, args) -> dict:
    launch = [sys.executable, "-m"]
    if args.processes > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(args.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m"]
    cmd = [*launch, "eval", "fid", run, "--out", str(out), "--num-samples", str(args.num_samples),
           "--precision", precision, "--seed", str(args.seed),
           "--chunk-size", str(max(1, args.num_samples // (4 * args.processes)))]  # every process gets chunks
    if args.reference_count:
        cmd += ["--reference-count", str(args.reference_count)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # processes on CPU over gloo
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return json.loads((out / "results.json").read_text())["evaluations"]["fid"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory, checkpoint or snapshot (e.g. quickstart_out/run)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--other", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--reference-count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    res = {p: fid_run(args.run, args.out / p, p, args) for p in ("fp32", args.other)}
    a = load_samples(args.out / "fp32").astype(np.int16)
    b = load_samples(args.out / args.other).astype(np.int16)
    d = np.abs(a - b)
    per_image = d.reshape(len(d), -1).mean(1)
    report = {
        "num_samples": len(a), "other": args.other,
        "fid_fp32": res["fp32"]["metrics"]["fid"], f"fid_{args.other}": res[args.other]["metrics"]["fid"],
        "fid_change": res[args.other]["metrics"]["fid"] - res["fp32"]["metrics"]["fid"],
        "pixels_equal": float((d == 0).mean()),
        "mean_abs_diff_levels": float(d.mean()),
        "p99_abs_diff_levels": float(np.percentile(d, 99)),
        "max_abs_diff_levels": int(d.max()),
        "images_identical": int((per_image == 0).sum()),
        "worst_image_mean_abs_diff": float(per_image.max()),
        "median_image_mean_abs_diff": float(np.median(per_image)),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
