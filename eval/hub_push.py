"""Push a checkpoint to the Hub as ONE commit, so a repo never shows half a checkpoint.

`push_to_hub` checks the token before anything is staged or uploaded, stages the files of one
push (`stage_push`: weights in our or diffusers' layout, the resolved recipe, results.json, sample
grids, the model card), and commits them with `commit_with_retries`: transient HTTP errors are
retried with exponential backoff, and a retry never makes a second commit. The loading side is
pipeline/hub.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterable

import httpx2
import yaml
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from eval.diffusers_layout import stage_diffusers_pipeline
from eval.model_card import render_model_card
from eval.public import public_recipe, public_tree
from pipeline import atomic
from pipeline.config import RecipeError, load_recipe
from pipeline.errors import UserError
from pipeline.hub import REPO_ID, find_checkpoint, our_weights
from pipeline.integrity import file_sha256
from pipeline.weights import LoadError, load_state_dict, weights_sha256

log = logging.getLogger(__name__)

_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


class PushError(UserError):
    """A push that cannot start: a bad token, source, results file or format (exit 2)."""


class PushFailedError(PushError):
    """A push that reached the Hub and failed after its retries; nothing was committed (exit 1)."""

    exit_code = 1


# ----------------------------------------------------------------------------- staging


def _resolve_checkpoint(src: Path) -> tuple[Path, Path, Path | None]:
    """(weights file, config.yaml, run dir or None) of a local run / checkpoint / safetensors file."""
    if not src.exists():
        raise PushError(f"{src}: no such file or directory (push takes a run dir, checkpoint dir or .safetensors)")
    if src.is_file():
        if src.suffix != ".safetensors":
            raise PushError(f"{src}: push takes a .safetensors file, a checkpoint or a run directory")
        ckpt, weights = src.parent, src
    else:
        try:
            ckpt = find_checkpoint(src)
            weights = our_weights(ckpt, use_ema=True)
        except LoadError as e:
            raise PushError(str(e)) from None
    config = ckpt / "config.yaml"
    if not config.is_file() and (ckpt.parent.parent / "config.yaml").is_file():
        config = ckpt.parent.parent / "config.yaml"
    if not weights.is_file() or not config.is_file():
        raise PushError(f"{ckpt}: want ema.safetensors (or model.safetensors) and config.yaml there")
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return weights, config, run_dir


def _find_results(ckpt: Path, run_dir: Path | None) -> Path | None:
    places = [ckpt, ckpt / "eval"] + ([run_dir, run_dir / "eval"] if run_dir else [])
    return next((p / "results.json" for p in places if (p / "results.json").is_file()), None)


def _trainer_state(ckpt: Path) -> dict:
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _step_of(weights: Path, trainer_state: dict) -> int | None:
    """The training step: the checkpoint's trainer state, else the name of its folder
    (checkpoints/step-N/) or of the file itself (an EMA snapshot, snapshots/step-N.safetensors)."""
    try:
        return int(trainer_state["step"])
    except (ValueError, KeyError, TypeError):
        for name in (weights.parent.name, weights.name):
            m = re.fullmatch(r"step-(\d+)(\.safetensors)?", name)
            if m:
                return int(m.group(1))
        return None


def _read_results(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PushError(f"{path}: not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise PushError(f"{path}: expected a JSON object")
    return d


def _check_results_match(path: Path | None, results: dict | None, state: dict) -> None:
    """The card's numbers must describe the pushed weights: compare the weights hash eval recorded."""
    want = ((results or {}).get("checkpoint") or {}).get("weights_sha256")
    if want and weights_sha256(state) != want:
        raise PushError(f"{path}: these results were computed for other weights (sha256 {want[:12]}...); "
                        "evaluate this checkpoint or pass the matching --results")


