"""Load a model from anywhere: a run dir, a checkpoint, a safetensors file, a folder, a Hub repo.

Two on-disk layouts are understood, locally or on the Hub:
  ours       config.yaml (the resolved recipe) + ema.safetensors / model.safetensors (UNet keys)
  diffusers  config.json (UNet2DModel) + diffusion_pytorch_model.{safetensors,bin}, optionally
             under unet/, with scheduler_config.json (DDPMScheduler) beside it or in scheduler/:
             the layout of the converted original checkpoints (google/ddpm-cifar10-32, ...).
Weights are read by `pipeline.weights` (safetensors, or torch.load(weights_only=True)). Every bad
input is a `LoadError` (a `UserError`) whose one-line message names the file or repo; entry points
print it and exit 2. Pushing is eval/hub_push.py's business.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import build, convert
from pipeline.checkpoint import STATE_FILE, CheckpointError, latest_intact
from pipeline.config import ModelConfig, Recipe, RecipeError, load_recipe
from pipeline.diffusion import GaussianDiffusion
from pipeline.integrity import damage
from pipeline.weights import LoadError, load_state_dict

log = logging.getLogger(__name__)

OUR_WEIGHTS = ("ema.safetensors", "model.safetensors")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Pretrained:
    """A loaded model: what every sampler and evaluation needs."""

    model: torch.nn.Module  # eval mode, float32, CPU
    diffusion: GaussianDiffusion
    recipe: Recipe  # ours, or one built from a diffusers config
    source: str  # the file that held the weights, or "repo_id@commit"


def load_pretrained(src: str | os.PathLike, revision: str | None = None, use_ema: bool = True) -> Pretrained:
    """The model (eval mode, float32, CPU) and its diffusion from a run directory (newest complete
    checkpoint), a checkpoint directory, a .safetensors file with config.yaml beside it, a local
    folder in our or diffusers' layout, or a Hub repo id `namespace/name` (at `revision`)."""
    path = Path(src)
    if path.exists():
        if revision is not None:
            raise LoadError(f"{src}: revision={revision!r} only applies to Hub repos, not to local paths")
        return _load_local(path, use_ema, source=None)
    s = str(src)
    if not REPO_ID.fullmatch(s):
        raise LoadError(f"{s}: no such file or directory, and not a Hub repo id (namespace/name)")
    local = _local_parent(s)
    if local is not None:  # runs/typo: a mistyped path, not a request to the Hub
        raise LoadError(f"{s}: no such file or directory ({local}/ exists here, so this is read as a local "
                        "path, not a Hub repo id)")
    folder, source = _fetch_from_hub(s, revision, use_ema)
    return _load_local(folder, use_ema, source=source)


def _local_parent(s: str) -> str | None:
    """The existing local folder that `namespace/name` starts with, or None (a Hub repo id then)."""
    parent = Path(s).parent
    return str(parent) if parent != Path(".") and parent.is_dir() else None


def _load_local(path: Path, use_ema: bool, source: str | None) -> Pretrained:
    if path.is_file() and (path.parent / STATE_FILE).is_file():
        find_checkpoint(path.parent)  # a weights file inside a checkpoint: verify its checksums
    if path.is_file():
        if path.suffix != ".safetensors" and path.suffix not in (".bin", ".pt", ".pth"):
            raise LoadError(f"{path}: expected a .safetensors file, a checkpoint or run directory, or a folder")
        folder = path.parent
        if (folder / "config.yaml").is_file():
            return _build_ours(folder / "config.yaml", path, source)
        if (folder / "config.json").is_file():
            return _build_diffusers(folder / "config.json", path, _scheduler_config(folder), source)
        raise LoadError(f"{path}: no config.yaml (our layout) or config.json (diffusers) beside it")
    path = find_checkpoint(path)
    if (path / "config.yaml").is_file() and any((path / w).is_file() for w in OUR_WEIGHTS):
        return _build_ours(path / "config.yaml", our_weights(path, use_ema), source)
    for sub in ("", "unet"):
        folder = path / sub if sub else path
        weights = next((folder / w for w in DIFFUSERS_WEIGHTS if (folder / w).is_file()), None)
        if weights is not None and (folder / "config.json").is_file():
            return _build_diffusers(folder / "config.json", weights, _scheduler_config(path), source,
                                    recipe_file=path / "config.yaml" if sub and (path / "config.yaml").is_file() else None)
    raise LoadError(
        f"{path}: no model found: want config.yaml + {' or '.join(OUR_WEIGHTS)} (ours), "
        f"config.json + diffusion_pytorch_model.safetensors/.bin (diffusers), or a run directory"
    )


def find_checkpoint(path: Path) -> Path:
    """`path` itself, or for a run directory its newest complete checkpoint (never a half-written
    one); LoadError when the run has none yet."""
    if not (path / "checkpoints").is_dir():
        if (path / STATE_FILE).is_file():  # a checkpoint directory: its files match their checksums
            why = damage(path, missing_ok=True)  # a checkpoint without EMA still loads its raw weights
            if why is not None:
                raise LoadError(f"{path}: damaged checkpoint: {why}")
        return path
    try:  # the newest checkpoint whose files match their checksums; newer damaged ones are reported
        ckpt = latest_intact(path, missing_ok=True)
    except CheckpointError as e:
        raise LoadError(str(e)) from None
    if ckpt is None:
        raise LoadError(f"{path}: run directory has no complete checkpoint yet")
    return Path(ckpt)


