"""What checkpoint checksums cost: hashing a checkpoint's files when it is written and
verifying them on resume (pipeline/integrity.py), against writing the same bytes.

A 113M-parameter (256x256) checkpoint holds ~2.3 GB: Accelerate's model (455 MB) and Adam
state (910 MB), model.safetensors and ema.safetensors (455 MB each). The files here are
random bytes of those sizes, scaled by --mb (total MB), written with fsync as commit() does.

    python bench/checkpoint_integrity.py [--mb 2300] [--repeat 3] [--dir /path/on/the/run/disk]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import integrity  # after the path insert: run as a script

# Shares of a 256x256 checkpoint's bytes, by file.
LAYOUT = {"accelerate/model.safetensors": 0.2, "accelerate/optimizer.bin": 0.4,
          "model.safetensors": 0.2, "ema.safetensors": 0.2}


def write(folder: Path, total_mb: float) -> float:
    t0 = time.perf_counter()
    for rel, share in LAYOUT.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        n = int(total_mb * share * 2**20)
        with open(p, "wb") as f:
            for off in range(0, n, 1 << 24):
                f.write(os.urandom(min(1 << 24, n - off)))
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=2300.0, help="checkpoint size in MB (default 2300: 256x256 model)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ckbench-", dir=args.dir))
    try:
        best_write = best_hash = best_verify = float("inf")
        for _ in range(args.repeat):
            d = root / "ck"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            best_write = min(best_write, write(d, args.mb))
            (d / "config.yaml").write_text("model: {}\n")
            t0 = time.perf_counter()
            files = integrity.digests(d)
            best_hash = min(best_hash, time.perf_counter() - t0)
            (d / integrity.STATE_FILE).write_text(json.dumps({"step": 1, "files": files}))
            t0 = time.perf_counter()
            assert integrity.damage(d) is None
            best_verify = min(best_verify, time.perf_counter() - t0)
        print(f"checkpoint {args.mb:.0f} MB: write+fsync {best_write:.2f} s, checksums at save {best_hash:.2f} s "
              f"({best_hash / best_write:.2f}x the write), verify on resume {best_verify:.2f} s "
              f"({args.mb / max(best_verify, 1e-9):.0f} MB/s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
