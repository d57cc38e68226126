"""How busy the processes of `eval sample` are: the old rule (whole chunks, round-robin) against
eval/work.py's equal shares of samples. A model, not a measurement: it runs the real split
(`eval.work.split`) and counts what each process draws, at any number of GPUs.

busy fraction = (mean work per process) / (work of the busiest process): the share of
processes x wall time spent drawing, since the job ends when the busiest process ends. Work
is counted two ways, which bound the truth:
  samples   time proportional to the samples drawn (large batches, compute-bound);
  batches   every model call costs a full batch, however few samples it holds (a GPU that a
            short last batch leaves mostly idle still takes the whole step time).
Sampling is the whole cost of FID (bench/eval_cost.py); Inception features and the NLL already
split per image (`features.share`, `pipeline.data.iter_split`: shares within one image).

Usage: PYTHONPATH=. python bench/eval_balance.py [--samples 50000] [--chunk-size 1000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import math

from eval.work import split


def chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + chunk_size, n)) for lo in range(0, n, chunk_size)]


def before(todo: list[tuple[int, int]], world: int, batch: int) -> tuple[list[int], list[int]]:
    """(samples, model calls) per process under the old rule: whole chunks, round-robin, each
    chunk drawn in its own batches."""
    mine = [todo[r::world] for r in range(world)]
    return ([sum(hi - lo for lo, hi in m) for m in mine],
            [sum(math.ceil((hi - lo) / batch) for lo, hi in m) for m in mine])


def after(todo: list[tuple[int, int]], world: int, batch: int) -> tuple[list[int], list[int]]:
    """(samples, model calls) per process with eval/work.py: equal shares of the samples, drawn
    in batches that run across the pieces of a share."""
    n = [sum(hi - lo for lo, hi in s) for s in split(todo, world)]
    return n, [math.ceil(k / batch) for k in n]


def busy(work: list[int]) -> float:
    return sum(work) / len(work) / max(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=50_000, help="the paper's FID sample count")
    ap.add_argument("--chunk-size", type=int, default=1000, help="eval sample's default --chunk-size")
    ap.add_argument("--batch-size", type=int, default=64, help="per process (lsun256 recipes: eval.batch_size 64)")
    args = ap.parse_args()
    cs, b = args.chunk_size, args.batch_size
    cases = [(f"{args.samples} samples", args.samples, chunks(args.samples, cs), w) for w in (8, 64, 512)]
    cases.append(("quickstart: 128 samples", 128, chunks(128, cs), 2))
    half = chunks(args.samples, cs)[len(chunks(args.samples, cs)) // 2:]  # a job preempted half way
    cases += [(f"{args.samples} samples, second half resumed", args.samples, half, w) for w in (64, 512)]
    print(f"chunk size {cs}, batch size {b} per process\n")
    print("| case | processes | before: samples | before: batches | after: samples | after: batches |")
    print("|---|---|---|---|---|---|")
    for label, _n, todo, w in cases:
        (bs, bc), (as_, ac) = before(todo, w, b), after(todo, w, b)
        print(f"| {label} | {w} | {busy(bs):.1%} | {busy(bc):.1%} | {busy(as_):.1%} | {busy(ac):.1%} |")


if __name__ == "__main__":
    main()
