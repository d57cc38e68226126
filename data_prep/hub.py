"""`python -m data_prep push SHARDS --repo-id NAMESPACE/NAME`: finished shards to a Hub data set
repo in ONE commit (a repo never shows half a data set).

The commit holds manifest.json, every shard it lists, checksums.json (sha256 and size of each
shard: what a reader verifies its download against) and a README.md data set card. Training then
names the repo in `data.shards` (pipeline/remote_shards.py fetches and verifies it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from data_prep.sources import PrepError
from pipeline import atomic
from pipeline.integrity import file_sha256
from pipeline.manifest import ManifestError, read_manifest

CHECKSUMS = "checksums.json"


def shard_files(out: Path) -> tuple[dict, list[str]]:
    """(manifest, names of the shards it lists); PrepError when the output is not finished, or
    when the manifest names anything but plain files of its folder (an absolute path or `../`
    would upload that file, a secret say): checked whole before the Hub is contacted."""
    mpath = out / "manifest.json"
    if not mpath.is_file():
        raise PrepError(f"{out}: no manifest.json: not a finished data_prep output (run data_prep first)")
    try:
        manifest = read_manifest(mpath)  # the reader's own checks: plain .tar names, counts, types
    except ManifestError as e:
        raise PrepError(str(e)) from None
    names = [s["name"] for split in manifest["splits"].values() for s in split["shards"]]
    missing = [n for n in names if not (out / n).is_file()]
    if missing:
        raise PrepError(f"{out / missing[0]}: listed in manifest.json but missing ({len(missing)} missing)")
    linked = [n for n in names if (out / n).is_symlink()]
    if linked:  # a link leads anywhere: only the folder's own files are uploaded
        raise PrepError(f"{out / linked[0]}: listed in manifest.json but a symbolic link; push uploads only "
                        "the folder's own files")
    return manifest, names


def _card(repo_id: str, manifest: dict) -> str:
    counts = {s: v["count"] for s, v in manifest["splits"].items()}
    return "\n".join([
        "---", "tags:", "- webdataset", "- ddpm-pipeline", "task_categories:", "- unconditional-image-generation",
        "---", "", f"# {repo_id.split('/')[-1]}", "",
        f"Image shards made by ddpm-pipeline's data_prep (WebDataset tars, {manifest.get('format', '?')} images at "
        f"{manifest.get('resolution', '?')}x{manifest.get('resolution', '?')}) from `{manifest.get('source', '?')}`; "
        f"samples per split: {json.dumps(counts)}. `manifest.json` lists the shards, `{CHECKSUMS}` their sha256.",
        "", "Train on it by naming the repo in a recipe:", "", "```yaml", "data:", f"  shards: {repo_id}", "```", ""])


def push_shards(src: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool = False,
                message: str | None = None, endpoint: str | None = None, token: str | None = None) -> dict:
    """Upload a finished data_prep output as a Hub data set; returns {repo_id, revision, commit, files}."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    out = Path(src)
    manifest, names = shard_files(out)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.whoami()
    except HfHubHTTPError as e:
        raise PrepError(f"the Hugging Face token was rejected or missing ({str(e).splitlines()[0]}): set HF_TOKEN") from None
    except OSError as e:
        raise PrepError(f"cannot reach the Hub at {api.endpoint}: {e}") from None
    branch = revision or "main"
    with tempfile.TemporaryDirectory(prefix="ddpm-shards-push-") as tmp:
        sums = {n: {"sha256": file_sha256(out / n), "bytes": (out / n).stat().st_size} for n in names}
        atomic.write_json(Path(tmp) / CHECKSUMS, sums, indent=1)
        atomic.write_text(Path(tmp) / "README.md", _card(repo_id, manifest))
        files = {"manifest.json": out / "manifest.json", CHECKSUMS: Path(tmp) / CHECKSUMS,
                 "README.md": Path(tmp) / "README.md", **{n: out / n for n in names}}
        ops = [CommitOperationAdd(path_in_repo=k, path_or_fileobj=str(v)) for k, v in sorted(files.items())]
        try:
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, repo_type="dataset", branch=branch, exist_ok=True)
            info = api.create_commit(repo_id, ops, repo_type="dataset", revision=branch,
                                     commit_message=message or f"Upload {len(names)} shards of {out.name}")
        except (HfHubHTTPError, OSError, RuntimeError) as e:
            raise PrepError(f"{repo_id}: push failed, nothing was committed: {str(e).splitlines()[0]}") from None
    return {"repo_id": repo_id, "revision": branch, "commit": info.oid, "files": sorted(files)}
