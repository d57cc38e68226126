"""Typed recipes: one YAML file per experiment, validated before any work starts.

A recipe has the sections model, diffusion, data, train, eval and run. Every field is typed; an
unknown key, a wrong type or a bad value raises `RecipeError` naming the file, the dotted key and
the closest valid key. Command-line overrides are dotted `section.key=value` strings whose values
are parsed as YAML (`train.lr=1e-4`, `model.ch_mult=[1,2]`). This module imports no torch: a
recipe is checked before anything heavy loads (pipeline/build.py makes the objects).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pipeline import recipe_checks
from pipeline.atomic import write_text
from pipeline.errors import UserError
from pipeline.manifest import ManifestError, read_manifest
from pipeline.presets import PRESETS
from pipeline.yaml_safe import YamlError, short
from pipeline.yaml_safe import load as _load_yaml
from pipeline.yaml_safe import load_file as _load_yaml_file


class RecipeError(UserError):
    """A recipe that cannot run. Entry points print the message and exit 2."""


@dataclass
class ModelConfig:
    # A preset of pipeline.presets.PRESETS; the fields below override it when set.
    preset: Optional[str] = None
    resolution: Optional[int] = None
    in_channels: Optional[int] = None
    out_channels: Optional[int] = None
    ch: Optional[int] = None
    ch_mult: Optional[tuple[int, ...]] = None
    num_res_blocks: Optional[int] = None
    attn_resolutions: Optional[tuple[int, ...]] = None
    dropout: Optional[float] = None

    def unet_kwargs(self) -> dict:
        """The resolved `UNet(**kwargs)`: the preset, overridden by the fields that are set."""
        kwargs = dict(PRESETS[self.preset]) if self.preset else {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "preset" and value is not None:
                kwargs[f.name] = value
        if "resolution" not in kwargs:
            raise RecipeError("model: set model.preset or model.resolution")
        return kwargs


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    mean_type: Literal["eps", "x0", "mu"] = "eps"
    # learned: the original's learned diagonal Sigma (Table 2); needs loss_type vlb and a
    # model with 2 x in_channels outputs (model.out_channels: 6).
    var_type: Literal["fixed_small", "fixed_large", "learned"] = "fixed_large"
    loss_type: Literal["simple", "vlb", "mu_mse"] = "simple"


@dataclass
class DataConfig:
    # A shard directory holding manifest.json, or the manifest file itself.
    shards: str = ""
    random_flip: bool = True  # the paper's text (App. B) flips every data set but LSUN Bedroom
    num_workers: int = 2
    max_corrupt: int = 10  # corrupt samples tolerated before the loader stops


@dataclass
class TrainConfig:
    global_batch_size: int = 128
    micro_batch_size: Optional[int] = None  # per process; None = global / world size
    max_steps: int = 800_000
    lr: float = 2e-4
    warmup_steps: int = 5000
    grad_clip: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    # EMA warm-up: decay min(ema_decay, (1 + n) / (10 + n)) at update n, so short and fine-tuning
    # runs do not sample from their initial weights for ~1/(1 - decay) steps. Off: the paper's
    # constant decay (every paper recipe).
    ema_warmup: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    log_every: int = 50
    sample_every: int = 10_000
    sample_count: int = 16
    max_nonfinite: int = 10  # consecutive non-finite losses before stopping
    init_from: Optional[str] = None  # checkpoint dir, safetensors file or Hub id (fine-tuning)
    # EMA-only weights every N steps in RUN/snapshots/ (never pruned; `eval sweep` scores them); 0 = off
    snapshot_every: int = 0
    # The GPU fast path (pipeline/fast_path.py): true, false or "auto" (on for CUDA, off elsewhere).
    channels_last: bool | Literal["auto"] = "auto"  # NHWC weights and activations
    compile: bool | Literal["auto"] = "auto"  # torch.compile of the U-Net for training (time printed)
    fused_adam: bool | Literal["auto"] = "auto"  # one fused Adam kernel for all tensors
    tf32: bool | Literal["auto"] = "auto"  # TF32 tensor cores for the float32 matmuls and convolutions
    # global: clip the averaged gradient; replica: the original's clipping of each TPU core's
    # gradient before averaging, with clip_replicas virtual cores (pipeline/clipping.py).
    clip_scope: Literal["global", "replica"] = "global"
    clip_replicas: int = 8  # the original's 8 cores: per-core batch 16 on CIFAR-10, 8 at 256x256


@dataclass
class EvalConfig:
    num_samples: int = 50_000
    batch_size: int = 256
    sampler: Literal["ancestral", "ddim"] = "ancestral"
    ddim_steps: int = 50
    var_type: Optional[Literal["fixed_small", "fixed_large"]] = None  # None = diffusion.var_type
    fid_reference: Optional[str] = None  # shard dir; None = data.shards (training split)
    nll_split: str = "test"
    nll_batch_size: int = 64
    nll_t_batch: int = 10  # time steps per model call in calc_bpd
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    # The first N reference images in shard order (None = the whole split); 50000 for LSUN and
    # CelebA-HQ, the StyleGAN2 code's protocol that the paper used.
    fid_reference_count: Optional[int] = None
    # Autocast of the U-Net while sampling; None = mixed_precision ("no" = fp32).
    sampling_precision: Optional[Literal["fp32", "bf16", "fp16"]] = None


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/run"
    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    wandb_project: Optional[str] = None  # None: $WANDB_PROJECT, else run.name (pipeline/trackers.py)
    wandb_entity: Optional[str] = None  # None: $WANDB_ENTITY, else the account's default
    # Publish to this Hub model repo (namespace/name) at the end of training, with `eval push`'s
    # code (pipeline/publish.py); hub_strategy checkpoint: every checkpoint too (diffusers' option).
    push_to_hub: Optional[str] = None
    hub_strategy: Literal["end", "checkpoint"] = "end"
    push_format: Literal["native", "diffusers"] = "native"


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Any, source: str = "<recipe>") -> "Recipe":
        recipe = _build(cls, d, source, prefix="")
        _check_values(recipe, source)
        return recipe


# ---------------------------------------------------------------------------- loading


def load_recipe(path: str | os.PathLike, overrides: typing.Iterable[str] = ()) -> Recipe:
    """Read a YAML recipe, apply dotted overrides and validate the result."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = _load_yaml_file(path) or {}
    except YamlError as e:
        raise RecipeError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    overrides = list(overrides)
    for item in overrides:
        _apply_override(data, item, str(path))
    try:
        return Recipe.from_dict(data, source=str(path))
    except RecipeError as e:
        raise _blame_override(e, str(path), overrides) from None


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe atomically: a reader never sees half a config.yaml."""
    write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def check_paths(recipe: Recipe, source: str = "<recipe>") -> None:
    """Fail before any work when the data the recipe names is not there."""
    shards = recipe.data.shards
    if not shards:
        raise RecipeError(f"{source}: data.shards is not set")
    if _remote(shards):  # a Hub data set repo or a URL: fetched and verified when the loader opens it
        return
    p = Path(shards)
    manifest = p / "manifest.json" if p.is_dir() else p
    if not manifest.is_file():
        raise RecipeError(f"{source}: data.shards: no manifest.json at '{shards}' (run data_prep first)")
    try:  # the shards' resolution must be the model's, before a 113M-parameter model is built
        m = read_manifest(manifest)
    except ManifestError as e:
        raise RecipeError(f"{source}: data.shards: {e}") from None
    check_shards_fit(recipe, m, f"{source}: ", str(manifest))
    init = recipe.train.init_from
    if init and not Path(init).exists():  # a Hub id is namespace/name, and not a local folder's child
        parent = Path(init).parent
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", init) or (parent != Path(".") and parent.is_dir()):
            raise RecipeError(f"{source}: train.init_from: {short(init)}: no such file or directory")


def check_shards_fit(recipe: Recipe, m: dict, prefix: str, manifest: str) -> None:
    """The shards' manifest `m` fits the recipe: the model's resolution, and training samples."""
    res = recipe.model.unet_kwargs()["resolution"]
    if m.get("resolution") is not None and m["resolution"] != res:
        raise RecipeError(f"{prefix}model resolution {res} does not match the shards' resolution "
                          f"{m['resolution']} ({manifest})")
    if not m["splits"].get("train", {}).get("count"):
        raise RecipeError(f"{prefix}data.shards: {manifest} has no training samples")


def _remote(shards: str) -> bool:
    from pipeline.remote_shards import is_remote  # torch-free, as this module

    return is_remote(shards)


def _apply_override(data: dict, item: str, source: str) -> None:
    where = f"command line override {short(item)} (recipe {source})"
    if "=" not in item:
        raise RecipeError(f"{where}: not of the form section.key=value")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise RecipeError(f"{where}: the key must be section.key, e.g. train.lr")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except YamlError as e:
        if str(e).startswith("refused"):
            raise RecipeError(f"{where}: {e}") from None
        value = raw  # not YAML: the plain string (run.name=a:b)
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise RecipeError(f"{where}: '{short(parts[0])}' is not a section")
    section[parts[1]] = value


def _blame_override(e: RecipeError, source: str, overrides: list[str]) -> RecipeError:
    """An error about a key that a command-line override set says so, not that the file is wrong."""
    msg = str(e)
    rest = msg[len(source) + 2:] if msg.startswith(f"{source}: ") else msg
    for item in reversed(overrides):
        key = item.partition("=")[0].strip()
        if rest.startswith((f"{key}:", f"{key}[")) or rest.startswith(f"unknown key '{key}'"):
            return RecipeError(f"command line override {short(item)} (recipe {source}): {rest}")
    return e


# Names other code bases use for our keys, which a string match would not find.
_ALIASES = {"learning_rate": "lr", "batch_size": "global_batch_size", "steps": "max_steps",
            "num_steps": "max_steps", "precision": "mixed_precision", "dataset": "shards"}


def _closest(name: str, choices: typing.Iterable[str], prefix: str) -> str:
    choices = list(choices)
    if _ALIASES.get(name) in choices:
        return f" (did you mean '{prefix}{_ALIASES[name]}'?)"
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


# Keys and sections removed because nothing read them. Every config.yaml saved before (run
# directories, pushed Hub repos) holds them, since save_recipe writes every key, so they are
# ignored with a warning whatever their value, and old checkpoints still load.
RETIRED = {"data.split": "the loader always reads the train split",
           "hub": "push with `python -m eval push SRC --repo-id NAMESPACE/NAME`"}


def _build(cls, d: Any, source: str, prefix: str):
    where = prefix.rstrip(".") or "recipe"
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise RecipeError(f"{source}: '{where}' must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        if f"{prefix}{key}" in RETIRED:
            warnings.warn(f"{source}: '{prefix}{key}' is no longer used ({RETIRED[prefix + key]}); ignored",
                          stacklevel=2)
            continue
        if key not in fields:
            raise RecipeError(
                f"{source}: unknown key '{prefix}{str(key)[:60]}'{_closest(str(key)[:60], fields, prefix)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, source, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, source, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    """Check `value` against a type hint; return it in the hinted form (lists -> tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, source, key)
            except RecipeError:
                pass
        raise RecipeError(f"{source}: {key}: expected {_name(hint)}, got {short(value)}")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            options = ", ".join(repr(a) for a in args)
            raise RecipeError(f"{source}: {key}: {short(value)} is not one of {options}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{source}: {key}: expected a list, got {short(value)}")
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise RecipeError(f"{source}: {key}: expected {len(item_types)} items, got {len(value)}")
        return tuple(_coerce(v, t, source, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (bool, str) and isinstance(value, hint):
        return value
    raise RecipeError(f"{source}: {key}: expected {_name(hint)}, got {short(value)}")


def _name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # "bool or 'auto'", not "Union"
        return " or ".join(_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_values(r: Recipe, source: str) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise RecipeError(f"{source}: {key}: {what}")

    recipe_checks.check(r, need)  # the value ranges: pipeline/recipe_checks.py
    if r.model.preset is not None:
        need(
            r.model.preset in PRESETS,
            "model.preset",
            f"unknown preset '{r.model.preset}'{_closest(r.model.preset, PRESETS, '')}; "
            f"choose one of {', '.join(PRESETS)}",
        )
    else:
        need(r.model.resolution is not None, "model.resolution", "set it, or set model.preset")


def _plain(obj: Any) -> Any:
    """Tuples to lists, so the YAML we write is plain and loads back to the same recipe."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
