"""The training loader: map-style random access over data_prep's tar shards.

Why not a streaming WebDataset pipeline: "every sample exactly once per epoch over all ranks
and workers" and "resume at sample k" are hard with shard-level splitting and shuffle
buffers (uneven shard counts, buffer state), and passing one through `accelerator.prepare()`
drops data with webdataset 1.0.2. Here each shard's member offsets come from its tar headers,
so sample i is a seek + read, and the data order is index arithmetic:

- The global stream is the concatenation of per-epoch permutations of all N train samples,
  perm_e = numpy PCG64 seeded with (seed, e). Stream position j is sample perm_{j // N}[j % N].
- Global batch b is stream[p : p + G] with G = batch_size * world_size, and rank r takes slice
  r of it (B consecutive positions). Batches may straddle an epoch boundary; every sample is
  seen exactly once per epoch; the order does not depend on the world size.
- The horizontal flip of a sample is a bit drawn from (seed, epoch, index) (the paper flips
  every data set but LSUN cat), so it survives resume and does not depend on worker count.
- DataLoader workers receive whole batches (index lists) in order, so `num_workers` never
  changes the result; the position (`state_dict()["position"]`, global samples consumed)
  advances only when a batch is handed to the trainer, so prefetching does not shift it.

Corrupt samples: an undecodable member is replaced, inside its batch, by the next decodable
sample of the same batch (cyclically), so batch shapes stay fixed and the order of the
other samples is unchanged. Each replacement is counted in `loader.skipped`; once more than
`max_corrupt` distinct samples were corrupt the loader raises DataError naming shard and key.
"""

from __future__ import annotations

import glob as _glob
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["DataError", "ShardSet", "TrainLoader", "iter_split", "decode_sample"]


class DataError(RuntimeError):
    """Bad shard source, or too many corrupt samples."""


def decode_sample(ext: str, data: bytes) -> torch.Tensor:
    """Stored sample bytes -> uint8 [3, H, W]."""
    if ext == "npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"npy sample has dtype {arr.dtype} shape {arr.shape}, expected uint8 [H, W, 3]")
        return torch.from_numpy(arr).permute(2, 0, 1)
    from torchvision.io import ImageReadMode, decode_image

    # libpng / libjpeg-turbo straight into a CHW tensor: no PIL object, no extra copy.
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _scan_tar(path: str) -> list[tuple[str, str, int, int]]:
    """[(key, ext, data offset, size)] of the regular members of a tar, from its headers."""
    out = []
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if m.isfile():
                base = m.name.rsplit("/", 1)[-1]
                stem, _, ext = m.name.rpartition(".") if "." in base else (m.name, "", "")
                out.append((stem, ext.lower(), m.offset_data, m.size))
    return out


