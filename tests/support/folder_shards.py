"""Shards of a few small PNG images, made by `python -m data_prep folder` as a user would: the
real data the eval tests sample against, score against and bound."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def make_folder_shards(folder: str | os.PathLike, n: int = 12, size: int = 8, test_count: int = 1, seed: int = 0,
                       smooth: bool = True) -> Path:
    """folder/shards from n PNG images of size x size (smooth random colour gradients, so a small
    model can learn them; with smooth=False uniform noise, which reaches the 0 and 255 edge bins),
    `test_count` of them in the test split."""
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    for i in range(n):
        if smooth:
            c0, cx, cy = g.uniform(0, 255, 3), g.uniform(-120, 120, 3), g.uniform(-120, 120, 3)
            im = c0 + cx * xx[..., None] + cy * yy[..., None]
        else:
            im = g.uniform(0, 255, (size, size, 3))
        Image.fromarray(np.clip(im, 0, 255).round().astype(np.uint8)).save(images / f"img{i:04d}.png")
    out = folder / "shards"
    r = subprocess.run([sys.executable, "-m", "data_prep", "folder", "--images", str(images), "--out", str(out),
                        "--resolution", str(size), "--test-count", str(test_count), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise RuntimeError(f"data_prep failed: {r.stderr[-2000:]}")
    return out
