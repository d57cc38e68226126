"""`eval sample`: ancestral sampling (Algorithm 2) from the EMA weights, over all processes.

Layout of the output directory:
    OUT/samples.json            the protocol (sampler, steps, variance, seed, count, chunk size,
                                weights hash) and, when finished, the list of chunks
    OUT/chunks/chunk-000123.npz images uint8 [n, H, W, 3], their global indices and the
                                sha256 of the images (also listed in samples.json)
    OUT/grid.png                the first 64 samples, for a look
Sample i is drawn from its own generator seeded by (seed, i) (`pipeline.rng.eval_seed`), so it is the
same image whatever the batch size or the number of processes. Chunk c holds samples
[c*chunk_size, (c+1)*chunk_size); it is written to a temporary name and renamed when whole,
so a chunk file that exists is complete. A restarted job lists the chunks (and parts of
chunks) that exist and draws only the rest, in equal shares per process whatever the chunk size
(eval/work.py), so nothing is redone or duplicated and no process waits on another. A chunk that does not load, holds other indices or fails its checksum (a disk
that lost the tail of a file) is moved aside as `.bad` and drawn again, never counted as done. The DDIM sampler is beyond the paper and is labelled so in the protocol.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from eval.common import EvalError, accelerator, add_model_args, load_model, resolve, to_uint8
from eval.results import BEYOND_PAPER, mark_paper_protocol, weights_sha256
from eval.work import assemble, chunk_problem, missing, part_path, split, write_images
from pipeline import build, fast_path
from pipeline.atomic import atomic_path, write_json
from pipeline.hub import Pretrained
from pipeline.rng import eval_generators

CHUNK_RE = "chunk-{:06d}.npz"


def protocol_for(loaded: Pretrained, *, num_samples: int, seed: int, sampler: str, steps: int | None,
                 eta: float, var_type: str | None, precision: str, chunk_size: int) -> dict:
    d = loaded.diffusion
    proto = {
        "sampler": sampler,
        "steps": int(d.num_timesteps) if sampler == "ancestral" else int(steps),
        "var_type": var_type or d.var_type,
        "mean_type": d.mean_type,
        "num_samples": int(num_samples),
        "seed": int(seed),
        "chunk_size": int(chunk_size),
        "precision": precision,
        "weights_sha256": weights_sha256(loaded.model),
        "source": loaded.source,
    }
    if sampler == "ddim":
        proto["eta"] = float(eta)
        proto["note"] = BEYOND_PAPER
    return mark_paper_protocol(proto, "sample")


def chunk_path(out: Path, c: int) -> Path:
    return out / "chunks" / CHUNK_RE.format(c)


def done_chunks(out: Path, n_chunks: int) -> set[int]:
    return {c for c in range(n_chunks) if chunk_path(out, c).is_file()}


def verified_todo(out: Path, n_chunks: int, chunk_size: int, num_samples: int) -> list[int]:
    """The chunks still to draw: missing ones, and damaged ones (moved aside, then redrawn)."""
    recorded = {}
    if (out / "samples.json").is_file():
        recorded = json.loads((out / "samples.json").read_text()).get("checksums") or {}
    todo = []
    for c in range(n_chunks):
        path = chunk_path(out, c)
        if not path.is_file():
            todo.append(c)
            continue
        lo = c * chunk_size
        why = chunk_problem(path, lo, lo + _chunk_len(c, chunk_size, num_samples), recorded.get(path.name))
        if why:
            bad = path.with_name(f"{path.name}.bad")
            os.replace(path, bad)
            print(f"warning: {path}: {why}; moved to {bad.name} and drawn again", flush=True)
            todo.append(c)
    return todo


def _check_protocol(out: Path, proto: dict) -> None:
    """A directory keeps the samples of one protocol; resuming with another is an error."""
    path = out / "samples.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())["protocol"]
    if old.get("precision") == "no":  # written before precision was named fp32
        old["precision"] = "fp32"
    derived = ("source", "paper_protocol", "paper_protocol_caveats")  # follow from the rest
    keys = [k for k in proto if k not in derived and old.get(k) != proto[k]]
    if keys:
        k = keys[0]
        raise EvalError(f"{path}: holds samples with {k}={old.get(k)!r}, asked for {proto[k]!r}; "
                        "use another --out")


def sampling_model(loaded: Pretrained, precision: str, device) -> Callable:
    """The U-Net as the samplers call it: autocast for bf16/fp16 (eq. 11's arithmetic stays
    float32), and on CUDA the recipe's layout and torch.compile (`train.channels_last`,
    `train.compile`; "auto" = on for CUDA). TF32 is off: an fp32 protocol means fp32 products."""
    fast_path.strict_fp32()
    fp = dataclasses.replace(fast_path.resolve(loaded.recipe.train, device), fused_adam=False, tf32=False,
                             cudnn_benchmark=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return fast_path.sampling_model(loaded.model, fp, dtype, fallback=loaded.recipe.train.compile == "auto")


def draw(loaded: Pretrained, model: Callable, indices, *, seed: int, sampler: str, steps: int | None,
         eta: float, device, on_step: Callable[[], None] | None = None) -> np.ndarray:
    """Samples for the given global indices as uint8 [n, H, W, 3]; `on_step()` after each
    denoising step (a progress bar: at 256x256 one batch of T = 1000 steps takes minutes)."""
    d = loaded.diffusion
    r = loaded.recipe.model.unet_kwargs()
    shape = (len(indices), r.get("in_channels", 3), r["resolution"], r["resolution"])
    gens = eval_generators(seed, indices, device)
    tick = (lambda *_: on_step()) if on_step is not None else None
    with torch.inference_mode():
        if sampler == "ancestral":
            x = d.p_sample_loop(model, shape, generator=gens, callback=tick)  # Algorithm 2
        else:
            x = d.ddim_sample_loop(model, shape, steps, eta=eta, generator=gens, callback=tick)
    return to_uint8(x)


def sampling_bar(n_images: int, batch_size: int, steps: int, rank: int, enabled: bool) -> tqdm:
    """One bar over denoising steps x batches of this process's share (total known up front)."""
    batches = math.ceil(n_images / batch_size)
    return tqdm(total=batches * steps, unit="step", mininterval=2.0, disable=not enabled,
                desc=f"sampling [{rank}] {n_images} images: {batches} batches x {steps} steps")


