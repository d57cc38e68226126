"""DeepSpeed's checkpoint files read without running anything they hold.

DeepSpeed reads its own `*_model_states.pt` and `*_optim_states.pt` with torch.load(weights_only=
False): full unpickling, so resuming a checkpoint someone else wrote (its checksums rewritten to
match) would run their code. While the trainer restores a checkpoint, the engine's checkpoint
engine reads with torch's weights-only unpickler instead, which builds only tensors, containers,
numbers, strings and the few DeepSpeed types that its ZeRO-1/2 files hold (`TYPES`: plain data
classes, no code runs when they are built). Anything else is refused in one line naming the
file and the global (a function or type): the checkpoint was not written by this trainer.
"""

from __future__ import annotations

import pickle
import re
from contextlib import contextmanager

from pipeline.errors import UserError

# What ZeRO-1/2 optimizer states hold besides tensors and containers (DeepSpeed 0.19; fp32, bf16
# and fp16 with its dynamic loss scaler). The model states hold none.
TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class ForeignCheckpointError(UserError):
    """A DeepSpeed checkpoint file holding something its own files never do (exit 2)."""


def _types() -> list:
    import importlib

    out = []
    for dotted in TYPES:
        module, _, name = dotted.rpartition(".")
        out.append(getattr(importlib.import_module(module), name))
    return out


def load(path, map_location=None):
    """torch.load of a DeepSpeed checkpoint file, weights only (the `load` of a checkpoint engine)."""
    import torch

    try:
        with torch.serialization.safe_globals(_types()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"the global {found.group(1).rstrip('.')[:100]}" if found else "a global"
        raise ForeignCheckpointError(f"{path}: not read: it holds {what}, which DeepSpeed checkpoints of this trainer "
                                     "never hold (weights-only loading; nothing in it was run)") from None
    except (RuntimeError, EOFError) as e:  # truncated, or not a torch file
        raise ForeignCheckpointError(f"{path}: unreadable DeepSpeed checkpoint file "
                                     f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


@contextmanager
def weights_only(models):
    """Within: every DeepSpeed engine among `models` reads its checkpoint files with `load`."""
    engines = [m.checkpoint_engine for m in models if getattr(m, "checkpoint_engine", None) is not None]
    for e in engines:
        e.load = load  # an instance attribute: shadows the engine class's torch.load(weights_only=False)
    try:
        yield
    finally:
        for e in engines:
            vars(e).pop("load", None)