def our_weights(folder: Path, use_ema: bool = True) -> Path:
    """The weights file of a checkpoint in our layout: the EMA weights unless `use_ema` is False;
    a checkpoint without EMA weights gives its raw ones (with a warning)."""
    want = folder / ("ema.safetensors" if use_ema else "model.safetensors")
    if want.is_file():
        return want
    if not use_ema:
        raise LoadError(f"{folder}: use_ema=False but there is no model.safetensors (only EMA weights)")
    log.warning("%s: no ema.safetensors, using the raw weights in model.safetensors", folder)
    return folder / "model.safetensors"


def _build_ours(config: Path, weights: Path, source: str | None) -> Pretrained:
    try:
        recipe = load_recipe(config)
    except RecipeError as e:
        raise LoadError(str(e)) from None
    _check_size(recipe.model, weights, config)
    model = build.unet(recipe.model)
    _load_into(model, load_state_dict(weights), weights)
    return Pretrained(model.eval(), build.diffusion(recipe.diffusion), recipe, source or str(weights))


def _check_size(cfg: ModelConfig, weights: Path, config: Path) -> None:
    """Refuse, before anything is allocated, a config that declares a larger U-Net than its weights
    file can hold even at 16 bits (`ch: 8192` beside a 1 MB file would build gigabytes first).
    The declared U-Net is built on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        numel = sum(p.numel() for p in build.unet(cfg).parameters())
    size = weights.stat().st_size
    # 2 bytes a weight at the least. Below 64 MiB the weights' own reader reports the mismatch
    # (building that much costs nothing): this only stops what would cost gigabytes.
    if numel * 2 > size + (64 << 20):
        raise LoadError(f"{config}: declares a U-Net of {numel:,} parameters, but {weights.name} holds "
                        f"{size:,} bytes (at most {size // 2:,} 16-bit weights): not the model of these weights")


def _scheduler_config(folder: Path) -> Path | None:
    for p in (folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json",
              folder.parent / "scheduler" / "scheduler_config.json"):
        if p.is_file():
            return p
    return None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return d


def _build_diffusers(config: Path, weights: Path, scheduler: Path | None, source: str | None,
                     recipe_file: Path | None = None) -> Pretrained:
    cfg = _read_json(config)
    try:
        kwargs = convert.unet_kwargs_from_diffusers(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise LoadError(f"{config}: not a UNet2DModel config our U-Net can hold: {e}") from None
    sched = _read_json(scheduler) if scheduler is not None else None
    try:
        diffusion = convert.diffusion_settings_from_diffusers(cfg, sched)
    except (ValueError, TypeError) as e:
        raise LoadError(f"{scheduler or config}: {e}") from None
    fields = set(ModelConfig.__dataclass_fields__) - {"preset"}
    model_section = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items() if k in fields}
    name = source.split("@")[0] if source else config.parent.name
    try:
        recipe = Recipe.from_dict({"model": model_section, "diffusion": diffusion,
                                   "run": {"name": name.replace("/", "--")}}, source=str(config))
    except RecipeError as e:
        raise LoadError(str(e)) from None
    if recipe_file is not None:  # our export of a pipeline keeps the training recipe beside it
        recipe = _matching_recipe(recipe_file, recipe)
    _check_size(recipe.model, weights, config)
    model = build.unet(recipe.model)
    state = _rename_deprecated_attention(load_state_dict(weights))
    try:
        state = convert.from_diffusers(state)
    except (KeyError, ValueError) as e:
        raise LoadError(f"{weights}: weights do not match the diffusers UNet2DModel layout: {e}") from None
    _load_into(model, state, weights)
    return Pretrained(model.eval(), build.diffusion(recipe.diffusion), recipe, source or str(weights))


def _matching_recipe(recipe_file: Path, derived: Recipe) -> Recipe:
    """The recipe in `recipe_file` (data, training and eval settings included) when its model and
    diffusion agree with the diffusers configs the weights came with; else, with a warning, the
    recipe built from those configs (the files diffusers reads decide what the weights are)."""
    try:
        ours = load_recipe(recipe_file)
    except RecipeError as e:
        log.warning("%s: ignored (%s); using the diffusers configs", recipe_file, e)
        return derived
    d_ours, d_derived = ours.to_dict()["diffusion"], derived.to_dict()["diffusion"]
    same_diffusion = all(d_ours[k] == d_derived[k] for k in ("timesteps", "beta_start", "beta_end", "mean_type", "var_type"))
    defaults = {"in_channels": 3, "out_channels": 3}  # the UNet's defaults, which a recipe may leave out
    if {**defaults, **ours.model.unet_kwargs()} == {**defaults, **derived.model.unet_kwargs()} and same_diffusion:
        return ours
    log.warning("%s: model or diffusion differ from the diffusers configs beside it; using those", recipe_file)
    return derived


_OLD_ATTN = re.compile(r"(.*attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)")
_NEW_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_deprecated_attention(state: dict) -> dict:
    """Checkpoints converted by early diffusers (the google/ddpm-* uploads among them) name the
    attention projections query/key/value/proj_attn; diffusers renames them on load
    (ModelMixin._convert_deprecated_attention_blocks), and so do we."""
    out = {}
    for k, v in state.items():
        m = _OLD_ATTN.fullmatch(k)
        out[f"{m.group(1)}.{_NEW_ATTN[m.group(2)]}.{m.group(3)}" if m else k] = v
    return out


def _load_into(model: torch.nn.Module, state: dict, weights: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise LoadError(
            f"{weights}: weights do not fit the configured U-Net: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise LoadError(f"{weights}: '{k}' has shape {tuple(v.shape)}, the U-Net wants {tuple(own[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()})


def _fetch_from_hub(repo_id: str, revision: str | None, use_ema: bool) -> tuple[Path, str]:
    """Download the files one layout needs, all at one commit; returns (folder, 'repo@commit')."""
    # The Hub client is imported for Hub ids only: local loads, and `python -m eval --help` which
    # imports this module, don't load it (nor read its HF_* settings before a caller sets them).
    import httpx2
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    try:
        info = api.model_info(repo_id, revision=revision)
        files = {s.rfilename for s in info.siblings or []}
        wanted = _pick_hub_files(files, use_ema)
        if not wanted:
            raise LoadError(f"{repo_id}: the Hub repo holds no model in our or diffusers' layout "
                            f"(files: {', '.join(sorted(files)) or 'none'})")
        # Said before the Hub client's own byte bars: which repo, ref and commit is coming down.
        print(f"fetching {repo_id} at {revision or 'main'} (commit {(info.sha or '?')[:12]}): "
              f"{len(wanted)} files", file=sys.stderr, flush=True)
        # snapshot_download resolves the revision to one commit and records the ref in the cache,
        # so the same call works offline later; only the files of the chosen layout come down.
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=wanted))
    except HFValidationError as e:  # names our pattern lets through: 'a/b--c', 'a/b.git', ...
        raise LoadError(f"{repo_id}: not a valid Hub repo id: {str(e).splitlines()[0]}") from None
    except RevisionNotFoundError:
        raise LoadError(f"{repo_id}: no revision '{revision}' on the Hub") from None
    except RepositoryNotFoundError:
        if _is_dataset(api, repo_id):  # a 404 for the model, but the name is a data set repo
            raise LoadError(f"{repo_id}: not a model repo on the Hub but a data set repo (for data.shards or "
                            "data_prep hf --dataset); name a model repo, a run directory or a checkpoint") from None
        raise LoadError(f"{repo_id}: no such repo on the Hub (or it is private and your token cannot read it)") from None
    except HfHubHTTPError as e:
        raise LoadError(f"{repo_id}: Hub request failed: {str(e).splitlines()[0]}") from None
    except (OSError, httpx2.TransportError) as e:  # connection refused, offline mode, ...
        cached = _cached_snapshot(repo_id, revision)
        if cached is not None:  # the Hub is unreachable but this revision was pulled before
            log.warning("%s: Hub unreachable (%s); using the cached snapshot %s", repo_id, e, cached.name)
            return cached, f"{repo_id}@{cached.name}"
        raise LoadError(f"{repo_id}: cannot download from the Hub, and it is not cached: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return folder, f"{repo_id}@{folder.name}"  # the cache folder of a snapshot is named by its commit


def _is_dataset(api, repo_id: str) -> bool:
    try:
        api.dataset_info(repo_id)
        return True
    except Exception:  # any answer but a data set's: the plain "no such repo" stands
        return False


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cache folder of `revision` when an earlier pull left it there (refs/<branch> -> commit).
    Not snapshot_download(local_files_only=True): that wants every file of the repo, and a pull
    fetches only the files of one layout."""
    from huggingface_hub import constants  # for Hub ids only, as in _fetch_from_hub
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    rev = revision or "main"
    ref = storage / "refs" / rev
    commit = rev if re.fullmatch(r"[0-9a-f]{40}", rev) else (ref.read_text().strip() if ref.is_file() else None)
    folder = storage / "snapshots" / commit if commit else None
    return folder if folder is not None and folder.is_dir() else None


def _pick_hub_files(files: set[str], use_ema: bool) -> list[str]:
    if "config.yaml" in files and files & set(OUR_WEIGHTS):
        order = OUR_WEIGHTS if use_ema else OUR_WEIGHTS[::-1]
        return ["config.yaml", next(w for w in order if w in files)]
    for sub in ("", "unet/"):
        weights = next((sub + w for w in DIFFUSERS_WEIGHTS if sub + w in files), None)
        if weights and sub + "config.json" in files:
            sched = [s for s in ("scheduler_config.json", "scheduler/scheduler_config.json") if s in files]
            recipe = ["config.yaml"] if sub and "config.yaml" in files else []  # our pipeline export's recipe
            return [sub + "config.json", weights, *sched[:1], *recipe]
    return []
