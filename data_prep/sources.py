"""Readers of the three input layouts. Each source lists its items cheaply in the main process
(keys only) and reads one item's bytes inside a worker process.

- `LsunSource`: a per-category LSUN LMDB; key -> encoded image (WebP or JPEG).
- `FolderSource`: a folder tree of images (CelebA-HQ, FFHQ, anything PIL reads).
- `Cifar10Source`: the python-pickle batches (`data_batch_1..5`, `test_batch`), which fix the split.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import lmdb
import numpy as np

from data_prep import safe_pickle
from pipeline.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".gif"}
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = "test_batch"


class PrepError(UserError):
    """A user error (bad path, wrong layout): the CLI prints it on one line and exits 2."""


def safe_key(text: str) -> str:
    """A WebDataset key: no dots (WebDataset splits a member name at its first dot)."""
    return re.sub(r"[^A-Za-z0-9_/-]", "_", text).strip("/") or "_"


def unique_key(name: str, seen: set, ident: bytes | None = None) -> str:
    """safe_key(name), never one already in `seen` (which it joins). Sanitising loses
    information (`a b`, `a.b` and `a_b` all give `a_b`), so a name it changed also carries a
    hash of the original (`ident`, default its UTF-8 bytes): distinct inputs, distinct keys."""
    key = safe_key(name)
    if key != name or key in seen:
        raw = ident if ident is not None else name.encode("utf-8", "surrogateescape")
        key = f"{key}-{hashlib.sha1(raw).hexdigest()[:10]}"
    while key in seen:  # a literal name that happens to equal another's hashed key
        key += "_"
    seen.add(key)
    return key


class LsunSource:
    kind = "lsun"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()
        if not self.path.exists():
            raise PrepError(f"{path}: no such LMDB directory")
        target = self.path if self.path.is_dir() else self.path.parent
        if not (target / "data.mdb").is_file():
            raise PrepError(f"{path}: not an LMDB database (no data.mdb)")
        self.path = target
        self._env = None
        self._pid = None

    def _open(self):
        if self._env is None or self._pid != os.getpid():  # one environment per process (fork-safe)
            try:
                self._env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False,
                                      max_readers=256)
            except lmdb.Error as e:
                raise PrepError(f"{self.path}: not an LMDB database ({e})") from None
            self._pid = os.getpid()
        return self._env

    def items(self, limit: int | None = None):
        """[(key, None, raw_key)] in LMDB key order (the split is decided later, by key hash)."""
        env = self._open()
        out, seen = [], set()
        with env.begin() as txn:
            for raw in txn.cursor().iternext(keys=True, values=False):
                out.append((unique_key(raw.decode("utf-8", "replace"), seen, bytes(raw)), None, bytes(raw)))
                if limit is not None and len(out) >= limit:
                    break
        self.close()
        if not out:
            raise PrepError(f"{self.path}: the LMDB database is empty")
        return out

    def read(self, payload: bytes) -> bytes:
        with self._open().begin() as txn:
            value = txn.get(payload)
        if value is None:
            raise KeyError(payload)
        return bytes(value)

    def close(self):
        if self._env is not None:
            self._env.close()
            self._env = None

    def __getstate__(self):  # never pickle an open environment into a worker
        return {"path": self.path, "_env": None, "_pid": None}


class FolderSource:
    kind = "folder"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()
        if not self.path.is_dir():
            raise PrepError(f"{path}: no such image folder")

    def items(self, limit: int | None = None):
        files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise PrepError(f"{self.path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        if limit is not None:
            files = files[:limit]
        out, seen = [], set()
        for f in files:
            rel = f.relative_to(self.path)
            stem = str(rel.with_suffix(""))
            # a.png and a.jpg side by side: keep both, name both
            key = unique_key(str(rel) if safe_key(stem) in seen else stem, seen)
            out.append((key, None, str(f)))
        return out

    def read(self, payload: str) -> bytes:
        with open(payload, "rb") as f:
            return f.read()


class Cifar10Source:
    kind = "cifar10"

    def __init__(self, path: str | os.PathLike):
        p = Path(path).absolute()
        if not p.is_dir():
            raise PrepError(f"{path}: no such directory (expected the CIFAR-10 python batches)")
        if not (p / CIFAR_TEST).is_file() and (p / "cifar-10-batches-py" / CIFAR_TEST).is_file():
            p = p / "cifar-10-batches-py"
        missing = [n for n in CIFAR_TRAIN + [CIFAR_TEST] if not (p / n).is_file()]
        if missing:
            raise PrepError(f"{path}: not the CIFAR-10 python batches (missing {', '.join(missing)})")
        self.path = p

    def _batch(self, name: str) -> np.ndarray:
        try:
            with open(self.path / name, "rb") as f:
                d = safe_pickle.load(f, encoding="bytes")  # never pickle.load: it runs what the file names
            raw = d[b"data"]
            if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
                raise ValueError(f"data is {type(raw).__name__} {getattr(raw, 'dtype', '')}, expected a uint8 array")
            data = raw
        except safe_pickle.RefusedPickle as e:
            raise PrepError(f"{self.path / name}: {e}") from None
        except Exception as e:  # any unreadable pickle is a user error here
            raise PrepError(f"{self.path / name}: not a CIFAR-10 batch ({type(e).__name__}: {str(e)[:200]})") from None
        if data.ndim != 2 or data.shape[1] != 3072:
            raise PrepError(f"{self.path / name}: data has shape {data.shape}, expected [N, 3072]")
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW planes -> HWC

    def items(self, limit: int | None = None):
        """[(key, split, HWC uint8 array)]: train = data_batch_1..5 in order, test = test_batch."""
        out, per_split = [], {"train": 0, "test": 0}
        for name in CIFAR_TRAIN + [CIFAR_TEST]:
            split = "test" if name == CIFAR_TEST else "train"
            imgs = self._batch(name)
            n = len(imgs) if limit is None else max(0, min(len(imgs), limit - per_split[split]))
            per_split[split] += n  # --limit N: at most N per split (the split is fixed by the batches)
            out += [(f"{name}_{i:05d}", split, imgs[i]) for i in range(n)]
        if not out:
            raise PrepError(f"{self.path}: the CIFAR-10 batches hold no images")
        return out

    def read(self, payload: np.ndarray) -> np.ndarray:
        return payload


def open_source(kind: str, path: str | os.PathLike):
    return {"lsun": LsunSource, "folder": FolderSource, "cifar10": Cifar10Source}[kind](path)
