"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer goes through here: write a temporary file in the same directory, then
`os.replace` it onto the target (atomic on POSIX). `fsync=True` also flushes the data and the
directory entry to disk, for files whose loss on power failure would cost work (checkpoints,
manifests); the others only need to be whole.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that pick a format by
    extension still do); on success it replaces `path`, on error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
        if fsync:
            fsync_path(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files that writers killed mid-write left in `folder` (run this
    before writing there again: each writer's temporary name holds its process id)."""
    for f in Path(folder).glob(".*.tmp-*"):
        if f.is_file():
            f.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any, fsync: bool = False, indent: int | None = 2) -> None:
    """JSON with a trailing newline."""
    write_text(path, json.dumps(obj, indent=indent) + "\n", fsync)
