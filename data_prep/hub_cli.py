"""The command-line parts of `data_prep hf` (extra options of the source) and `data_prep push`,
kept here so data_prep/__main__.py only wires them in."""

from __future__ import annotations

EPILOG_PUSH = """\
One commit holds manifest.json, every shard it lists, checksums.json (sha256 of each shard) and a
data set card. The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another
Hub-compatible server. Train on the repo by naming it:  data.shards=NAMESPACE/NAME
"""


def add_hf_arguments(p) -> None:
    p.add_argument("--split", default="train", help="the data set split to read (default train)")
    p.add_argument("--image-column", default=None, help="the image column (default: the first of type Image)")
    p.add_argument("--test-split", default=None,
                   help="take our test split from this split of the data set (e.g. test) instead of by key hash")
    p.add_argument("--revision", default=None, help="data set revision on the Hub (branch, tag or commit)")


def open_hf_source(args):
    from data_prep.hf import HfSource  # imports `datasets` (optional, seconds to load): only for `hf`

    return HfSource(args.src, split=args.split, image_column=args.image_column, test_split=args.test_split,
                    revision=args.revision)


def add_push_parser(sub) -> None:
    import argparse

    p = sub.add_parser("push", help="upload finished shards to a Hub data set repo in one commit",
                       description="Upload a finished data_prep output (manifest.json and its shards) "
                       "to a Hugging Face Hub data set repo, in one commit.", epilog=EPILOG_PUSH,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a data_prep output folder (with manifest.json)")
    p.add_argument("--repo-id", required=True, help="NAMESPACE/NAME of the data set repo (created if missing)")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")


def run_push(args) -> int:
    from data_prep.hub import push_shards

    out = push_shards(args.src, args.repo_id, revision=args.revision, private=args.private)
    print(f"pushed {len(out['files'])} files to dataset {out['repo_id']}@{out['revision']} as commit {out['commit']}")
    print(f"train on it with: data.shards={out['repo_id']}")
    return 0
