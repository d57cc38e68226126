"""Shards that live elsewhere: `data.shards` naming a Hub data set repo or an fsspec URL.

    data.shards: NAMESPACE/NAME                 a Hub data set repo (from `python -m data_prep push`)
    data.shards: hf://datasets/NAMESPACE/NAME@REV   the same at a revision
    data.shards: s3://bucket/prefix, gs://..., file:///..., any fsspec URL of a folder holding
                 manifest.json and its shards

On first use the manifest and every shard it lists are copied into a local per-node cache
($DDPM_SHARDS_CACHE, default ~/.cache/ddpm-pipeline/shards), one folder per source (and Hub
commit), under a file lock so the processes of one node fetch once. Each shard is verified
against checksums.json when the source has it (sha256 and size), else its sample count against
the manifest; a bad copy is deleted and is a DataError naming it. The cached folder is then read
as local shards: the same exactly-once order, resume and world-size independence. A bare
NAMESPACE/NAME is a Hub repo only when no local path of that name (or its first part) exists.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tarfile
from contextlib import contextmanager
from pathlib import Path

from pipeline import atomic, safe_names
from pipeline.errors import UserError
from pipeline.integrity import file_sha256
from pipeline.manifest import MAX_BYTES, ManifestError, read_manifest

CHECKSUMS = "checksums.json"
COMPLETE = ".complete"  # written last: the folder holds a verified copy
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HF_URL = re.compile(r"hf://datasets/([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@([^/]+))?/?")


class RemoteShardsError(UserError):
    """Remote shards that cannot be fetched or do not match their manifest (exit 2)."""


def is_remote(spec: str) -> bool:
    if not isinstance(spec, str) or not spec:
        return False
    if "://" in spec:
        return True
    return bool(_REPO.fullmatch(spec)) and not Path(spec).exists() and not Path(spec.split("/")[0]).exists()


def cache_root() -> Path:
    return Path(os.environ.get("DDPM_SHARDS_CACHE") or Path.home() / ".cache" / "ddpm-pipeline" / "shards")


def local_shards(spec: str, count_samples=None) -> str:
    """A local folder holding a verified copy of the shards `spec` names (fetched on first use).
    `count_samples(path) -> int` checks shards against the manifest when there is no checksums.json
    (pipeline.data passes its own tar reader)."""
    m = _HF_URL.fullmatch(spec)
    if m or "://" not in spec:
        repo, rev = (m.group(1), m.group(2)) if m else (spec, None)
        return str(_fetch_hub(repo, rev, count_samples))
    return str(_fetch_fsspec(spec, count_samples))


@contextmanager
def _locked(folder: Path):
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # the other processes of this node wait for the first fetch
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "--", name).strip("-")[:120] or "_"


# ------------------------------------------------------------------------------ the Hub


def _fetch_hub(repo_id: str, revision: str | None, count_samples) -> Path:
    # Imported for Hub sources only: local shards never load the Hub client.
    import httpx2
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    base = cache_root() / "hub" / _safe(repo_id)
    ref = base / "refs" / _safe(revision or "main")
    try:
        commit = HfApi().dataset_info(repo_id, revision=revision).sha
    except RepositoryNotFoundError:
        raise RemoteShardsError(f"data.shards={repo_id}: no local folder of that name (run data_prep first?), "
                                "and no Hub data set repo (or it is private and your token cannot read it)") from None
    except RevisionNotFoundError:
        raise RemoteShardsError(f"data.shards={repo_id}: no revision '{revision}' on the Hub") from None
    except (HfHubHTTPError, OSError, httpx2.TransportError) as e:
        cached = ref.read_text().strip() if ref.is_file() else None
        if cached and (base / cached / COMPLETE).is_file():  # offline, but fetched before
            return base / cached
        raise RemoteShardsError(f"data.shards={repo_id}: no local folder of that name (run data_prep first?), "
                                f"and the Hub cannot be reached and holds no cached copy: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    folder = base / commit

    def get(name: str, dest: Path) -> None:
        try:
            path = hf_hub_download(repo_id, name, repo_type="dataset", revision=commit, local_dir=dest.parent)
        except (HfHubHTTPError, OSError, httpx2.TransportError) as e:
            if name == "manifest.json" and getattr(getattr(e, "response", None), "status_code", None) == 404:
                # an ordinary image data set repo (parquet, image folders), not data_prep's shards
                raise RemoteShardsError(
                    f"data.shards={repo_id}: this Hub data set holds no data_prep shards (no manifest.json); "
                    f"convert it once: python -m data_prep hf --dataset {repo_id} --out data/{_safe(repo_id.split('/')[-1])}"
                    f" --resolution N, then set data.shards to that folder") from None
            raise RemoteShardsError(f"data.shards={repo_id}@{commit[:12]}: cannot download {name}: "
                                    f"{str(e).splitlines()[0]}") from None
        if Path(path) != dest:
            os.replace(path, dest)

    _fill(folder, get, f"{repo_id}@{commit[:12]}", count_samples)
    ref.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(ref, commit + "\n")
    return folder


# ------------------------------------------------------------------------------ fsspec


def _fetch_fsspec(url: str, count_samples) -> Path:
    import fsspec

    folder = cache_root() / "url" / (_safe(url) + "-" + hashlib.sha1(url.encode()).hexdigest()[:10])
    base = url.rstrip("/")

    def get(name: str, dest: Path) -> None:
        try:
            with fsspec.open(f"{base}/{name}", "rb") as src, atomic.atomic_path(dest) as tmp, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (OSError, ValueError, ImportError) as e:
            raise RemoteShardsError(f"data.shards={url}: cannot read {name}: {str(e).splitlines()[0]}") from None

    _fill(folder, get, url, count_samples)
    return folder


# ------------------------------------------------------------------------------ fetch and verify


def _fill(folder: Path, get, what: str, count_samples) -> None:
    """Fetch manifest.json (+ checksums.json) and every listed shard into `folder` unless a verified
    copy is there; verify each shard; mark the folder complete. Both listings are checked whole
    (pipeline/manifest.py, safe_names.py) before the first shard is fetched: a name that leads
    out of the folder never reaches a download or a write."""
    with _locked(folder):
        if (folder / COMPLETE).is_file() and _sizes_hold(folder):
            return
        folder.mkdir(parents=True, exist_ok=True)
        get("manifest.json", folder / "manifest.json")
        try:
            manifest = read_manifest(folder / "manifest.json", label=f"data.shards={what}: manifest.json")
        except ManifestError as e:
            (folder / "manifest.json").unlink()  # refused: a relaunch fetches it again
            raise RemoteShardsError(str(e)) from None
        shards = [(s["name"], s["count"]) for split in manifest["splits"].values() for s in split["shards"]]
        try:
            get(CHECKSUMS, folder / CHECKSUMS)
        except RemoteShardsError:
            sums = None  # shards made without `data_prep push`: their counts are checked instead
        else:
            sums = _read_checksums(folder / CHECKSUMS, what)
        from tqdm.auto import tqdm

        # `what` names the repo and commit (or the URL): the bar says what is coming down.
        for name, count in tqdm(shards, desc=f"fetching shards {what}", unit="shard", mininterval=2):
            dest = safe_names.inside(folder, name)  # checked above; kept next to the write it guards
            if not (dest.is_file() and _verified(dest, count, sums, count_samples)):
                dest.unlink(missing_ok=True)  # the Hub client would take a bad copy in its folder as done
                get(name, dest)
                if not _verified(dest, count, sums, count_samples):
                    dest.unlink()
                    raise RemoteShardsError(f"data.shards={what}: {name} does not match "
                                            f"{CHECKSUMS if sums else 'manifest.json'}; the copy was deleted")
        atomic.write_text(folder / COMPLETE, what + "\n", fsync=True)


def _sizes_hold(folder: Path) -> bool:
    """A verified copy reused at the next launch is checked for size against checksums.json
    (a stat per shard, not a hash of the whole data set); a shard changed on disk sends the
    folder back through the fetch, where every shard is hashed and a bad one fetched again."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_bytes())
        return all((folder / name).stat().st_size == entry["bytes"] for name, entry in sums.items()
                   if safe_names.name_problem(name) is None)
    except FileNotFoundError as e:
        return e.filename is not None and Path(e.filename).name == CHECKSUMS  # no checksums: counts were checked
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _read_checksums(path: Path, what: str) -> dict:
    """checksums.json as {plain file name: {"sha256": str, "bytes": int}}; RemoteShardsError else."""
    where = f"data.shards={what}: {CHECKSUMS}"
    if path.stat().st_size > MAX_BYTES:
        raise RemoteShardsError(f"{where}: more than {MAX_BYTES} bytes")
    try:
        sums = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise RemoteShardsError(f"{where}: unreadable ({type(e).__name__})") from None
    if not isinstance(sums, dict):
        raise RemoteShardsError(f"{where}: expected an object of file names")
    for name, rec in sums.items():
        why = safe_names.name_problem(name)
        if why is None and not (isinstance(rec, dict) and isinstance(rec.get("sha256"), str)
                                and isinstance(rec.get("bytes"), int)):
            why = "has no {sha256, bytes} record"
        if why:
            raise RemoteShardsError(f"{where}: entry {safe_names.shown(name)} {why}")
    return sums


def _verified(path: Path, count: int, sums: dict | None, count_samples) -> bool:
    if sums is not None:
        want = sums.get(path.name) or {}
        if path.stat().st_size != want.get("bytes"):
            return False
        return file_sha256(path) == want.get("sha256")
    if count_samples is None:
        return True
    try:
        return count_samples(str(path)) == count
    except (tarfile.TarError, OSError):
        return False
