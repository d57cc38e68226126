"""Load a model from anywhere (run dir, checkpoint, safetensors file, folder, Hub repo) and push one.

Two on-disk layouts are understood, locally or on the Hub:
  ours       config.yaml (the resolved recipe) + ema.safetensors / model.safetensors (UNet keys)
  diffusers  config.json (UNet2DModel) + diffusion_pytorch_model.{safetensors,bin}, optionally
             under unet/, with scheduler_config.json (DDPMScheduler) beside it or in scheduler/:
             the layout of the converted original checkpoints (google/ddpm-cifar10-32, ...).
Weights are read only from safetensors or with torch.load(weights_only=True): a pickle that would
build anything but tensors is refused. Every bad input is a `LoadError` (a ValueError) whose
one-line message names the file; entry points print it and exit 2.

`push_to_hub` uploads a checkpoint as ONE commit (so a repo never shows half a checkpoint),
retrying transient HTTP errors with exponential backoff, and checking the token before any upload.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from pipeline import build
from pipeline.errors import UserError

log = logging.getLogger(__name__)

OUR_WEIGHTS = ("ema.safetensors", "model.safetensors")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class LoadError(UserError, ValueError):
    """A model source that cannot be loaded; the message names the file or repo."""


class PushError(UserError, RuntimeError):
    """A push that cannot start (token, input) or that failed after its retries."""


@dataclass
class Pretrained:
    model: torch.nn.Module
    diffusion: Any  # pipeline.diffusion.GaussianDiffusion
    recipe: Any  # pipeline.config.Recipe
    source: str  # the file that held the weights, or "repo_id@commit"


# ----------------------------------------------------------------------------- weights


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or from a torch file without unpickling arbitrary objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LoadError(f"{path}: not a readable safetensors file (truncated or corrupt?): {msg}") from None
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise LoadError(
                f"{path}: refused: this pickle holds objects other than tensors, and only plain tensor "
                "state dicts are loaded (torch.load(weights_only=True)); convert it to safetensors"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise LoadError(f"{path}: not a readable torch file (truncated or corrupt?): {str(e).splitlines()[0]}") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise LoadError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
        return obj
    raise LoadError(f"{path}: unknown weight format '{path.suffix}' (want .safetensors, or .bin/.pt)")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- loading


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
    folder, source = _fetch_from_hub(s, revision, use_ema)
    return _load_local(folder, use_ema, source=source)


def _load_local(path: Path, use_ema: bool, source: str | None) -> Pretrained:
    if path.is_file():
        if path.suffix != ".safetensors" and path.suffix not in (".bin", ".pt", ".pth"):
            raise LoadError(f"{path}: expected a .safetensors file, a checkpoint or run directory, or a folder")
        folder = path.parent
        if (folder / "config.yaml").is_file():
            return _build_ours(folder / "config.yaml", path, source)
        if (folder / "config.json").is_file():
            return _build_diffusers(folder / "config.json", path, _scheduler_config(folder), source)
        raise LoadError(f"{path}: no config.yaml (our layout) or config.json (diffusers) beside it")
    if (path / "checkpoints").is_dir():
        path = _latest_checkpoint(path)
    if (path / "config.yaml").is_file() and any((path / w).is_file() for w in OUR_WEIGHTS):
        return _build_ours(path / "config.yaml", _our_weights(path, use_ema), source)
    for sub in ("", "unet"):
        folder = path / sub if sub else path
        weights = next((folder / w for w in DIFFUSERS_WEIGHTS if (folder / w).is_file()), None)
        if weights is not None and (folder / "config.json").is_file():
            return _build_diffusers(folder / "config.json", weights, _scheduler_config(path), source)
    raise LoadError(
        f"{path}: no model found: want config.yaml + {' or '.join(OUR_WEIGHTS)} (ours), "
        f"config.json + diffusion_pytorch_model.safetensors/.bin (diffusers), or a run directory"
    )


def _latest_checkpoint(run_dir: Path) -> Path:
    from pipeline.checkpoint import latest_checkpoint  # complete checkpoints only, never a half-written one

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise LoadError(f"{run_dir}: run directory has no complete checkpoint yet")
    return Path(ckpt)


def _our_weights(folder: Path, use_ema: bool) -> Path:
    want = folder / ("ema.safetensors" if use_ema else "model.safetensors")
    if want.is_file():
        return want
    if not use_ema:
        raise LoadError(f"{folder}: use_ema=False but there is no model.safetensors (only EMA weights)")
    log.warning("%s: no ema.safetensors, using the raw weights in model.safetensors", folder)
    return folder / "model.safetensors"


def _build_ours(config: Path, weights: Path, source: str | None) -> Pretrained:
    from pipeline.config import RecipeError, load_recipe

    try:
        recipe = load_recipe(config)
    except RecipeError as e:
        raise LoadError(str(e)) from None
    model = build.unet(recipe.model)
    _load_into(model, load_state_dict(weights), weights)
    return Pretrained(model.eval(), build.diffusion(recipe.diffusion), recipe, source or str(weights))


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


def diffusion_settings_from_diffusers(unet_config: dict, scheduler: dict | None) -> dict:
    """Our `diffusion` recipe section for a diffusers repo: from its DDPMScheduler config when
    there is one, else the paper's (T=1000, linear betas 1e-4..0.02; sigma^2 = beta for CIFAR-10
    at 32x32, beta-tilde for the 256x256 models, Sec. 4 / Appendix B)."""
    if scheduler is None:
        large = int(unet_config.get("sample_size") or 0) <= 32
        return {"timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "mean_type": "eps",
                "var_type": "fixed_large" if large else "fixed_small"}
    if scheduler.get("trained_betas") is not None or scheduler.get("beta_schedule", "linear") != "linear":
        raise ValueError(f"beta_schedule {scheduler.get('beta_schedule')!r} is not the paper's linear schedule")
    var = scheduler.get("variance_type", "fixed_small")
    if var not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance_type {var!r} is not supported (want fixed_small or fixed_large)")
    pred = {"epsilon": "eps", "sample": "x0"}.get(scheduler.get("prediction_type", "epsilon"))
    if pred is None:
        raise ValueError(f"prediction_type {scheduler.get('prediction_type')!r} is not supported")
    return {"timesteps": int(scheduler.get("num_train_timesteps", 1000)),
            "beta_start": float(scheduler.get("beta_start", 1e-4)),
            "beta_end": float(scheduler.get("beta_end", 0.02)), "mean_type": pred, "var_type": var}


def _build_diffusers(config: Path, weights: Path, scheduler: Path | None, source: str | None) -> Pretrained:
    from pipeline import convert
    from pipeline.config import ModelConfig, Recipe, RecipeError

    cfg = _read_json(config)
    try:
        kwargs = convert.unet_kwargs_from_diffusers(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise LoadError(f"{config}: not a UNet2DModel config our U-Net can hold: {e}") from None
    sched = _read_json(scheduler) if scheduler is not None else None
    try:
        diffusion = diffusion_settings_from_diffusers(cfg, sched)
    except ValueError as e:
        raise LoadError(f"{scheduler}: {e}") from None
    fields = set(ModelConfig.__dataclass_fields__) - {"preset"}
    model_section = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items() if k in fields}
    name = source.split("@")[0] if source else config.parent.name
    try:
        recipe = Recipe.from_dict({"model": model_section, "diffusion": diffusion,
                                   "run": {"name": name.replace("/", "--")}}, source=str(config))
    except RecipeError as e:
        raise LoadError(str(e)) from None
    model = build.unet(recipe.model)
    state = _rename_deprecated_attention(load_state_dict(weights))
    try:
        state = convert.from_diffusers(state)
    except (KeyError, ValueError) as e:
        raise LoadError(f"{weights}: weights do not match the diffusers UNet2DModel layout: {e}") from None
    _load_into(model, state, weights)
    return Pretrained(model.eval(), build.diffusion(recipe.diffusion), recipe, source or str(weights))


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
    import httpx2
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    try:
        info = api.model_info(repo_id, revision=revision)
        files = {s.rfilename for s in info.siblings or []}
        wanted = _pick_hub_files(files, use_ema)
        if not wanted:
            raise LoadError(f"{repo_id}: the Hub repo holds no model in our or diffusers' layout "
                            f"(files: {', '.join(sorted(files)) or 'none'})")
        # snapshot_download resolves the revision to one commit and records the ref in the cache,
        # so the same call works offline later; only the files of the chosen layout come down.
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=wanted))
    except RevisionNotFoundError:
        raise LoadError(f"{repo_id}: no revision '{revision}' on the Hub") from None
    except RepositoryNotFoundError:
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


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cache folder of `revision` when an earlier pull left it there (refs/<branch> -> commit).
    Not snapshot_download(local_files_only=True): that wants every file of the repo, and a pull
    fetches only the files of one layout."""
    from huggingface_hub import constants
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
            return [sub + "config.json", weights, *sched[:1]]
    return []


