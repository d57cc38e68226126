"""The paper's Figs. 7, 9 and 10 for `eval figures --which 7,9,10`: PNG files plus their numbers as JSON.

Fig. 7   samples x_0 ~ p(x_0 | x_t) that share one x_t, as App. D draws them: a single reverse
         chain (Algorithm 2) from one prior draw x_T ~ N(0, I) is split at t = T, 3T/4, T/2, T/4
         (the paper's 1000, 750, 500, 250): its state x_t there is frozen and the rest of the
         chain is drawn several times with independent noise. No test data is involved. Large t
         share only coarse attributes, small t nearly everything.
Fig. 9   coarse-to-fine interpolation: Fig. 8's latent mixing after different numbers of diffusion
         steps (0 steps = mixing the pixels; T steps = two unrelated samples at the ends).
Fig. 10  sample quality along the reverse process: FID (and the Inception Score when the Inception
         weights with their classifier are available) of the predicted x_0 (eq. 15) at chosen
         steps of Algorithm 2, scored by the eval stage's FID/IS code (eval/fid.py) against the
         training split.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from eval.common import EvalError, to_uint8
from eval.features import share
from eval.sample import save_grid
from eval.work import gather_share
from pipeline.atomic import atomic_path, write_json
from pipeline.rng import eval_generators
from pipeline.sampling import sample_from


def say(msg: str) -> None:
    """A progress line of `eval figures` (stderr: its stdout ends with the numbers as JSON)."""
    print(f"figures: {msg}", file=sys.stderr, flush=True)


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()))


def _mean_pairwise_rmse(images: np.ndarray) -> float:
    n = len(images)
    return float(np.mean([_rmse(images[i], images[j]) for i in range(n) for j in range(i + 1, n)]))


def split_chain_samples(diffusion, model, shape, ts, n_samples: int, seed: int = 0, device="cpu") -> tuple:
    """Fig. 7: one chain of Algorithm 2 from x_T ~ N(0, I) of `shape` [1, C, H, W], split at each
    0-based t in `ts` (t = 999 is the paper's x_1000 = x_T itself): `n_samples` draws of
    p(x_0 | x_t) continue from the chain's own x_t with independent noise.

    Noise streams of `seed` (pipeline.rng.eval_generators): 0 is the chain (x_T and every step),
    1 + i * n .. the draws from split i. Returns (uint8 [len(ts), 2 + n, H, W, C] with columns x_t,
    the n draws, the chain's own x_0 (itself a draw of p(x_0 | x_t) for every t); numbers; the
    frozen x_t by t, float)."""
    want = {int(t) for t in ts}
    frozen: dict[int, torch.Tensor] = {}

    def grab(t, x_t, _pred_x0):  # sample_from's callback: x_t is the input of step t
        if t in want:
            frozen[t] = x_t.clone()

    with torch.inference_mode():
        chain_x0 = diffusion.p_sample_loop(model, shape, generator=eval_generators(seed, range(1), device),
                                           callback=grab, device=device)
    own = to_uint8(chain_x0)
    T = diffusion.num_timesteps
    rows, info = [], {"t_paper": [int(t) + 1 for t in ts], "t_0based": [int(t) for t in ts], "T": T,
                      "samples_per_t": n_samples, "seed": seed, "pairwise_rmse_0_255": [],
                      "rmse_to_chain_x0_0_255": []}
    for i, t in enumerate(ts):
        xs = frozen[int(t)].expand(n_samples, *shape[1:]).contiguous()
        gens = eval_generators(seed, range(1 + i * n_samples, 1 + (i + 1) * n_samples), device)
        with torch.inference_mode():
            out = to_uint8(sample_from(diffusion, model, xs, int(t), generator=gens))
        rows.append(np.concatenate([to_uint8(frozen[int(t)]), out, own], 0))
        info["pairwise_rmse_0_255"].append(_mean_pairwise_rmse(out))
        info["rmse_to_chain_x0_0_255"].append(float(np.mean([_rmse(o, own[0]) for o in out])))
    info["columns"] = "x_t of the one chain (clipped to [-1, 1]), draws of p(x_0 | x_t), the chain's own x_0"
    return np.stack(rows), info, {int(t): frozen[int(t)] for t in ts}


def coarse_to_fine(diffusion, model, x_a: torch.Tensor, x_b: torch.Tensor, lambdas, steps, seed: int = 0) -> tuple:
    """Fig. 9 for one pair: a row per number of diffusion steps before mixing (0 = the pixels),
    columns source a, the decodings for each lambda, source b. Returns (uint8 grid, numbers)."""
    rows = []
    for s in steps:
        if s == 0:  # no diffusion: mix the images themselves
            lam = torch.as_tensor(lambdas, dtype=x_a.dtype, device=x_a.device).reshape(-1, 1, 1, 1)
            mid = to_uint8((1 - lam) * x_a + lam * x_b)
            rows.append(np.concatenate([to_uint8(x_a), mid, to_uint8(x_b)], 0))
        else:  # s steps of diffusion = 0-based t = s - 1, then Fig. 8's decoding
            g = torch.Generator(device=x_a.device).manual_seed(seed)
            with torch.inference_mode():
                mix = diffusion.interpolate(model, x_a, x_b, lambdas, t=int(s) - 1, generator=g)[0]
            rows.append(np.concatenate([to_uint8(x_a), to_uint8(mix), to_uint8(x_b)], 0))
    grid = np.stack(rows)
    info = {"diffusion_steps": [int(s) for s in steps], "lambdas": [float(v) for v in lambdas], "seed": seed,
            "rmse_lambda0_vs_a": [_rmse(r[1], r[0]) for r in grid],
            "rmse_lambda1_vs_b": [_rmse(r[-2], r[-1]) for r in grid],
            "columns": "source a, decodings for each lambda, source b"}
    return grid, info


def progressive_quality(diffusion, model, shape, show_t, score, *, batch_size: int = 64, seed: int = 0,
                        device="cpu") -> dict:
    """Fig. 10: the predicted x_0 at each 0-based step in `show_t` of `shape[0]` ancestral runs
    (Algorithm 2; one noise stream per sample), each set scored by `score(uint8 images) -> dict`."""
    want = sorted({int(t) for t in show_t}, reverse=True)
    shots: dict[int, list] = {t: [] for t in want}

    def grab(t, _x_t, pred_x0):
        if t in shots:
            shots[t].append(to_uint8(pred_x0))

    n = shape[0]
    mine = share(n)  # this process's samples; every process draws its own share
    for start in range(mine.start, mine.stop, batch_size):
        b = min(batch_size, mine.stop - start)
        gens = eval_generators(seed, range(start, start + b), device)
        with torch.inference_mode():
            diffusion.p_sample_loop(model, (b, *shape[1:]), generator=gens, callback=grab, device=device)
    T = diffusion.num_timesteps
    out = {"t_0based": want, "reverse_steps": [T - t for t in want], "num_samples": n, "seed": seed}
    none = np.zeros((0, *shape[2:], shape[1]), np.uint8)
    scores = [score(gather_share(np.concatenate([none, *shots[t]]), n, device)) for t in want]
    for key in scores[0]:
        out[key] = [s[key] for s in scores]
    return out


def plot_progressive_quality(q: dict, path: Path) -> None:
    import matplotlib  # imported here: `python -m eval --help` should not pay for it

    matplotlib.use("Agg")  # no display: draw to files only
    import matplotlib.pyplot as plt

    panels = [k for k in ("is", "fid") if q.get(k) is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        ax.plot(q["reverse_steps"], q[key], marker="o")
        ax.set(xlabel="Reverse process steps (T - t)", ylabel={"is": "Inception Score", "fid": "FID"}[key])
    fig.suptitle(f"Fig. 10: the predicted x_0 along the reverse process, {q['num_samples']} samples\n"
                 f"(features: {q.get('extractor', 'Inception')})"
                 + (f"\n{q['fid_bias']}" if q.get("fid_bias") else ""), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------- CLI pieces


def add_args(p) -> None:
    """The options of Figs. 7, 9 and 10 on `eval figures`."""
    p.add_argument("--fig7-t", default=None,
                   help="comma-separated t of the split points, counted from 1 as in the paper (Fig. 7); "
                   "default: T, 3T/4, T/2, T/4 (the paper's 1000, 750, 500, 250)")
    p.add_argument("--fig7-samples", type=int, default=3, help="samples of p(x_0 | x_t) per t (Fig. 7)")
    p.add_argument("--fig9-steps", default=None,
                   help="comma-separated diffusion steps before mixing (Fig. 9); default: 0, T/4, T/2, 3T/4, T")
    p.add_argument("--fig10-samples", type=int, default=1000,
                   help="samples scored at each step (Fig. 10); FID below 50,000 is biased upward, "
                   "and the output says so")
    p.add_argument("--fig10-points", type=int, default=11, help="evenly spaced steps scored (Fig. 10)")
    p.add_argument("--reference", default=None, help="FID reference shards (Fig. 10); default: data.shards")
    p.add_argument("--reference-count", type=int, default=None, help="first N reference images (Fig. 10)")
    p.add_argument("--inception-weights", default=None, help="Inception weights file (Fig. 10); see `eval fid`")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (Fig. 10); default: eval.batch_size")
    # Testing hook, as on `eval fid`: NAME=module:Class registers a torch-fidelity extractor.
    p.add_argument("--feature-extractor", default=None, help=argparse.SUPPRESS)


def _ints(text: str | None, default: list[int], what: str, lo: int, hi: int) -> list[int]:
    if text is None:
        return default
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"{what}: {text!r} is not a comma-separated list of whole numbers") from None
    bad = [v for v in vals if not lo <= v <= hi]
    if not vals or bad:
        raise EvalError(f"{what}: values must lie in [{lo}, {hi}], got {text!r}")
    return vals


def make_more(loaded, model, x0: torch.Tensor, out: Path, which, args, *, shards: str, seed: int,
              lambdas, device) -> dict:
    """Figs. 7, 9, 10 (those in `which`) into `out`; returns the headline numbers."""
    d, T = loaded.diffusion, loaded.diffusion.num_timesteps
    numbers = {}
    if "7" in which:
        ts = _ints(args.fig7_t, sorted({max(1, T * k // 4) for k in (4, 3, 2, 1)}, reverse=True),
                   "--fig7-t", 1, T)
        k = loaded.recipe.model.unet_kwargs()
        shape = (1, k.get("in_channels", 3), k["resolution"], k["resolution"])
        say(f"Fig. 7: one chain of {T} steps, {args.fig7_samples} draws from each of {len(ts)} steps")
        grid, info, _ = split_chain_samples(d, model, shape, sorted({t - 1 for t in ts}, reverse=True),
                                            args.fig7_samples, seed, device)
        save_grid(grid.reshape(-1, *grid.shape[2:]), out / "fig7_shared_latent.png", ncol=grid.shape[1])
        write_json(out / "fig7_shared_latent.json", info, indent=1)
        numbers["fig7"] = {"t_paper": info["t_paper"], "pairwise_rmse_0_255": info["pairwise_rmse_0_255"]}
    if "9" in which:
        steps = _ints(args.fig9_steps, sorted({T * k // 4 for k in range(5)}), "--fig9-steps", 0, T)
        lam = list(lambdas) if lambdas is not None else [round(v, 3) for v in np.linspace(0, 1, 9)]
        say(f"Fig. 9: {len(steps)} rows of {len(lam)} decodings")
        grid, info = coarse_to_fine(d, model, x0[:1], x0[1:2], lam, steps, seed)
        save_grid(grid.reshape(-1, *grid.shape[2:]), out / "fig9_coarse_to_fine.png", ncol=grid.shape[1])
        write_json(out / "fig9_coarse_to_fine.json", info, indent=1)
        numbers["fig9"] = {"diffusion_steps": info["diffusion_steps"], "rmse_lambda0_vs_a": info["rmse_lambda0_vs_a"]}
    if "10" in which:
        say(f"Fig. 10: {args.fig10_samples} samples of {T} steps, scored at {args.fig10_points} steps")
        q = _fig10(loaded, model, args, shards=shards, seed=seed, device=device)
        plot_progressive_quality(q, out / "fig10_progressive_quality.png")
        write_json(out / "fig10_progressive_quality.json", q, indent=1)
        numbers["fig10"] = {"fid_at_end": q["fid"][-1], "is_at_end": q["is"][-1] if q.get("is") else None,
                            "num_samples": q["num_samples"], "fid_bias": q.get("fid_bias")}
    return numbers


def _fig10(loaded, model, args, *, shards: str, seed: int, device) -> dict:
    from eval.common import resolve
    from eval.fid import INCEPTION, _register_extractor, compute_fid, compute_is, extractor_id
    from eval.inception import has_logits, resolve_weights

    if args.fig10_samples < 2 or args.fig10_points < 2:
        raise EvalError("--fig10-samples and --fig10-points must be at least 2")
    r, T = loaded.recipe, loaded.diffusion.num_timesteps
    ref = resolve(args.reference, r, "eval.fid_reference", r.data.shards) or shards
    name = _register_extractor(args.feature_extractor) if args.feature_extractor else INCEPTION
    weights = resolve_weights(args.inception_weights) if name == INCEPTION else None
    with_is = name == INCEPTION and has_logits(weights)

    def score(images: np.ndarray) -> dict:
        m = {"fid": compute_fid(images, ref, name=name, weights=weights, device=device,
                                reference_count=args.reference_count)["fid"]}
        if with_is:
            m["is"] = compute_is(images, weights=weights, device=device)["is"]
        return m

    k = r.model.unet_kwargs()
    shape = (args.fig10_samples, k.get("in_channels", 3), k["resolution"], k["resolution"])
    show = sorted({int(round(v)) for v in np.linspace(T - 1, 0, args.fig10_points)}, reverse=True)
    q = progressive_quality(loaded.diffusion, model, shape, show, score, seed=seed, device=device,
                            batch_size=resolve(args.batch_size, r, "eval.batch_size"))
    q.update({"reference": str(ref), "extractor": extractor_id(name, weights) if name == INCEPTION else name,
              "what": "pred_x0 (eq. 15) at each t of Algorithm 2, scored against the reference split"})
    if not with_is:
        q["is"] = None
        q["is_unavailable"] = ("the Inception Score needs torch-fidelity's Inception weights with the "
                               "classifier (pass --inception-weights)")
    if any(not math.isfinite(v) for v in q["fid"]):
        raise EvalError("Fig. 10: a non-finite FID; use more --fig10-samples")
    if q["num_samples"] < PAPER_FID_SAMPLES:
        q["fid_bias"] = fid_bias_note(q["num_samples"])
    return q


PAPER_FID_SAMPLES = 50_000  # Table 1's FID protocol


def fid_bias_note(n: int) -> str:
    """FID's estimator is biased upward at finite N (the bias falls roughly as 1/N, Chong & Forsyth
    2020), so a curve from N < 50,000 samples sits above the paper's protocol at every point."""
    return (f"FID from {n} samples is biased upward against the paper's {PAPER_FID_SAMPLES:,}: compare "
            f"points within this curve, not with Table 1 (more: --fig10-samples)")
