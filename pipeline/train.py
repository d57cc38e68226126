"""Train a DDPM from a recipe.

    accelerate launch pipeline/train.py recipes/lsun_bedroom.yaml [section.key=value ...]
    python pipeline/train.py recipes/quickstart.yaml train.max_steps=20 --dry-run

Every launch resumes from the newest complete checkpoint in run.output_dir (--resume-from CKPT
picks another, --no-resume starts fresh in an empty folder) and prints where it started. On SIGTERM or
SIGUSR1 the run saves after the current step and exits 75 (EX_TEMPFAIL: relaunch to resume);
a finished run exits 0; a bad recipe exits 2 before any work, with one line naming the key.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch pipeline/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from pipeline import launcher, publish
from pipeline.config import check_paths, load_recipe
from pipeline.errors import EXIT_OK, EXIT_REQUEUE, UserError, run_cli
from pipeline.resume import choose_checkpoint

__all__ = ["EXIT_OK", "EXIT_REQUEUE", "main", "parse_args"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pipeline/train.py",
        description=__doc__.split("\n\n")[0],
        epilog="Overrides are dotted recipe keys with YAML values, e.g. train.lr=1e-4 "
               "model.ch_mult=[1,2] run.output_dir=runs/x. Exit codes: 0 finished, 2 bad recipe, "
               f"{EXIT_REQUEUE} stopped by SIGTERM/SIGUSR1 after saving a checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe YAML (recipes/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="publish to this Hub model repo at the end of training (= run.push_to_hub=REPO; "
                        "run.hub_strategy: checkpoint pushes every checkpoint too)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume-from", metavar="CKPT", default=None,
                   help="resume from this checkpoint directory (or a run directory's newest checkpoint) "
                        "into run.output_dir; a requeue of the same command continues the new run")
    g.add_argument("--no-resume", action="store_true",
                   help="start fresh; refused unless run.output_dir is empty or missing")
    return p.parse_intermixed_args(argv)  # flags and overrides in any order


def main(argv=None, hooks=None) -> int:
    """`hooks`: a pipeline.trainer.Hooks for tests (tests/support/train_with_hooks.py)."""
    # A crash in native code (gloo, a CUDA kernel) shows every thread's Python stack. To the process's
    # own stderr: a caller's replacement of sys.stderr (pytest's capture) has no file descriptor.
    try:
        faulthandler.enable(file=sys.__stderr__)
    except (AttributeError, ValueError):  # no stderr at all (None, or closed): run without it
        pass
    return run_cli(run, parse_args(argv), hooks)


def run(args: argparse.Namespace, hooks=None) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return EXIT_OK
    if args.push_to_hub:
        recipe.run.push_to_hub = args.push_to_hub
    check_paths(recipe, args.recipe)
    launcher.check_precision(recipe.train.mixed_precision)  # the recipe decides; a launcher that disagrees is refused
    launcher.recorded_command()  # the command as run, taken at launch for the checkpoints and the card
    recipe.model.unet_kwargs()  # the model section resolves (preset, sizes) before any work
    choose_checkpoint(recipe.run.output_dir, args.resume_from, args.no_resume)  # refused here, before torch loads
    # Imported here: torch, Accelerate and DeepSpeed take seconds to import, and --help,
    # --dry-run and a recipe refused above need none of them.
    from pipeline.trainer import train

    if os.environ.get("RANK", "0") == "0":
        publish.check_token(recipe.run)  # a token that cannot push fails now, not after training

    try:
        return train(recipe, hooks=hooks, resume_from=args.resume_from, no_resume=args.no_resume)
    except UserError as e:
        # Found once the world size / shards are open: batch layout, DeepSpeed config, a split
        # without samples, a resumed loader state that does not fit these shards, too many
        # corrupt samples, a diverging run. Name the recipe they come from.
        if args.recipe not in str(e):
            e.args = (f"{args.recipe}: {e}",)
        raise


if __name__ == "__main__":
    sys.exit(main())
