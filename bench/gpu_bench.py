"""The GPU benchmark behind bench/gpu.sh: one run, every figure, JSON + Markdown.

Parts, in this order (each one's figures are written as soon as it ends, so a run cut short
keeps what it measured; a part that fails is recorded with its error and the rest go on):

  env        device, torch, CUDA, diffusers; the bf16 matmul rate measured here (8192^3 products),
             the denominator of MFU
  tests      the CUDA-marked tests (pytest -m cuda)
  flops      training FLOPs per image (forward + backward), counted by torch's FlopCounterMode
  train      training img/s, peak memory and MFU, ours vs diffusers' UNet2DModel with identical
             weights (pipeline/convert.py), eager: for cifar10 (batch 128) every fast-path option
             on its own; for lsun256 (batch 64) the plain bf16 and the full fast path
  sampling   Algorithm 2 at 256x256 (lsun256): a few hundred steps timed, img/s extrapolated to
             T = 1000 steps (each step costs the same whatever t is)
  inception  FID feature extraction img/s (torch-fidelity's InceptionV3 through eval.features.features,
             untrained weights: the speed does not depend on their values)
  ema        the EMA update of the lsun256 weights: fused foreach lerp vs a per-tensor loop
  loader     TrainLoader img/s at 256x256 with t/eps drawn by its workers, and the host's
             per-step input time before/after moving that draw (bench/train_rng.py)
  compile    torch.compile (Inductor): ours vs diffusers, lsun256 then cifar10, then 256x256
             sampling; compile time reported; each started only while the time budget leaves room

    bench/gpu.sh OUT_DIR                 # on a CUDA machine, < 8 minutes on one H200
    bench/gpu.sh --cpu-smoke OUT_DIR     # every part on tiny sizes on CPU, < 1 minute
    bench/gpu.sh --parts env,flops,compile OUT2   # a second call for what the budget left out
    bench/gpu.sh --cpu OUT_DIR           # the fast-path options on CPU (cifar10, batch 8, 2 threads)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project root
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import fast_path
from pipeline.atomic import write_json, write_text
from pipeline.convert import diffusers_config, to_diffusers
from pipeline.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.ema import EMA
from pipeline.fast_path import FastPath
from pipeline.presets import PRESETS
from pipeline.unet import UNet

TINY = dict(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
FAST = FastPath(channels_last=True, fused_adam=True, tf32=True)  # the eager fast path


class Run:
    """Sizes, device and the time budget of this run; the results so far."""

    def __init__(self, args):
        self.smoke, self.out = args.cpu_smoke, Path(args.out)
        self.device = torch.device("cpu" if self.smoke or args.cpu else "cuda")
        self.compile_backend = "eager" if self.smoke else "inductor"  # smoke: dynamo traces, no codegen
        self.budget, self.start = args.budget_s, time.perf_counter()
        mode = "cpu-smoke" if self.smoke else "cpu" if args.cpu else "cuda"
        self.results: dict = {"mode": mode, "parts": {}}
        self.presets = ({"tiny": (TINY, 2)} if self.smoke else {"cifar10": (PRESETS["cifar10"], 8)} if args.cpu else
                        {"cifar10": (PRESETS["cifar10"], 128), "lsun256": (PRESETS["lsun256"], 64)})
        self.steps, self.warmup = (1, 1) if self.smoke else (10, 3)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# ------------------------------------------------------------------------------ parts


def part_env(run: Run) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(run.device),
            "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    n = 512 if run.smoke else 2048 if run.device.type == "cpu" else 8192
    a = torch.randn(n, n, device=run.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=run.device, dtype=torch.bfloat16)
    for _ in range(2 if run.smoke else 3):
        a @ b
    run.sync()
    reps = 2 if run.smoke else 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    run.sync()
    info["bf16_matmul_tflops"] = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
    if run.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    run.peak = info["bf16_matmul_tflops"] * 1e12
    return info


def part_tests(_run: Run) -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.strip()]
    return {"files": files, "exit_code": r.returncode, "summary": lines[-1] if lines else r.stderr[-500:],
            "failures": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]}


def make_pair(cfg: dict, device):
    """Ours and diffusers' UNet2DModel with identical weights."""
    import diffusers  # a bench/test dependency, slow to import

    torch.manual_seed(0)
    ours = UNet(**cfg)
    ref = diffusers.UNet2DModel(**diffusers_config(cfg))
    ref.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    return ours.to(device), ref.to(device)


def part_flops(run: Run) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for name, (cfg, _) in run.presets.items():
        model = UNet(**cfg).to(run.device)
        x = torch.randn(2, 3, cfg["resolution"], cfg["resolution"], device=run.device)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, torch.tensor([1, 500], device=run.device)).square().mean().backward()
        out[name] = counter.get_total_flops() / 2
        del model
    run.flops = out
    return {"train_flops_per_image": out}


