"""`python -m eval export SRC --format {native,diffusers} --out DIR`: the folder a push would
commit, written locally (no Hub, no token). `--format diffusers` is a DDPMPipeline folder:

    from diffusers import DDPMPipeline
    image = DDPMPipeline.from_pretrained("DIR")().images[0]

The folder is built beside DIR and renamed into place when whole, so DIR is never half written.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from pipeline.errors import UserError

EPILOG = """\
what is written (the same files `python -m eval push` commits):
  native     ema.safetensors, config.yaml (resolved recipe), config.json (model description)
  diffusers  model_index.json, unet/{config.json,diffusion_pytorch_model.safetensors},
             scheduler/scheduler_config.json (the recipe's T, betas, variance, clipping), config.yaml
  both       results.json of the evaluation, sample grids, README.md model card

Load it back with pipeline.hub.load_pretrained(DIR), `python -m eval sample DIR ...`, or (diffusers)
DDPMPipeline.from_pretrained(DIR); upload it later with `hf upload NAMESPACE/NAME DIR`.
"""


class ExportError(UserError):
    """An export that cannot be written: the output exists, or the source is bad (exit 2)."""


def export(src: str | os.PathLike, out: str | os.PathLike, *, format: str = "native", repo_id: str | None = None,
           results: str | os.PathLike | None = None, samples=(), command: str | None = None,
           overwrite: bool = False) -> list[str]:
    """Write the push folder of `src` (a run, checkpoint or .safetensors file) to `out`; returns
    its files (paths relative to `out`)."""
    # Imported here: `python -m eval --help` registers this subcommand without loading torch.
    from eval.hub_push import stage_push

    out = Path(out)
    if format not in ("native", "diffusers"):
        raise ExportError(f"format {format!r}: want 'native' or 'diffusers'")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder of --out should be
        raise ExportError(f"{out}: cannot make its folder {out.parent} ({e.strerror})") from None
    _remove_stale(out.parent)
    with tempfile.TemporaryDirectory(prefix=_prefix("stage"), dir=out.parent) as stage, \
            tempfile.TemporaryDirectory(prefix=_prefix("build"), dir=out.parent) as build:
        # The card names the model by the folder's name, not a local path (eval/public.py).
        files = stage_push(src, Path(stage), repo_id=repo_id or out.name, format=format, results=results,
                           samples=list(samples), command=command)
        for name, path in files.items():
            dest = Path(build) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        old = Path(stage) / "replaced"
        if out.exists():  # moved aside (deleted with the staging folder): `out` is never half written
            os.replace(out, old)
        os.replace(build, out)  # whole or not at all; the emptied temporary name is recreated for cleanup
        Path(build).mkdir()
    return sorted(files)


def _prefix(kind: str) -> str:
    """Temporary folders name their maker (host, pid), so a later export can tell a killed one's."""
    return f".export-{kind}-{socket.gethostname()}-{os.getpid()}-"


def _remove_stale(parent: Path) -> None:
    """The temporary folders of exports killed (SIGKILL, OOM) before they cleaned up: made on this
    host by a process that is gone. Another host's, or a running export's, are left alone."""
    pattern = re.compile(rf"\.export-(stage|build)-{re.escape(socket.gethostname())}-(\d+)-[\w-]+")
    for p in parent.glob(".export-*"):
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a checkpoint as a local folder in our or diffusers' DDPMPipeline layout",
        description="Write a run directory (its newest complete checkpoint), a checkpoint directory or a "
        ".safetensors file as a folder: the files `eval push` would commit, model card included.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="run directory, checkpoint directory or .safetensors file")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--format", choices=("native", "diffusers"), default="native",
                   help="native: our layout; diffusers: DDPMPipeline.from_pretrained opens it")
    p.add_argument("--repo-id", default=None, help="the name the model card uses (default: the --out folder's name)")
    p.add_argument("--results", default=None, help="results.json to include (default: the checkpoint's or run's)")
    p.add_argument("--samples", nargs="*", default=None, help="sample grids to include (default: the run's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from eval.hub_push import PushError

    try:
        files = export(args.src, args.out, format=args.format, repo_id=args.repo_id, results=args.results,
                       samples=args.samples or (), overwrite=args.overwrite)
    except PushError as e:  # the staging's errors, reported as export errors
        raise ExportError(str(e).replace("; push --format native", "; export --format native")) from None
    print(f"wrote {len(files)} files to {args.out} ({args.format} layout)")
    if args.format == "diffusers":
        print(f'open it with: DDPMPipeline.from_pretrained("{args.out}")')
    return 0
