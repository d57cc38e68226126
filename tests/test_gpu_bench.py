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
PARTS = ["env", "flops", "trainer", "compile", "peer", "smoke", "sampling", "inception", "ema", "loader", "tests",
         "sampling_compiled", "cifar10"]


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


def test_unknown_part_and_budget_cut(tmp_path):
    """--parts names are checked before any work; a part the budget cuts is recorded as skipped."""
    r = _run("--cpu-smoke", "--parts", "env,nonsense", str(tmp_path / "x"), timeout=120)
    assert r.returncode == 2 and "unknown part(s) ['nonsense']" in r.stderr
    out = tmp_path / "out"
    r = _run("--cpu-smoke", "--budget-s", "0", "--parts", "sampling_compiled", str(out), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert list(res["parts"]) == ["env", "flops", "sampling_compiled"]  # MFU's inputs always come along
    assert res["parts"]["sampling_compiled"]["skipped"].startswith("time budget")


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path):
    out = tmp_path / "out"
    r = _run("--cpu-smoke", str(out), timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "cpu-smoke" and list(res["parts"]) == PARTS
    assert not [n for n, p in res["parts"].items() if "error" in p], res
    p = res["parts"]
    assert p["flops"]["train_flops_per_image"]["tiny"] > 1e6
    variants = [r["variant"] for r in p["trainer"]["rows"]]
    assert variants[0] == "replica (recipe), NCHW" and len(variants) == 6
    assert all(r["img_per_s"] > 0 and 0 < r["mfu"] for r in p["trainer"]["rows"])
    assert p["trainer"]["rows"][0]["micro_steps"] == 8 and p["trainer"]["rows"][1]["micro_steps"] == 1
    assert [r["compile"] for r in p["compile"]["rows"]] == [True, True]
    assert [r["variant"].split(",")[0] for r in p["peer"]["rows"]][:2] == ["diffusers example loop"] * 2
    assert p["smoke"]["replica"]["resumed"] and p["smoke"]["global"]["newest_checkpoint"].endswith("20")
    assert p["sampling"]["img_per_s_T1000"] > 0 and p["sampling_compiled"]["img_per_s_T1000"] > 0
    assert p["inception"]["rows"][0]["feature_dim"] == 2048 and p["ema"]["foreach_lerp_ms"] > 0
    assert p["tests"]["summary"] and len(p["cifar10"]["rows"]) == 2
    md = (out / "results.md").read_text()
    assert all(f"## {name}" in md for name in PARTS) and "ours (recipe, best replica row) / diffusers" in md