def train_rate(run: Run, model, call, cfg, batch, fp: FastPath, dtype, compiled=False) -> dict:
    """img/s of forward (autocast) + L_simple + backward + Adam, peak memory, first-step time."""
    fast_path.apply_tf32(fp)
    fast_path.prepare_module(model.train(), fp)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, eps=1e-8, **fast_path.adam_kwargs(fp))
    fwd = torch.compile(model, backend=run.compile_backend) if compiled else model
    g = torch.Generator().manual_seed(1)
    r = cfg["resolution"]
    x = fast_path.to_format(torch.randn(batch, 3, r, r, generator=g).to(run.device), fp)
    t = torch.randint(0, 1000, (batch,), generator=g).to(run.device)
    eps = torch.randn(batch, 3, r, r, generator=g).to(run.device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(run.device.type, dtype=dtype, enabled=dtype is not None):
            out = call(fwd, x, t)
        (out.float() - eps).square().mean().backward()  # eq. 14 in float32
        opt.step()

    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    run.sync()
    first = time.perf_counter() - t0
    for _ in range(run.warmup - 1):
        step()
    run.sync()
    t0 = time.perf_counter()
    for _ in range(run.steps):
        step()
    run.sync()
    per = (time.perf_counter() - t0) / run.steps
    res = {"img_per_s": batch / per, "step_ms": per * 1e3, "first_step_s": first}
    if run.device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    fast_path.apply_tf32(FastPath())
    return res


OURS = lambda m, x, t: m(x, t)
REF = lambda m, x, t: m(x, t).sample


def _variants(name: str):
    bf16 = torch.bfloat16
    if name == "tiny":  # the smoke run: the code paths, not every option
        yield "ours", "fp32", FastPath(), None
    if name == "cifar10":  # every option on its own, then all together
        yield "ours", "fp32", FastPath(), None
        yield "ours", "fp32 + TF32", FastPath(tf32=True), None
        yield "ours", "bf16", FastPath(), bf16
        yield "ours", "bf16 + channels_last", FastPath(channels_last=True), bf16
        yield "ours", "bf16 + fused Adam", FastPath(fused_adam=True), bf16
    yield "ours", "bf16 + channels_last + fused Adam + TF32", FAST, bf16
    if name != "tiny":
        yield "diffusers", "bf16", FastPath(), bf16
    yield "diffusers", "bf16 + channels_last + fused Adam + TF32", FAST, bf16


def _mfu(run: Run, name: str, res: dict) -> None:
    flops = getattr(run, "flops", {}).get(name)
    if flops and getattr(run, "peak", None):
        res["tflops"] = res["img_per_s"] * flops / 1e12
        res["mfu"] = res["img_per_s"] * flops / run.peak


def part_train(run: Run) -> dict:
    rows = []
    for name, (cfg, batch) in run.presets.items():
        for model_name, label, fp, dtype in _variants(name):
            ours, ref = make_pair(cfg, run.device)
            model, call = (ours, OURS) if model_name == "ours" else (ref, REF)
            del ours, ref
            res = train_rate(run, model, call, cfg, batch, fp, dtype)
            _mfu(run, name, res)
            rows.append({"preset": name, "batch": batch, "model": model_name, "options": label, "compile": False, **res})
            del model
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows}


def part_sampling(run: Run, compiled: bool = False) -> dict:
    from pipeline import sampling
    from pipeline.rng import eval_generators

    cfg, batch, steps = (TINY, 2, 3) if run.smoke else (PRESETS["lsun256"], 64, 200)
    net = UNet(**cfg).to(run.device)
    diffusion = GaussianDiffusion(linear_beta_schedule(1000))
    fp = FastPath(channels_last=True, compile=compiled)
    model = fast_path.sampling_model(net, fp, torch.bfloat16, backend=run.compile_backend)
    r = cfg["resolution"]
    gens = eval_generators(0, range(batch), run.device)  # one noise stream per sample, as eval draws
    x = torch.randn(batch, 3, r, r, device=run.device)
    t0 = time.perf_counter()
    sampling.sample_from(diffusion, model, x, 4, gens)  # warm-up (and compilation): 5 steps
    run.sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    sampling.sample_from(diffusion, model, x, steps - 1, gens)
    run.sync()
    per_step = (time.perf_counter() - t0) / steps
    how = "torch.compile" if compiled else "eager"
    return {"preset": "lsun256" if not run.smoke else "tiny", "resolution": r, "batch": batch, "steps_timed": steps,
            "step_ms": per_step * 1e3, "img_per_s_T1000": batch / (per_step * 1000), "warmup_s": first,
            "note": f"{steps} ancestral steps timed (bf16 autocast, channels_last, {how}), extrapolated to T = 1000"}


