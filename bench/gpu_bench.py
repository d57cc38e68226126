"""The GPU benchmark behind bench/gpu.sh: one run, every figure, JSON + Markdown, row by row.

Parts, by value (bench/gpu_parts.py), under one overall time budget; each row is written to
results.json / results.md the moment it is measured, and a part or row the budget cuts is
recorded as skipped, to be rerun with --parts:

  env        device, torch, CUDA, diffusers; the bf16 matmul rate measured here (the MFU denominator)
  flops      training FLOPs per image (forward + backward), counted by torch's FlopCounterMode
  trainer    pipeline.trainer.train_step as users run it: recipes/lsun_bedroom.yaml (lsun256,
             batch 64, bf16) with its loader, t/eps draws, clipper, EMA and host syncs: replica
             vs global clipping, NCHW vs channels_last, cudnn.benchmark on/off; img/s, peak
             memory, MFU, host syncs per step; and the bare step (no loader, clip, EMA) as the
             upper bound
  compile    the same trainer with torch.compile (static shapes), replica and global
  peer       the training loop of diffusers' unconditional example (bench/diffusers_peer.py) on
             the same network, batch and precision; and its bare UNet2DModel step
  smoke      pipeline/train.py on the device: a tiny recipe, 20 steps global, 10 + 10 replica
             (checkpoint written, then resumed)
  sampling   Algorithm 2 at 256x256 (lsun256): 200 steps timed, img/s extrapolated to T = 1000
  inception  FID feature extraction img/s (torch-fidelity's InceptionV3, untrained weights)
  ema        the EMA update of the lsun256 weights: fused foreach lerp vs a per-tensor loop
  loader     TrainLoader img/s at 256x256 with t/eps drawn by its workers
  tests      the CUDA-marked tests (pytest -m cuda), capped at 90 s
  sampling_compiled, cifar10   compiled 256x256 sampling; CIFAR-10 bare steps per option

    bench/gpu.sh OUT_DIR                        # on a CUDA machine, ~7 minutes on one H200
    bench/gpu.sh --cpu-smoke OUT_DIR            # every part on tiny sizes on CPU, ~2 minutes
    bench/gpu.sh --parts compile,peer OUT2      # a second call for what the budget cut

Before any part, a preflight of a few seconds checks CUDA and every import the parts need, and
exits 2 with a one-line fix (e.g. the wheels of .whl/: bench/gpu_wheels.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project root
sys.path.insert(0, str(ROOT / "bench"))

from gpu_parts import PARTS, TINY

from pipeline.atomic import write_json, write_text
from pipeline.presets import PRESETS

NEEDS = ["diffusers", "torch_fidelity", "lmdb", "accelerate", "safetensors", "yaml", "PIL", "torchvision", "tqdm"]


def preflight(cuda: bool) -> str | None:
    """The one-line fix for a machine that cannot run the parts, or None."""
    if cuda and not torch.cuda.is_available():
        return "no CUDA device here; use --cpu-smoke to check the script on CPU"
    import importlib

    missing = []
    for name in NEEDS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        have = sorted(p.name for p in (ROOT / ".whl").glob("*.whl"))
        where = f".whl/ holds {len(have)} wheels" if have else ".whl/ is empty or missing"
        return (f"cannot import {', '.join(missing)} ({where}); run bench/gpu_wheels.sh where pip reaches PyPI "
                "and carry .whl to this machine")
    return None


class Run:
    """Sizes, device, the time budget and the results so far (written at every row)."""

    def __init__(self, args):
        self.smoke, self.out = args.cpu_smoke, Path(args.out)
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.dtype = None if self.smoke else torch.bfloat16
        self.compile_backend = "eager" if self.smoke else "inductor"  # smoke: dynamo traces, no codegen
        self.budget, self.start = args.budget_s, time.perf_counter()
        self.results: dict = {"mode": "cpu-smoke" if self.smoke else "cuda", "budget_s": self.budget, "parts": {}}
        self.steps, self.warmup = (2, 1) if self.smoke else (10, 3)
        self.presets = ["tiny"] if self.smoke else ["lsun256", "cifar10"]
        self.tmp = tempfile.mkdtemp(prefix="ddpm-gpu-bench-")
        self._shards: dict = {}
        self.peak = self.flops = None

    def cfg(self, name: str) -> dict:
        return TINY if self.smoke else PRESETS[name]

    def batch(self, name: str) -> int:
        return 8 if self.smoke else {"lsun256": 64, "cifar10": 128}[name]

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def shards(self, res: int | None = None) -> Path:
        """data_prep shards of smooth random images at `res` (default: the lsun256 resolution), made once."""
        import train_rng

        res = res or self.cfg("lsun256")["resolution"]
        if res not in self._shards:
            self._shards[res] = train_rng.make_shards(Path(self.tmp) / f"data{res}", res, 16 if self.smoke else 512)
        return self._shards[res]

    def images(self) -> Path:
        """The image files behind the lsun256 shards (the diffusers example reads files)."""
        return self.shards().parent / "img"

    def mfu(self, name: str, res: dict) -> None:
        flops = (self.flops or {}).get("tiny" if self.smoke else name)
        if flops and self.peak and "img_per_s" in res:
            res["tflops"] = res["img_per_s"] * flops / 1e12
            res["mfu"] = res["img_per_s"] * flops / self.peak

    def part(self, name: str) -> dict:
        return self.results["parts"].setdefault(name, {})

    def rows(self, name: str) -> list:
        return self.results["parts"].get(name, {}).get("rows", [])

    def row(self, name: str, row: dict) -> dict:
        self.part(name).setdefault("rows", []).append(row)
        print(f"  {name}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
              flush=True)
        self.save()
        return row

    def save(self) -> None:
        self.results["elapsed_s"] = time.perf_counter() - self.start
        write_json(self.out / "results.json", self.results)
        write_text(self.out / "results.md", markdown(self.results))


# ------------------------------------------------------------------------------ report


def _fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, list):
        return "-".join(_fmt(x, nd) for x in v)
    return str(v)


COLUMNS = [("img/s", "img_per_s"), ("step ms", "step_ms"), ("range ms", "step_ms_range"), ("peak GiB", "peak_mem_gib"),
           ("TFLOP/s", "tflops"), ("MFU", "mfu"), ("host syncs/step", "host_syncs_per_step"),
           ("first step s", "first_step_s")]


def _table(rows: list) -> list:
    head = "variant" if "variant" in rows[0] else "model / options"
    lines = [f"| {head} | " + " | ".join(c for c, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        name = r.get("variant") or f"{r.get('model')}, {r.get('options')}"
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} |" + " |" * (len(COLUMNS) - 1))
            continue
        cells = [f"{r[k]:.1%}" if k == "mfu" and k in r else _fmt(r.get(k)) for _, k in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def ratios(parts: dict) -> list:
    """The goals' ratios: ours vs the diffusers example, replica vs global."""
    by = {r["variant"]: r for p in ("trainer", "compile", "peer") for r in parts.get(p, {}).get("rows", [])
          if "img_per_s" in r}
    ours = max((r for v, r in by.items() if v.startswith("replica")), key=lambda r: r["img_per_s"], default=None)
    peer = max((r for v, r in by.items() if v.startswith("diffusers example")), key=lambda r: r["img_per_s"],
               default=None)
    out = []
    if ours and peer:
        out.append(f"ours (recipe, best replica row) / diffusers example loop (best row) img/s: "
                   f"**{ours['img_per_s'] / peer['img_per_s']:.2f}x**")
    for layout in ("NCHW", "channels_last"):
        rep = by.get("replica (recipe), NCHW" if layout == "NCHW" else "replica, channels_last")
        glo = by.get(f"global, {layout}")
        if rep and glo:
            out.append(f"replica / global step time, {layout}: **{rep['step_ms'] / glo['step_ms']:.3f}x**")
    return out


