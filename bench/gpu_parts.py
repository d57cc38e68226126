"""The parts of bench/gpu.sh (bench/gpu_bench.py runs them, in this file's PARTS order: by value,
so a run cut by its time budget loses the least useful figures). Each part takes the `Run` and
returns a dict; parts with rows add each row through `run.row(...)`, which writes results.json
and results.md at once, so a run killed mid-part keeps every row measured so far."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline import fast_path
from pipeline.convert import diffusers_config, to_diffusers
from pipeline.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.ema import EMA
from pipeline.fast_path import FastPath
from pipeline.presets import PRESETS
from pipeline.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
BF16 = torch.bfloat16


# ------------------------------------------------------------------------------ environment


def part_env(run) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(run.device),
            "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    n = 512 if run.smoke else 8192
    a = torch.randn(n, n, device=run.device, dtype=BF16)
    b = torch.randn(n, n, device=run.device, dtype=BF16)
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


def part_flops(run) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for name in run.presets:
        cfg = run.cfg(name)
        model = UNet(**cfg).to(run.device)
        x = torch.randn(2, 3, cfg["resolution"], cfg["resolution"], device=run.device)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, torch.tensor([1, 500], device=run.device)).square().mean().backward()
        out[name] = counter.get_total_flops() / 2
        del model
    run.flops = out
    return {"train_flops_per_image": out}


# ------------------------------------------------------------------------------ the trainer as users run it


def _trainer_variants():
    """(label, overrides of lsun_bedroom.yaml): the recipe as shipped first, then one change each."""
    yield "replica (recipe), NCHW", dict(clip_scope="replica", channels_last=False, compile=False)
    yield "global, NCHW", dict(clip_scope="global", channels_last=False, compile=False)
    yield "replica, channels_last", dict(clip_scope="replica", channels_last=True, compile=False)
    yield "global, channels_last", dict(clip_scope="global", channels_last=True, compile=False)
    yield "replica, NCHW, cudnn.benchmark off", dict(clip_scope="replica", channels_last=False, compile=False,
                                                      cudnn_benchmark=False)


def _trainer_row(run, part: str, label: str, need: float, **train) -> dict:
    from gpu_trainer import trainer_row

    if run.left() < need:
        return run.row(part, {"variant": label, "skipped": f"time budget ({run.left():.0f} s left)"})
    res = trainer_row(run.shards(), Path(run.tmp) / "run", smoke=run.smoke, steps=run.steps, warmup=run.warmup,
                      **train)
    run.mfu("lsun256", res)
    return run.row(part, {"variant": label, "compile": bool(train.get("compile")), **res})


def part_trainer(run) -> dict:
    """pipeline.trainer.train_step on lsun_bedroom.yaml (batch 64, bf16), eager."""
    for label, train in _trainer_variants():
        _trainer_row(run, "trainer", label, 25, **train)
    # The upper bound: one bare forward/backward/Adam step of the same 64 images, no loader,
    # clipping, EMA or syncs, with the trainer's CUDA options.
    cfg, batch = run.cfg("lsun256"), run.batch("lsun256")
    fp = FastPath(fused_adam=True, tf32=True, cudnn_benchmark=run.device.type == "cuda")
    res = train_rate(run, UNet(**cfg).to(run.device), OURS, cfg, batch, fp, run.dtype)
    run.mfu("lsun256", res)
    run.row("trainer", {"variant": "bare step (no loader, clip, EMA, syncs): upper bound", "compile": False, **res})
    return {}


def faster_layout(run) -> bool:
    """channels_last if the eager trainer rows measured it faster for replica clipping."""
    rows = {r["variant"]: r.get("img_per_s", 0) for r in run.rows("trainer")}
    return rows.get("replica, channels_last", 0) > rows.get("replica (recipe), NCHW", 0)


def part_compile(run) -> dict:
    """The same trainer with torch.compile (static shapes), replica then global, in the faster
    layout of the eager rows; dynamo is reset between models (trainer_row)."""
    cl = faster_layout(run)
    layout = "channels_last" if cl else "NCHW"
    for scope in ("replica", "global"):
        _trainer_row(run, "compile", f"{scope}, {layout}, torch.compile", 5 if run.smoke else 100, clip_scope=scope,
                     channels_last=cl, compile=True)
    return {"backend": "inductor"}


# ------------------------------------------------------------------------------ the peer


def part_peer(run) -> dict:
    """diffusers' unconditional example loop (bench/diffusers_peer.py) on the same GPU, batch,
    precision and network, with its default data workers (0) and with 8; then the bare
    diffusers step, beside ours."""
    from diffusers_peer import example_loop_row

    cfg, batch = run.cfg("lsun256"), run.batch("lsun256")
    for workers in (0, 1 if run.smoke else 8):
        if run.left() < 20:
            run.row("peer", {"variant": f"example loop, {workers} workers", "skipped": "time budget"})
            continue
        res = example_loop_row(run.images(), cfg, batch, steps=run.steps, warmup=run.warmup, workers=workers,
                               device=run.device)
        run.mfu("lsun256", res)
        run.row("peer", {"variant": f"diffusers example loop, dataloader_num_workers={workers}", **res})
    _ours, ref = make_pair(cfg, run.device)
    del _ours
    fp = FastPath(fused_adam=True, tf32=True, cudnn_benchmark=run.device.type == "cuda")
    res = train_rate(run, ref, REF, cfg, batch, fp, run.dtype)
    run.mfu("lsun256", res)
    run.row("peer", {"variant": "bare diffusers UNet2DModel step (no loader, clip, EMA)", **res})
    return {}


# ------------------------------------------------------------------------------ the real trainer on CUDA


def part_smoke(run) -> dict:
    """pipeline/train.py itself on the device: a tiny model, 20 steps with global clipping, and
    with replica clipping 10 steps, stopped, then resumed to 20 from its checkpoint."""
    from gpu_trainer import SMOKE

    from pipeline.checkpoint import latest_checkpoint

    shards = run.shards(res=16)
    out = {}
    base = [str(ROOT / "recipes" / "lsun_bedroom.yaml"), f"data.shards={shards}", "run.tracker=none",
            "train.sample_every=0", "train.log_every=5", "train.checkpoint_every=10", "train.warmup_steps=2",
            *[o for o in SMOKE if "mixed_precision" not in o],
            "train.mixed_precision=" + ("no" if run.device.type == "cpu" else "bf16")]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for scope in ("global", "replica"):
        folder = Path(run.tmp) / f"smoke-{scope}"
        legs = [20] if scope == "global" else [10, 20]
        for steps in legs:
            cmd = [sys.executable, "-m", "pipeline.train", *base, f"run.output_dir={folder}",
                   f"train.clip_scope={scope}", f"train.max_steps={steps}"]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=180)
            if r.returncode != 0:
                raise RuntimeError(f"{scope}, {steps} steps: exit {r.returncode}: {(r.stderr or r.stdout)[-800:]}")
        newest = latest_checkpoint(folder)
        out[scope] = {"legs": legs, "newest_checkpoint": newest.name if newest else None,
                      "resumed": "resum" in r.stdout.lower() if len(legs) > 1 else None,
                      "last_lines": r.stdout.strip().splitlines()[-3:]}
        if newest is None or not newest.name.endswith("20"):
            raise RuntimeError(f"{scope}: no step-20 checkpoint ({newest})")
    return out


# ------------------------------------------------------------------------------ bare steps, sampling, features, EMA, loader


def make_pair(cfg: dict, device):
    """Ours and diffusers' UNet2DModel with identical weights."""
    import diffusers  # a bench/test dependency, slow to import

    torch.manual_seed(0)
    ours = UNet(**cfg)
    ref = diffusers.UNet2DModel(**diffusers_config(cfg))
    ref.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    return ours.to(device), ref.to(device)


