"""`eval figures`: the paper's Figs. 5, 6 and 8, as PNG files plus their numbers as JSON
(Figs. 7, 9 and 10: eval/figures_more.py, through the same command).

Fig. 5  rate-distortion of progressive lossy decoding (Sec. 4.3, Algorithms 3-4): after the
        receiver has x_T (the prior, L_T bits) and the reverse steps down to x_t, the rate is
        L_T + sum of the KL terms sent so far, and the distortion is the RMSE (on [0, 255]) of
        the x_0 predicted from x_t (eq. 15). Both come from one `calc_bpd` pass over test images.
Fig. 6  progressive generation: the predicted x_0 along one ancestral sampling run (Algorithm 2).
Fig. 8  interpolation: two test images encoded to x_t ~ q(x_t | x_0) at the paper's t = 500
        (1-based, as the paper and Fig. 9 count; 0-based index 499 here; default T/2), the
        latents mixed linearly with several lambda and decoded by the reverse process (noise shared).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from eval import figures_more
from eval.common import EvalError, Precision, accelerator, add_model_args, load_model, resolve, to_uint8
from eval.nll import iter_float
from eval.results import weights_sha256, write_result
from eval.sample import save_grid
from eval.tracking import log_figures_to_run
from pipeline.atomic import atomic_path, write_json
from pipeline.hub import Pretrained
from pipeline.rng import eval_generators


def rate_distortion(diffusion, model, x0: torch.Tensor, *, t_batch: int = 10, seed: int = 0,
                    progress: bool = False) -> dict:
    """Fig. 5 numbers, averaged over the images x0 ([N, 3, H, W] on the 8-bit grid in [-1, 1]).

    Index k = number of reverse steps taken, 0..T. After k steps the receiver holds x_t with
    0-based t = T-1-k (k < T): rate = L_T + sum_{i > t} L_i (bits/dim; terms_bpd[:, i] = L_i, the
    cost of the paper's x_i given x_{i+1}), distortion = RMSE of pred_x0(x_t). At k = T the image
    is decoded losslessly: rate = the full bound, distortion 0.
    """
    T = diffusion.num_timesteps
    with torch.inference_mode():
        r = diffusion.calc_bpd(model, x0, generator=eval_generators(seed, range(len(x0)), x0.device), t_batch=t_batch,
                               progress=progress)
    terms, prior = r["terms_bpd"].double().cpu(), r["prior_bpd"].double().cpu()
    mse = r["mse"].double().cpu()  # of pred_x0 on [-1, 1]
    # rate at t: prior + sum_{i >= t+1} terms[:, i]  (reverse cumulative sum, shifted by one)
    tail = torch.flip(torch.cumsum(torch.flip(terms, [1]), 1), [1])  # tail[:, i] = sum_{j >= i}
    rate_t = prior[:, None] + torch.cat([tail[:, 1:], torch.zeros(len(x0), 1, dtype=tail.dtype)], 1)
    rmse_t = mse.sqrt() * 127.5  # [-1, 1] -> [0, 255] scale
    ts = torch.arange(T - 1, -1, -1)  # k = 0 .. T-1
    rate = torch.cat([rate_t[:, ts], (prior + terms.sum(1))[:, None]], 1).mean(0)
    dist = torch.cat([rmse_t[:, ts], torch.zeros(len(x0), 1, dtype=rmse_t.dtype)], 1).mean(0)
    return {"reverse_steps": list(range(T + 1)), "rate_bpd": rate.tolist(), "rmse_0_255": dist.tolist(),
            "num_images": len(x0), "total_bpd": float((prior + terms.sum(1)).mean())}


def plot_rate_distortion(rd: dict, path: Path) -> None:
    # matplotlib is imported here: it takes half a second, which `python -m eval --help` should not pay.
    import matplotlib

    matplotlib.use("Agg")  # no display: draw to files only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    steps, rate, dist = rd["reverse_steps"], rd["rate_bpd"], rd["rmse_0_255"]
    ax[0].plot(steps, dist)
    ax[0].set(xlabel="Reverse process steps (T - t)", ylabel="Distortion (RMSE [0, 255])")
    ax[1].plot(steps, rate)
    ax[1].set(xlabel="Reverse process steps (T - t)", ylabel="Rate (bits/dim)")
    ax[2].plot(rate, dist)
    ax[2].set(xlabel="Rate (bits/dim)", ylabel="Distortion (RMSE [0, 255])")
    fig.suptitle(f"Fig. 5: rate-distortion, {rd['num_images']} test images")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)


def progressive_generation(diffusion, model, shape, *, show_t, seed: int = 0, device="cpu",
                           progress: bool = False) -> np.ndarray:
    """Fig. 6: pred_x0 at the 0-based steps `show_t` along Algorithm 2; uint8 [N, len(show_t), H, W, C]."""
    want = set(int(t) for t in show_t)
    shots: dict[int, torch.Tensor] = {}

    def grab(t, _x_t, pred_x0):
        if t in want:
            shots[t] = pred_x0.detach().cpu()

    with torch.inference_mode():
        diffusion.p_sample_loop(model, shape, generator=eval_generators(seed, range(shape[0]), device), callback=grab,
                                progress=progress)
    cols = [to_uint8(shots[t]) for t in sorted(want, reverse=True)]
    return np.stack(cols, 1)


def interpolation(diffusion, model, x_a, x_b, lambdas, *, t: int = 499, seed: int = 0,
                  progress: bool = False) -> np.ndarray:
    """Fig. 8: uint8 [N, 2 + L, H, W, C]: source a, the L decodings, source b. `t` is the 0-based
    index (499 = the paper's t = 500)."""
    g = torch.Generator(device=x_a.device).manual_seed(seed)
    with torch.inference_mode():
        out = diffusion.interpolate(model, x_a, x_b, lambdas, t=t, generator=g, progress=progress)  # [N, L, C, H, W]
    N, L = out.shape[:2]
    mid = to_uint8(out.reshape(N * L, *out.shape[2:])).reshape(N, L, *to_uint8(x_a[:1]).shape[1:])
    return np.concatenate([to_uint8(x_a)[:, None], mid, to_uint8(x_b)[:, None]], 1)


def make_figures(loaded: Pretrained, shards: str, out: str | os.PathLike, *, split: str = "test",
                 num_images: int = 8, t_batch: int = 10, seed: int = 0, precision: str = "no",
                 n_progressive: int = 4, lambdas=None, interp_t: int | None = None, which=("5", "6", "8"),
                 device="cpu", more=None) -> dict:
    """The figures in `which`; `more`: the parsed options of Figs. 7, 9, 10 (figures_more.add_args).
    `interp_t`: Fig. 8's t counted as the paper counts (1..T; None: T/2, the paper's 500 of 1000)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = loaded.diffusion
    T = d.num_timesteps
    interp_t = T // 2 if interp_t is None else int(interp_t)
    if not 1 <= interp_t <= T:
        raise EvalError(f"--interp-t {interp_t}: the paper's t counts from 1 to T = {T}")
    model = Precision(loaded.model.to(device).eval(), precision, device)
    need = max(num_images, 2 * 2)
    xs, n = [], 0
    for x in iter_float(shards, split, need):
        xs.append(x)
        n += len(x)
        if n >= need:
            break
    x0 = torch.cat(xs)[:need].to(device) if xs else None
    if x0 is None or len(x0) < 2:
        raise EvalError(f"{shards}: the '{split}' split needs at least 2 images for the figures")
    numbers = {}
    if "5" in which:
        figures_more.say(f"Fig. 5: the bound's {T} terms for {len(x0[:num_images])} test images "
            f"({math.ceil(T / max(1, t_batch))} model calls)")
        rd = rate_distortion(d, model, x0[:num_images], t_batch=t_batch, seed=seed, progress=True)
        plot_rate_distortion(rd, out / "fig5_rate_distortion.png")
        write_json(out / "fig5_rate_distortion.json", rd, indent=1)
        numbers["fig5"] = {"total_bpd": rd["total_bpd"], "rate_bpd_at_end": rd["rate_bpd"][-1],
                           "rmse_at_start": rd["rmse_0_255"][0], "rmse_before_last_step": rd["rmse_0_255"][-2]}
    if "6" in which:
        r = loaded.recipe.model.unet_kwargs()
        shape = (n_progressive, r.get("in_channels", 3), r["resolution"], r["resolution"])
        show = sorted({int(round(v)) for v in np.linspace(T - 1, 0, 10)}, reverse=True)
        figures_more.say(f"Fig. 6: {n_progressive} samples, {T} ancestral steps")
        grid = progressive_generation(d, model, shape, show_t=show, seed=seed, device=device, progress=True)
        save_grid(grid.reshape(-1, *grid.shape[2:]), out / "fig6_progressive.png", ncol=len(show))
        write_json(out / "fig6_progressive.json", {"t_shown_0based": show, "rows": n_progressive,
                                                   "seed": seed, "what": "pred_x0 at each t (Algorithm 2)"},
                   indent=1)
        numbers["fig6"] = {"t_shown_0based": show}
    if "8" in which:
        lam = list(lambdas) if lambdas is not None else [round(v, 3) for v in np.linspace(0, 1, 9)]
        k = max(1, len(x0) // 2)
        k = min(k, 2)
        figures_more.say(f"Fig. 8: {k} pairs x {len(lam)} lambdas, {interp_t} reverse steps")
        grid = interpolation(d, model, x0[:k], x0[k:2 * k], lam, t=interp_t - 1, seed=seed,
                             progress=True)  # 0-based index
        save_grid(grid.reshape(-1, *grid.shape[2:]), out / "fig8_interpolation.png", ncol=grid.shape[1])
        # how far the lambda = 0 / 1 decodings land from their sources (on [0, 255])
        rmse = lambda a, b: float(np.sqrt(((a.astype(np.float64) - b) ** 2).mean()))
        info = {"t_paper": interp_t, "t_0based": interp_t - 1, "lambdas": lam, "pairs": k, "seed": seed,
                "rmse_lambda0_vs_a": rmse(grid[:, 1], grid[:, 0]), "rmse_lambda1_vs_b": rmse(grid[:, -2], grid[:, -1]),
                "columns": "source a, decodings for each lambda, source b"}
        write_json(out / "fig8_interpolation.json", info, indent=1)
        numbers["fig8"] = {k2: info[k2] for k2 in ("t_paper", "rmse_lambda0_vs_a", "rmse_lambda1_vs_b")}
    if more is not None and {"7", "9", "10"} & set(which):
        numbers.update(figures_more.make_more(loaded, model, x0, out, which, more, shards=shards, seed=seed,
                                              lambdas=lambdas, device=device))
    return numbers


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "figures", help="Figs. 5 (rate-distortion), 6 (progressive generation), 7 (shared x_t), "
        "8 (interpolation), 9 (coarse-to-fine), 10 (quality along the reverse process)",
        description="The paper's Figs. 5-10 as PNG files with their numbers as JSON in OUT.")
    add_model_args(p)
    p.add_argument("--shards", default=None, help="shard directory with a test split (default: data.shards)")
    p.add_argument("--split", default=None, help="default: eval.nll_split (test)")
    p.add_argument("--which", default="5,6,8", help="comma-separated subset of 5,6,7,8,9,10 (10 samples "
                   "--fig10-samples images and scores them with the FID code: the slow one)")
    p.add_argument("--num-images", type=int, default=8, help="test images averaged in Fig. 5")
    p.add_argument("--t-batch", type=int, default=None, help="time steps per model call (Fig. 5); default: eval.nll_t_batch")
    p.add_argument("--rows", type=int, default=4, help="samples in Fig. 6")
    p.add_argument("--lambdas", default=None, help="comma-separated interpolation weights (Fig. 8)")
    p.add_argument("--interp-t", type=int, default=None,
                   help="t of the interpolated latent, counted from 1 as in the paper and Fig. 9 (Fig. 8); "
                   "default: T/2 (the paper's 500 of T = 1000)")
    p.add_argument("--seed", type=int, default=None, help="base seed; default: eval.seed")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default=None,
                   help="autocast the U-Net; default: eval.mixed_precision")
    figures_more.add_args(p)
    p.set_defaults(func=main)


def main(args) -> int:
    loaded = load_model(args.src, args.revision, args.model_factory)
    r = loaded.recipe
    which = tuple(w.strip() for w in args.which.split(",") if w.strip())
    bad = [w for w in which if w not in ("5", "6", "7", "8", "9", "10")]
    if bad:
        raise EvalError(f"--which: unknown figure {bad[0]!r}; choose from 5, 6, 7, 8, 9, 10")
    shards = resolve(args.shards, r, "data.shards")
    if not shards:
        raise EvalError("no test data: pass --shards or set data.shards in the recipe")
    lambdas = [float(v) for v in args.lambdas.split(",")] if args.lambdas else None
    split = resolve(args.split, r, "eval.nll_split")
    seed = resolve(args.seed, r, "eval.seed")
    precision = resolve(args.precision, r, "eval.mixed_precision")
    acc = accelerator()
    if not acc.is_main_process:  # Figs. 5-9 are small: rank 0 draws them; all share Fig. 10's samples
        if "10" in which:
            device = args.device or acc.device
            model = Precision(loaded.model.to(device).eval(), precision, device)
            figures_more._fig10(loaded, model, args, shards=shards, seed=seed, device=device)  # rank 0 writes it
        return 0
    nums = make_figures(loaded, shards, args.out, split=split, num_images=args.num_images,
                        t_batch=resolve(args.t_batch, r, "eval.nll_t_batch"), seed=seed, precision=precision,
                        n_progressive=args.rows, lambdas=lambdas, interp_t=args.interp_t, which=which,
                        device=args.device or acc.device, more=args)
    proto = {"split": split, "shards": str(shards), "num_images_fig5": args.num_images, "seed": seed,
             "precision": precision, "interp_t_paper": nums.get("fig8", {}).get("t_paper"), "figures": list(which)}
    write_result(args.out, "figures", nums, proto,
                 {"source": loaded.source, "weights_sha256": weights_sha256(loaded.model)})
    log_figures_to_run(args.src, args.out)  # the run's tracker shows them too, when it has one
    print(json.dumps({"out": str(args.out), **nums}))
    return 0