def run_sampling(loaded: Pretrained, out: str | os.PathLike, *, num_samples: int, batch_size: int, seed: int = 0,
                 sampler: str = "ancestral", steps: int | None = None, eta: float = 0.0,
                 var_type: str | None = None, precision: str = "fp32", chunk_size: int = 1000,
                 device=None, acc=None, stop_after_chunks: int | None = None) -> dict:
    """Draw the missing chunks of OUT; returns the protocol. `stop_after_chunks` (tests) ends
    the job early as a preemption would."""
    if sampler == "ddim" and steps is None:
        raise EvalError("--sampler ddim needs --steps N")
    if sampler == "ddim" and not 1 <= steps <= loaded.diffusion.num_timesteps:
        raise EvalError(f"--steps {steps}: DDIM steps must be in [1, T = {loaded.diffusion.num_timesteps}]")
    precision = "fp32" if precision == "no" else precision
    acc = acc or accelerator()
    device = torch.device(device) if device else acc.device
    loaded.model.to(device)
    if var_type and var_type != loaded.diffusion.var_type:
        # eval.var_type: the same diffusion with another reverse variance
        cfg = dataclasses.replace(loaded.recipe.diffusion, var_type=var_type)
        loaded = dataclasses.replace(loaded, diffusion=build.diffusion(cfg))
    out = Path(out)
    proto = protocol_for(loaded, num_samples=num_samples, seed=seed, sampler=sampler, steps=steps,
                         eta=eta, var_type=var_type, precision=precision, chunk_size=chunk_size)
    n_chunks = math.ceil(num_samples / chunk_size)
    if acc.is_main_process:
        (out / "chunks").mkdir(parents=True, exist_ok=True)
        (out / "parts").mkdir(exist_ok=True)
        _check_protocol(out, proto)
        if not (out / "samples.json").is_file():
            write_json(out / "samples.json", {"protocol": proto, "complete": False, "chunks": []})
    acc.wait_for_everyone()
    from accelerate.utils import broadcast_object_list, gather_object  # imported here: `--help` stays fast

    chunks = {c: (c * chunk_size, c * chunk_size + _chunk_len(c, chunk_size, num_samples)) for c in range(n_chunks)}
    if acc.is_main_process:
        todo = verified_todo(out, n_chunks, chunk_size, num_samples)
        plan = [todo, missing(out, chunks, set(chunks) - set(todo))]
    box = broadcast_object_list([plan if acc.is_main_process else None])  # rank 0 checked the files: all agree
    todo, left = box[0]
    mine = split(left, acc.num_processes)[acc.process_index]  # equal shares of samples, not whole chunks
    model = sampling_model(loaded, precision, device)
    # One bar per machine (its first process), over its own share.
    bar = sampling_bar(sum(hi - lo for lo, hi in mine), batch_size, proto["steps"], acc.process_index,
                       acc.is_local_main_process)
    written = _draw_share(out, mine, chunks, chunk_size, lambda idx: draw(
        loaded, model, idx, seed=seed, sampler=sampler, steps=steps, eta=eta, device=device,
        on_step=lambda: bar.update(1)), batch_size, stop_after_chunks)
    bar.close()
    acc.wait_for_everyone()
    for c in todo[acc.process_index :: acc.num_processes]:  # chunks drawn in parts: put together
        if not chunk_path(out, c).is_file():
            assemble(out, chunk_path(out, c), *chunks[c])
    drawn = gather_object([written])
    acc.wait_for_everyone()
    if acc.is_main_process:
        done = sorted(done_chunks(out, n_chunks))
        write_json(out / "samples.json", {"protocol": proto, "complete": len(done) == n_chunks,
                                          "processes": acc.num_processes,  # of the last run
                                          "drawn_per_process": drawn,  # samples each drew in the last run
                                          "chunks": [chunk_path(out, c).name for c in done],
                                          "checksums": _checksums(out, done)})
        if done and 0 in done:
            save_grid(load_samples(out, limit=64), out / "grid.png")
    acc.wait_for_everyone()
    return proto


