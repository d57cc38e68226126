"""File names that an untrusted file gives for other files: a shard in manifest.json, an entry
of checksums.json or of a checkpoint's trainer_state.json. Such a name is joined to the folder
the listing lives in, so it must never lead out of it (`/etc/passwd`, `../x`, `C:\\x`), on read,
write, fetch or upload. One rule for every listing; torch-free (the Slurm job and data_prep use it).
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_NAME = 1024  # characters: a listing names files, not blobs


def name_problem(name, *, subfolders: bool = False) -> str | None:
    """None when `name` is a relative name inside its folder, else why not (a short phrase).
    `subfolders`: `a/b` is allowed (a checkpoint's accelerate/ files); else a plain file name."""
    if not isinstance(name, str) or not name:
        return "is not a non-empty string"
    if len(name) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    if "\0" in name or "\\" in name:
        return "holds a NUL or a backslash"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' part"
    if len(parts) > 1 and not subfolders:
        return "names a sub-folder: a plain file name is expected"
    return None


def shown(name) -> str:
    """The name as a message shows it: bounded, quoted."""
    return repr(str(name)[:80])


def inside(folder: str | os.PathLike, name: str, *, subfolders: bool = False) -> Path:
    """folder / name, once `name_problem` accepts it (ValueError naming the problem otherwise)."""
    why = name_problem(name, subfolders=subfolders)
    if why:
        raise ValueError(f"{shown(name)} {why}")
    return Path(folder) / name
