"""Builders of small *real* inputs for data_prep and the loader (importable by any test).

- `make_cifar10_batches(dir, n_train, n_test, seed)`: CIFAR-10-format pickles
  (data_batch_1..5 + test_batch, dict with b"data" [N, 3072] uint8 CHW rows and b"labels").
- `make_lsun_lmdb(path, n, size, seed)`: an LMDB in LSUN's layout (key: 40 hex digits,
  value: encoded image), alternating WebP and JPEG, plus one corrupt value (key CORRUPT_KEY)
  and one image smaller than `size` (key SMALL_KEY) -> n + 2 entries.
- `make_image_folder(dir, n, size, seed)`: a CelebA-HQ-like folder (PNG and JPEG, in a subfolder too).
- `make_shards(out, n_train, n_test, resolution, seed, **prepare_kw)`: run data_prep on a fresh
  CIFAR-like set and return the shard dir (what trainer / eval tests need).
Images are smooth random colour fields (they compress like photos, not like noise).
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image

from data_prep.shards import prepare
from data_prep.sources import Cifar10Source

CORRUPT_KEY = "0" * 40  # an LSUN key whose value is not an image
SMALL_KEY = "f" * 40  # an LSUN key whose image is smaller than the target size


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random RGB image: a coarse grid of colours upsampled bilinearly, plus mild noise."""
    coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
    img = img + rng.integers(-8, 9, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_cifar10_batches(dir, n_train: int = 10, n_test: int = 4, seed: int = 0) -> Path:
    """Write CIFAR-10 python batches with `n_train` images spread over the 5 train batches."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = [len(a) for a in np.array_split(np.arange(n_train), 5)] + [n_test]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, n in zip(names, counts):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": data, b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return d


def cifar_image(batches_dir, name: str, index: int) -> np.ndarray:
    """The HWC uint8 image `index` of CIFAR batch `name` (an independent reader for tests)."""
    with open(Path(batches_dir) / name, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return np.asarray(d[b"data"][index], dtype=np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)


def make_lsun_lmdb(path, n: int = 8, size: int = 32, seed: int = 0) -> dict[str, bytes]:
    """LSUN-layout LMDB at `path`: n landscape/portrait images (WebP and JPEG alternating, sides
    size..1.5*size), one corrupt value and one too-small image. Returns {key: value}."""
    rng = np.random.default_rng(seed)
    values = {}
    for i in range(n):
        long = int(rng.integers(size, size * 3 // 2 + 1))
        w, h = (long, size) if i % 2 == 0 else (size, long)
        img = random_image(rng, w, h)
        v = encoded(img, "WEBP", quality=90) if i % 4 < 2 else encoded(img, "JPEG", quality=90)
        values[hashlib.sha1(v).hexdigest()] = v
    values[CORRUPT_KEY] = b"RIFF\x10\x00\x00\x00not a WebP image" + bytes(64)
    values[SMALL_KEY] = encoded(random_image(rng, size - 1, size // 2), "WEBP", quality=90)
    Path(path).mkdir(parents=True, exist_ok=True)
    with lmdb.open(str(path), map_size=1 << 28) as env, env.begin(write=True) as txn:
        for k, v in values.items():
            txn.put(k.encode(), v)
    return values


def make_image_folder(dir, n: int = 6, size: int = 32, seed: int = 0) -> list[Path]:
    """A CelebA-HQ-like folder: square-ish PNG and JPEG images, a third of them in `sub/`."""
    d = Path(dir)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = d / "sub" if i % 3 == 2 else d
        sub.mkdir(parents=True, exist_ok=True)
        img = random_image(rng, size + int(rng.integers(0, size // 2 + 1)), size + int(rng.integers(0, 3)))
        p = sub / (f"{i:05d}.png" if i % 2 == 0 else f"{i:05d}.jpg")
        img.save(p, quality=95) if p.suffix == ".jpg" else img.save(p)
        paths.append(p)
    return paths


def make_shards(out, n_train: int = 16, n_test: int = 4, seed: int = 0, shard_size: int = 5, **kw) -> Path:
    """CIFAR-like 32x32 shards (+ manifest.json) in `out`, made by data_prep itself."""
    out = Path(out)
    src = make_cifar10_batches(out.parent / f"{out.name}-batches", n_train, n_test, seed)
    prepare(Cifar10Source(src), out, resolution=kw.pop("resolution", 32), shard_size=shard_size,
            progress=False, **kw)
    return out