def _draw_share(out: Path, mine: list, chunks: dict, chunk_size: int, draw_batch: Callable, batch_size: int,
                stop_after: int | None) -> int:
    """Draw this process's pieces `mine` ([lo, hi) ranges) in batches that may run across pieces
    and write each piece when it is complete: a whole chunk as the chunk, else as a part.
    Returns the samples written. `stop_after` files (tests) ends early, as a preemption would."""
    flat = [i for lo, hi in mine for i in range(lo, hi)]
    pieces, buf, have, written, files = list(mine), [], 0, 0, 0
    for b in range(0, len(flat), batch_size):
        idx = flat[b : b + batch_size]
        buf.append(draw_batch(idx))
        have += len(idx)
        while pieces and have >= pieces[0][1] - pieces[0][0]:
            lo, hi = pieces.pop(0)
            images = np.concatenate(buf)
            buf, have = [images[hi - lo :]], have - (hi - lo)
            c = lo // chunk_size
            write_images(chunk_path(out, c) if chunks[c] == (lo, hi) else part_path(out, lo, hi), images[: hi - lo], lo)
            written, files = written + hi - lo, files + 1
            if stop_after is not None and files >= stop_after:
                return written  # preempted: what was not written is lost
    return written


def _checksums(out: Path, done: list[int]) -> dict:
    """name -> sha256 of the images of each finished chunk (as written inside the chunk)."""
    sums = {}
    for c in done:
        with np.load(chunk_path(out, c), allow_pickle=False) as z:
            if "sha256" in z.files:
                sums[chunk_path(out, c).name] = str(z["sha256"])
    return sums


def _chunk_len(c: int, chunk_size: int, num_samples: int) -> int:
    return min(chunk_size, num_samples - c * chunk_size)


def load_samples(out: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """All finished samples of OUT in index order, uint8 [n, H, W, 3]."""
    out = Path(out)
    files = sorted((out / "chunks").glob("chunk-*.npz"))
    if not files:
        raise EvalError(f"{out}: no sample chunks (run `python -m eval sample` first)")
    arrays, n = [], 0
    for f in files:
        with np.load(f) as z:
            arrays.append(z["images"])
        n += len(arrays[-1])
        if limit is not None and n >= limit:
            break
    x = np.concatenate(arrays)
    return x[:limit] if limit is not None else x


class SampleChunks:
    """All finished samples of OUT as one indexable uint8 [n, H, W, 3] sequence, reading one
    chunk at a time (50,000 samples at 256x256 are 9.8 GB: never all in memory)."""

    def __init__(self, out: str | os.PathLike, num_samples: int | None = None, chunk_size: int | None = None):
        if num_samples is not None:  # the requested range only: a stray chunk (a copy, another run's) is never scored
            self.files = [chunk_path(Path(out), c) for c in range(math.ceil(num_samples / chunk_size))]
            missing = [f for f in self.files if not f.is_file()]
            if missing:
                raise EvalError(f"{missing[0]}: missing ({len(missing)} chunks); run the same command again to draw it")
        else:
            self.files = sorted((Path(out) / "chunks").glob("chunk-*.npz"))
        if not self.files:
            raise EvalError(f"{out}: no sample chunks (run `python -m eval sample` first)")
        self.starts = [0]
        for f in self.files:
            with np.load(f) as z:
                self.starts.append(self.starts[-1] + len(z["indices"]))
        self._cached = (-1, None)

    def __len__(self):
        return self.starts[-1]

    def parts(self):
        """The chunks' image arrays in index order, one at a time."""
        for f in self.files:
            with np.load(f) as z:
                yield z["images"]

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        c = int(np.searchsorted(self.starts, i, side="right")) - 1
        if self._cached[0] != c:
            with np.load(self.files[c]) as z:
                self._cached = (c, z["images"])
        return self._cached[1][i - self.starts[c]]


def save_grid(images: np.ndarray, path: str | os.PathLike, ncol: int | None = None) -> None:
    """uint8 [n, H, W, 3] -> one PNG grid with 2-pixel gaps, written atomically."""
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    pad = 2
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = im
    with atomic_path(path) as tmp:
        Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(tmp)


def add_sampling_args(p, optional_src: bool = False) -> None:
    add_model_args(p, optional_src)
    add_sampling_options(p)


def add_sampling_options(p) -> None:
    """How to sample (everything but which model and where to)."""
    p.add_argument("--num-samples", type=int, default=None, help="default: the recipe's eval.num_samples")
    p.add_argument("--batch-size", type=int, default=None, help="per process; default: eval.batch_size")
    p.add_argument("--seed", type=int, default=None, help="base seed; default: eval.seed")
    p.add_argument("--sampler", choices=("ancestral", "ddim"), default=None,
                   help="ancestral = the paper (T steps); ddim = beyond the paper, fewer steps")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: eval.ddim_steps)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--var-type", choices=("fixed_small", "fixed_large"), default=None,
                   help="reverse variance (default: eval.var_type, else the recipe's diffusion.var_type)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "no"), default=None,
                   help="autocast the U-Net while the diffusion arithmetic stays float32 (default: "
                   "eval.sampling_precision, else eval.mixed_precision; 'no' = fp32)")
    p.add_argument("--chunk-size", type=int, default=1000, help="samples per chunk file (the resume unit)")