def OURS(m, x, t):
    return m(x, t)


def REF(m, x, t):
    return m(x, t).sample


def train_rate(run, model, call, cfg, batch, fp: FastPath, dtype, compiled=False) -> dict:
    """img/s of a bare step: forward (autocast) + L_simple + backward + Adam, peak memory."""
    from gpu_trainer import timed

    fast_path.apply_tf32(fp)
    fast_path.prepare_module(model.train(), fp)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, eps=1e-8, **fast_path.adam_kwargs(fp))
    fwd = torch.compile(model, backend=run.compile_backend, dynamic=False) if compiled else model
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

    res = timed(step, batch, run.device, run.steps, run.warmup)
    fast_path.apply_tf32(FastPath())
    return res


def part_sampling(run, compiled: bool = False) -> dict:
    from pipeline import sampling
    from pipeline.rng import eval_generators

    cfg, batch, steps = (TINY, 2, 3) if run.smoke else (PRESETS["lsun256"], 64, 200)
    net = UNet(**cfg).to(run.device)
    diffusion = GaussianDiffusion(linear_beta_schedule(1000))
    fp = FastPath(channels_last=faster_layout(run), compile=compiled)
    fast_path.strict_fp32()
    model = fast_path.sampling_model(net, fp, BF16, backend=run.compile_backend)
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
    layout = "channels_last" if fp.channels_last else "NCHW"
    return {"preset": "lsun256" if not run.smoke else "tiny", "resolution": r, "batch": batch, "steps_timed": steps,
            "step_ms": per_step * 1e3, "img_per_s_T1000": batch / (per_step * 1000), "warmup_s": first,
            "note": f"{steps} ancestral steps timed (bf16 autocast, {layout}, {how}), extrapolated to T = 1000"}


