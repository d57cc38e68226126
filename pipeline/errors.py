"""Exit codes and user errors: one base class, one line on stderr, exit code 2.

Every error that a user can fix (a recipe, a path, an argument, a damaged input file) derives
from `UserError`; the four command-line programs run through `run_cli`, which prints such an
error as one line and exits 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

# The programs' exit codes, as launchers read them (slurm/job.py requeues on EXIT_REQUEUE).
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_REQUEUE = 75  # EX_TEMPFAIL: training saved a checkpoint after a stop signal; relaunch to resume


class UserError(Exception):
    """Bad input that the user can fix: the CLI prints `error: <first line>` and exits 2."""

    exit_code = EXIT_USER_ERROR


MAX_MESSAGE = 1000  # characters: a message never echoes an unbounded value (a 1 GB override)


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE] + " [...]"


def run_cli(main: Callable[..., int | None], *args, **kwargs) -> int:
    """Call `main`; a UserError becomes `error: <message>` on stderr and its exit code."""
    try:
        return int(main(*args, **kwargs) or 0)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return e.exit_code
