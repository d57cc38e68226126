"""python -m data_prep {lsun,folder,cifar10,hf}: images -> WebDataset tar shards + manifest.json.

Each image is centre-cropped to its short side and resized (antialiased, LANCZOS) to
--resolution, as ProGAN's create_lsun did for the TFRecords the original DDPM trained on,
and stored losslessly (npy by default; --format png for less disk, jpg if lossy is fine).
Re-running into a complete output does nothing; after a crash it finishes the job.
"""

from __future__ import annotations

import argparse
import sys

from data_prep.hub_cli import add_hf_arguments, add_push_parser, open_hf_source, run_push
from data_prep.preprocess import DEFAULT_FORMAT, FORMATS, PNG_LEVEL
from data_prep.shards import prepare
from data_prep.sources import PrepError, open_source
from pipeline.errors import run_cli

EPILOG = """examples:
  python -m data_prep lsun --lmdb lsun/bedroom_train_lmdb --out data/lsun_bedroom --workers 16
  python -m data_prep folder --images celeba_hq/1024 --out data/celebahq256 --test-count 1000
  python -m data_prep cifar10 --batches cifar-10-batches-py --out data/cifar10
  python -m data_prep hf --dataset NAMESPACE/NAME --split train --out data/name --resolution 64
  python -m data_prep push data/cifar10 --repo-id you/cifar10-shards   # then data.shards: you/cifar10-shards"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="kind", required=True, metavar="{lsun,folder,cifar10,hf,push}")
    specs = [("lsun", "--lmdb", "an LSUN category LMDB (folder with data.mdb); values are WebP/JPEG bytes", 256),
             ("folder", "--images", "a folder tree of images (CelebA-HQ, FFHQ, ...), read recursively", 256),
             ("cifar10", "--batches", "the CIFAR-10 python batches (data_batch_1..5, test_batch)", 32),
             ("hf", "--dataset", "an image data set of the `datasets` library: a Hub id or a local copy "
              "(parquet/arrow/image folder)", 256)]
    for kind, flag, help_, res in specs:
        p = sub.add_parser(kind, help=help_, description=help_)
        p.add_argument(flag, dest="src", required=True, metavar="PATH", help=help_)
        p.add_argument("--out", required=True, help="output folder: {train,test}-NNNNNN.tar + manifest.json")
        p.add_argument("--resolution", type=int, default=res, help=f"output side in pixels (default {res})")
        p.add_argument("--format", choices=FORMATS, default=DEFAULT_FORMAT,
                       help="npy (raw uint8 HWC, lossless, fastest to load; default), png (lossless, "
                            "~1.8x smaller at 256px, ~3.5x slower to decode) or jpg (lossy, see --quality)")
        p.add_argument("--quality", type=int, default=95, help="JPEG quality for --format jpg (default 95)")
        p.add_argument("--png-level", type=int, default=PNG_LEVEL,
                       help=f"zlib level 0-9 of stored PNGs (default {PNG_LEVEL}; 0 = uncompressed, "
                            "fastest to decode; see bench/RESULTS.md)")
        p.add_argument("--allow-upscale", action="store_true",
                       help="accept images smaller than --resolution (default: skip them, recorded in the manifest)")
        if kind != "cifar10":
            g = p.add_mutually_exclusive_group()
            g.add_argument("--test-count", type=int, default=None,
                           help="put exactly N inputs in the test split (the N smallest key hashes)")
            g.add_argument("--test-fraction", type=float, default=0.01,
                           help="put this fraction of inputs in the test split, by key hash (default 0.01)")
        p.add_argument("--shard-size", type=int, default=1000, help="inputs per shard (default 1000)")
        p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
        p.add_argument("--limit", type=int, default=None,
                       help="only the first N inputs (cifar10: per split), to try things out")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--push-to-hub", metavar="REPO", default=None,
                       help="then upload the finished shards to this Hub data set repo (as `data_prep push`)")
        if kind == "hf":
            add_hf_arguments(p)
    add_push_parser(sub)
    return ap


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.kind == "push":
        return run_push(args)
    for name, v, lo in (("--resolution", args.resolution, 1), ("--shard-size", args.shard_size, 1),
                        ("--workers", args.workers, 1), ("--limit", args.limit, 1),
                        ("--test-count", getattr(args, "test_count", None), 0)):
        if v is not None and v < lo:
            raise PrepError(f"{name} must be >= {lo}, got {v}")
    if not 0 <= args.png_level <= 9:
        raise PrepError(f"--png-level must be in 0..9, got {args.png_level}")
    if not 1 <= args.quality <= 100:
        raise PrepError(f"--quality must be in 1..100, got {args.quality}")
    frac = getattr(args, "test_fraction", 0.0)
    if not 0.0 <= frac < 1.0:
        raise PrepError(f"--test-fraction must be in [0, 1), got {frac}")
    try:
        source = open_hf_source(args) if args.kind == "hf" else open_source(args.kind, args.src)
        m = prepare(source, args.out, resolution=args.resolution, fmt=args.format, quality=args.quality,
                    allow_upscale=args.allow_upscale, png_level=args.png_level, test_count=getattr(args, "test_count", None),
                    test_fraction=frac, shard_size=args.shard_size, workers=args.workers,
                    limit=args.limit, command=["python", "-m", "data_prep", *argv],
                    progress=not args.no_progress)
    except OSError as e:  # unwritable --out, a file where a folder should be, disk full, ...
        raise PrepError(f"{e.filename or ''}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        print("data_prep: interrupted; completed shards are kept, run the same command again to finish",
              file=sys.stderr)
        return 130
    sp = m["splits"]
    print(f"{args.out}: train {sp['train']['count']} ({len(sp['train']['shards'])} shards), "
          f"test {sp['test']['count']} ({len(sp['test']['shards'])} shards), skipped {len(m['skipped'])}")
    if args.push_to_hub:
        return run_push(argparse.Namespace(src=args.out, repo_id=args.push_to_hub, revision=None, private=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