def stage_push(src: str | os.PathLike, out: Path, *, repo_id: str, format: str = "native",
               results: str | os.PathLike | None = None, samples: list | None = None,
               command: str | None = None) -> dict[str, Path]:
    """The files of one push, {path in repo: local file}; generated ones are written under `out`.

    native:    ema.safetensors, config.yaml (resolved recipe), config.json (model description)
    diffusers: what `DDPMPipeline.from_pretrained` opens: model_index.json, unet/ (config.json +
               diffusion_pytorch_model.safetensors), scheduler/scheduler_config.json; and config.yaml
    both:      results.json (when evaluated), samples/*.png, README.md (model card)"""
    weights, config, run_dir = _resolve_checkpoint(Path(src))
    try:
        recipe = load_recipe(config)
        state = load_state_dict(weights)
    except (RecipeError, LoadError) as e:
        raise PushError(str(e)) from None
    results_path = Path(results) if results else _find_results(weights.parent, run_dir)
    if results_path is not None and not results_path.is_file():
        raise PushError(f"{results_path}: results file not found")
    results_data = _read_results(results_path)
    _check_results_match(results_path, results_data, state)
    trainer_state = _trainer_state(weights.parent)
    step = _step_of(weights, trainer_state)
    if not samples:
        grid = run_dir / "samples" / f"step-{step:08d}.png" if run_dir and step is not None else None
        samples = [grid] if grid is not None and grid.is_file() else []
    for s in samples:
        if not Path(s).is_file():
            raise PushError(f"{s}: sample grid not found")
    unet_kwargs = recipe.model.unet_kwargs()
    sha = file_sha256(weights)
    parameters = sum(t.numel() for t in state.values())
    # No absolute local path leaves this machine (eval/public.py): the recipe, results and card
    # name local data and runs by their folder name, Hub data sets by their id.
    atomic.write_text(out / "config.yaml", yaml.safe_dump(public_recipe(recipe.to_dict()), sort_keys=False))
    files: dict[str, Path] = {"config.yaml": out / "config.yaml", "config.json": out / "config.json"}
    ema = weights.name != "model.safetensors"  # a checkpoint without EMA weights pushes its raw ones
    if format == "native":
        name = "ema.safetensors" if ema else "model.safetensors"
        files[name] = weights
        atomic.write_json(out / "config.json", {
            "library": "ddpm-pipeline", "architecture": "DDPM U-Net (Ho et al. 2020)",
            "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet_kwargs.items()},
            "diffusion": recipe.to_dict()["diffusion"], "weights": name, "ema": ema, "sha256": sha,
            "parameters": parameters, "step": step})
    else:
        try:
            files.update(stage_diffusers_pipeline(recipe, state, out))
        except ValueError as e:
            raise PushError(f"{e}; push --format native") from None
        del files["config.json"]  # the pipeline's files say it all: model_index.json, unet/, scheduler/
    if results_path is not None:
        results_data = public_tree(results_data)
        atomic.write_json(out / "results.json", results_data)
        files["results.json"] = out / "results.json"
    for s in samples:
        files[f"samples/{Path(s).name}"] = Path(s)
    card = render_model_card(recipe, results_data, repo_id=repo_id, format=format, step=step, weights_sha256=sha, ema=ema,
                             parameters=parameters, command=command, files=sorted(files) + ["README.md"],
                             trainer_state=trainer_state)
    atomic.write_text(out / "README.md", card)
    files["README.md"] = out / "README.md"
    return files


# ----------------------------------------------------------------------------- the commit


def check_token(api: HfApi, repo_id: str) -> str:
    """Fail before any upload when the token is missing, invalid, or cannot write `namespace`."""
    token = api.token or get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token)")
    try:
        who = api.whoami(token=token)
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status == 401:
            raise PushError("the Hugging Face token was rejected (401 from whoami): check HF_TOKEN") from None
        raise PushError(f"cannot check the token with the Hub: {str(e).splitlines()[0]}") from None
    except (OSError, httpx2.TransportError) as e:  # connection refused, DNS, offline mode
        raise PushError(f"cannot reach the Hub at {api.endpoint}: {_describe(e)}") from None
    namespace = repo_id.split("/")[0]
    allowed = {who.get("name")} | {o.get("name") for o in who.get("orgs", [])}
    if namespace not in allowed:
        raise PushError(f"{repo_id}: the token belongs to '{who.get('name')}', who cannot write to '{namespace}'")
    return token


def _is_transient(e: BaseException) -> bool:
    while e is not None:  # LFS upload errors arrive wrapped: RuntimeError from HfHubHTTPError
        if isinstance(e, HfHubHTTPError):
            return getattr(e.response, "status_code", None) in _TRANSIENT_STATUS
        if isinstance(e, (httpx2.TransportError, ConnectionError)):
            return True
        e = e.__cause__
    return False


