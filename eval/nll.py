"""`eval nll`: the test-set negative log likelihood bound in bits/dim (eq. 5, Table 1).

For every test image: all T terms (L_0 with the discretized decoder of eq. 13, the KL terms
L_1..L_{T-1} of eq. 5) plus the prior L_T, through `GaussianDiffusion.calc_bpd` with
`t_batch` time steps per model call. The test split is read exactly once over all processes
(`pipeline.data.iter_split` with rank / world size). Each image's noise comes from a generator
seeded by (seed, the image's key), so the number does not depend on batch size or world size.
Reports the mean with its standard error, and L_0, L_T and sum L_{1..T-1} separately
(Sec. 4.3 discusses how the bits split between them). `--also-train` bounds the training split
too and reports the gap (Table 1 gives both: <= 3.75 test, 3.72 train on CIFAR-10).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch
from tqdm import tqdm

from eval.common import EvalError, Precision, accelerator, add_model_args, check_resolution, load_model, manifest_path, resolve
from eval.results import weights_sha256, write_result
from pipeline import fast_path
from pipeline.data import iter_split, split_share
from pipeline.hub import Pretrained
from pipeline.integrity import file_sha256
from pipeline.rng import eval_generators


def iter_float(shards: str, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
               with_keys: bool = False):
    """The split's images, each once over all ranks, as float32 [B, 3, H, W] in [-1, 1] on the
    8-bit grid (what the discretized decoder of eq. 13 expects); with keys if asked."""
    for x, keys in iter_split(shards, split, batch_size, rank=rank, world_size=world_size, with_keys=True):
        x = torch.as_tensor(x)
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
        yield (x.contiguous(), list(keys)) if with_keys else x.contiguous()


def key_index(key: str) -> int:
    """A stable integer for a sample key: its noise stream does not depend on rank or batch."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "big")


def run_nll(loaded: Pretrained, shards: str, *, split: str = "test", batch_size: int = 64, t_batch: int = 10,
            seed: int = 0, precision: str = "no", limit: int | None = None, device=None, acc=None,
            progress: bool = True) -> dict:
    """Per-image bound terms over the split, gathered on every process. Returns metrics."""
    acc = acc or accelerator()
    device = torch.device(device) if device else acc.device
    fast_path.strict_fp32()  # bits/dim in float32, not TF32
    model = Precision(loaded.model.to(device), precision, device)
    d = loaded.diffusion
    rows = []  # per image: total, prior (L_T), L_0, sum L_1..L_{T-1}
    seen = 0
    total = split_share(shards, split, acc.process_index, acc.num_processes)
    total = total if limit is None else min(total, limit)
    bar = tqdm(total=total, desc=f"nll [{acc.process_index}] {split}", unit="img", mininterval=2.0,
               disable=not (progress and acc.is_local_main_process))
    for x, keys in iter_float(shards, split, batch_size, acc.process_index, acc.num_processes, with_keys=True):
        if limit is not None:
            x, keys = x[: limit - seen], keys[: limit - seen]
        if len(x) == 0:
            break
        x = x.to(device)
        # One noise stream per image, keyed by (seed, sample key): the same draw for an image
        # whatever the batch size or the number of processes.
        gens = eval_generators(seed, [key_index(k) for k in keys], device)
        with torch.inference_mode():
            r = d.calc_bpd(model, x, generator=gens, t_batch=t_batch)
        terms = r["terms_bpd"].double().cpu()
        rows.append(torch.stack([r["total_bpd"].double().cpu(), r["prior_bpd"].double().cpu(),
                                 terms[:, 0], terms[:, 1:].sum(1)], 1))
        seen += len(x)
        bar.update(len(x))
        if limit is not None and seen >= limit:
            break
    bar.close()
    local = torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.float64)
    from accelerate.utils import gather_object  # imported here: `python -m eval --help` stays fast

    allrows = np.array(gather_object(local.tolist()), dtype=np.float64).reshape(-1, 4)
    n = len(allrows)
    if n == 0:
        raise EvalError(f"{shards}: the '{split}' split has no images")
    mean = allrows.mean(0)
    sem = float(allrows[:, 0].std(ddof=1) / math.sqrt(n)) if n > 1 else None  # JSON has no NaN
    return {"bpd": float(mean[0]), "bpd_sem": sem, "L_T_bpd": float(mean[1]),
            "L_0_bpd": float(mean[2]), "L_1_to_T-1_bpd": float(mean[3]), "num_images": int(n)}


