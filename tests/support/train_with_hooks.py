"""pipeline/train.py with a test hook, for tests that need a real process to die at a chosen point:

    python tests/support/train_with_hooks.py --kill-in-save STEP RECIPE [section.key=value ...]
    python tests/support/train_with_hooks.py --disk-full-at STEP RECIPE [section.key=value ...]
    python tests/support/train_with_hooks.py --record-batches FILE RECIPE [section.key=value ...]

--kill-in-save SIGKILLs the main process inside the checkpoint save of STEP, after the weights
are written and before trainer_state.json makes the directory whole. --disk-full-at makes the
disk "full" from the optimizer step STEP on, for real: a file-size limit (RLIMIT_FSIZE, 2 KiB,
SIGXFSZ ignored) makes every later write past 2 KiB fail with EFBIG, as a full disk fails
with ENOSPC. --record-batches writes, per rank, FILE.rank<R> with one JSON line per micro-batch: step, micro-step and the sha1 of each sample's
uint8 pixels (what the trainer was fed). Everything else is the real entry point.
(Run as a script: PYTHONPATH must hold the project root, as support.training.env() sets it.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import sys

import torch

from pipeline import train
from pipeline.trainer import Hooks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kill-in-save", type=int, metavar="STEP")
    p.add_argument("--disk-full-at", type=int, metavar="STEP")
    p.add_argument("--record-batches", metavar="FILE")
    args, rest = p.parse_known_args(argv)

    def in_save(step, _tmp_dir):
        if step == args.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)

    def loss(step, value):
        if step == args.disk_full_at:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return value

    def batch(step, k, x0):
        with open(f"{args.record_batches}.rank{os.environ.get('RANK', '0')}", "a") as f:
            f.write(json.dumps({"step": step, "k": k, "sha1": [pixel_digest(x) for x in x0]}) + "\n")

    return train.main(rest, hooks=Hooks(in_save=in_save, loss=loss, batch=batch if args.record_batches else None))


def pixel_digest(x) -> str:
    """sha1 of one sample's pixels as uint8 CHW (the loader's [-1, 1] floats map back exactly)."""
    u = ((x.detach().cpu().double() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return hashlib.sha1(u.contiguous().numpy().tobytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
