"""A small real image set with no download: scikit-image's sample photographs, cut into
random square crops and stored as an LSUN-style LMDB (key: 40-hex-digit id, value: WebP
bytes), so the quickstart runs the real LSUN path of data_prep."""

from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image

# The colour photographs that ship inside scikit-image (no network needed).
PHOTOS = [
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
    "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg", "color.png",
]


def load_photos() -> list[Image.Image]:
    import skimage  # the test extra, and a slow import: only when an LMDB is actually written

    folder = Path(skimage.__file__).parent / "data"
    return [Image.open(folder / name).convert("RGB") for name in PHOTOS]


def make_quickstart_lmdb(path: str | Path, count: int = 2000, seed: int = 0, min_size: int = 48,
                         max_size: int = 160) -> int:
    """Write `count` random crops (side min_size..max_size px) as WebP into an LMDB at `path`.

    Returns the number of entries. Deterministic for a given seed; a complete LMDB is reused.
    """
    path = Path(path)
    if (path / "data.mdb").exists():
        with lmdb.open(str(path), readonly=True, lock=False) as env:
            if env.stat()["entries"] == count:
                return count
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = load_photos()
    with lmdb.open(str(path), map_size=1 << 30) as env, env.begin(write=True) as txn:
        for _ in range(count):
            img = photos[rng.integers(len(photos))]
            side = int(rng.integers(min_size, min(max_size, *img.size) + 1))
            # LSUN images are not square: crop a slightly wider box so data_prep's centre crop works.
            w = min(img.width, int(side * rng.uniform(1.0, 1.33)))
            x = int(rng.integers(0, img.width - w + 1))
            y = int(rng.integers(0, img.height - side + 1))
            buf = io.BytesIO()
            img.crop((x, y, x + w, y + side)).save(buf, format="WEBP", quality=90)
            value = buf.getvalue()
            txn.put(hashlib.sha1(value).hexdigest().encode(), value)
        n = txn.stat()["entries"]
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", help="LMDB folder to write")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = make_quickstart_lmdb(args.out, args.count, args.seed)
    print(f"{args.out}: {n} images")


if __name__ == "__main__":
    main()
