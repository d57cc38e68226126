"""`python -m eval {sample,fid,is,nll,figures,push} ...`: parse, dispatch, report errors as one line.

Each subcommand lives in its own module with `register(subparsers)`. Run several processes with
`accelerate launch -m eval <subcommand> ...`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("eval.sample", "eval.fid", "eval.nll", "eval.figures", "eval.push")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval",
        description="Evaluate a DDPM checkpoint as the paper does: samples (Algorithm 2), FID/IS "
        "against the training set, test NLL in bits/dim, and Figs. 5, 6 and 8. Every command "
        "writes OUT/results.json (metrics, protocol, weights hash, software versions).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # not written yet (eval.push comes from the Hub stage)
                continue
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    from eval.common import EvalError
    from eval.inception import InceptionWeightsError
    from eval.results import ResultsError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (EvalError, InceptionWeightsError, ResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as e:
        # The other stages' input errors (a bad config.yaml, unreadable shards, a model that
        # cannot load) are one line and exit 2 as well; anything else is a bug: traceback.
        if type(e).__name__ in ("RecipeError", "DataError", "LoadError"):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
