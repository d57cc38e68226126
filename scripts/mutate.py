"""Deliberate bugs, one at a time, against the fast tests meant to catch them (`make mutate`).

The tree is copied to a temporary folder (this checkout's files are never edited); each bug
replaces one exact piece of one file there, the named test files run against it, and the file
is put back before the next. The table says which tests failed for each bug: "caught by". First
the same test files run unmutated: a test that already fails there catches nothing.

Only the test files named for a bug run, so the whole list takes minutes, not the suite's time.
Exit status 0 when every bug was caught, 1 otherwise (2 for a bug that no longer applies).

    python -m scripts.mutate            # every bug
    python -m scripts.mutate --only ema # the bugs whose name contains "ema"
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Not copied: history, environments, caches and run outputs.
IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info",
                                "runs", "build", "quickstart_out", ".whl")


@dataclass(frozen=True)
class Bug:
    name: str
    path: str  # relative to the project root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # test files (or node ids) that should catch it


BUGS = (
    Bug("loss weighted by t", "pipeline/diffusion.py",
        "return mean_flat((target - out) ** 2)",
        "return mean_flat((target - out) ** 2) * (t + 1).to(out.dtype)",
        ("tests/test_losses.py", "tests/test_diffusion.py")),
    Bug("loss target x0 instead of eps", "pipeline/diffusion.py",
        'target = {"eps": noise, "x0": x0, "mu": None}',
        'target = {"eps": x0, "x0": x0, "mu": None}',
        ("tests/test_losses.py", "tests/test_diffusion.py", "tests/test_learning.py")),
    Bug("loss gradient cut (scaled to 0 before backward)", "pipeline/trainer.py",
        "                acc.backward(loss)\n                if parts.clipper:",
        "                acc.backward(loss * 0)\n                if parts.clipper:",
        ("tests/test_learning.py",)),
    Bug("EMA decay a constant, not train.ema_decay", "pipeline/trainer.py",
        "ema = EMA(model, tc.ema_decay, device=rt.device)",
        "ema = EMA(model, 0.9999, device=rt.device)",
        ("tests/test_trainer_ema.py",)),
    Bug("sampler noise dropped (sigma_t * 0)", "pipeline/sampling.py",
        'p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise',
        'p["mean"] + nonzero * 0 * torch.exp(0.5 * p["log_variance"]) * noise',
        ("tests/test_sampling.py",)),
    Bug("sampler step off by one (t - 1 for t)", "pipeline/sampling.py",
        "t = torch.full((B,), i, dtype=torch.long, device=x.device)\n        if i > 0:",
        "t = torch.full((B,), max(i - 1, 0), dtype=torch.long, device=x.device)\n        if i > 0:",
        ("tests/test_sampling.py",)),
    Bug("loader order shuffled differently", "pipeline/data.py",
        "perm = np.random.default_rng([self.seed, e]).permutation(self.n)",
        "perm = np.random.default_rng([e, self.seed]).permutation(self.n)",
        ("tests/test_data_loader.py",)),
    Bug("checkpoint checksum verification skipped", "pipeline/integrity.py",
        'if file_sha256(p) != rec.get("sha256"):',
        "if False:",
        ("tests/test_checkpoint_damage.py",)),
)


def run_tests(tree: Path, tests: tuple[str, ...], timeout: int) -> tuple[list[str], float, str]:
    """(failed or erroring test ids, seconds, the tail of the output) of the fast tests in `tests`."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        out = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = f"{e.stdout or ''}\nTIMEOUT after {timeout} s"
        return [f"(timed out after {timeout} s)"], time.time() - t0, out[-2000:]
    # "FAILED tests/x.py::name[param with spaces] - message": the id ends at " - " or the line's end
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", out, re.M)
    if p.returncode not in (0, 1) and not failed:  # collection error, crash: the run itself failed
        failed = [f"(pytest exit {p.returncode})"]
    return failed, time.time() - t0, out[-2000:]


def short(test_id: str) -> str:
    return test_id.removeprefix("tests/")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="run only the bugs whose name contains this text")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per test run (default 900)")
    args = ap.parse_args(argv)
    bugs = [b for b in BUGS if not args.only or args.only.lower() in b.name.lower()]
    if not bugs:
        print(f"no bug matches {args.only!r}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ddpm-mutate-") as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(ROOT, tree, ignore=IGNORE)
        for b in bugs:
            if (tree / b.path).read_text().count(b.old) != 1:
                print(f"error: {b.name}: {b.path} no longer holds the line to change exactly once: {b.old!r}",
                      file=sys.stderr)
                return 2
        files = tuple(dict.fromkeys(t for b in bugs for t in b.tests))
        print(f"baseline: {' '.join(files)}", flush=True)
        failed, secs, tail = run_tests(tree, files, args.timeout)
        if failed:
            print(f"the unmutated tree already fails ({secs:.0f} s): {', '.join(failed)}\n{tail}", file=sys.stderr)
            return 1
        print(f"baseline passes ({secs:.0f} s)", flush=True)
        rows = []
        for b in bugs:
            target = tree / b.path
            original = target.read_text()
            target.write_text(original.replace(b.old, b.new))
            try:
                failed, secs, _ = run_tests(tree, b.tests, args.timeout)
            finally:
                target.write_text(original)
            rows.append((b, failed, secs))
            print(f"  {b.name}: {'caught by ' + str(len(failed)) + ' test(s)' if failed else 'MISSED'} "
                  f"({secs:.0f} s)", flush=True)
    print("\n| bug | file | caught by | s |\n|---|---|---|---|")
    for b, failed, secs in rows:
        shown = ", ".join(short(f) for f in failed[:4]) + (f" (+{len(failed) - 4} more)" if len(failed) > 4 else "")
        print(f"| {b.name} | {b.path} | {shown or '**MISSED**'} | {secs:.0f} |")
    missed = [b.name for b, failed, _ in rows if not failed]
    print(f"\n{len(rows) - len(missed)}/{len(rows)} caught" + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
