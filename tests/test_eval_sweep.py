"""eval sweep: FID of every EMA snapshot, resumed after a real kill without recomputing finished
snapshots, sweep.json / plot / the best snapshot; a snapshot scored alone by eval fid agrees."""

import json
import os
import signal
import subprocess
import time

import torch

from pipeline import build
from pipeline.snapshots import list_snapshots, write_snapshot
from support.cli import PY, ROOT, eval_env
from support.folder_shards import make_folder_shards
from support.model import tiny_recipe

TINY = "tiny-seeded=support.features:TinyFeatures"


def _run_with_snapshots(run, shards, steps=(100, 200, 300, 400)):
    """RUN/snapshots of a tiny recipe: EMA weights per step (seeded random U-Nets stand in for
    training, which tests/test_train.py covers; the sweep only reads the files)."""
    recipe = tiny_recipe(shards=str(shards))
    for i, step in enumerate(steps):
        torch.manual_seed(i)
        model = build.unet(recipe.model)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1 and p.abs().max() < 1e-6:
                    p.normal_(0, 0.02)
        write_snapshot(run, step, model.state_dict(), recipe)
    return run


def _sweep(run, out, *extra):
    return [PY, "-m", "eval", "sweep", str(run), "--out", str(out), "--num-samples", "16", "--chunk-size", "2",
            "--batch-size", "2", "--feature-extractor", TINY, "--cache-dir", str(out.parent / "cache"), *extra]


def test_sweep_resumes_after_kill_and_names_the_best(tmp_path):
    shards = make_folder_shards(tmp_path / "d", n=20, size=8, test_count=2)
    run = _run_with_snapshots(tmp_path / "run", shards)
    out = tmp_path / "sweep"
    env = eval_env()
    proc = subprocess.Popen(_sweep(run, out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    second = out / "step-00000200" / "chunks"
    deadline = time.time() + 300
    while not (second.is_dir() and list(second.glob("chunk-*.npz"))) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # killed while sampling the second snapshot
    proc.wait()
    first = out / "step-00000100" / "results.json"
    assert first.is_file() and not (out / "step-00000400" / "results.json").exists()
    kept = {p: p.stat().st_mtime_ns for p in [first, *(out / "step-00000100" / "chunks").glob("*.npz"),
                                               *second.glob("chunk-*.npz")]}
    r = subprocess.run(_sweep(run, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # nothing finished was redone
    sweep = json.loads((out / "sweep.json").read_text())
    steps = [row["step"] for row in sweep["snapshots"]]
    assert steps == [100, 200, 300, 400]
    fids = {row["step"]: row["fid"] for row in sweep["snapshots"]}
    for step, fid in fids.items():  # each number is that snapshot's own results.json
        ev = json.loads((out / f"step-{step:08d}" / "results.json").read_text())["evaluations"]["fid"]
        assert ev["metrics"]["fid"] == fid and ev["protocol"]["num_samples_scored"] == 16
    assert sweep["best"]["fid"] == min(fids.values()) and len(set(fids.values())) == 4
    assert sweep["selection"].startswith("minimum FID") and "App. B" in sweep["selection"]
    assert json.loads(r.stdout.strip().splitlines()[-1])["best_snapshot"] == sweep["best"]["snapshot"]
    assert (out / "sweep.png").stat().st_size > 1000
    # the best snapshot scored on its own by `eval fid` gives the same number
    best = sweep["best"]["snapshot"]
    r = subprocess.run([PY, "-m", "eval", "fid", best, "--out", str(tmp_path / "alone"), "--num-samples", "16",
                        "--chunk-size", "2", "--batch-size", "2", "--feature-extractor", TINY,
                        "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    alone = json.loads((tmp_path / "alone" / "results.json").read_text())["evaluations"]["fid"]["metrics"]["fid"]
    assert alone == sweep["best"]["fid"]


def test_sweep_without_snapshots_says_how_to_get_them(tmp_path):
    (tmp_path / "run").mkdir()
    r = subprocess.run(_sweep(tmp_path / "run", tmp_path / "o"), cwd=ROOT, env=eval_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "snapshot_every" in r.stderr and "Traceback" not in r.stderr
    assert list_snapshots(tmp_path / "run") == []


def test_a_snapshot_pushes_to_the_hub_and_loads_back(hub, tmp_path, monkeypatch):
    from pathlib import Path

    from huggingface_hub import snapshot_download
    from safetensors.torch import load_file

    from eval.hub_push import push_to_hub
    from support.hub import fresh_cache

    run = _run_with_snapshots(tmp_path / "run", "", steps=(100, 200))
    snap = list_snapshots(run)[0][1]
    out = push_to_hub(snap, "alice/best-snapshot")
    assert "ema.safetensors" in out["files"] and "config.yaml" in out["files"]
    fresh_cache(monkeypatch, tmp_path, "clean-cache")
    card = (Path(snapshot_download("alice/best-snapshot")) / "README.md").read_text()
    assert "after 100 steps." in card  # the step comes from the snapshot's file name
    got = load_file(str(Path(snapshot_download("alice/best-snapshot")) / "ema.safetensors"))
    want = load_file(str(snap))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
