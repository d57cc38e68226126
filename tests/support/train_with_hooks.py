"""pipeline/train.py with a test hook, for tests that need a real process to die at a chosen point:

    python tests/support/train_with_hooks.py --kill-in-save STEP RECIPE [section.key=value ...]

SIGKILLs the main process inside the checkpoint save of STEP, after the weights are written and
before trainer_state.json makes the directory whole. Everything else is the real entry point.
(Run as a script: PYTHONPATH must hold the project root, as support.training.env() sets it.)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from pipeline import train
from pipeline.trainer import Hooks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kill-in-save", type=int, required=True, metavar="STEP")
    args, rest = p.parse_known_args(argv)

    def in_save(step, _tmp_dir):
        if step == args.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)

    return train.main(rest, hooks=Hooks(in_save=in_save))


if __name__ == "__main__":
    sys.exit(main())
