"""pipeline/train.py with a test hook, for tests that need a real process to die at a chosen point:

    python tests/support/train_with_hooks.py --kill-in-save STEP RECIPE [section.key=value ...]
    python tests/support/train_with_hooks.py --kill-at STEP RECIPE [section.key=value ...]
    python tests/support/train_with_hooks.py --file-limit-at STEP RECIPE [section.key=value ...]
    python tests/support/train_with_hooks.py --fill-disk-at STEP --filler FILE RECIPE [...]
    python tests/support/train_with_hooks.py --record-batches FILE RECIPE [section.key=value ...]

--kill-in-save SIGKILLs the main process inside the checkpoint save of STEP, after the weights
are written and before trainer_state.json makes the directory whole. --kill-at SIGKILLs every
rank at the start of optimizer step STEP (0-based: after STEP steps), a preemption at a known
point. --file-limit-at sets a file-size limit (RLIMIT_FSIZE, 2 KiB, SIGXFSZ ignored) from step
STEP on: every later write past 2 KiB fails with EFBIG. --fill-disk-at fills the file system of
FILE at step STEP (on the main process) with FILE, leaving 64 KiB free: the next checkpoint
meets a real ENOSPC (on a small tmpfs, so nothing else is starved). --record-batches writes, per rank, FILE.rank<R> with one JSON line per micro-batch: step, micro-step and the sha1 of each sample's
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
    p.add_argument("--kill-at", type=int, metavar="STEP")
    p.add_argument("--file-limit-at", type=int, metavar="STEP")
    p.add_argument("--fill-disk-at", type=int, metavar="STEP")
    p.add_argument("--filler", metavar="FILE")
    p.add_argument("--record-batches", metavar="FILE")
    args, rest = p.parse_known_args(argv)

    def in_save(step, _tmp_dir):
        if step == args.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)

    def loss(step, value):
        if step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.file_limit_at:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        if step == args.fill_disk_at and os.environ.get("RANK", "0") == "0" and not os.path.exists(args.filler):
            fill(args.filler, keep=64 * 1024)
        return value

    def batch(step, k, x0):
        with open(f"{args.record_batches}.rank{os.environ.get('RANK', '0')}", "a") as f:
            f.write(json.dumps({"step": step, "k": k, "sha1": [pixel_digest(x) for x in x0]}) + "\n")

    return train.main(rest, hooks=Hooks(in_save=in_save, loss=loss, batch=batch if args.record_batches else None))


def fill(path: str, keep: int) -> None:
    """Take all but `keep` bytes of the free space of path's file system (real blocks: tmpfs and
    most file systems allocate them on posix_fallocate)."""
    st = os.statvfs(os.path.dirname(path) or ".")
    size = st.f_bavail * st.f_frsize - keep
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def pixel_digest(x) -> str:
    """sha1 of one sample's pixels as uint8 CHW (the loader's [-1, 1] floats map back exactly)."""
    u = ((x.detach().cpu().double() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return hashlib.sha1(u.contiguous().numpy().tobytes()).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