def sample_from_args(args, check=None):
    """Load the model and draw (or resume) the samples the arguments ask for; `check(loaded)`
    runs before any sampling (a bad reference fails in seconds, not after the samples)."""
    loaded = load_model(args.src, args.revision, args.model_factory)
    if check is not None:
        check(loaded)
    r = loaded.recipe
    num = resolve(args.num_samples, r, "eval.num_samples")
    batch = resolve(args.batch_size, r, "eval.batch_size")
    for name, value in (("--num-samples", num), ("--batch-size", batch), ("--chunk-size", args.chunk_size)):
        if value <= 0:
            raise EvalError(f"{name} {value}: must be a positive whole number")
    sampler = resolve(args.sampler, r, "eval.sampler")
    if sampler == "ancestral" and args.steps is not None:
        raise EvalError(f"--steps {args.steps}: ancestral sampling (Algorithm 2) takes all T = "
                        f"{loaded.diffusion.num_timesteps} steps; --steps is for --sampler ddim")
    precision = resolve(args.precision, r, "eval.sampling_precision", r.eval.mixed_precision)
    acc = accelerator()
    proto = run_sampling(
        loaded, args.out, num_samples=num, batch_size=batch, seed=resolve(args.seed, r, "eval.seed"),
        sampler=sampler, steps=resolve(args.steps, r, "eval.ddim_steps") if sampler == "ddim" else None,
        eta=args.eta, var_type=resolve(args.var_type, r, "eval.var_type", r.diffusion.var_type),
        precision=precision, chunk_size=args.chunk_size,
        device=args.device, acc=acc)
    return loaded, proto, acc


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="draw samples (Algorithm 2) into resumable numbered chunks",
        description="Ancestral sampling (Algorithm 2) from the EMA weights, spread over all "
        "processes (`accelerate launch -m eval sample ...`). Each sample's noise comes from "
        "(seed, index), so images do not depend on batch size or process count. Samples go to "
        "OUT/chunks/chunk-NNNNNN.npz; rerunning the same command resumes after a preemption. "
        "--sampler ddim is beyond the paper and labelled so in OUT/samples.json.")
    add_sampling_args(p)
    p.add_argument("--npz", default=None, metavar="PATH",
                   help="also write all samples as PATH, an .npz whose arr_0 is uint8 [n, H, W, 3] (the "
                   "ADM / guided-diffusion format other evaluators read)")
    p.add_argument("--png", default=None, metavar="DIR",
                   help="also write each sample as DIR/<index>.png (index zero-padded: the image folder "
                   "pytorch-fid and clean-fid read)")
    p.set_defaults(func=main)


def main(args) -> int:
    _, proto, acc = sample_from_args(args)
    if acc.is_main_process:
        if args.npz:
            from eval.outside import write_adm_npz

            chunks = SampleChunks(args.out, proto["num_samples"], proto["chunk_size"])
            first = chunks[0]
            write_adm_npz(args.npz, chunks.parts(), (len(chunks), *first.shape))
        if args.png:
            from eval.outside import write_png_folder

            n = write_png_folder(args.png, SampleChunks(args.out).files, proto["num_samples"])
            print(f"wrote {n} PNG images to {args.png}", file=sys.stderr, flush=True)
        label = "" if proto["paper_protocol"] else "  [not the paper's protocol: " + "; ".join(
            proto["paper_protocol_caveats"]) + "]"
        print(json.dumps({"out": str(args.out), **{k: proto[k] for k in ("sampler", "steps", "num_samples")}}) + label)
    return 0
