"""The quickstart's data set, with no download: scikit-learn's handwritten digits (1,797 real
8x8 scans from 43 writers, inside the scikit-learn wheel), drawn as dark ink on white paper and
stored as an LSUN-style LMDB (key: 40-hex-digit id, value: WebP bytes), so the quickstart runs
the real LSUN path of data_prep: LMDB read, decode, centre crop, antialiased resize."""

from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image

DIGITS = 1797
# Drawn at 32x32 (bicubic, so strokes are smooth, not 4x4 blocks) with 4 px of paper either side:
# like an LSUN image, wider than tall, so data_prep's centre crop has work to do.
SIDE, MARGIN = 32, 4


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8], 0 = paper, 255 = ink; labels int [1797])."""
    from sklearn.datasets import load_digits as sk_digits  # the test extra: only when digits are needed

    d = sk_digits()
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


def draw(ink: np.ndarray) -> Image.Image:
    """One 8x8 ink image -> a (SIDE + 2 MARGIN) x SIDE RGB picture, dark ink on white."""
    page = Image.fromarray(255 - ink).resize((SIDE, SIDE), Image.BICUBIC)
    canvas = Image.new("L", (SIDE + 2 * MARGIN, SIDE), 255)
    canvas.paste(page, (MARGIN, 0))
    return canvas.convert("RGB")


def make_quickstart_lmdb(path: str | Path, count: int = DIGITS) -> int:
    """Write the first `count` digits as WebP (lossless) into an LMDB at `path`; return the entries.

    Deterministic; a complete LMDB is reused.
    """
    if not 0 < count <= DIGITS:
        raise ValueError(f"count must be 1..{DIGITS} (scikit-learn's digits), got {count}")
    path = Path(path)
    if (path / "data.mdb").exists():
        with lmdb.open(str(path), readonly=True, lock=False) as env:
            if env.stat()["entries"] == count:
                return count
    path.mkdir(parents=True, exist_ok=True)
    ink, _ = load_digits()
    with lmdb.open(str(path), map_size=1 << 28) as env, env.begin(write=True) as txn:
        for i in range(count):
            buf = io.BytesIO()
            draw(ink[i]).save(buf, format="WEBP", lossless=True)
            # Keyed by index, not content: two identical scans stay two images.
            txn.put(hashlib.sha1(f"digit-{i}".encode()).hexdigest().encode(), buf.getvalue())
        n = txn.stat()["entries"]
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", help="LMDB folder to write")
    ap.add_argument("--count", type=int, default=DIGITS, help=f"how many of the {DIGITS} digits")
    args = ap.parse_args()
    if not 0 < args.count <= DIGITS:
        ap.error(f"--count must be 1..{DIGITS}, got {args.count}")
    n = make_quickstart_lmdb(args.out, args.count)
    print(f"{args.out}: {n} images")


if __name__ == "__main__":
    main()
