"""data_prep throughput per CPU core on LSUN-like input, vs a plain one-file-per-image script.

Input: an LMDB in LSUN's layout whose values are WebP images with the short side 256 and
the long side 256..384 (as LSUN distributes them), cut from scikit-image's photographs.
Ours: `data_prep.shards.prepare` (decode, centre crop, LANCZOS to 256, encode, tar shards)
with --workers 1, per format. Peer: what ProGAN's create_lsun / most repos' export scripts
do, the same decode + crop + LANCZOS, then `Image.save(path.png)` with Pillow's defaults
(zlib level 6), one file per image. Both single-process: img/s is per core.

    python bench/data_prep.py [--images 96] [--repeats 2]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np

# bench/data_loader.py, a sibling: run as a script, this file's folder is first on sys.path.
from data_loader import load_photos
from PIL import Image

from data_prep.preprocess import center_crop_resize
from data_prep.shards import prepare
from data_prep.sources import LsunSource


def make_lsun_like(path: Path, n: int, seed: int = 0) -> float:
    """n WebP (q80) values, short side 256, long side 256..384; returns mean KiB per value."""
    photos = load_photos()
    rng = np.random.default_rng(seed)
    total = 0
    path.mkdir(parents=True)
    with lmdb.open(str(path), map_size=1 << 30) as env, env.begin(write=True) as txn:
        for i in range(n):
            img = photos[i % len(photos)]
            long_side = int(rng.integers(256, 385))
            w, h = (long_side, 256) if rng.random() < 0.75 else (256, long_side)
            s = max(w / img.width, h / img.height) * rng.uniform(1.0, 1.3)
            img = img.resize((int(img.width * s) + 1, int(img.height * s) + 1), Image.BICUBIC)
            x, y = rng.integers(0, img.width - w + 1), rng.integers(0, img.height - h + 1)
            buf = io.BytesIO()
            img.crop((x, y, x + w, y + h)).save(buf, format="WEBP", quality=80)
            v = buf.getvalue()
            total += len(v)
            txn.put(hashlib.sha1(v).hexdigest().encode(), v)
    return total / n / 1024


def peer(lmdb_path: Path, out: Path, res: int = 256) -> int:
    out.mkdir(parents=True)
    n = 0
    with lmdb.open(str(lmdb_path), readonly=True, lock=False) as env, env.begin() as txn:
        for key, value in txn.cursor():
            img = center_crop_resize(Image.open(io.BytesIO(value)), res)
            img.save(out / f"{key.decode()}.png")
            n += 1
    return n


def timed(fn, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` (CPU seconds of this process, wall seconds): CPU time is the per-core
    cost on a machine shared with other jobs."""
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        best_cpu, best_wall = min(best_cpu, time.process_time() - c0), min(best_wall, time.perf_counter() - t0)
    return best_cpu, best_wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kb = make_lsun_like(tmp / "lmdb", n)
        runs = iter(range(10**6))

        def fresh(name):
            d = tmp / f"{name}-{next(runs)}"
            return d

        def run_peer():
            d = fresh("peer")
            peer(tmp / "lmdb", d)
            return d

        t_peer = timed(run_peer, args.repeats)
        peer_kb = sum(f.stat().st_size for f in (tmp).glob("peer-0/*.png")) / n / 1024
        rows = [("peer: PIL decode/crop/LANCZOS, one PNG file each (level 6)", peer_kb, t_peer)]
        for label, kw in [("ours: png level 1 (--format png)", dict(fmt="png", png_level=1)),
                          ("ours: npy (default)", dict(fmt="npy")),
                          ("ours: jpg q95", dict(fmt="jpg", quality=95))]:
            outs = []

            def run():
                d = fresh(label.split()[1])
                prepare(LsunSource(tmp / "lmdb"), d, resolution=256, test_count=0, workers=1, progress=False,
                        shard_size=1000, **kw)
                outs.append(d)

            t = timed(run, args.repeats)
            size = sum(f.stat().st_size for f in outs[0].glob("*.tar")) / n / 1024
            rows.append((label, size, t))
            for d in outs:
                shutil.rmtree(d)
    print(f"data_prep img/s per core: {n} LSUN-like WebP values ({kb:.0f} KiB each, short side 256) -> 256x256, "
          f"1 process, best of {args.repeats}")
    print("| pipeline | KiB/img out | img/s per core (CPU time) | vs peer | img/s wall |\n|---|---|---|---|---|")
    for name, size, (cpu, wall) in rows:
        print(f"| {name} | {size:.0f} | {n / cpu:.0f} | {rows[0][2][0] / cpu:.2f}x | {n / wall:.0f} |")


if __name__ == "__main__":
    main()
