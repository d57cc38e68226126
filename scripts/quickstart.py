"""The whole chain on 2 CPU cores, on real handwritten digits that need no download:

  1. scikit-learn's 1,797 digits as an LSUN-style LMDB                   (scripts/quickstart_data.py)
  2. python -m data_prep lsun  -> 8x8 WebDataset shards + manifest, 197 digits held out
  3. accelerate launch (2 CPU processes) pipeline/train.py recipes/quickstart.yaml
  4. python -m eval fid / nll / figures  (real Inception features, offline weights), and
     python -m eval sweep: FID of the EMA snapshots against training step (it falls: the model learns)
  5. do the samples read as digits? A digit classifier scores them, beside the training digits
     and pure noise, and scores each snapshot's samples   (scripts/digit_score.py)
  6. python -m eval push  -> a Hub server on localhost; download it again and sample from it

Each stage is the real command a user would type (printed before it runs); re-running resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from eval.sample import load_samples, save_grid
from pipeline import atomic
from scripts.digit_score import DigitClassifier, print_table, score_table, split_images
from scripts.hub_server import HubServer
from scripts.quickstart_data import DIGITS, make_quickstart_lmdb

ROOT = Path(__file__).resolve().parents[1]

PY = sys.executable
ACCELERATE_2CPU = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def stage(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def run(cmd: list[str], env: dict | None = None) -> None:
    print("$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, env={**os.environ, **(env or {})})


def quickstart(out: Path, steps: int, images: int, samples: int, nll_images: int) -> dict:
    """Run every stage into `out`; return the paths and numbers a user looks at."""
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    lmdb_dir, shards, run_dir, ev = out / "lsun_lmdb", out / "shards", out / "run", out / "eval"
    cpu = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}

    stage(f"1/6 data: {images} of scikit-learn's handwritten digits as an LSUN-style LMDB")
    n = make_quickstart_lmdb(lmdb_dir, count=images)
    print(f"{lmdb_dir}: {n} WebP images")

    stage("2/6 data_prep: centre crop + antialiased resize to 8x8, WebDataset shards")
    run([PY, "-m", "data_prep", "lsun", "--lmdb", lmdb_dir, "--out", shards, "--resolution", "8",
         "--test-count", str(nll_images), "--shard-size", "500", "--workers", "2"])

    stage(f"3/6 train: 2 processes on CPU, {steps} steps (resumes if interrupted)")
    overrides = [f"data.shards={shards}", f"run.output_dir={run_dir}", f"train.max_steps={steps}",
                 f"train.snapshot_every={max(1, steps // 4)}", f"train.sample_every={max(1, steps // 3)}"]
    run(ACCELERATE_2CPU + ["pipeline/train.py", "recipes/quickstart.yaml", *overrides], env=cpu)

    stage("4/6 eval: samples + FID (offline Inception), test NLL, Figs. 5/6/8")
    run(ACCELERATE_2CPU + ["-m", "eval", "fid", run_dir, "--out", ev, "--num-samples", str(samples),
                            "--reference-count", "1000"], env=cpu)
    run(ACCELERATE_2CPU + ["-m", "eval", "nll", run_dir, "--out", ev], env=cpu)
    run([PY, "-m", "eval", "figures", run_dir, "--out", ev / "figures", "--num-images", "8"], env=cpu)
    run(ACCELERATE_2CPU + ["-m", "eval", "sweep", run_dir, "--out", ev / "sweep", "--num-samples", str(samples), "--chunk-size", "32",
                            "--reference-count", "1000"], env=cpu)
    sweep = json.loads((ev / "sweep" / "sweep.json").read_text())
    print("FID by training step (EMA snapshots): " + ", ".join(f"{r['step']}: {r['fid']:.1f}" for r in sweep["snapshots"])
          + f"; best {sweep['best']['snapshot']}; plot {ev / 'sweep' / 'sweep.png'}")

    stage("5/6 digits: do the samples read as digits? (a classifier fitted on the 1,797 digits)")
    reader = DigitClassifier()
    table = score_table(reader, load_samples(ev), str(shards))
    print_table(table)
    by_step = {r["step"]: reader.score(load_samples(r["out"])).confident for r in sweep["snapshots"]}
    print("read as digits, by training step (EMA snapshots): "
          + ", ".join(f"{step}: {share:.0%}" for step, share in by_step.items()))
    figure = write_figure(out / "digits.png", load_samples(ev), split_images(str(shards), "train"))
    print(f"samples (left) beside training digits (right): {figure}")

    stage("6/6 Hub: push to a Hub server on localhost, download into a clean cache, sample from it")
    with HubServer(tokens={"hf_quickstart": "quickstart"}) as srv:
        hub_env = {"HF_ENDPOINT": srv.endpoint, "HF_TOKEN": "hf_quickstart", "HF_HUB_DISABLE_XET": "1",
                   "HF_HOME": str(out / "hf_home")}
        repo = "quickstart/ddpm-tiny"
        run([PY, "-m", "eval", "push", run_dir, "--repo-id", repo, "--results", ev / "results.json"], env=hub_env)
        run([PY, "-m", "eval", "sample", repo, "--out", out / "from_hub", "--num-samples", "16"],
            env={**hub_env, **cpu})
        same = _same_weights(run_dir, repo, hub_env)
    print(f"Hub round trip: downloaded EMA weights {'equal' if same else 'DIFFER FROM'} the local ones")

    results = json.loads((ev / "results.json").read_text())["evaluations"]
    summary = {
        "sample_grid": str(_newest(run_dir / "samples")),
        "hub_samples": str(out / "from_hub"),
        "results": str(ev / "results.json"),
        "figures": str(ev / "figures"),
        "fid": results["fid"]["metrics"]["fid"],
        "nll_bpd": results["nll"]["metrics"]["bpd"],
        "fid_by_step": {r["step"]: r["fid"] for r in sweep["snapshots"]},
        "digits": {name: asdict(s) for name, s in table.items()},
        "digits_by_step": by_step,
        "figure": str(figure),
        "best_snapshot": sweep["best"]["snapshot"],
        "hub_round_trip_equal": same,
        "minutes": round((time.time() - t0) / 60, 1),
    }
    atomic.write_json(out / "summary.json", summary)
    return summary


def _same_weights(run_dir: Path, repo: str, hub_env: dict) -> bool:
    """Load both copies in a child process (the Hub settings are read at import time)."""
    code = (
        "import sys, torch; from pipeline.hub import load_pretrained\n"
        "a = load_pretrained(sys.argv[1]).model.state_dict(); b = load_pretrained(sys.argv[2]).model.state_dict()\n"
        "sys.exit(0 if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) else 1)\n"
    )
    r = subprocess.run([PY, "-c", code, str(run_dir), repo], cwd=ROOT, env={**os.environ, **hub_env})
    return r.returncode == 0


def write_figure(path: Path, samples: np.ndarray, training: np.ndarray, rows: int = 8, zoom: int = 4) -> Path:
    """Per row, 8 samples, a grey tile, 8 training digits; every image `zoom`x (nearest)."""
    rows = max(1, min(rows, len(samples) // 8, len(training) // 8))
    k = rows * 8
    grey = np.full((rows, 1, *samples.shape[1:]), 128, np.uint8)
    tiles = np.concatenate([samples[:k].reshape(rows, 8, *samples.shape[1:]), grey,
                            training[:k].reshape(rows, 8, *training.shape[1:])], axis=1)
    tiles = tiles.reshape(-1, *samples.shape[1:]).repeat(zoom, axis=1).repeat(zoom, axis=2)
    save_grid(tiles, path, ncol=17)
    return path


def _newest(folder: Path) -> Path | None:
    files = sorted(folder.glob("*.png"))
    return files[-1] if files else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "quickstart_out", help="everything goes here")
    ap.add_argument("--steps", type=int, default=1500, help="training steps (global batch 64)")
    ap.add_argument("--images", type=int, default=DIGITS, help=f"digits in the LSUN-style LMDB (at most {DIGITS})")
    ap.add_argument("--samples", type=int, default=256, help="samples for FID and the digit scores")
    ap.add_argument("--nll-images", type=int, default=197, help="held-out test digits (NLL)")
    ap.add_argument("--figure", type=Path, default=None,
                    help="also copy the samples-beside-training-digits figure here (the README's: "
                    "docs/quickstart_digits.png, `make quickstart-figure`)")
    args = ap.parse_args()
    if not 0 < args.images <= DIGITS:
        ap.error(f"--images must be 1..{DIGITS}, got {args.images}")
    try:
        s = quickstart(args.out, args.steps, args.images, args.samples, args.nll_images)
    except subprocess.CalledProcessError as e:
        sys.exit(f"quickstart: a stage failed (exit {e.returncode}): {' '.join(map(str, e.cmd))}")
    if args.figure:
        atomic.write_bytes(args.figure, Path(s["figure"]).read_bytes())
    d = s["digits"]
    print(f"\n\033[1mDone in {s['minutes']} min.\033[0m")
    print(f"  read as digits  : {d['samples']['confident']:.0%} of {d['samples']['images']} samples "
          f"(training digits {d['training images']['confident']:.0%}, noise {d['noise']['confident']:.0%}); "
          f"class entropy {d['samples']['entropy']:.2f} of 1")
    print(f"  samples, digits : {s['figure']}")
    print(f"  EMA sample grid : {s['sample_grid']}")
    print(f"  samples from Hub: {s['hub_samples']}")
    print(f"  metrics         : {s['results']}  (FID {s['fid']:.1f} on {args.samples} samples, "
          f"test NLL {s['nll_bpd']:.3f} bits/dim)")
    print(f"  figures         : {s['figures']}")


if __name__ == "__main__":
    main()