def part_inception(run: Run) -> dict:
    import numpy as np
    import torch_fidelity.feature_extractor_inceptionv3 as mod

    from eval.features import INCEPTION, features, load_extractor

    class Skeleton(mod.FeatureExtractorInceptionV3):  # untrained weights, no download
        def load_state_dict(self, *args, **kwargs):
            return None

    saved = mod.load_state_dict_from_url
    mod.load_state_dict_from_url = lambda *a, **k: {}
    try:
        sd = Skeleton(INCEPTION, ["2048"]).state_dict()
    finally:
        mod.load_state_dict_from_url = saved
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inception.pth"
        torch.save(sd, path)
        extractor = load_extractor(INCEPTION, weights=str(path), device=run.device)
        for res, n, batch in ([(32, 2, 2)] if run.smoke else [(32, 2048, 256), (256, 1024, 256)]):
            imgs = np.random.default_rng(0).integers(0, 256, (n, res, res, 3), dtype=np.uint8)
            features(imgs[:batch], extractor, batch, run.device, progress=False)  # warm-up
            run.sync()
            t0 = time.perf_counter()
            f = features(imgs, extractor, batch, run.device, progress=False)
            run.sync()
            rows.append({"resolution": res, "images": n, "batch": batch, "img_per_s": n / (time.perf_counter() - t0),
                         "feature_dim": int(f.shape[1])})
    return {"rows": rows}


def part_ema(run: Run) -> dict:
    cfg = TINY if run.smoke else PRESETS["lsun256"]
    model = UNet(**cfg).to(run.device)
    ema = EMA(model, 0.9999)
    params = list(model.parameters())

    def loop():
        with torch.no_grad():
            for s, p in zip(ema.shadow, params):
                s.mul_(ema.decay).add_(p.detach(), alpha=1 - ema.decay)

    out = {"params": sum(p.numel() for p in params)}
    for name, fn in (("foreach_lerp_ms", lambda: ema.update(model)), ("per_tensor_loop_ms", loop)):
        fn()
        times = []
        for _ in range(3 if run.smoke else 20):
            run.sync()
            t0 = time.perf_counter()
            fn()
            run.sync()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) * 1e3
    return out


def part_loader(run: Run) -> dict:
    import train_rng

    from pipeline.data import TrainLoader
    from pipeline.diffusion import NoiseDraw

    res, batch, workers, n = (16, 4, 1, 8) if run.smoke else (256, 64, 8, 512)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = train_rng.make_shards(Path(tmp), res, n)
        loader = TrainLoader(shards, batch_size=batch, seed=0, num_workers=workers, draw=NoiseDraw(0, 1000),
                             pin_memory=run.device.type == "cuda")
        for _ in range(2):
            next(loader)
        count = 2 if run.smoke else 12
        t0 = time.perf_counter()
        for _ in range(count):
            x0, t, eps = (v.to(run.device, non_blocking=True) for v in next(loader))
        run.sync()
        out["loader"] = {"resolution": res, "batch": batch, "workers": workers,
                         "img_per_s": count * batch / (time.perf_counter() - t0)}
        loader.close()
    argv = ["--device", str(run.device), "--workers", str(workers)] + (["--smoke"] if run.smoke else ["--steps", "10", "--step-ms", "250"])
    out["rng_before_after"] = train_rng.main(argv)
    return out


def part_compile(run: Run) -> dict:
    rows = []
    order = ["tiny"] if run.smoke else ["lsun256", "cifar10"]
    need = 5 if run.smoke else 120  # seconds one compiled run (compile + timed steps) may take
    for name in order:
        cfg, batch = run.presets[name]
        for model_name in ("ours",) if run.smoke else ("ours", "diffusers"):  # smoke: the code path once
            if run.left() < need:
                rows.append({"preset": name, "model": model_name, "skipped": f"time budget ({run.left():.0f} s left)"})
                continue
            ours, ref = make_pair(cfg, run.device)
            model, call = (ours, OURS) if model_name == "ours" else (ref, REF)
            del ours, ref
            res = train_rate(run, model, call, cfg, batch, FAST, torch.bfloat16, compiled=True)
            res["compile_s"] = res.pop("first_step_s")
            _mfu(run, name, res)
            rows.append({"preset": name, "batch": batch, "model": model_name, "compile": True,
                         "options": "bf16 + channels_last + fused Adam + TF32 + torch.compile", **res})
            del model
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
    out = {"rows": rows, "backend": run.compile_backend}
    if run.left() >= need:  # Algorithm 2 with the compiled U-Net (compile time in warmup_s)
        out["sampling"] = part_sampling(run, compiled=True)
    else:
        out["sampling"] = {"skipped": f"time budget ({run.left():.0f} s left)"}
    return out


