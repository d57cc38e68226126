"""`python -m eval ...` in a child process, as a user runs it. The child can import this package
(tests/ is on its PYTHONPATH): the hidden hooks --model-factory and --feature-extractor name
modules here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def eval_env(**extra: str) -> dict:
    """The environment of an eval child: the project root and tests/ importable, plus `extra`."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **extra}


def run_eval(*args, env: dict | None = None, launcher=(PY, "-m"), timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `<launcher> eval <args>` from the project root; `launcher` may be a torchrun prefix."""
    return subprocess.run([*launcher, "eval", *map(str, args)], cwd=ROOT, env=env or eval_env(),
                          capture_output=True, text=True, timeout=timeout)
