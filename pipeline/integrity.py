"""Checksums of a checkpoint's files: recorded when it is written, verified on resume and load.

`trainer_state.json`, the file that marks a checkpoint whole, lists every other file of the
checkpoint with its size and sha256 (`"files"`). `damage(ckpt)` re-reads them and names the
first file that is missing, truncated or altered, so that resume can fall back to the previous
complete checkpoint instead of loading garbage (or dying with a traceback in torch.load).
Hashing runs at disk speed (~1 GB/s): about a second for a 113M-parameter checkpoint with its
Adam state. No torch here: the Slurm job and the Hub loader read checkpoints without it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

from pipeline.safe_names import name_problem, shown

STATE_FILE = "trainer_state.json"
REQUIRED = ("model.safetensors", "ema.safetensors", "config.yaml")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (checkpoints do not fit in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digests(folder: str | os.PathLike) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `folder` but trainer_state.json."""
    folder = Path(folder)
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in sorted(files):
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            if rel != STATE_FILE:
                out[rel] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    return dict(sorted(out.items()))


def damage(ckpt: str | os.PathLike, missing_ok: bool = False) -> str | None:
    """None if the checkpoint is whole and unaltered, else why not (one short phrase).
    `missing_ok` (loading a model, which needs only some files): a listed file that is absent is
    not damage, one that is present must match its checksum."""
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / STATE_FILE).read_bytes())
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({type(e).__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} has no step"
    files = state.get("files")
    if files is None:  # written before checksums were recorded: only what can be seen
        missing = [n for n in REQUIRED if not (ckpt / n).is_file()]
        return f"{missing[0]} is missing" if missing and not missing_ok else None
    if not isinstance(files, dict):
        return f"{STATE_FILE}: 'files' is not a mapping"
    for name in REQUIRED:
        if name not in files:
            return f"{name} is not listed in {STATE_FILE}"
    for rel, rec in files.items():
        why = name_problem(rel, subfolders=True) or (None if isinstance(rec, dict) else "has no record")
        if why:  # a name out of the checkpoint would be hashed (read) wherever it points
            return f"{STATE_FILE} lists a bad file entry: {shown(rel)} {why}"
        p = ckpt / rel
        if not p.is_file():
            if missing_ok:
                continue
            return f"{rel[:100]} is missing"
        size = p.stat().st_size
        if size != rec.get("bytes"):
            return f"{rel[:100]} has {size} bytes, {rec.get('bytes')} were written (truncated?)"
        if file_sha256(p) != rec.get("sha256"):
            return f"{rel[:100]} does not match its sha256 (corrupt)"
    return None


# What a write that ran out of space raises, from Python (OSError), safetensors (Rust io::Error
# text) or torch.save (PytorchStreamWriter, no errno): ENOSPC, EDQUOT, and EFBIG (a file-size limit).
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_TEXT = re.compile(r"No space left|Disk quota|File too large|os error (28|27|122)|code: (28|27|122)"
                        r"|file write failed|FileTooLarge|StorageFull", re.I)


def is_disk_full(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if _FULL_TEXT.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False
