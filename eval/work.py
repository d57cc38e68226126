"""Work units of `eval sample`: every process draws an equal share of the missing samples.

The files stay what they were: chunk c holds samples [c*cs, (c+1)*cs) and exists only whole.
What is handed out is samples, not chunks. The samples still missing, in index order, are cut
into `world` contiguous shares that differ by at most one sample, so 128 samples on 2 processes
are 64 + 64 (not one 1000-sample chunk on rank 0 while rank 1 waits) and 50,000 on 512 GPUs are
97 or 98 each (not 50 chunks on 50 GPUs while 462 wait). A share that covers a whole chunk
writes the chunk; a piece of a chunk is written as a part, OUT/parts/part-LO-HI.npz (same
format, whole when it exists). When every process is done, the chunks whose parts are all there
are put together (spread over the processes) and their parts removed.

A sample depends only on (seed, index) (pipeline.rng.eval_seed), so who draws it does not
matter. A preempted job leaves whole chunks and whole parts; the next job, with any number of
processes, draws only what neither holds. Parts are checked like chunks (indices, checksum);
a damaged one is moved aside as `.bad` and its samples drawn again.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path

PART_RE = re.compile(r"part-(\d{9})-(\d{9})\.npz")

Ranges = list[tuple[int, int]]


def images_sha256(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def chunk_problem(path: Path, lo: int, hi: int, recorded: str | None = None) -> str | None:
    """Why the chunk (or part) file at `path` cannot count as samples [lo, hi), or None when it
    is whole: it must load, hold those indices, and match its own checksum (and samples.json's)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, indices = z["images"], z["indices"]
            sha = str(z["sha256"]) if "sha256" in z.files else None
    except Exception as e:  # a truncated or damaged zip: BadZipFile, EOFError, ValueError, KeyError...
        return f"unreadable ({type(e).__name__})"
    if indices.tolist() != list(range(lo, hi)) or len(images) != hi - lo:
        return f"holds {len(images)} samples / other indices, expected [{lo}, {hi})"
    got = images_sha256(images)
    for want in (sha, recorded):
        if want is not None and want != got:
            return "checksum mismatch"
    return None


def write_images(path: Path, images: np.ndarray, lo: int) -> None:
    """Samples [lo, lo + len(images)) to `path`, atomically: a file that exists is whole."""
    with atomic_path(path) as tmp:
        np.savez(tmp, images=images, indices=np.arange(lo, lo + len(images), dtype=np.int64),
                 sha256=images_sha256(images))


def split(ranges: Ranges, world: int) -> list[Ranges]:
    """The samples of `ranges` (sorted, disjoint) in index order, cut into `world` contiguous
    shares of n*r//W .. n*(r+1)//W samples; a range is cut where a share ends."""
    n = sum(hi - lo for lo, hi in ranges)
    shares: list[Ranges] = [[] for _ in range(world)]
    pos = 0  # samples of `ranges` before the current range
    for lo, hi in ranges:
        for r in range(world):
            a, b = max(n * r // world, pos), min(n * (r + 1) // world, pos + hi - lo)
            if a < b:
                shares[r].append((lo + a - pos, lo + b - pos))
        pos += hi - lo
    return shares


def part_path(out: Path, lo: int, hi: int) -> Path:
    return out / "parts" / f"part-{lo:09d}-{hi:09d}.npz"


def parts_of(out: Path, lo: int, hi: int) -> Ranges:
    """The ranges of the part files inside [lo, hi), sorted."""
    got = []
    for p in (out / "parts").glob("part-*.npz") if (out / "parts").is_dir() else ():
        m = PART_RE.fullmatch(p.name)
        if m and lo <= int(m[1]) < int(m[2]) <= hi:
            got.append((int(m[1]), int(m[2])))
    return sorted(got)


def _aside(path: Path, why: str) -> None:
    bad = path.with_name(f"{path.name}.bad")
    os.replace(path, bad)
    print(f"warning: {path}: {why}; moved to {bad.name} and drawn again", flush=True)


def missing(out: Path, chunks: dict[int, tuple[int, int]], done: set[int]) -> Ranges:
    """The samples still to draw, as sorted ranges each inside one chunk: the ranges of the
    `chunks` (c -> [lo, hi)) not in `done`, less their whole parts. Damaged parts are moved
    aside, parts of finished chunks (left by a job stopped while it tidied up) removed."""
    todo: Ranges = []
    for c, (lo, hi) in sorted(chunks.items()):
        at = lo
        for a, b in parts_of(out, lo, hi):
            path = part_path(out, a, b)
            if c in done:
                path.unlink(missing_ok=True)
                continue
            why = "overlaps another part" if a < at else chunk_problem(path, a, b)
            if why:
                _aside(path, why)
                continue
            if at < a:
                todo.append((at, a))
            at = b
        if c not in done and at < hi:
            todo.append((at, hi))
    return todo


def assemble(out: Path, chunk_file: Path, lo: int, hi: int) -> bool:
    """Write the chunk [lo, hi) from its parts when they cover it (then remove them); True if done."""
    parts = parts_of(out, lo, hi)
    at = lo
    for a, b in parts:
        if a != at:
            return False
        at = b
    if at != hi:
        return False
    images = []
    for a, b in parts:
        with np.load(part_path(out, a, b), allow_pickle=False) as z:
            images.append(z["images"])
    write_images(chunk_file, np.concatenate(images), lo)
    for a, b in parts:  # after the chunk exists: a job stopped here leaves parts that `missing` removes
        part_path(out, a, b).unlink(missing_ok=True)
    return True


def gather_share(local: np.ndarray, n: int, device="cpu") -> np.ndarray:
    """All n items on every process, in order, from each process's contiguous share
    (`eval.features.share`: rank r holds items [n*r//W, n*(r+1)//W)). For work split by item
    whose result needs all of them (Fig. 10 scores every step's images with `eval fid`'s code,
    which splits the features again)."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    world = torch.distributed.get_world_size()
    sizes = [n * (r + 1) // world - n * r // world for r in range(world)]
    pad = torch.zeros((max(sizes), *local.shape[1:]), dtype=torch.uint8, device=device)
    pad[: len(local)] = torch.from_numpy(local)
    got = [torch.empty_like(pad) for _ in range(world)]
    torch.distributed.all_gather(got, pad)
    return torch.cat([g[:s] for g, s in zip(got, sizes)]).cpu().numpy()