def part_sampling_compiled(run) -> dict:
    if run.left() < (5 if run.smoke else 90):
        return {"skipped": f"time budget ({run.left():.0f} s left)"}
    out = part_sampling(run, compiled=True)
    torch._dynamo.reset()
    return out


def part_inception(run) -> dict:
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
    return {"rows": rows, "precision": "fp32, TF32 off (eval's setting)"}


def part_ema(run) -> dict:
    model = UNet(**run.cfg("lsun256")).to(run.device)
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


def part_loader(run) -> dict:
    import train_rng

    from pipeline.data import TrainLoader
    from pipeline.diffusion import NoiseDraw

    res, batch, workers = (16, 4, 1) if run.smoke else (256, 64, 8)
    out = {}
    loader = TrainLoader(run.shards(res=res), batch_size=batch, seed=0, num_workers=workers, draw=NoiseDraw(0, 1000),
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


def part_tests(run) -> dict:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-x", *files]
    cap = max(10.0, min(90.0, run.left()))
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cap)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"files": files, "exit_code": None, "summary": f"stopped at the {cap:.0f} s cap",
                "passed_so_far": out.count(".")}
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.strip()]
    return {"files": files, "exit_code": r.returncode, "summary": lines[-1] if lines else r.stderr[-500:],
            "failures": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]}


def part_cifar10(run) -> dict:
    """Bare steps of the CIFAR-10 model (batch 128): each fast-path option on its own, ours vs
    diffusers' UNet2DModel with identical weights."""
    name = "tiny" if run.smoke else "cifar10"
    cfg, batch = run.cfg(name), run.batch(name)
    variants = [("ours", "fp32", FastPath(), None), ("ours", "bf16", FastPath(), BF16),
                ("ours", "bf16 + channels_last", FastPath(channels_last=True), BF16),
                ("ours", "bf16 + fused Adam + TF32", FastPath(fused_adam=True, tf32=True), BF16),
                ("diffusers", "bf16 + fused Adam + TF32", FastPath(fused_adam=True, tf32=True), BF16)]
    for model_name, label, fp, dtype in variants[-2:] if run.smoke else variants:
        if run.left() < 10:
            run.row("cifar10", {"model": model_name, "options": label, "skipped": "time budget"})
            continue
        ours, ref = make_pair(cfg, run.device)
        model, call = (ours, OURS) if model_name == "ours" else (ref, REF)
        del ours, ref
        res = train_rate(run, model, call, cfg, batch, fp, dtype if run.device.type == "cuda" else None)
        run.mfu(name, res)
        run.row("cifar10", {"model": model_name, "options": label, "batch": batch, **res})
        del model
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    return {}


PARTS = [("env", part_env), ("flops", part_flops), ("trainer", part_trainer), ("compile", part_compile),
         ("peer", part_peer), ("smoke", part_smoke), ("sampling", part_sampling), ("inception", part_inception),
         ("ema", part_ema), ("loader", part_loader), ("tests", part_tests),
         ("sampling_compiled", part_sampling_compiled), ("cifar10", part_cifar10)]
