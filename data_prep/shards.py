"""Plan, write and resume WebDataset tar shards; write manifest.json.

The plan is a pure function of the input keys and the options: the train/test split comes
from a hash of each key (or from the source, for CIFAR-10) and each split is cut into
shards of `shard_size` inputs in source order. Workers only decode and encode; the main
process writes the shards in plan order, so the output bytes do not depend on `--workers`.

Crash safety: a shard is written beside its final name and renamed into place when whole
(pipeline.atomic), then its record `.prep/NAME.json` (count, skipped inputs) is written the
same way. On a re-run, a shard with a record is complete and kept; anything else is rewritten,
and the temporary files of a killed run are removed. manifest.json is written last.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import multiprocessing as mp
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep.preprocess import DEFAULT_FORMAT, PNG_LEVEL, Refused, TooSmall, center_crop_resize, encode, process_bytes
from data_prep.sources import PrepError
from pipeline.atomic import atomic_path, remove_temporaries, write_json

TOOL = "ddpm-pipeline data_prep 1"
SPLITS = ("train", "test")


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")


def assign_splits(items, test_count: int | None = None, test_fraction: float = 0.0, usable=None) -> dict:
    """{'train': [...], 'test': [...]}, source order kept. Items whose split the source fixes keep
    it; others go to test by key hash (the `test_count` smallest hashes, or hash < fraction).
    `usable(key)`: whether an input will make a sample; with it, `test_count` counts usable inputs
    only, so a skipped input does not leave the test split one short (it goes to train, where
    it is skipped and recorded)."""
    free = [it for it in items if it[1] is None]
    if test_count is not None:
        test = set()
        for _, k in sorted((key_hash(k), k) for k, _, _ in free):
            if len(test) >= test_count:
                break
            if usable is None or usable(k):
                test.add(k)
    else:
        cut = int(test_fraction * 2**64)
        test = {k for k, _, _ in free if key_hash(k) < cut}
    out = {s: [] for s in SPLITS}
    for it in items:
        out[it[1] or ("test" if it[0] in test else "train")].append(it)
    return out


def make_plan(splits: dict, shard_size: int) -> list[tuple[str, str, list]]:
    """[(shard name, split, items)] in write order."""
    plan = []
    for split in SPLITS:
        its = splits[split]
        for i in range(0, len(its), shard_size):
            plan.append((f"{split}-{i // shard_size:06d}.tar", split, its[i:i + shard_size]))
    return plan


def plan_digest(plan, options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for name, _, its in plan:
        h.update(name.encode())
        for key, _, _ in its:
            h.update(b"\0" + key.encode())
    return h.hexdigest()


def write_record(path: Path, obj) -> None:
    """plan.json, a shard's record, manifest.json: fsynced, since each one vouches for finished work."""
    write_json(path, obj, fsync=True, indent=1)


# -- workers -----------------------------------------------------------------------------------
_W: dict = {}


def _init_worker(source, resolution, fmt, quality, allow_upscale, png_level):
    _W.update(source=source, res=resolution, fmt=fmt, q=quality, up=allow_upscale, lvl=png_level)


def _work(task):
    """(key, payload) -> (key, sample bytes or None, skip reason or None). Never raises on bad input."""
    key, payload = task
    try:
        raw = _W["source"].read(payload)
        if isinstance(raw, np.ndarray):  # CIFAR-10: already pixels
            if raw.shape[0] == raw.shape[1] == _W["res"]:
                return key, encode(raw, _W["fmt"], _W["q"], _W["lvl"]), None
            img = center_crop_resize(Image.fromarray(raw), _W["res"], _W["up"])
            return key, encode(img, _W["fmt"], _W["q"], _W["lvl"]), None
        return key, process_bytes(raw, _W["res"], _W["fmt"], _W["q"], _W["up"], _W["lvl"]), None
    except (TooSmall, Refused) as e:
        return key, None, str(e)[:300]
    except Exception as e:  # a corrupt input never stops the run; it is recorded
        msg = re.sub(r" <[^>]* at 0x[0-9a-f]+>", "", str(e)) or type(e).__name__  # no memory addresses
        kind = "truncated file" if "truncated" in msg.lower() else "undecodable bytes"
        return key, None, f"{kind}: {type(e).__name__}: {msg[:300]}"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, 0, 0o644, "", ""
    return ti


def write_shard(path: Path, samples) -> int:
    """Write [(key, ext, bytes)] to `path` atomically (fsynced, renamed when whole); returns its size."""
    with atomic_path(path, fsync=True) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, ext, data in samples:
            tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
    return path.stat().st_size


def _check_output(out: Path, digest: str, describe: dict) -> dict | None:
    """The finished manifest if `out` already holds this exact data set; PrepError if another."""
    for f in (out / "manifest.json", out / ".prep" / "plan.json"):
        if f.is_file():
            try:
                old = json.loads(f.read_text())
            except ValueError:
                raise PrepError(f"{f}: unreadable; {out} does not look like a data_prep output") from None
            if old.get("plan_digest") != digest:
                diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in describe.items() if old.get(k) != v]
                raise PrepError(f"{out} holds a different data set ({'; '.join(diff) or 'other inputs'}); "
                                f"use another --out or delete it")
            return old if f.name == "manifest.json" else None  # complete, or resumable
    if any(out.glob("*.tar")):
        raise PrepError(f"{out} holds tar files that data_prep did not plan; use another --out")
    return None