def with_train(test: dict, train: dict) -> dict:
    """The train split's metrics under train_* keys, and the gap (test - train) with its standard
    error (the two splits are independent images): the overfitting check of Table 1."""
    out = {f"train_{k}": v for k, v in train.items()}
    out["gap_bpd"] = test["bpd"] - train["bpd"]
    sems = (test["bpd_sem"], train["bpd_sem"])
    out["gap_bpd_sem"] = None if None in sems else math.hypot(*sems)
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "nll", help="test NLL bound in bits/dim (all T terms + prior)",
        description="Negative log likelihood bound (eq. 5) on the held-out split, in bits/dim: all "
        "T terms plus the prior L_T, mean +- standard error, with L_0, L_T and sum L_1..L_{T-1} "
        "reported separately. Distributed over processes (`accelerate launch -m eval nll ...`).")
    add_model_args(p)
    p.add_argument("--shards", default=None, help="shard directory (default: the recipe's data.shards)")
    p.add_argument("--split", default=None, help="default: eval.nll_split (test)")
    p.add_argument("--batch-size", type=int, default=None, help="images per call; default: eval.nll_batch_size")
    p.add_argument("--t-batch", type=int, default=None,
                   help="time steps per model call (batch = images x t-batch); default: eval.nll_t_batch")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per process (a quick look)")
    p.add_argument("--seed", type=int, default=None, help="base seed of the noise; default: eval.seed")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default=None,
                   help="autocast the U-Net (the bound itself is computed in float32); default: eval.mixed_precision")
    p.add_argument("--also-train", action="store_true",
                   help="bound the 'train' split as well and report the gap test - train (Table 1: 3.75 vs 3.72)")
    p.add_argument("--train-limit", type=int, default=None,
                   help="with --also-train: at most this many train images per process (default: --limit)")
    p.set_defaults(func=main)


def main(args) -> int:
    for name, v in (("--limit", args.limit), ("--train-limit", args.train_limit)):
        if v is not None and v < 1:  # before the model loads: -2 would silently bound no image at all
            raise EvalError(f"{name} must be at least 1, got {v}")
    loaded = load_model(args.src, args.revision, args.model_factory)
    r = loaded.recipe
    shards = resolve(args.shards, r, "data.shards")
    if not shards:
        raise EvalError("no test data: pass --shards or set data.shards in the recipe")
    manifest = manifest_path(shards)
    split = resolve(args.split, r, "eval.nll_split")
    check_resolution(shards, split, r)  # a bound on images of another size means nothing
    t_batch = resolve(args.t_batch, r, "eval.nll_t_batch")
    batch = resolve(args.batch_size, r, "eval.nll_batch_size")
    if batch <= 0 or t_batch <= 0:
        raise EvalError("--batch-size and --t-batch must be positive")
    seed = resolve(args.seed, r, "eval.seed")
    precision = resolve(args.precision, r, "eval.mixed_precision")
    acc = accelerator()
    m = run_nll(loaded, shards, split=split, batch_size=batch, t_batch=t_batch, seed=seed,
                precision=precision, limit=args.limit, device=args.device, acc=acc)
    train_limit = args.train_limit if args.train_limit is not None else args.limit
    if args.also_train:
        mt = run_nll(loaded, shards, split="train", batch_size=batch, t_batch=t_batch, seed=seed,
                     precision=precision, limit=train_limit, device=args.device, acc=acc)
        m.update(with_train(m, mt))
    if acc.is_main_process:
        proto = {"split": split, "shards": str(shards), "manifest_sha256": file_sha256(manifest),
                 "num_images": m["num_images"], "timesteps": int(loaded.diffusion.num_timesteps),
                 "var_type": loaded.diffusion.var_type, "mean_type": loaded.diffusion.mean_type,
                 "terms": "all T terms + prior (eq. 5), decoder eq. 13", "seed": seed,
                 "precision": precision, "processes": acc.num_processes,
                 "complete_split": args.limit is None}
        if args.also_train:
            proto.update({"train_split": "train", "train_complete_split": train_limit is None})
        sha = weights_sha256(loaded.model)
        path = write_result(args.out, "nll", m, proto, {"source": loaded.source, "weights_sha256": sha})
        sem = "n/a" if m["bpd_sem"] is None else f"{m['bpd_sem']:.4f}"
        print(f"NLL {m['bpd']:.4f} +- {sem} bits/dim over {m['num_images']} {split} images "
              f"(L_0 {m['L_0_bpd']:.4f}, L_1..T-1 {m['L_1_to_T-1_bpd']:.4f}, L_T {m['L_T_bpd']:.2e})")
        if args.also_train:
            gap_sem = "n/a" if m["gap_bpd_sem"] is None else f"{m['gap_bpd_sem']:.4f}"
            print(f"NLL {m['train_bpd']:.4f} bits/dim over {m['train_num_images']} train images; "
                  f"gap {split} - train {m['gap_bpd']:+.4f} +- {gap_sem}")
        print(json.dumps({"results": str(path)}))
    return 0
