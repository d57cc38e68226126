"""manifest.json of a shard folder, read as untrusted input: every value the loader and the
trainer use is checked for type and range before use, with one line naming the key."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pipeline.errors import UserError
from pipeline.safe_names import name_problem, shown

MAX_BYTES = 256 << 20  # a manifest lists shards and skipped inputs: megabytes, never gigabytes
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.tar")  # a plain file name beside the manifest


class ManifestError(UserError):
    """A manifest.json that is not what data_prep writes."""


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_manifest(path: str | os.PathLike, label: str | None = None) -> dict:
    """The checked manifest: `splits` maps split names to {count, shards: [{name, count}]} whose
    counts add up, shard names are plain file names in its folder, `resolution` a positive int.
    `label`: how messages name the manifest (a fetched copy: its source, not the cache path)."""
    path = Path(path)
    shown_path = label or path
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ManifestError(f"{shown_path}: {size} bytes; a manifest is at most {MAX_BYTES}")
    try:
        m = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"{shown_path}: unreadable manifest ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{shown_path}: a manifest is a JSON object, got {type(m).__name__}")
    res = m.get("resolution")
    if res is not None and not (_count(res) and res >= 1):
        raise ManifestError(f"{shown_path}: resolution: expected a positive integer, got {str(res)[:40]}")
    splits = m.get("splits")
    if not isinstance(splits, dict):
        raise ManifestError(f"{shown_path}: splits: expected an object of splits, got {type(splits).__name__}")
    for split, sp in splits.items():
        where = f"{shown_path}: splits.{str(split)[:40]}"
        if not isinstance(sp, dict) or not isinstance(sp.get("shards"), list) or not _count(sp.get("count")):
            raise ManifestError(f"{where}: expected {{count: int >= 0, shards: [...]}}")
        for i, sh in enumerate(sp["shards"]):
            if not isinstance(sh, dict) or not _count(sh.get("count")):
                raise ManifestError(f"{where}.shards[{i}]: expected {{name, count: int >= 0}}")
            name = sh.get("name")
            why = name_problem(name) or (None if SHARD_NAME.fullmatch(name) else "other characters")
            if why:
                raise ManifestError(f"{where}.shards[{i}].name: {shown(name)} is not a plain .tar file name in "
                                    f"the manifest's folder ({why})")
        total = sum(sh["count"] for sh in sp["shards"])
        if total != sp["count"]:
            raise ManifestError(f"{where}.count: {sp['count']}, but its shards hold {total}")
    return m

