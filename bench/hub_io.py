"""Hub I/O on the paper's CIFAR-10 U-Net (35.7M params): loading, pushing, pulling.

Peers in the same run, so the ratios hold on any machine:
  load     load_pretrained from safetensors vs the same weights as a torch .bin (weights_only)
  push     push_to_hub (one commit, local Hub server) vs copying the files to another folder
  pull     load_pretrained(repo id) into an empty cache vs from the local checkpoint

    python bench/hub_io.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline import build
from pipeline.config import Recipe, save_recipe
from pipeline.hub import load_pretrained
from pipeline.weights import load_state_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: scripts.hub_server is not installed

from scripts.hub_server import HubServer


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hub-bench-"))
    srv = HubServer().start()
    os.environ.update(HF_TOKEN="hf_test_token", HF_HUB_DISABLE_XET="1", HF_ENDPOINT=srv.endpoint,
                      HF_HOME=str(tmp / "hf"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    # Only now: huggingface_hub reads HF_ENDPOINT and HF_HOME when it is imported.
    from huggingface_hub import constants

    from eval.hub_push import push_to_hub

    recipe = Recipe.from_dict({"model": {"preset": "cifar10"}, "run": {"name": "cifar10"}})
    model = build.unet(recipe.model)
    ckpt = tmp / "run" / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    save_recipe(recipe, ckpt / "config.yaml")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(ckpt / "ema.safetensors"))
    (ckpt / "trainer_state.json").write_text('{"step": 1}')  # written last: it makes the checkpoint complete
    (tmp / "run" / "checkpoints" / "latest").write_text(ckpt.name)
    binf = tmp / "bin" / "ema.bin"
    binf.parent.mkdir()
    torch.save(state, binf)
    size_mb = (ckpt / "ema.safetensors").stat().st_size / 2**20

    rows = []
    t_st = best(lambda: load_state_dict(ckpt / "ema.safetensors"), args.repeat)
    t_bin = best(lambda: load_state_dict(binf), args.repeat)
    rows.append(("load state dict: safetensors vs torch .bin (weights_only)", t_st, t_bin))

    t_copy = best(lambda: shutil.copytree(ckpt, tmp / f"copy-{time.perf_counter_ns()}"), args.repeat)
    t_push = float("inf")
    for i in range(args.repeat):  # new weights each time: the server would skip blobs it already holds
        state["conv_in.bias"][0] = float(i + 1)
        save_file(state, str(ckpt / "ema.safetensors"))
        t0 = time.perf_counter()
        push_to_hub(tmp / "run", f"alice/bench-{i}", samples=())
        t_push = min(t_push, time.perf_counter() - t0)
    rows.append(("push_to_hub (local server, 1 commit) vs file copy", t_push, t_copy))

    def pull():
        constants.HF_HUB_CACHE = str(tmp / f"cache-{time.perf_counter_ns()}")
        load_pretrained("alice/bench-0")

    t_pull = best(pull, args.repeat)
    t_local = best(lambda: load_pretrained(tmp / "run"), args.repeat)
    rows.append(("load_pretrained: Hub id, empty cache vs local run dir", t_pull, t_local))
    srv.stop()
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"CIFAR-10 U-Net, {sum(v.numel() for v in state.values()):,} params, {size_mb:.1f} MiB; "
          f"best of {args.repeat}; torch {torch.__version__}")
    print(f"| {'measure':<58} | {'this s':>8} | {'peer s':>8} | {'ratio':>6} | {'MiB/s':>7} |")
    print(f"|{'-' * 60}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 9}|")
    for name, a, b in rows:
        print(f"| {name:<58} | {a:8.3f} | {b:8.3f} | {a / b:6.2f} | {size_mb / a:7.0f} |")


if __name__ == "__main__":
    main()
