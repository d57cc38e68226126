"""`python -m eval {sample,fid,is,ref-stats,sweep,nll,figures,push,export} ...`: parse, dispatch, report errors as one line.

Each subcommand lives in its own module with `register(subparsers)`. Run several processes with
`accelerate launch -m eval <subcommand> ...`. A user error (`pipeline.errors.UserError`) is one
line on stderr and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from eval import export, fid, figures, nll, push, sample, sweep
from pipeline.errors import run_cli

SUBCOMMANDS = (sample, fid, nll, figures, push, sweep, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval",
        description="Evaluate a DDPM checkpoint as the paper does: samples (Algorithm 2), FID/IS "
        "against the training set, test NLL in bits/dim, and Figs. 5, 6 and 8. Every command "
        "writes OUT/results.json (metrics, protocol, weights hash, software versions).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    code = None
    try:
        code = run_cli(args.func, args)
        return code
    finally:
        close_process_group(ok=code == 0)


def close_process_group(ok: bool) -> None:
    """Leave the process group before the interpreter exits: a rank that exits with gloo's threads
    still up can die in C++ (`terminate called without an active exception`, seen under load).
    On success every rank first waits for the others; after an error it only leaves."""
    dist = sys.modules.get("torch.distributed")  # never imported: no group to close (fast --help)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
