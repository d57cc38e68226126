"""bench/gpu.sh, the prepared GPU benchmark: its help, its refusal without CUDA, and its CPU smoke
run (every part on tiny sizes), so it is known to work before a GPU is spent on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "bench" / "gpu.sh")
PARTS = ["env", "tests", "flops", "train", "sampling", "inception", "ema", "loader", "compile"]


def _run(*args, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_help_explains_the_modes():
    r = _run("--help", timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("--cpu-smoke", "results.json", "diffusers", "extrapolated to", "MFU"):
        assert word in r.stdout, word


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_real_mode_without_cuda_exits_2_with_one_line(tmp_path):
    r = _run(str(tmp_path / "out"), timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "--cpu-smoke" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cpu_smoke_runs_every_part(tmp_path):
    out = tmp_path / "out"
    r = _run("--cpu-smoke", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "cpu-smoke" and list(res["parts"]) == PARTS
    assert not [n for n, p in res["parts"].items() if "error" in p], res
    p = res["parts"]
    assert p["tests"]["exit_code"] == 0 and "skipped" in p["tests"]["summary"]  # CUDA tests skip cleanly
    assert p["flops"]["train_flops_per_image"]["tiny"] > 1e6
    models = {r["model"] for r in p["train"]["rows"]}
    assert models == {"ours", "diffusers"} and all(r["img_per_s"] > 0 and 0 < r["mfu"] for r in p["train"]["rows"])
    assert p["compile"]["rows"][0]["compile_s"] > 0 and p["sampling"]["img_per_s_T1000"] > 0
    assert p["compile"]["sampling"]["img_per_s_T1000"] > 0 and "torch.compile" in p["compile"]["sampling"]["note"]
    assert p["inception"]["rows"][0]["feature_dim"] == 2048 and p["ema"]["foreach_lerp_ms"] > 0
    assert p["loader"]["rng_before_after"][0]["after_ms"] > 0
    md = (out / "results.md").read_text()
    assert all(f"## {name}" in md for name in PARTS) and "ours/diffusers img/s" in md
