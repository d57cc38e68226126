"""One trainer per run folder: `RUN/.lock`, taken by the main process before it writes anything.

Two trainers on one run.output_dir would prune, set aside and overwrite each other's checkpoints.
The lock is an flock(2) on RUN/.lock, which the kernel drops when its holder dies however it
dies (SIGKILL, OOM, a node lost on a shared file system), so a dead holder never blocks a run;
the file's text names the holder (host, pid, start time) for the message a second trainer gets.
A file that names a holder but is not locked was left by a trainer that died: it is taken over
with a one-line notice. A clean exit removes it.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from pipeline.errors import UserError

LOCK_NAME = ".lock"
# resolved run folder -> (fd, pid): a second train() in one process re-uses its lock; a forked
# child (a data loader worker) that runs exit handlers must not remove its parent's lock.
_held: dict[str, tuple[int, int]] = {}


class RunLockedError(UserError):
    """run.output_dir cannot be held: in use by another trainer, or not a folder (exit 2)."""


def _holder(fd: int) -> str:
    """Who the lock file names, as a message says it; '' when it names nobody."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)  # bounded: the file is ours, but the folder may be anyone's
    try:
        d = json.loads(raw)
        return f"host {str(d['host'])[:64]}, pid {int(d['pid'])}, since {str(d['since'])[:32]}"
    except (ValueError, KeyError, TypeError):
        return "an unreadable holder" if raw.strip() else ""


def acquire(run_dir: str | os.PathLike, notice=print) -> None:
    """Hold RUN/.lock until this process exits; RunLockedError naming the holder when another
    live process holds it. `notice` gets the line about a stale lock taken over."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file under that name, a read-only parent
        raise RunLockedError(f"run.output_dir={run_dir}: cannot make the run folder ({e.strerror})") from None
    path = run_dir / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:  # a link or a folder under the lock's name, a read-only folder
            raise RunLockedError(f"{path}: cannot open the run folder's lock ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            os.close(fd)
            raise RunLockedError(f"run.output_dir={run_dir} is in use by another trainer ({who or 'starting'}; "
                                 f"lock {path}): wait for it to end, or choose another run.output_dir") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            notice(f"warning: {path}: this file system cannot lock files ({e.strerror}); "
                   "nothing stops a second trainer on this run folder")
            return
        # The holder before us may have removed the file between our open and our lock: then we
        # hold a file nobody else sees, so try again on the one that is there now.
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _holder(fd)
    if stale:
        notice(f"{path}: the trainer that held this run folder ({stale}) is gone; lock taken over")
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
    _held[key] = (fd, os.getpid())
    atexit.register(release, run_dir)


def release(run_dir: str | os.PathLike) -> None:
    """Remove RUN/.lock and drop the lock (the order matters: a waiter then finds no stale holder)."""
    key = str(Path(run_dir).resolve())
    if key not in _held or _held[key][1] != os.getpid():
        return
    fd, _ = _held.pop(key)
    try:
        os.unlink(Path(run_dir) / LOCK_NAME)
    except FileNotFoundError:
        pass
    os.close(fd)
