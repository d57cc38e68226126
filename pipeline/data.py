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
  every data set but LSUN Bedroom, App. B), so it survives resume and does not depend on worker count.
- DataLoader workers receive whole batches (index lists) in order, so `num_workers` never
  changes the result; the position (`state_dict()["position"]`, global samples consumed)
  advances only when a batch is handed to the trainer, so prefetching does not shift it.
- `draw` (the trainer passes pipeline.diffusion.NoiseDraw): the workers also draw each sample's
  t and eps of Algorithm 1 from its global stream position, on CPU, off the training step's
  critical path; a batch is then (x0, t, eps), pinned for a non-blocking copy when asked.

Corrupt samples: an undecodable member is replaced, inside its batch, by the next decodable
sample of the same batch (cyclically), so batch shapes stay fixed and the order of the
other samples is unchanged. Each replacement is counted in `loader.skipped`; once more than
`max_corrupt` distinct samples were corrupt the loader raises DataError naming shard and key.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import io
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import remote_shards
from pipeline.errors import UserError
from pipeline.manifest import ManifestError, read_manifest

__all__ = ["DataError", "ShardSet", "TrainLoader", "iter_split", "decode_sample", "DECODERS"]


class DataError(UserError):
    """Bad shard source, or too many corrupt samples."""


DECODERS = ("pil", "torchvision")


