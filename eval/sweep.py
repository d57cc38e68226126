"""`eval sweep RUN`: the FID of every EMA snapshot of a run, and the best one.

The selection (App. B): the paper reports every metric at the checkpoint with the minimum FID
over the course of training. Training keeps EMA-only snapshots in RUN/snapshots/
(`train.snapshot_every`, set in every paper recipe; pipeline/snapshots.py); this command scores
each of them exactly as `eval fid` does (same samples, reference and Inception network), and the
best is the argmin of those FIDs, the earliest step on a tie. The FID that picks the snapshot is
the FID reported for it, as in the paper, so it is the minimum of noisy estimates: slightly
optimistic, by about the spread of FID between sample sets of this size. `--every k` thins the
candidates (the last snapshot is always one). One output folder per snapshot:

    OUT/step-00010000/         samples (resumable chunks) and results.json of that snapshot
    OUT/sweep.json             step, FID and folder of every scored snapshot, the best, and the rule
    OUT/sweep.png              FID against training step

A snapshot whose results.json already holds an FID of the asked number of samples is not
recomputed, and a half-sampled one resumes from its chunks: a killed sweep is simply rerun.
Run it on several processes with `accelerate launch -m eval sweep ...`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.common import EvalError
from eval.fid import _add_extractor_args, _add_reference_args, _broadcast, _is_main, positive
from eval.fid import main as fid_main
from eval.sample import add_sampling_options
from pipeline.atomic import atomic_path, write_json
from pipeline.snapshots import list_snapshots

SELECTION = ("minimum FID over the scored EMA snapshots, the earliest on a tie (App. B: metrics are "
             "reported at the checkpoint with the minimum FID over the course of training)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="FID of every EMA snapshot of a run (resumable); names the best",
        description="Scores each RUN/snapshots/step-N.safetensors with `eval fid` (same options), "
        "writes OUT/sweep.json and OUT/sweep.png (FID against training step) and names the "
        "snapshot with the minimum FID, the one the paper reports its metrics at (App. B). Rerunning "
        "resumes: finished snapshots are not recomputed.")
    p.add_argument("run", help="run directory (its snapshots/ folder, written when train.snapshot_every > 0)")
    p.add_argument("--out", default=None, help="output directory (default: RUN/sweep)")
    p.add_argument("--device", default=None, help="torch device; default: the process's accelerator device")
    add_sampling_options(p)
    _add_extractor_args(p)
    p.add_argument("--reference", default=None, help="shard directory or statistics .npz (default: "
                   "eval.fid_reference, else data.shards of the run's recipe)")
    _add_reference_args(p)
    p.add_argument("--every", type=positive, default=1, help="score every k-th snapshot only (the last always)")
    p.set_defaults(func=main)


def _done(folder: Path, num_samples: int | None) -> float | None:
    """The FID already in folder/results.json for `num_samples` samples, else None."""
    try:
        ev = json.loads((folder / "results.json").read_text())["evaluations"]["fid"]
    except (OSError, ValueError, KeyError):
        return None
    if num_samples is not None and ev["protocol"].get("num_samples_scored") != num_samples:
        return None
    return float(ev["metrics"]["fid"])


def main(args) -> int:
    run = Path(args.run)
    snaps = list_snapshots(run)
    if not snaps:
        raise EvalError(f"{run}: no snapshots in {run / 'snapshots'} (train with train.snapshot_every > 0)")
    snaps = [s for i, s in enumerate(snaps) if i % args.every == 0 or i == len(snaps) - 1]
    out = Path(args.out or run / "sweep")
    rows = []
    for step, path in snaps:
        folder = out / f"step-{step:08d}"
        fid = _broadcast(_done(folder, args.num_samples))  # rank 0 decides for all
        if fid is None:
            ns = argparse.Namespace(**vars(args))
            ns.src, ns.out, ns.metric, ns.samples = str(path), str(folder), "fid", None
            ns.revision, ns.model_factory = None, None
            fid_main(ns)
            fid = _broadcast(_done(folder, None))
        rows.append({"step": step, "snapshot": str(path), "fid": fid, "out": str(folder)})
        _write(out, run, rows)
    best = min(rows, key=lambda r: r["fid"])
    if _is_main():
        print(json.dumps({"best_snapshot": best["snapshot"], "step": best["step"], "fid": best["fid"],
                          "sweep": str(out / "sweep.json")}))
    return 0


def _write(out: Path, run: Path, rows: list[dict]) -> None:
    if not _is_main():
        return
    best = min(rows, key=lambda r: r["fid"])
    write_json(out / "sweep.json", {"run": str(run), "snapshots": rows, "best": best, "selection": SELECTION})
    plot(rows, out / "sweep.png", best)


def plot(rows: list[dict], path: Path, best: dict) -> None:
    """FID against training step, the best snapshot marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([r["step"] for r in rows], [r["fid"] for r in rows], "o-", color="tab:blue")
    ax.plot([best["step"]], [best["fid"]], "*", color="tab:red", markersize=12, label=f"best: step {best['step']}")
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (EMA snapshot)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