# ----------------------------------------------------------------------------- pushing


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
            ckpt = _latest_checkpoint(src) if (src / "checkpoints").is_dir() else src
            weights = _our_weights(ckpt, use_ema=True)
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


def _step_of(ckpt: Path) -> int | None:
    state = ckpt / "trainer_state.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text())["step"])
        except (ValueError, KeyError, TypeError):
            pass
    m = re.search(r"step-(\d+)", ckpt.name)
    return int(m.group(1)) if m else None


def ddpm_scheduler_config(diffusion) -> dict:
    """diffusers' DDPMScheduler config for our `diffusion` recipe section (the paper's schedule)."""
    pred = {"eps": "epsilon", "x0": "sample"}.get(diffusion.mean_type)
    if pred is None:
        raise PushError(f"diffusion.mean_type={diffusion.mean_type!r} has no diffusers equivalent; push --format native")
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": diffusion.timesteps,
            "beta_start": diffusion.beta_start, "beta_end": diffusion.beta_end, "beta_schedule": "linear",
            "trained_betas": None, "variance_type": diffusion.var_type, "clip_sample": True,
            "clip_sample_range": 1.0, "prediction_type": pred}


def stage_push(src: str | os.PathLike, out: Path, *, repo_id: str, format: str = "native",
               results: str | os.PathLike | None = None, samples: list | None = None,
               command: str | None = None) -> dict[str, Path]:
    """The files of one push, {path in repo: local file}; generated ones are written under `out`.

    native:    ema.safetensors, config.yaml (resolved recipe), config.json (model description)
    diffusers: diffusion_pytorch_model.safetensors + config.json (UNet2DModel), scheduler_config.json,
               config.yaml
    both:      results.json (when evaluated), samples/*.png, README.md (model card)"""
    from safetensors.torch import save_file

    from eval.model_card import render_model_card
    from pipeline.config import RecipeError, load_recipe

    weights, config, run_dir = _resolve_checkpoint(Path(src))
    try:
        recipe = load_recipe(config)
    except RecipeError as e:
        raise PushError(str(e)) from None
    try:
        state = load_state_dict(weights)
    except LoadError as e:
        raise PushError(str(e)) from None
    results_path = Path(results) if results else _find_results(weights.parent, run_dir)
    if results_path is not None and not results_path.is_file():
        raise PushError(f"{results_path}: results file not found")
    results_data = _read_results(results_path)
    _check_results_match(results_path, results_data, state)
    step = _step_of(weights.parent)
    if samples is None or not samples:
        grid = run_dir / "samples" / f"step-{step:08d}.png" if run_dir and step is not None else None
        samples = [grid] if grid is not None and grid.is_file() else []
    for s in samples:
        if not Path(s).is_file():
            raise PushError(f"{s}: sample grid not found")
    unet_kwargs = recipe.model.unet_kwargs()
    sha = file_sha256(weights)
    files: dict[str, Path] = {"config.yaml": config}
    ema = weights.name != "model.safetensors"  # a checkpoint without EMA weights pushes its raw ones
    if format == "native":
        name = "ema.safetensors" if ema else "model.safetensors"
        files[name] = weights
        desc = {"library": "ddpm-pipeline", "architecture": "DDPM U-Net (Ho et al. 2020)",
                "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet_kwargs.items()},
                "diffusion": recipe.to_dict()["diffusion"], "weights": name, "ema": ema, "sha256": sha,
                "parameters": sum(t.numel() for t in state.values()), "step": step}
        _write_json(out / "config.json", desc)
    else:
        from pipeline import convert

        save_file(convert.to_diffusers(state), str(out / "diffusion_pytorch_model.safetensors"),
                  metadata={"format": "pt"})
        files["diffusion_pytorch_model.safetensors"] = out / "diffusion_pytorch_model.safetensors"
        _write_json(out / "config.json", {"_class_name": "UNet2DModel", **convert.diffusers_config(unet_kwargs)})
        _write_json(out / "scheduler_config.json", ddpm_scheduler_config(recipe.diffusion))
        files["scheduler_config.json"] = out / "scheduler_config.json"
    files["config.json"] = out / "config.json"
    if results_path is not None:
        files["results.json"] = results_path
    for s in samples:
        files[f"samples/{Path(s).name}"] = Path(s)
    card = render_model_card(recipe, results_data, repo_id=repo_id, format=format, step=step, weights_sha256=sha, ema=ema,
                             parameters=sum(t.numel() for t in state.values()), command=command,
                             files=sorted(files) + ["README.md"], trainer_state=_trainer_state(weights.parent))
    (out / "README.md").write_text(card)
    files["README.md"] = out / "README.md"
    return files


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
    if not want:
        return
    try:
        from eval.results import weights_sha256
    except ImportError:
        return

    class _Weights:  # weights_sha256 hashes model.state_dict(); the EMA file holds exactly that
        def state_dict(self):
            return state

    if weights_sha256(_Weights()) != want:
        raise PushError(f"{path}: these results were computed for other weights (sha256 {want[:12]}...); "
                        "evaluate this checkpoint or pass the matching --results")