def decode_hwc(ext: str, data: bytes, decoder: str = "pil") -> np.ndarray:
    """Stored sample bytes -> uint8 [H, W, 3] (a view where possible). `decoder` picks the
    PNG/JPEG decoder: Pillow (default) or torchvision.io (libpng / libjpeg-turbo; deprecated
    since torchvision 0.29, and not faster here: bench/RESULTS.md)."""
    if ext == "npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"npy sample has dtype {arr.dtype} shape {arr.shape}, expected uint8 [H, W, 3]")
        return arr
    if decoder == "torchvision":
        # Imported here: torchvision takes seconds to import, and only this decoder needs it.
        from torchvision.io import ImageReadMode, decode_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            x = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return x.permute(1, 2, 0).numpy()
    img = Image.open(io.BytesIO(data))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def decode_sample(ext: str, data: bytes, decoder: str = "pil") -> torch.Tensor:
    """Stored sample bytes -> uint8 [3, H, W] (contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(decode_hwc(ext, data, decoder).transpose(2, 0, 1)))


IMAGE_EXTS = ("npy", "png", "jpg", "jpeg", "webp", "ppm", "bmp")


class _Members:
    """The samples of one tar: data offset, size and extension of each sample's image member.
    Numpy arrays, not Python tuples: every DataLoader worker holds the tables of all shards."""

    def __init__(self, path: str):
        try:
            keys, exts, offs, sizes = scan_tar(path)
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None
        self.exts = sorted(set(exts))
        self.ext_code = np.asarray([self.exts.index(e) for e in exts], dtype=np.uint8)
        self.offsets, self.sizes = np.asarray(offs, dtype=np.int64), np.asarray(sizes, dtype=np.int64)

    def __len__(self):
        return len(self.offsets)


def scan_tar(path: str) -> tuple[list[str], list[str], list[int], list[int]]:
    """(keys, exts, data offsets, sizes) of the samples of a WebDataset tar, from its headers.
    As in WebDataset, a sample is the run of consecutive members sharing the name up to the
    first dot of the file name; its image member (npy/png/jpg/...) is the one read."""
    keys, exts, offs, sizes = [], [], [], []
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            d, _, base = m.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key, ext = (f"{d}/{stem}" if d else stem), ext.lower()
            if ext not in IMAGE_EXTS or (keys and keys[-1] == key):
                continue  # labels, json, ... or a second image of the same sample
            keys.append(key)
            exts.append(ext)
            offs.append(m.offset_data)
            sizes.append(m.size)
    return keys, exts, offs, sizes


class ShardSet:
    """The samples of one split as one indexable sequence: sample i -> (shard, key, bytes).

    `source` is a data_prep output folder (or its manifest.json), a glob pattern of tar files,
    or a list of tar paths. With a manifest, per-shard counts come from it and a shard's member
    table is read from its tar headers on first use (per process)."""

    def __init__(self, source, split: str = "train"):
        self.manifest = None
        if isinstance(source, str) and remote_shards.is_remote(source):  # a Hub repo / URL: a verified local copy
            source = remote_shards.local_shards(source, count_samples=lambda p: len(scan_tar(p)[0]))
        if isinstance(source, (list, tuple)):
            paths = [str(p) for p in source]
        else:
            p = Path(source)
            mpath = p / "manifest.json" if p.is_dir() else p
            if mpath.is_file() and mpath.suffix == ".json":
                try:  # checked: types, counts, plain shard names (pipeline/manifest.py)
                    self.manifest = read_manifest(mpath)
                except ManifestError as e:
                    raise DataError(str(e)) from None
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
        self._members: dict[int, _Members] = {}
        self._broken: dict[int, str] = {}  # shard -> why it cannot be read
        self._keys: tuple[int, list[str]] = (-1, [])
        if self.manifest is None:
            counts = [len(self.members(i)) for i in range(len(paths))]
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self.resolution = self.manifest.get("resolution") if self.manifest else None
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def members(self, s: int) -> _Members:
        if s in self._broken:  # found unreadable once: every later sample of it fails fast
            raise DataError(self._broken[s])
        if s not in self._members:
            try:
                m = _Members(self.paths[s])
                if self.manifest is not None and len(m) != self.counts[s]:
                    raise DataError(f"{self.paths[s]}: {len(m)} samples, manifest says {self.counts[s]} (truncated?)")
            except DataError as e:
                self._broken[s] = str(e)
                raise
            self._members[s] = m
        return self._members[s]

    def safe_key(self, i: int) -> str:
        """key(i), or `#j` (its place in the shard) when the shard cannot be read."""
        try:
            return self.key(i)
        except (DataError, tarfile.TarError, OSError):
            return f"#{self.locate(i)[1]}"

    def keys(self, s: int) -> list[str]:
        """The sample keys of shard s (read again from the tar: only error messages and eval need them)."""
        if self._keys[0] != s:
            self._keys = (s, scan_tar(self.paths[s])[0])
        return self._keys[1]

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

    def read(self, i: int) -> tuple[str, str, bytes]:
        """(shard path, ext, bytes) of sample i."""
        s, j = self.locate(i)
        m = self.members(s)
        f = self._file(s)
        f.seek(int(m.offsets[j]))
        data = f.read(int(m.sizes[j]))
        if len(data) != m.sizes[j]:
            raise DataError(f"{self.paths[s]}: sample {self.key(i)} truncated")
        return self.paths[s], m.exts[m.ext_code[j]], data

    def key(self, i: int) -> str:
        s, j = self.locate(i)
        return self.keys(s)[j]

    def __getstate__(self):
        return {**self.__dict__, "_files": {}, "_keys": (-1, [])}


class _Batches(torch.utils.data.Dataset):
    """dataset[(indices, flips)] -> (batch [B, 3, H, W], [(shard, key, reason)]): float32 in
    [-1, 1], or uint8 in [0, 255] with `to_float=False`."""

    def __init__(self, shards: ShardSet, decoder: str = "pil", to_float: bool = True, draw=None):
        self.shards, self.decoder, self.to_float, self.draw = shards, decoder, to_float, draw

    def __len__(self):  # unused: the sampler drives the DataLoader
        return len(self.shards)

    def __getitem__(self, spec):
        indices, flips, lo = spec  # lo: the global stream position of the first sample
        imgs, bad = [], []
        res = self.shards.resolution
        for i in indices.tolist():
            path = self.shards.paths[self.shards.locate(i)[0]]
            try:
                path, ext, data = self.shards.read(i)
                x = decode_hwc(ext, data, self.decoder)
                if x.ndim != 3 or x.shape[2] != 3 or (res is not None and x.shape[:2] != (res, res)):
                    raise ValueError(f"shape {x.shape}, expected ({res}, {res}, 3)")
                if imgs and imgs[0] is not None and x.shape != imgs[0].shape:
                    raise ValueError(f"shape {x.shape} differs from the batch's {imgs[0].shape}")
                imgs.append(x)
            except Exception as e:  # an undecodable sample or unreadable shard is skipped and reported
                imgs.append(None)
                bad.append((path, self.shards.safe_key(i), f"{type(e).__name__}: {str(e)[:200]}"))
        good = [k for k, x in enumerate(imgs) if x is not None]
        if not good:
            raise DataError(f"{bad[0][0]}: every sample of a batch is corrupt (first: {bad[0][1]}: {bad[0][2]})")
        h, w, _ = imgs[good[0]].shape
        u = np.empty((len(imgs), 3, h, w), dtype=np.uint8)
        for k, (x, flip) in enumerate(zip(imgs, flips.tolist())):
            if x is None:  # replace by the next decodable sample of the same batch (cyclic)
                later = [g for g in good if g > k]
                x = imgs[later[0] if later else good[0]]
            u[k] = (x[:, ::-1] if flip else x).transpose(2, 0, 1)  # HWC -> CHW, mirrored if flipped
        out = torch.from_numpy(u)
        if self.to_float:
            # [0, 255] -> [-1, 1] (the paper scales images to [-1, 1]); in the worker, in parallel.
            out = out.float().div_(127.5).sub_(1.0)
        if self.draw is not None:  # per-sample draws of the positions [lo, lo + B), in the worker
            out = (out, *self.draw(range(lo, lo + len(indices)), out))
        return out, bad


class EpochOrder:
    """The global sample stream: per-epoch seeded permutations of N indices and flip bits."""

    def __init__(self, num_samples: int, seed: int, random_flip: bool):
        self.n, self.seed, self.random_flip = num_samples, seed, random_flip
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation of the N sample indices, flip bit per sample index) of epoch e."""
        if e not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            perm = np.random.default_rng([self.seed, e]).permutation(self.n)
            flips = np.random.default_rng([self.seed, e, 1]).integers(0, 2, self.n).astype(bool)
            self._cache[e] = (perm, flips & self.random_flip)
        return self._cache[e]

    def stream(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices, flips) at global stream positions [lo, hi)."""
        idx, flp = [], []
        j = lo
        while j < hi:
            e, k = divmod(j, self.n)
            m = min(hi - j, self.n - k)
            perm, flips = self.epoch(e)
            idx.append(perm[k:k + m])
            flp.append(flips[perm[k:k + m]])
            j += m
        return np.concatenate(idx), np.concatenate(flp)


class _Specs(torch.utils.data.Sampler):
    """Endless (indices, flips) for one rank, starting at global stream position `start`.
    (Holds the order, not the loader: no reference cycle, so a dropped loader's workers stop at once.)"""

    def __init__(self, order: EpochOrder, start: int, rank: int, batch_size: int, world_size: int):
        self.order, self.start, self.rank, self.b, self.g = order, start, rank, batch_size, batch_size * world_size

    def __iter__(self):
        p = self.start
        while True:
            lo = p + self.rank * self.b
            yield (*self.order.stream(lo, lo + self.b), lo)
            p += self.g


class TrainLoader:
    """Endless iterator of float32 [batch_size, 3, H, W] batches in [-1, 1] for one rank.

    source: a data_prep folder / manifest.json (or a tar glob pattern or list); batch_size: per
    rank; seed: the data order and flips; random_flip: off for LSUN Bedroom (App. B); num_workers: DataLoader
    processes (never changes the result); max_corrupt: distinct corrupt samples tolerated.
    Extras: split ("train"), decoder ("pil" | "torchvision"), dtype (torch.uint8 yields [0, 255]
    uint8, 4x less to move between processes and to the GPU; scale there with x / 127.5 - 1),
    pin_memory, prefetch_factor, draw (a picklable `draw(positions, x0) -> tensors` run in the
    workers; batches are then tuples (x0, *draws)).
    See the module docstring for the order; `state_dict()` / `load_state_dict()` carry the
    global position, so a resumed run (also with another world size) reads what an
    uninterrupted run would have read next. Do not pass it through `accelerator.prepare()`."""

    def __init__(self, source, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 random_flip: bool = True, num_workers: int = 2, max_corrupt: int = 10,
                 split: str = "train", prefetch_factor: int = 2, decoder: str = "pil",
                 dtype: torch.dtype = torch.float32, pin_memory: bool = False, draw=None):
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
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        self.num_workers, self.max_corrupt, self.prefetch_factor = num_workers, max_corrupt, prefetch_factor
        if dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"dtype must be torch.float32 ([-1, 1]) or torch.uint8 ([0, 255]), got {dtype}")
        self.decoder, self.dtype, self.pin_memory, self.draw = decoder, dtype, pin_memory, draw
        self.position = 0  # global samples consumed by the trainer (all ranks together)
        self.skipped = 0  # corrupt samples replaced on this rank (each occurrence)
        self.corrupt: dict[str, str] = {}  # "shard:key" -> reason, distinct
        self.order = EpochOrder(self.num_samples, seed, random_flip)
        self._it = None
        self._dl = None

    def stream(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices, flips) at global stream positions [lo, hi)."""
        return self.order.stream(lo, hi)

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples

    # -- iteration --------------------------------------------------------------------------
    def _start(self):
        kw = dict(num_workers=self.num_workers, pin_memory=self.pin_memory)
        if self.num_workers > 0:
            kw.update(prefetch_factor=self.prefetch_factor, persistent_workers=False)
        self._dl = torch.utils.data.DataLoader(_Batches(self.shards, self.decoder, self.dtype == torch.float32, self.draw),
                                               batch_size=None,
                                               sampler=_Specs(self.order, self.position, self.rank, self.batch_size,
                                                              self.world_size), **kw)
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
            # In the training log as it happens, not only in trainer_state.json.
            print(f"data (rank {self.rank}): corrupt sample {key} in {path} replaced ({reason}); "
                  f"{len(self.corrupt)} distinct so far, max_corrupt={self.max_corrupt}", flush=True)
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
    def fingerprint(self) -> str | None:
        """What tells one data set from another of the same size, cheaply: the bytes of the first
        and the last training sample (two reads, whatever the data set's size). The same shards,
        local or fetched, give the same value. None when either cannot be read (a damaged shard
        is the corrupt-sample rule's business, not a reason to refuse a resume)."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256(str(self.num_samples).encode())
            try:
                for i in sorted({0, self.num_samples - 1}):
                    _, ext, data = self.shards.read(i)
                    h.update(ext.encode() + b"\0" + data)
                self._fingerprint = h.hexdigest()[:16]
            except (OSError, tarfile.TarError, DataError):
                self._fingerprint = None
        return self._fingerprint

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch,
                "sample_in_epoch": self.position % self.num_samples, "num_samples": self.num_samples,
                "seed": self.seed, "skipped": self.skipped, "corrupt": dict(self.corrupt),
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise DataError(f"the saved loader state is for {state['num_samples']} samples, "
                            f"these shards hold {self.num_samples}")
        saved, mine = state.get("fingerprint"), self.fingerprint()
        if saved and mine and saved != mine:  # checkpoints from before the fingerprint carry none
            raise DataError(f"the saved loader state is for another data set of {self.num_samples} samples "
                            f"(fingerprint {saved}, these shards {mine}: their first or last training sample "
                            "differs); resume with the shards it was trained on, or use a new run.output_dir")
        if state.get("seed", self.seed) != self.seed:
            raise DataError(f"the saved loader state has seed {state['seed']}, this loader {self.seed}")
        self.close()
        self.position = int(state["position"])
        self.skipped = int(state.get("skipped", 0))
        self.corrupt = dict(state.get("corrupt", {}))


def split_share(source, split: str = "test", rank: int = 0, world_size: int = 1, limit: int | None = None) -> int:
    """How many samples `iter_split` gives rank `rank` (a progress bar's total)."""
    n = len(ShardSet(source, split))
    n = n if limit is None else min(limit, n)
    return n * (rank + 1) // world_size - n * rank // world_size


def iter_split(source, split: str = "test", batch_size: int = 64, rank: int = 0, world_size: int = 1,
               with_keys: bool = False, limit: int | None = None):
    """Each sample of `split` exactly once, in manifest order, as uint8 [b, 3, H, W] tensors
    (the last batch may be shorter). Rank r reads the contiguous block
    [N * r // W, N * (r + 1) // W), so ranks never overlap and nothing is padded.
    With `with_keys`, yields (images, keys). Corrupt samples raise DataError (eval needs all).
    With `limit`, only the first `limit` samples in shard order count as the split."""
    shards = ShardSet(source, split)
    n = len(shards) if limit is None else min(limit, len(shards))
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    for b in range(lo, hi, batch_size):
        imgs, keys = [], []
        for i in range(b, min(b + batch_size, hi)):
            path, ext, data = shards.read(i)
            try:
                imgs.append(decode_sample(ext, data))
            except Exception as e:
                raise DataError(f"{path}: corrupt sample {shards.key(i)} ({type(e).__name__}: {e})") from None
            if with_keys:
                keys.append(shards.key(i))
        x = torch.stack(imgs)
        yield (x, keys) if with_keys else x