def prepare(source, out, *, resolution: int, fmt: str = DEFAULT_FORMAT, quality: int = 95,
            allow_upscale: bool = False, png_level: int = PNG_LEVEL, test_count: int | None = None, test_fraction: float = 0.0,
            shard_size: int = 1000, workers: int = 1, limit: int | None = None,
            command: list[str] | None = None, progress: bool = True) -> dict:
    """Turn `source` (see data_prep.sources) into shards + manifest.json under `out`; returns the
    manifest. Idempotent: a complete output is left alone, a partial one is finished."""
    out = Path(out)
    items = source.items(limit)
    keys = [k for k, _, _ in items]
    if len(set(keys)) != len(keys):  # two samples under one key: the loader would see one of them
        dup = next(k for k in keys if keys.count(k) > 1)
        raise PrepError(f"{source.path}: two inputs map to the key {dup[:100]!r}; nothing written")
    init = (source, resolution, fmt, quality, allow_upscale, png_level)
    usable = None
    if test_count:  # the test candidates are decoded once here, in hash order, until enough are good
        payloads = {k: payload for k, split, payload in items if split is None}
        _init_worker(*init)
        usable = lambda k: _work((k, payloads[k]))[1] is not None
    try:
        splits = assign_splits(items, test_count, test_fraction, usable)
    finally:
        _W.clear()
        if usable is not None and hasattr(source, "close"):
            source.close()  # reopened by whichever process reads next (one LMDB environment per process)
    if not splits["train"]:
        raise PrepError(f"{source.path}: all {len(items)} inputs went to the test split; nothing left to "
                        "train on (lower --test-count / --test-fraction)")
    plan = make_plan(splits, shard_size)
    describe = {"dataset": source.kind, "source": str(source.path), "resolution": resolution,
                "format": fmt, "quality": quality if fmt == "jpg" else None,
                "png_level": png_level if fmt == "png" else None,
                "allow_upscale": allow_upscale, "shard_size": shard_size, "limit": limit,
                "test_count": test_count, "test_fraction": None if test_count is not None else test_fraction}
    digest = plan_digest(plan, describe)
    out.mkdir(parents=True, exist_ok=True)
    done = _check_output(out, digest, describe)
    if done is not None:
        if progress:
            print(f"{out}: already complete (manifest.json matches these inputs and options); nothing to do",
                  file=sys.stderr)
        return done
    (out / ".prep").mkdir(exist_ok=True)
    for d in (out, out / ".prep"):  # what a killed run left half-written
        remove_temporaries(d)
    write_record(out / ".prep" / "plan.json", {**describe, "plan_digest": digest})

    def record(name):
        r = out / ".prep" / f"{name}.json"
        if r.is_file() and (out / name).is_file():
            rec = json.loads(r.read_text())
            if rec.get("bytes") == (out / name).stat().st_size:
                return rec
        return None

    pending = [sh for sh in plan if record(sh[0]) is None]
    tasks = ((key, payload) for _, _, its in pending for key, _, payload in its)
    total = sum(len(its) for _, _, its in pending)
    pool = None
    if workers > 1 and total:
        pool = mp.get_context("fork").Pool(workers, _init_worker, init)
        results = pool.imap(_work, tasks, chunksize=16)
    else:
        _init_worker(*init)
        results = map(_work, tasks)
    bar = tqdm(total=total, unit="img", desc=f"data_prep {source.kind}", disable=not progress or not total)
    ext = {"png": "png", "jpg": "jpg", "npy": "npy"}[fmt]
    try:
        for name, split, its in pending:
            samples, skipped = [], []
            for _ in its:
                key, data, reason = next(results)
                bar.update(1)
                if data is None:
                    skipped.append({"key": key, "split": split, "shard": name, "reason": reason})
                else:
                    samples.append((key, ext, data))
            size = write_shard(out / name, samples)
            write_record(out / ".prep" / f"{name}.json",
                         {"name": name, "split": split, "count": len(samples), "bytes": size, "skipped": skipped})
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        _W.clear()
        if hasattr(source, "close"):
            source.close()  # py-lmdb allows one open environment per path and process

    records = [record(name) for name, _, _ in plan]
    if not sum(r["count"] for r in records if r["split"] == "train"):
        first = next((sk for r in records for sk in r["skipped"] if sk["split"] == "train"), None)
        why = f" (first: {first['key'][:100]}: {first['reason']})" if first else ""
        raise PrepError(f"{out}: 0 training samples: every train input was skipped{why}; no manifest.json written")
    manifest = {
        **describe, "tool": TOOL, "plan_digest": digest, "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": len(items),
        "splits": {s: {"count": sum(r["count"] for r in records if r["split"] == s),
                       "shards": [{"name": r["name"], "count": r["count"]} for r in records if r["split"] == s]}
                   for s in SPLITS},
        "skipped": [sk for r in records for sk in r["skipped"]],
    }
    write_record(out / "manifest.json", manifest)
    return manifest