PARTS = [("env", part_env), ("tests", part_tests), ("flops", part_flops), ("train", part_train),
         ("sampling", part_sampling), ("inception", part_inception), ("ema", part_ema),
         ("loader", part_loader), ("compile", part_compile)]


# ------------------------------------------------------------------------------ report


def _fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}%}" if nd == "%" else f"{v:,.{nd}f}"
    return str(v)


def markdown(results: dict) -> str:
    p = results["parts"]
    env = p.get("env", {})
    lines = [f"# bench/gpu.sh ({results['mode']})", "",
             f"{env.get('gpu', env.get('device', '?'))}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"diffusers {env.get('diffusers')}, {env.get('date')}; measured bf16 matmul rate "
             f"{_fmt(env.get('bf16_matmul_tflops'))} TFLOP/s (the MFU denominator).", ""]
    for name, _ in PARTS:
        part = p.get(name)
        if part is None:
            continue
        lines.append(f"## {name}")
        if "error" in part or "skipped" in part:
            lines += [f"{'error' if 'error' in part else 'skipped'}: {part.get('error') or part.get('skipped')}", ""]
            continue
        if name in ("train", "compile"):
            lines += ["| preset | batch | model | options | img/s | step ms | peak GiB | TFLOP/s | MFU | first step / compile s |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in part["rows"]:
                if "skipped" in r:
                    lines.append(f"| {r['preset']} | | {r['model']} | skipped: {r['skipped']} | | | | | | |")
                    continue
                mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
                lines.append(f"| {r['preset']} | {r['batch']} | {r['model']} | {r['options']} | {_fmt(r['img_per_s'])} | "
                             f"{_fmt(r['step_ms'])} | {_fmt(r.get('peak_mem_gib'))} | {_fmt(r.get('tflops'))} | {mfu} | "
                             f"{_fmt(r.get('compile_s', r.get('first_step_s')))} |")
            lines.append(_ratios(part["rows"]))
            if "sampling" in part:
                lines += ["Sampling with the compiled U-Net:", "```json", json.dumps(part["sampling"], indent=1), "```"]
        else:
            lines += ["```json", json.dumps({k: v for k, v in part.items() if k != "seconds"}, indent=1), "```"]
        lines += [f"({part.get('seconds', 0):.0f} s)", ""]
    return "\n".join(lines) + "\n"


def _ratios(rows) -> str:
    """ours/diffusers img/s for each (preset, options, compile) measured for both."""
    by = {(r["preset"], r["options"], r["compile"], r["model"]): r["img_per_s"] for r in rows if "img_per_s" in r}
    out = [f"ours/diffusers img/s, {k[0]}, {k[1]}: **{v / by[(k[0], k[1], k[2], 'diffusers')]:.2f}x**"
           for k, v in by.items() if k[3] == "ours" and (k[0], k[1], k[2], "diffusers") in by]
    return "\n" + "; ".join(out) + "\n" if out else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for results.json and results.md (created)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: proves every part runs")
    ap.add_argument("--cpu", action="store_true",
                    help="cifar10 at batch 8 on CPU: the options that apply there (default parts env,flops,train)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="compile parts start only within this budget")
    ap.add_argument("--parts", default=None, help="comma-separated subset (default: all)")
    args = ap.parse_args(argv)
    args.parts = args.parts or ("env,flops,train" if args.cpu else ",".join(n for n, _ in PARTS))
    if not (args.cpu_smoke or args.cpu) and not torch.cuda.is_available():
        print("bench/gpu.sh: no CUDA device here; use --cpu-smoke to check the script on CPU", file=sys.stderr)
        return 2
    if args.cpu_smoke or args.cpu:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    run = Run(args)
    run.out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.parts.split(","))
    for name, fn in PARTS:
        if name not in wanted:
            continue
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - run.start:6.1f} s] {name} ...", flush=True)
        try:
            part = fn(run)
        except Exception as e:  # record and go on: one broken part must not cost the others
            part = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:500], "traceback": traceback.format_exc()[-3000:]}
        part["seconds"] = time.perf_counter() - t0
        run.results["parts"][name] = part
        write_json(run.out / "results.json", run.results)
        write_text(run.out / "results.md", markdown(run.results))
    run.results["total_s"] = time.perf_counter() - run.start
    write_json(run.out / "results.json", run.results)
    md = markdown(run.results)
    write_text(run.out / "results.md", md)
    print(md)
    errors = [n for n, p in run.results["parts"].items() if "error" in p]
    print(f"total {run.results['total_s']:.0f} s; {len(errors)} part(s) failed: {errors}" if errors
          else f"total {run.results['total_s']:.0f} s; every part ran")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
