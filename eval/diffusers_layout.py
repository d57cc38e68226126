"""Our checkpoint in the layout of a diffusers `DDPMPipeline` (what `save_pretrained` writes):

    model_index.json                        {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
    unet/config.json                        the UNet2DModel config (pipeline.convert.diffusers_config)
    unet/diffusion_pytorch_model.safetensors the weights under diffusers' names (pipeline.convert.to_diffusers)
    scheduler/scheduler_config.json         DDPMScheduler: the recipe's T, linear betas, variance type,
                                            x_0 clipping to [-1, 1] (as our Algorithm 2 clips), parameterisation

so `DDPMPipeline.from_pretrained(folder_or_repo)` opens and runs it, and `pipeline.hub.load_pretrained`
reads it back (the layout of the google/ddpm-* repos). diffusers itself is not imported: the files
are plain JSON and safetensors. A parameterisation diffusers has no name for is a ValueError.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from safetensors.torch import save_file

from pipeline import atomic, convert

# The diffusers release whose file layout this writes; recorded as `_diffusers_version` (the loaders
# only read it for warnings). The installed version when there is one.
_LAYOUT_VERSION = "0.30.0"


def _diffusers_version() -> str:
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return _LAYOUT_VERSION


def model_index() -> dict:
    return {"_class_name": "DDPMPipeline", "_diffusers_version": _diffusers_version(),
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}


def stage_diffusers_pipeline(recipe, state: dict, out: Path) -> dict[str, Path]:
    """Write the pipeline's files for `recipe` and our U-Net `state` under `out`; returns
    {path in the repo: local file}. ValueError when the recipe cannot be expressed in diffusers."""
    if recipe.diffusion.var_type == "learned":
        # DDPMScheduler.step reads the second half of a "learned" output as sigma^2; ours (and the
        # original's) is log sigma^2, so DDPMPipeline would sample wrongly (NaN for negative values).
        raise ValueError("diffusion.var_type=learned: diffusers' DDPMPipeline reads the learned half as "
                         "sigma^2 and this model outputs log sigma^2")
    version = _diffusers_version()
    scheduler = {**convert.ddpm_scheduler_config(recipe.diffusion), "_diffusers_version": version}
    unet = {"_class_name": "UNet2DModel", "_diffusers_version": version,
            **convert.diffusers_config(recipe.model.unet_kwargs())}
    files = {"model_index.json": out / "model_index.json",
             "unet/config.json": out / "unet" / "config.json",
             "unet/diffusion_pytorch_model.safetensors": out / "unet" / "diffusion_pytorch_model.safetensors",
             "scheduler/scheduler_config.json": out / "scheduler" / "scheduler_config.json"}
    for sub in ("unet", "scheduler"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    atomic.write_json(files["model_index.json"], model_index(), indent=2)
    atomic.write_json(files["unet/config.json"], _jsonable(unet), indent=2)
    atomic.write_json(files["scheduler/scheduler_config.json"], scheduler, indent=2)
    with atomic.atomic_path(files["unet/diffusion_pytorch_model.safetensors"]) as tmp:
        save_file({k: v.contiguous() for k, v in convert.to_diffusers(state).items()}, str(tmp),
                  metadata={"format": "pt"})
    return files


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