def markdown(results: dict) -> str:
    p = results["parts"]
    env = p.get("env", {})
    lines = [f"# bench/gpu.sh ({results['mode']})", "",
             f"{env.get('gpu', env.get('device', '?'))}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"diffusers {env.get('diffusers')}, {env.get('date')}; measured bf16 matmul rate "
             f"{_fmt(env.get('bf16_matmul_tflops'))} TFLOP/s (the MFU denominator); "
             f"{_fmt(results.get('elapsed_s'), 0)} s of a {_fmt(results.get('budget_s'), 0)} s budget.", ""]
    lines += [f"- {r}" for r in ratios(p)] + [""]
    for name, _ in PARTS:
        part = p.get(name)
        if part is None:
            continue
        lines.append(f"## {name}")
        if part.get("rows") and isinstance(part["rows"][0], dict) and ("variant" in part["rows"][0]
                                                                          or "options" in part["rows"][0]):
            lines += _table(part["rows"])
        rest = {k: v for k, v in part.items() if k not in ("rows", "seconds", "traceback")}
        if rest or (part.get("rows") and not lines[-1].startswith("|")):
            lines += ["```json", json.dumps(rest if not part.get("rows") or lines[-1].startswith("|")
                                            else part, indent=1), "```"]
        lines += [f"({part.get('seconds', 0):.0f} s)", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for results.json and results.md (created)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: proves every part runs")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="overall seconds; a part or row that would not fit is skipped and recorded "
                         "(default 420 on CUDA; 3600 for --cpu-smoke, which proves code paths, not speed)")
    ap.add_argument("--parts", default=None, help="comma-separated subset, in the order above (default: all)")
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 3600.0 if args.cpu_smoke else 420.0
    known = [n for n, _ in PARTS]
    wanted = args.parts.split(",") if args.parts else known
    if [w for w in wanted if w not in known]:
        print(f"bench/gpu.sh: unknown part(s) {[w for w in wanted if w not in known]}; parts: {','.join(known)}",
              file=sys.stderr)
        return 2
    problem = preflight(cuda=not args.cpu_smoke)
    if problem:
        print(f"bench/gpu.sh: {problem}", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    run = Run(args)
    run.out.mkdir(parents=True, exist_ok=True)
    if "flops" not in wanted and "env" not in wanted:  # MFU needs both: they take seconds
        wanted = ["env", "flops", *wanted]
    for name, fn in PARTS:
        if name not in wanted:
            continue
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - run.start:6.1f} s] {name} ...", flush=True)
        try:
            part = fn(run)
        except Exception as e:  # record and go on: one broken part must not cost the others
            part = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:500], "traceback": traceback.format_exc()[-3000:]}
            print(f"  {name}: {part['error']}", flush=True)
        part = {**run.part(name), **part, "seconds": time.perf_counter() - t0}
        run.results["parts"][name] = part
        run.save()
    md = markdown(run.results)
    print(md)
    errors = [n for n, p in run.results["parts"].items() if "error" in p]
    print(f"total {run.results['elapsed_s']:.0f} s; {len(errors)} part(s) failed: {errors}" if errors
          else f"total {run.results['elapsed_s']:.0f} s; every part ran")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
