"""Weight files: read them safely, and name them by hash.

Weights are read only from safetensors or with torch.load(weights_only=True): a pickle that would
build anything but tensors is refused. A bad file is a `LoadError` whose one-line message names it.
`weights_sha256` names the tensors themselves: what results.json records, so that numbers computed
on a run directory still match the same weights pulled from the Hub in another format (the file
as stored is named by `pipeline.integrity.file_sha256`, the model card's checksum).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.errors import UserError


class LoadError(UserError):
    """A model source that cannot be loaded; the message names the file or repo."""


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or from a torch file without unpickling arbitrary objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LoadError(f"{path}: not a readable safetensors file (truncated or corrupt?): {msg}") from None
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise LoadError(
                f"{path}: refused: this pickle holds objects other than tensors, and only plain tensor "
                "state dicts are loaded (torch.load(weights_only=True)); convert it to safetensors"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise LoadError(f"{path}: not a readable torch file (truncated or corrupt?): {str(e).splitlines()[0]}") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise LoadError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
        return obj
    raise LoadError(f"{path}: unknown weight format '{path.suffix}' (want .safetensors, or .bin/.pt)")


def weights_sha256(weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Hash of the weights themselves (sorted keys, dtype, shape, bytes) of a model or a state
    dict: the same for a run directory, a safetensors file or a Hub copy of the same EMA weights.
    results.json files record it: the byte layout hashed here must never change."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    h = hashlib.sha256()
    for key, value in sorted(state.items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