def _trainer_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


def check_token(api, repo_id: str) -> str:
    """Fail before any upload when the token is missing, invalid, or cannot write `namespace`."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError

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
    except OSError as e:
        raise PushError(f"cannot reach the Hub at {api.endpoint}: {e}") from None
    namespace = repo_id.split("/")[0]
    allowed = {who.get("name")} | {o.get("name") for o in who.get("orgs", [])}
    if namespace not in allowed:
        raise PushError(f"{repo_id}: the token belongs to '{who.get('name')}', who cannot write to '{namespace}'")
    return token


def _is_transient(e: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    while e is not None:  # LFS upload errors arrive wrapped: RuntimeError from HfHubHTTPError
        if isinstance(e, HfHubHTTPError):
            return getattr(e.response, "status_code", None) in _TRANSIENT_STATUS
        if isinstance(e, (httpx2.TransportError, ConnectionError)):
            return True
        e = e.__cause__
    return False


def commit_with_retries(api, repo_id: str, operations: list, *, message: str, revision: str,
                        max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 30.0):
    """One create_commit, retried on 5xx / timeouts / resets with exponential backoff.

    A retry must not make a second commit when the first reached the server and only its reply
    was lost: the commit carries a unique push id and names its parent, so before each retry we
    look at the branch head; when our push id is there, the push is done."""
    from huggingface_hub.errors import HfHubHTTPError

    push_id = uuid.uuid4().hex
    description = f"push-id: {push_id}"
    parent = api.repo_info(repo_id, revision=revision).sha
    for attempt in range(max_retries + 1):
        try:
            return api.create_commit(repo_id, operations, commit_message=message, commit_description=description,
                                     revision=revision, parent_commit=parent)
        except Exception as e:
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


def _describe(e: BaseException) -> str:
    parts = []
    while e is not None and len(parts) < 3:
        text = str(e).strip().splitlines()
        parts.append(text[0] if text else type(e).__name__)
        e = e.__cause__
    return ": ".join(parts)


def _find_commit(api, repo_id: str, revision: str, push_id: str):
    from huggingface_hub import CommitInfo

    for c in api.list_repo_commits(repo_id, revision=revision)[:5]:
        if push_id in (c.message or ""):
            return CommitInfo(commit_url=f"{api.endpoint}/{repo_id}/commit/{c.commit_id}", commit_message=c.title,
                              commit_description=c.message, oid=c.commit_id)
    return None


def push_to_hub(src: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool = False,
                format: str = "native", results: str | os.PathLike | None = None,
                samples: Iterable[str | os.PathLike] = (), command: str | None = None,
                commit_message: str | None = None, max_retries: int = 5, backoff: float = 1.0,
                endpoint: str | None = None, token: str | None = None) -> dict:
    """Push a run / checkpoint / safetensors file as one commit; returns {repo_id, revision, commit, url, files}."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not REPO_ID.fullmatch(repo_id):
        raise PushError(f"{repo_id}: a repo id is 'namespace/name'")
    if format not in ("native", "diffusers"):
        raise PushError(f"format {format!r}: want 'native' or 'diffusers'")
    _resolve_checkpoint(Path(src))  # bad input fails before the network is touched
    api = HfApi(endpoint=endpoint, token=token)
    token = check_token(api, repo_id)  # before anything is staged or uploaded
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
        except (HfHubHTTPError, OSError, RuntimeError) as e:
            raise PushError(f"{repo_id}: push failed, nothing was committed: {_describe(e)}") from None
        except ValueError as e:  # e.g. the Hub rejected the model card metadata (before any upload)
            raise PushError(f"{repo_id}: {' '.join(str(e).split())}") from None
    return {"repo_id": repo_id, "revision": branch, "commit": info.oid, "url": info.commit_url,
            "files": sorted(files)}


def push_after_eval(src: str | os.PathLike, recipe, results: str | os.PathLike | None = None) -> dict | None:
    """The last step of `eval` when the recipe's `hub` section asks (hub.push_after_eval + hub.repo_id)."""
    hub = recipe.hub
    if not hub.push_after_eval:
        return None
    if not hub.repo_id:
        raise PushError("hub.push_after_eval is set but hub.repo_id is not")
    return push_to_hub(src, hub.repo_id, revision=hub.revision, private=hub.private, format=hub.format,
                       results=results)
