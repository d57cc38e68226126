"""`python -m eval push SRC --repo-id NAMESPACE/NAME`: a checkpoint to the Hub, in one commit."""

from __future__ import annotations

import argparse
import shlex

EPILOG = """\
what is pushed (one commit, so the repo never shows half a checkpoint):
  native     ema.safetensors, config.yaml (resolved recipe), config.json (model description)
  diffusers  a DDPMPipeline: model_index.json, unet/ (UNet2DModel config + weights),
             scheduler/scheduler_config.json (DDPMScheduler), config.yaml
  both       results.json of the evaluation, sample grids, README.md model card

The token comes from HF_TOKEN or `hf auth login`; it is checked before anything is uploaded.
HF_ENDPOINT selects another Hub-compatible server. Transient HTTP errors (5xx, resets) are
retried with exponential backoff; a push that still fails commits nothing (exit 1; bad input: 2).
Load it back anywhere a path is accepted:  python -m eval fid NAMESPACE/NAME --out DIR
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "push", help="push a checkpoint (EMA weights, recipe, results, card) to the Hugging Face Hub",
        description="Push a run directory (its newest complete checkpoint), a checkpoint directory "
        "or a .safetensors file (config.yaml beside it) to a Hub model repo, with a model card.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="run directory, checkpoint directory or .safetensors file")
    p.add_argument("--repo-id", required=True, help="namespace/name of the Hub model repo (created if missing)")
    p.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--format", choices=("native", "diffusers"), default="native",
                   help="native: our layout; diffusers: DDPMPipeline.from_pretrained opens it")
    p.add_argument("--results", default=None,
                   help="results.json to publish (default: the checkpoint's or the run's results.json)")
    p.add_argument("--samples", nargs="*", default=None,
                   help="sample grid images to include (default: the run's grid for this checkpoint)")
    p.add_argument("--command", default=None, help="training command for the card (default: from the checkpoint)")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--check-token", action="store_true",
                   help="only check that the token can write to --repo-id (training's run.push_to_hub does, at launch)")
    p.add_argument("--max-retries", type=int, default=5, help="retries on transient HTTP errors (default 5)")
    p.set_defaults(func=run)


def run(args) -> int:
    # Imported here, not at the top: `python -m eval --help` registers this subcommand and must
    # not load the Hub client and the model card's dependencies.
    from eval.hub_push import push_to_hub

    if args.check_token:
        from huggingface_hub import HfApi

        from eval.hub_push import check_token

        check_token(HfApi(), args.repo_id)
        print(f"the token can write to {args.repo_id}")
        return 0

    # A PushError reaches `python -m eval`'s run_cli: one line, exit 2 (bad input), or exit 1
    # (PushFailedError: the Hub failed after the retries).
    out = push_to_hub(args.src, args.repo_id, revision=args.revision, private=args.private, format=args.format,
                      results=args.results, samples=args.samples or (), command=args.command,
                      commit_message=args.message, max_retries=args.max_retries)
    print(f"pushed {len(out['files'])} files to {out['repo_id']}@{out['revision']} as commit {out['commit']}")
    print(f"load it with: python -m eval sample {shlex.quote(out['repo_id'])}"
          + (f" --revision {shlex.quote(out['revision'])}" if out["revision"] != "main" else "") + " --out DIR")
    return 0