def commit_with_retries(api: HfApi, repo_id: str, operations: list, *, message: str, revision: str,
                        max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 30.0) -> CommitInfo:
    """One create_commit, retried on 5xx / timeouts / resets with exponential backoff.

    A retry must not make a second commit when the first reached the server and only its reply
    was lost: the commit carries a unique push id and names its parent, so before each retry we
    look at the branch head; when our push id is there, the push is done."""
    push_id = uuid.uuid4().hex
    description = f"push-id: {push_id}"
    parent = api.repo_info(repo_id, revision=revision).sha
    for attempt in range(max_retries + 1):
        try:
            return api.create_commit(repo_id, operations, commit_message=message, commit_description=description,
                                     revision=revision, parent_commit=parent)
        except Exception as e:  # sorted below
            # A conflict after a lost reply is our own commit having landed (or another push):
            # look at the branch before deciding.
            conflict = isinstance(e, HfHubHTTPError) and getattr(e.response, "status_code", None) in (409, 412)
            if not (_is_transient(e) or (conflict and attempt > 0)) or attempt == max_retries:
                raise
            wait = min(max_backoff, backoff * 2**attempt)
            log.warning("push to %s: %s; retry %d/%d in %.1fs", repo_id, str(e).splitlines()[0] or type(e).__name__,
                        attempt + 1, max_retries, wait)
            time.sleep(wait)
            landed = _find_commit(api, repo_id, revision, push_id)
            if landed is not None:
                return landed
            parent = api.repo_info(repo_id, revision=revision).sha


def _find_commit(api: HfApi, repo_id: str, revision: str, push_id: str) -> CommitInfo | None:
    """Our commit, when one of the newest commits on the branch carries `push_id`."""
    for c in api.list_repo_commits(repo_id, revision=revision)[:5]:
        if push_id in (c.message or ""):
            return CommitInfo(commit_url=f"{api.endpoint}/{repo_id}/commit/{c.commit_id}", commit_message=c.title,
                              commit_description=c.message, oid=c.commit_id)
    return None


def _describe(e: BaseException) -> str:
    """The first lines of an error and of up to two causes (LFS errors arrive wrapped)."""
    parts = []
    while e is not None and len(parts) < 3:
        text = str(e).strip().splitlines()
        parts.append(text[0] if text else type(e).__name__)
        e = e.__cause__
    return ": ".join(parts)


def push_to_hub(src: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool = False,
                format: str = "native", results: str | os.PathLike | None = None,
                samples: Iterable[str | os.PathLike] = (), command: str | None = None,
                commit_message: str | None = None, max_retries: int = 5, backoff: float = 1.0,
                endpoint: str | None = None, token: str | None = None) -> dict:
    """Push a run / checkpoint / safetensors file as one commit; returns {repo_id, revision, commit, url, files}."""
    if not REPO_ID.fullmatch(repo_id):
        raise PushError(f"{repo_id}: a repo id is 'namespace/name'")
    if format not in ("native", "diffusers"):
        raise PushError(f"format {format!r}: want 'native' or 'diffusers'")
    _resolve_checkpoint(Path(src))  # bad input fails before the network is touched
    api = HfApi(endpoint=endpoint, token=token)
    check_token(api, repo_id)  # before anything is staged or uploaded
    branch = revision or "main"
    with tempfile.TemporaryDirectory(prefix="ddpm-push-") as tmp:
        files = stage_push(src, Path(tmp), repo_id=repo_id, format=format, results=results,
                           samples=list(samples), command=command)
        ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(p)) for name, p in sorted(files.items())]
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            info = commit_with_retries(api, repo_id, ops, revision=branch, max_retries=max_retries, backoff=backoff,
                                       message=commit_message or f"Upload {Path(str(src)).name} ({format} layout)")
        except (HfHubHTTPError, OSError, RuntimeError, httpx2.TransportError) as e:
            raise PushFailedError(f"{repo_id}: push failed, nothing was committed: {_describe(e)}") from None
        except ValueError as e:  # e.g. the Hub rejected the model card metadata (before any upload)
            raise PushError(f"{repo_id}: {' '.join(str(e).split())}") from None
    return {"repo_id": repo_id, "revision": branch, "commit": info.oid, "url": info.commit_url,
            "files": sorted(files)}
