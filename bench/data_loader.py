"""Loader throughput per CPU core at 256x256: pipeline.data.TrainLoader over data_prep shards
vs the usual peer, torchvision ImageFolder + PIL over the original (larger) JPEGs with the
same centre crop + LANCZOS resize + flip done on the fly.

Everything runs in this process with one torch thread and num_workers=0, so img/s per
CPU-second of the process is img/s per core. Inputs: photographs shipped with scikit-image, cut into 512x384 JPEGs (q90), like
LSUN / CelebA-HQ originals are larger JPEGs. Each loader yields float32 NCHW in [-1, 1]
(rows marked "uint8 out": TrainLoader(dtype=torch.uint8), scaling left to the GPU).

    python bench/data_loader.py [--images 160] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the project root
from data_prep.preprocess import center_crop_resize
from data_prep.shards import prepare
from data_prep.sources import FolderSource
from pipeline.data import TrainLoader

PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "ihc.png"]


def load_photos() -> list[Image.Image]:
    """The colour photographs inside scikit-image's data folder (no download)."""
    import skimage  # here: scikit-image is in the test extra, and only the inputs need it

    folder = Path(skimage.__file__).parent / "data"
    return [Image.open(folder / name).convert("RGB") for name in PHOTOS]


def make_originals(folder: Path, n: int, seed: int = 0) -> None:
    """n photographs cut to 512x384 JPEG (random crops of the scikit-image samples)."""
    photos = load_photos()
    rng = np.random.default_rng(seed)
    (folder / "all").mkdir(parents=True, exist_ok=True)  # ImageFolder wants one class folder
    for i in range(n):
        img = photos[i % len(photos)]
        scale = max(512 / img.width, 384 / img.height) * rng.uniform(1.0, 1.4)
        img = img.resize((int(img.width * scale + 1), int(img.height * scale + 1)), Image.BICUBIC)
        x, y = rng.integers(0, img.width - 512 + 1), rng.integers(0, img.height - 384 + 1)
        img.crop((x, y, x + 512, y + 384)).save(folder / "all" / f"{i:05d}.jpg", quality=90)


def peer_loader(folder: Path, batch: int, res: int):
    # Here: torchvision takes seconds to import, and only the peer needs it.
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.Lambda(lambda im: center_crop_resize(im, res)), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    ds = ImageFolder(str(folder), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0, drop_last=True)


def rate(make_iter, n_images: int, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` (images per CPU-second of this process, images per wall second).
    CPU time is what "per core" means on a machine shared with other jobs; wall time is shown too."""
    best_cpu = best_wall = 0.0
    for _ in range(repeats):
        it = make_iter()
        next(it)  # warm-up: first batch (file opens, tar index) not timed
        c0, t0, seen = time.process_time(), time.perf_counter(), 0
        while seen < n_images:
            b = next(it)
            seen += len(b[0] if isinstance(b, (list, tuple)) else b)
        best_cpu = max(best_cpu, seen / (time.process_time() - c0))
        best_wall = max(best_wall, seen / (time.perf_counter() - t0))
    return best_cpu, best_wall


def endless(dl):
    while True:
        yield from dl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    f32, u8 = torch.float32, torch.uint8
    variants = [("npy (default)", dict(fmt="npy"), "pil", f32),
                ("npy, uint8 out", dict(fmt="npy"), "pil", u8),
                ("png level 1 (--format png)", dict(fmt="png", png_level=1), "pil", f32),
                ("png level 1, torchvision decode", dict(fmt="png", png_level=1), "torchvision", f32),
                ("png level 1, uint8 out", dict(fmt="png", png_level=1), "pil", u8),
                ("png level 0 (uncompressed)", dict(fmt="png", png_level=0), "pil", f32),
                ("jpg q95 (lossy)", dict(fmt="jpg", quality=95), "pil", f32)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_originals(tmp / "orig", args.images)
        orig_kb = sum(f.stat().st_size for f in (tmp / "orig" / "all").iterdir()) / args.images / 1024
        n = args.images
        peer = rate(lambda: endless(peer_loader(tmp / "orig", args.batch, args.resolution)), n, args.repeats)
        rows = [("peer: ImageFolder + PIL, 512x384 JPEG + crop/resize", orig_kb, peer)]
        for name, kw, decoder, dtype in variants:
            out = tmp / name.split()[0] / str(kw.get("png_level", kw.get("quality", "")))
            if not (out / "manifest.json").exists():
                prepare(FolderSource(tmp / "orig"), out, resolution=args.resolution, test_count=0,
                        progress=False, **kw)
            kb = sum(f.stat().st_size for f in out.glob("train-*.tar")) / n / 1024
            r = rate(lambda: TrainLoader(out, batch_size=args.batch, seed=0, num_workers=0, decoder=decoder,
                                         dtype=dtype),
                     n, args.repeats)
            rows.append((f"ours: {name}", kb, r))
    print(f"loader img/s per core, {args.resolution}x{args.resolution}, batch {args.batch}, {n} images, "
          f"best of {args.repeats}, torch {torch.__version__}, 1 thread")
    print("| loader | KiB/img on disk | img/s per core (CPU time) | vs peer | img/s wall |\n|---|---|---|---|---|")
    for name, kb, (r, wall) in rows:
        print(f"| {name} | {kb:.0f} | {r:.0f} | {r / peer[0]:.2f}x | {wall:.0f} |")


if __name__ == "__main__":
    main()