class ShardSet:
    """The samples of one split as one indexable sequence: sample i -> (shard, key, bytes).

    `source` is a data_prep output folder (or its manifest.json), a glob pattern of tar files,
    or a list of tar paths. With a manifest, per-shard counts come from it and a shard's member
    table is read from its tar headers on first use (per process)."""

    def __init__(self, source, split: str = "train"):
        self.manifest = None
        if isinstance(source, (list, tuple)):
            paths = [str(p) for p in source]
        else:
            p = Path(source)
            mpath = p / "manifest.json" if p.is_dir() else p
            if mpath.is_file() and mpath.suffix == ".json":
                try:
                    self.manifest = json.loads(mpath.read_text())
                except ValueError as e:
                    raise DataError(f"{mpath}: unreadable manifest ({e})") from None
                if split not in self.manifest.get("splits", {}):
                    raise DataError(f"{mpath}: no split {split!r} (has {', '.join(self.manifest.get('splits', {}))})")
                shards = self.manifest["splits"][split]["shards"]
                paths = [str(mpath.parent / s["name"]) for s in shards]
                counts = [int(s["count"]) for s in shards]
            elif p.is_dir():
                raise DataError(f"{source}: no manifest.json (make shards with `python -m data_prep`)")
            else:
                paths = sorted(_glob.glob(str(source)))
                if not paths:
                    raise DataError(f"{source}: no such manifest, folder or shard files")
        missing = [q for q in paths if not os.path.isfile(q)]
        if missing:
            raise DataError(f"{missing[0]}: shard listed but missing ({len(missing)} missing)")
        self.paths = paths
        self._members: dict[int, list] = {}
        if self.manifest is None:
            counts = [len(self.members(i)) for i in range(len(paths))]
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.resolution = self.manifest.get("resolution") if self.manifest else None
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def members(self, s: int) -> list:
        if s not in self._members:
            self._members[s] = _scan_tar(self.paths[s])
            if self.manifest is not None and len(self._members[s]) != self.counts[s]:
                raise DataError(f"{self.paths[s]}: {len(self._members[s])} samples, manifest says {self.counts[s]}")
        return self._members[s]

    def locate(self, i: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return s, int(i - self.starts[s])

    def _file(self, s: int):
        if self._pid != os.getpid():  # forked into a DataLoader worker: own file handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(s)
        if f is None:
            if len(self._files) >= 64:  # bound the open descriptors
                self._files.pop(next(iter(self._files))).close()
            f = self._files[s] = open(self.paths[s], "rb")
        return f

    def read(self, i: int) -> tuple[str, str, str, bytes]:
        """(shard path, key, ext, bytes) of sample i."""
        s, j = self.locate(i)
        key, ext, off, size = self.members(s)[j]
        f = self._file(s)
        f.seek(off)
        data = f.read(size)
        if len(data) != size:
            raise DataError(f"{self.paths[s]}: member {key} truncated")
        return self.paths[s], key, ext, data

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}


class _Batches(torch.utils.data.Dataset):
    """dataset[(indices, flips)] -> (float32 [B, 3, H, W] in [-1, 1], [(shard, key, reason)])."""

    def __init__(self, shards: ShardSet):
        self.shards = shards

    def __len__(self):  # unused: the sampler drives the DataLoader
        return len(self.shards)

    def __getitem__(self, spec):
        indices, flips = spec
        imgs, bad = [], []
        res = self.shards.resolution
        for i, flip in zip(indices.tolist(), flips.tolist()):
            path, key = self.shards.paths[self.shards.locate(i)[0]], f"#{i}"
            try:
                path, key, ext, data = self.shards.read(i)
                x = decode_sample(ext, data)
                if x.shape[0] != 3 or (res is not None and tuple(x.shape[1:]) != (res, res)):
                    raise ValueError(f"shape {tuple(x.shape)}, expected (3, {res}, {res})")
                imgs.append(x.flip(-1) if flip else x)
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - any undecodable sample is skipped and reported
                imgs.append(None)
                bad.append((path, key, f"{type(e).__name__}: {e}"))
        good = [k for k, x in enumerate(imgs) if x is not None]
        if not good:
            raise DataError(f"{bad[0][0]}: every sample of a batch is corrupt (first: {bad[0][1]}: {bad[0][2]})")
        for k in range(len(imgs)):  # replace by the next decodable sample of the same batch (cyclic)
            if imgs[k] is None:
                later = [g for g in good if g > k]
                imgs[k] = imgs[later[0] if later else good[0]]
        # uint8 -> [-1, 1] (the paper scales images to [-1, 1]); done in the worker, in parallel.
        return torch.stack(imgs).float().div_(127.5).sub_(1.0), bad


class _Specs(torch.utils.data.Sampler):
    """Endless (indices, flips) for one rank, starting at global stream position `start`."""

    def __init__(self, loader: "TrainLoader", start: int):
        self.loader, self.start = loader, start

    def __iter__(self):
        L = self.loader
        p = self.start
        while True:
            lo = p + L.rank * L.batch_size
            yield L.stream(lo, lo + L.batch_size)
            p += L.global_batch


