"""What the launcher decided: its precision, and the command line that was actually run.

Torch-free: `pipeline/train.py` asks both before any heavy import.

Precision, one rule: the recipe's `train.mixed_precision` decides. `accelerate launch
--mixed_precision X` (or `accelerate config`) exports ACCELERATE_MIXED_PRECISION=X to every
process; Accelerate's `Accelerator(mixed_precision=...)` argument would silently win over it.
The launcher always exports a value ("no" when not asked), so "no" there cannot be told from a
default and is not a request; any other value that differs from the recipe is refused in one
line, instead of training in a precision the user did not ask for.
"""

from __future__ import annotations

import functools
import os
import shlex
import sys
from pathlib import Path

from pipeline.config import RecipeError

LAUNCHER_ENV = "ACCELERATE_MIXED_PRECISION"


def check_precision(recipe_precision: str, environ=None) -> str:
    """The precision the run trains in (the recipe's); RecipeError when the launcher asked for
    another one."""
    launcher = (environ if environ is not None else os.environ).get(LAUNCHER_ENV, "no")
    if launcher not in ("", "no") and launcher != recipe_precision:
        raise RecipeError(f"the launcher asks for mixed precision {launcher} (accelerate launch --mixed_precision "
                          f"or accelerate config), the recipe for train.mixed_precision={recipe_precision}: "
                          f"the recipe decides; add train.mixed_precision={launcher} or drop the launcher's setting")
    return recipe_precision


def _public(arg: str, cwd: Path) -> str:
    """An absolute path as the user would type it: relative to the working directory when under
    it, else its name (an installed command, an interpreter); anything else as it is."""
    if not os.path.isabs(arg):
        return arg
    p = Path(arg)
    try:
        return str(p.relative_to(cwd))
    except ValueError:
        return p.name


def _parent_cmdline(pid: int | None = None) -> list[str]:
    try:
        raw = Path(f"/proc/{pid or os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def launch_command(argv: list[str] | None = None, parent: list[str] | None = None, cwd=None) -> str:
    """The command that started this run, recorded at launch: the `accelerate launch ...` line
    (with its --config_file, --num_processes, ...) when Accelerate's launcher is the parent
    process, else this process's own command line (`ddpm-train ...`, `python -m pipeline.train ...`);
    absolute paths shortened (no local path goes into a published model card)."""
    argv = list(argv if argv is not None else getattr(sys, "orig_argv", sys.argv))
    parent = _parent_cmdline() if parent is None else parent
    cwd = Path(cwd or os.getcwd())
    names = [Path(a).name for a in parent[:3]]
    if ("accelerate" in names and "launch" in parent) or "accelerate.commands.launch" in parent[:3]:
        argv = parent  # accelerate's launcher (torchrun's workers run under it too)
    if len(argv) > 1 and Path(argv[0]).name.startswith("python") and os.path.isabs(argv[1]) \
            and not argv[1].endswith(".py"):
        argv = argv[1:]  # an installed command (ddpm-train, accelerate) run by its shebang line
    return " ".join(shlex.quote(_public(a, cwd)) for a in argv)


@functools.lru_cache(maxsize=1)
def recorded_command() -> str:
    """`launch_command()` of this process, taken once (the trainer stores it in every checkpoint)."""
    return launch_command()
