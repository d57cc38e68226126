"""Shared by the training tests: a tiny recipe on real shards, launching, reading checkpoints."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch
import yaml
from safetensors.torch import load_file

from support.datasets import make_shards
from support.model import TINY_UNET

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
ACCELERATE = str(Path(PY).with_name("accelerate"))
TRAIN_SCRIPT = str(ROOT / "pipeline" / "train.py")
# pipeline/train.py with test hooks (SIGKILL inside a checkpoint save): see that file.
HOOKS_SCRIPT = str(Path(__file__).with_name("train_with_hooks.py"))

# Tiny and fast on 2 loaded CPU cores: 16x16 images, ch 32, one res block per level.
TINY_RECIPE = {
    "model": {**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY_UNET.items()}, "dropout": 0.1},
    "diffusion": {"timesteps": 100},
    "data": {"shards": "", "num_workers": 0, "random_flip": True},
    "train": {"global_batch_size": 4, "max_steps": 8, "lr": 1.0e-3, "warmup_steps": 3,
              "ema_decay": 0.9, "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 2,
              "sample_every": 0, "sample_count": 4, "seed": 7},
    "run": {"name": "t", "output_dir": "", "tracker": "none"},
}


def make_tiny_shards(out: Path, n_train: int = 24) -> Path:
    if not (out / "manifest.json").is_file():
        make_shards(out, n_train=n_train, n_test=4, resolution=16, shard_size=7)
    return out


def write_recipe(path: Path, shards: Path, run_dir: Path, **sections) -> Path:
    r = {k: dict(v) for k, v in TINY_RECIPE.items()}
    r["data"]["shards"] = str(shards)
    r["run"]["output_dir"] = str(run_dir)
    for section, values in sections.items():
        r[section].update(values)
    path.write_text(yaml.safe_dump(r))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
    e.pop("ACCELERATE_USE_CPU", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def train_cmd(recipe: Path, *overrides: str, procs: int = 1, deepspeed: bool = False,
              script: Sequence[str] = (TRAIN_SCRIPT,)) -> tuple[list, dict]:
    """The command line (and environment) of a training launch on CPU. `script`: the program and
    its own arguments, e.g. (HOOKS_SCRIPT, "--kill-in-save", "6")."""
    if procs == 1 and not deepspeed:
        return [PY, *script, str(recipe), *overrides], env()
    if deepspeed:
        cfg, e = ROOT / "recipes/accelerate/deepspeed_zero2.yaml", env()  # no ACCELERATE_USE_CPU
    else:
        cfg, e = ROOT / "recipes/accelerate/cpu_2proc.yaml", env(ACCELERATE_USE_CPU=1)
    return [ACCELERATE, "launch", "--config_file", str(cfg), "--num_processes", str(procs),
            "--main_process_port", str(free_port()), *script, str(recipe), *overrides], e


def run_train(recipe: Path, *overrides: str, procs: int = 1, deepspeed: bool = False,
              timeout: float = 300) -> subprocess.CompletedProcess:
    cmd, e = train_cmd(recipe, *overrides, procs=procs, deepspeed=deepspeed)
    return subprocess.run(cmd, env=e, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def weights(ckpt: Path, name: str = "model.safetensors") -> dict:
    return load_file(str(ckpt / name))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs: max |diff| {(a[k] - b[k]).abs().max().item()}"


def assert_same_trajectory(a: dict, b: dict, start: dict, frac: float = 0.05) -> None:
    """a and b continue the same training from `start` up to float summation order.

    Adam divides by sqrt(v): reduction-order noise in near-zero gradients can move a weight by
    up to ~lr, so a fixed tolerance is either loose or flaky. Measure against how far the
    weights moved instead: another trajectory (other data, noise or step) differs by ~moved."""
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((b[k] - start[k]).abs().max().item() for k in a)
    assert diff < frac * moved, f"max |a - b| = {diff:.3g} vs max move {moved:.3g}"
    close = sum(torch.isclose(a[k], b[k], rtol=1e-4, atol=1e-6).sum().item() for k in a)
    assert close / sum(v.numel() for v in a.values()) > 0.99