class TrainLoader:
    """Endless iterator of float32 [batch_size, 3, H, W] batches in [-1, 1] for one rank.

    See the module docstring for the order; `state_dict()` / `load_state_dict()` carry the
    global position, so a resumed run (also with another world size) reads what an
    uninterrupted run would have read next. Do not pass it through `accelerator.prepare()`."""

    def __init__(self, source, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 random_flip: bool = True, num_workers: int = 2, max_corrupt: int = 10,
                 split: str = "train", prefetch_factor: int = 2):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shards = ShardSet(source, split)
        self.num_samples = len(self.shards)
        if self.num_samples == 0:
            raise DataError(f"{source}: split {split!r} has no samples")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.global_batch = batch_size * world_size
        self.seed, self.random_flip = seed, random_flip
        self.num_workers, self.max_corrupt, self.prefetch_factor = num_workers, max_corrupt, prefetch_factor
        self.position = 0  # global samples consumed by the trainer (all ranks together)
        self.skipped = 0  # corrupt samples replaced on this rank (each occurrence)
        self.corrupt: dict[str, str] = {}  # "shard:key" -> reason, distinct
        self._perm_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._it = None
        self._dl = None

    # -- order ------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation of the N sample indices, flip bit per sample index) of one epoch."""
        if epoch not in self._perm_cache:
            if len(self._perm_cache) >= 2:
                self._perm_cache.pop(min(self._perm_cache))
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            flips = np.random.default_rng([self.seed, epoch, 1]).integers(0, 2, self.num_samples).astype(bool)
            self._perm_cache[epoch] = (perm, flips & self.random_flip)
        return self._perm_cache[epoch]

    def stream(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices, flips) at global stream positions [lo, hi)."""
        idx, flp = [], []
        j = lo
        while j < hi:
            e, k = divmod(j, self.num_samples)
            n = min(hi - j, self.num_samples - k)
            perm, flips = self.epoch_order(e)
            idx.append(perm[k:k + n])
            flp.append(flips[perm[k:k + n]])
            j += n
        return np.concatenate(idx), np.concatenate(flp)

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples

    # -- iteration --------------------------------------------------------------------------
    def _start(self):
        kw = dict(num_workers=self.num_workers)
        if self.num_workers > 0:
            kw.update(prefetch_factor=self.prefetch_factor, persistent_workers=False)
        self._dl = torch.utils.data.DataLoader(_Batches(self.shards), batch_size=None,
                                               sampler=_Specs(self, self.position), **kw)
        self._it = iter(self._dl)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._start()
        batch, bad = next(self._it)
        for path, key, reason in bad:
            self.skipped += 1
            self.corrupt.setdefault(f"{path}:{key}", reason)
            if len(self.corrupt) > self.max_corrupt:
                self.close()
                raise DataError(f"{path}: corrupt sample {key} ({reason}); {len(self.corrupt)} corrupt "
                                f"samples > max_corrupt={self.max_corrupt}")
        self.position += self.global_batch
        return batch

    def close(self):
        self._it = None  # the DataLoader iterator shuts its workers down when collected
        self._dl = None

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch,
                "sample_in_epoch": self.position % self.num_samples, "num_samples": self.num_samples,
                "seed": self.seed, "skipped": self.skipped, "corrupt": dict(self.corrupt)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise DataError(f"the saved loader state is for {state['num_samples']} samples, "
                            f"these shards hold {self.num_samples}")
        if state.get("seed", self.seed) != self.seed:
            raise DataError(f"the saved loader state has seed {state['seed']}, this loader {self.seed}")
        self.close()
        self.position = int(state["position"])
        self.skipped = int(state.get("skipped", 0))
        self.corrupt = dict(state.get("corrupt", {}))


def iter_split(source, split: str = "test", batch_size: int = 64, rank: int = 0, world_size: int = 1,
               with_keys: bool = False):
    """Each sample of `split` exactly once, in manifest order, as uint8 [b, 3, H, W] tensors
    (the last batch may be shorter). Rank r reads the contiguous block
    [N * r // W, N * (r + 1) // W), so ranks never overlap and nothing is padded.
    With `with_keys`, yields (images, keys). Corrupt samples raise DataError (eval needs all)."""
    shards = ShardSet(source, split)
    n = len(shards)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    for b in range(lo, hi, batch_size):
        imgs, keys = [], []
        for i in range(b, min(b + batch_size, hi)):
            path, key, ext, data = shards.read(i)
            try:
                imgs.append(decode_sample(ext, data))
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{path}: corrupt sample {key} ({type(e).__name__}: {e})") from None
            keys.append(key)
        x = torch.stack(imgs)
        yield (x, keys) if with_keys else x
