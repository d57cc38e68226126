"""The quickstart's `eval fid` step on 2 CPU processes: wall time and each process's CPU time.

The step as scripts/quickstart.py runs it (128 samples, 1000 reference images, real offline
Inception, `accelerate launch` with 2 CPU processes, OMP_NUM_THREADS=1), on the quickstart's
data and a quickstart-sized model trained for a few steps (how long it trained does not change
the work of sampling and scoring). Every repeat starts from an empty --out and an empty
reference cache (`--cache-dir`: the reference statistics are computed again, as on a first
quickstart run), or with `--ref-cache DIR` a copy of one that holds them (as on a later run).

Each process's CPU time (user + system, its own threads included) and its wall time are
written at exit by a `sitecustomize` hook that only the measured processes load.
`--code DIR` times another checkout on the same data; `--before DIR` times a second checkout (e.g.
the commit before a change) in pairs with it, alternating, and prints each one's medians and the
ratio after/before per pair.

Usage: PYTHONPATH=. python bench/eval_fid_processes.py [--repeats 3] [--before DIR] [--code DIR] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

HOOK = '''import atexit, json, os, time
_rank, _t0 = os.environ.get("RANK"), time.time()
if _rank is not None and os.environ.get("DDPM_BENCH_TIMES"):
    def _dump():
        t = os.times()
        with open(os.path.join(os.environ["DDPM_BENCH_TIMES"], f"rank{_rank}.json"), "w") as f:
            json.dump({"rank": int(_rank), "cpu_s": t.user + t.system, "wall_s": time.time() - _t0}, f)
    atexit.register(_dump)
'''


def setup(work: Path, steps: int, code: Path) -> Path:
    """The quickstart's LMDB, shards and a run briefly trained by `code` (the oldest checkout: newer
    code reads older checkpoints, not the reverse); reused when present."""
    sys.path.insert(0, str(ROOT))
    from scripts.quickstart_data import make_quickstart_lmdb

    run_dir, shards = work / "run", work / "shards"
    if (run_dir / "checkpoints" / "latest").exists():
        return run_dir
    make_quickstart_lmdb(work / "lmdb")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if not (shards / "manifest.json").is_file():
        subprocess.run([PY, "-m", "data_prep", "lsun", "--lmdb", work / "lmdb", "--out", shards, "--resolution",
                        "32", "--test-count", "64", "--shard-size", "500", "--workers", "2"], check=True, cwd=ROOT, env=env)
    # 32x32 whatever the checkout's quickstart recipe says (8x8 since issue 28): the figures in
    # RESULTS were taken at 32x32.
    subprocess.run([PY, "pipeline/train.py", "recipes/quickstart.yaml", f"data.shards={shards}", "model.resolution=32",
                    f"run.output_dir={run_dir}", f"train.max_steps={steps}"], check=True, cwd=code,
                   env={**env, "PYTHONPATH": str(code)})
    return run_dir


def time_once(code: Path, run_dir: Path, samples: int, ref_cache: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="fidbench-") as tmp:
        tmp = Path(tmp)
        if ref_cache:  # the reference statistics of an earlier run: only sampling and its features are timed
            shutil.copytree(ref_cache, tmp / "ref")
        (tmp / "hook").mkdir()
        (tmp / "hook" / "sitecustomize.py").write_text(HOOK)
        (tmp / "times").mkdir()
        env = {**os.environ, "PYTHONPATH": f"{tmp / 'hook'}{os.pathsep}{code}", "OMP_NUM_THREADS": "1",
               "ACCELERATE_USE_CPU": "1", "DDPM_BENCH_TIMES": str(tmp / "times")}
        cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "eval", "fid", str(run_dir),
               "--out", str(tmp / "eval"), "--num-samples", str(samples), "--reference-count", "1000",
               "--cache-dir", str(tmp / "ref")]  # an empty reference cache, as on a first quickstart run
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=code, env=env, stdout=subprocess.DEVNULL)
        wall = time.time() - t0
        ranks = sorted((json.loads(p.read_text()) for p in (tmp / "times").glob("rank*.json")), key=lambda r: r["rank"])
        fid = json.loads((tmp / "eval" / "results.json").read_text())["evaluations"]["fid"]["metrics"]["fid"]
    return {"wall_s": wall, "cpu_s": [r["cpu_s"] for r in ranks], "fid": fid}


def table(name: str, runs: list[dict]) -> None:
    walls = [r["wall_s"] for r in runs]
    print(f"\n{name}: {len(runs)} runs")
    print("| | median | range |\n|---|---|---|")
    print(f"| wall s | {statistics.median(walls):.1f} | {min(walls):.1f}-{max(walls):.1f} |")
    for k in range(len(runs[0]["cpu_s"])):
        c = [r["cpu_s"][k] for r in runs]
        print(f"| rank {k} CPU s | {statistics.median(c):.1f} | {min(c):.1f}-{max(c):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose `eval fid` is timed")
    ap.add_argument("--before", type=Path, default=None, help="a second checkout, timed in pairs with --code")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ddpm-fid-bench",
                    help="data and the trained run (kept for reuse)")
    ap.add_argument("--steps", type=int, default=20, help="training steps of the model (reused when present)")
    ap.add_argument("--samples", type=int, default=128, help="the quickstart's --num-samples")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-cache", type=Path, default=None,
                    help="a --cache-dir holding the reference statistics (as on a later quickstart run)")
    args = ap.parse_args()
    run_dir = setup(args.work, args.steps, (args.before or args.code).resolve())
    with open("/proc/loadavg") as f:
        print(f"load average before: {f.read().split()[:3]}", flush=True)
    codes = {"after": args.code.resolve()}
    if args.before:
        codes = {"before": args.before.resolve(), **codes}
    runs = {k: [] for k in codes}
    for i in range(args.repeats):
        for name, code in codes.items():
            r = time_once(code, run_dir, args.samples, args.ref_cache)
            print(json.dumps({"repeat": i, "code": name, **r}), flush=True)
            runs[name].append(r)
    with open("/proc/loadavg") as f:
        print(f"load average after: {f.read().split()[:3]}")
    for name, code in codes.items():
        table(f"{name} ({code}), {args.samples} samples, 2 processes", runs[name])
    if args.before:
        ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(runs["after"], runs["before"])]
        print(f"\nwall after/before per pair: median {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
