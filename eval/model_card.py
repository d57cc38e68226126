"""The README.md model card of a pushed checkpoint: Hub metadata + what a reader needs to trust it.

The YAML header is built with huggingface_hub's `ModelCardData` / `EvalResult`, so `model-index`
has the shape the Hub (and `ModelCard.load(...).data.eval_results`) expects. The body reports every
metric of results.json together with its exact protocol, the training command, data set and
preprocessing, hardware and steps, the weights' sha256, and how to load the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCardData

from eval.public import hub_dataset_id, public_path, public_text

TASK = "unconditional-image-generation"
# run/preset names -> (dataset id, display name)
_DATASETS = {
    "cifar10": ("cifar10", "CIFAR-10"),
    "celebahq": ("celeba-hq", "CelebA-HQ 256x256"),
    "lsun_bedroom": ("lsun-bedroom", "LSUN Bedroom"),
    "lsun_church": ("lsun-church", "LSUN Church"),
    "lsun_cat": ("lsun-cat", "LSUN Cat"),
    "quickstart": ("quickstart", "quickstart photos (scikit-image)"),
}
# (evaluation, metric) of results.json -> model-index (type, display name): the headline numbers
# of the paper's Table 1; every other number goes to the card's table only.
_HEADLINE = {("fid", "fid"): ("fid", "FID"), ("is", "is"): ("inception_score", "Inception Score"),
             ("nll", "bpd"): ("bits_per_dim", "NLL (bits/dim)")}


def _dataset(recipe) -> tuple[str, str]:
    hub = hub_dataset_id(recipe.data.shards)
    if hub:
        return hub, hub
    keys = [recipe.run.name or "", recipe.data.shards or "", recipe.model.preset or ""]
    for key in keys:
        norm = key.lower().replace("-", "_")
        for k, v in _DATASETS.items():
            if k in norm:
                return v
    name = public_path(recipe.data.shards) if recipe.data.shards else "unknown"
    return name, name


def hub_datasets(recipe, manifest: dict) -> list[str] | None:
    """The card's `datasets:`: Hub data set ids only. The shards' own repo, else the Hub data set
    `data_prep hf` converted, else CIFAR-10's canonical id; a local folder is no Hub id."""
    hub = hub_dataset_id(recipe.data.shards)
    src = manifest.get("source")
    if not hub and manifest.get("dataset") == "hf" and isinstance(src, str) and not Path(src).is_absolute() \
            and not Path(src).exists():
        hub = src
    if not hub and _dataset(recipe)[0] == "cifar10":
        hub = "cifar10"
    return [hub] if hub else None


def _manifest(recipe) -> dict:
    p = Path(recipe.data.shards or "")
    p = p / "manifest.json" if p.is_dir() else p
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError):
        return {}


def metric_rows(results: dict | None) -> list[tuple[str, str, float, dict]]:
    """(evaluation, metric, value, protocol) for every numeric metric in results.json (schema 1)."""
    rows = []
    for name, ev in ((results or {}).get("evaluations") or {}).items():
        for metric, value in (ev.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((name, metric, float(value), ev.get("protocol") or {}))
    return rows


def render_model_card(recipe, results: dict | None, *, repo_id: str, format: str = "native",
                      step: int | None = None, weights_sha256: str = "", parameters: int | None = None,
                      command: str | None = None, files: list[str] = (), trainer_state: dict | None = None,
                      ema: bool = True) -> str:
    ds_id, ds_name = _dataset(recipe)
    manifest = _manifest(recipe)
    command = public_text(command) if isinstance(command, str) else command
    rows = metric_rows(results)
    evals = []
    for name, metric, value, protocol in rows:
        if (name, metric) not in _HEADLINE:
            continue
        mtype, mname = _HEADLINE[(name, metric)]
        split = protocol.get("split") or protocol.get("reference_split") or ("test" if name == "nll" else "train")
        if protocol.get("paper_protocol") is False:
            why = protocol.get("paper_protocol_caveats") or [f"{protocol.get('sampler', 'DDIM')}, beyond the paper"]
            mname += f" (not the paper's protocol: {'; '.join(why)})"
        evals.append(EvalResult(task_type=TASK, dataset_type=ds_id, dataset_name=ds_name, dataset_split=str(split),
                                metric_type=mtype, metric_value=value, metric_name=mname,
                                metric_args=_protocol_args(protocol)))
    data = ModelCardData(
        # The Hub knows "diffusers" (widgets, code snippets); it does not know our own layout's
        # loader, so that card names no library and says what it is in the tags.
        library_name="diffusers" if format == "diffusers" else None,
        pipeline_tag=TASK,
        tags=["ddpm", "diffusion", "unconditional-image-generation", "pytorch", "safetensors"]
        + (["diffusers:DDPMPipeline"] if format == "diffusers" else ["ddpm-pipeline"]),
        datasets=hub_datasets(recipe, manifest),
        model_name=repo_id,
        eval_results=evals or None,
    )
    ts = trainer_state or {}
    out = ["---", data.to_yaml(), "---", "", f"# {repo_id.split('/')[-1]}", ""]
    out += [f"A denoising diffusion probabilistic model (Ho, Jain, Abbeel 2020, "
            f"[arXiv:2006.11239](https://arxiv.org/abs/2006.11239)) trained on **{ds_name}** at "
            f"{recipe.model.unet_kwargs()['resolution']}x{recipe.model.unet_kwargs()['resolution']} with "
            f"ddpm-pipeline. "
            + (f"The weights are the EMA weights (decay {recipe.train.ema_decay})" if ema
               else "The weights are the raw training weights (the checkpoint had no EMA weights)")
            + (f" after {step:,} steps." if step is not None else "."), ""]
    out += _results_section(rows, results)
    out += _training_section(recipe, step, ts, command, manifest)
    out += _model_section(recipe, parameters, weights_sha256)
    out += _load_section(repo_id, format, recipe.diffusion.timesteps)
    if files:
        out += ["## Files", ""] + [f"- `{f}`" for f in files] + [""]
    out += ["## Citation", "", "```bibtex", "@inproceedings{ho2020denoising,",
            "  title={Denoising Diffusion Probabilistic Models},",
            "  author={Ho, Jonathan and Jain, Ajay and Abbeel, Pieter},",
            "  booktitle={Advances in Neural Information Processing Systems}, year={2020}", "}", "```", ""]
    return "\n".join(out)


def _results_section(rows, results) -> list[str]:
    if not rows:
        return ["## Results", "", "Not evaluated yet: no results.json was pushed with these weights.", ""]
    out = ["## Results", "", "| evaluation | metric | value |", "|---|---|---|"]
    out += [f"| {name} | {metric} | {value:.6g} |" for name, metric, value, _ in rows]
    out += [f"\n**Caveat: {name} is not the paper's protocol** ({'; '.join(p['paper_protocol_caveats'])}); "
            "do not compare it with the paper's numbers." for name, p in
            {n: p for n, _, _, p in rows if p.get("paper_protocol") is False and p.get("paper_protocol_caveats")}.items()]
    out += ["", "### Exactly how they were computed", ""]
    for name, ev in (results.get("evaluations") or {}).items():
        out += [f"**{name}** ({ev.get('created', 'date unknown')}):", "", "```yaml",
                yaml.safe_dump(ev.get("protocol") or {}, sort_keys=True).rstrip(), "```", ""]
    ck = results.get("checkpoint") or {}
    if ck:
        out += [f"Evaluated checkpoint: `{ck.get('source', '?')}`, weights sha256 (`pipeline.weights.weights_sha256`) "
                f"`{ck.get('weights_sha256', '?')}`.", ""]
    if results.get("versions"):
        out += ["Software: " + ", ".join(f"{k} {v}" for k, v in sorted(results["versions"].items())) + ".", ""]
    return out


def _training_section(recipe, step, ts: dict, command: str | None, manifest: dict) -> list[str]:
    t, d = recipe.train, recipe.diffusion
    cmd = command or ts.get("command") or "accelerate launch pipeline/train.py config.yaml"
    if isinstance(cmd, list):
        cmd = " ".join(cmd)
    cmd = public_text(cmd)  # recorded at launch (pipeline/launcher.py); no local path in a public card
    out = ["## Training", "", "Command (the resolved recipe is `config.yaml` in this repo):", "", "```bash", cmd, "```", ""]
    out += ["Data set and preprocessing:", ""]
    if manifest:
        counts = manifest.get("counts") or manifest.get("splits") or {}
        out.append(f"- source: {manifest.get('dataset', '?')} {public_path(str(manifest.get('source', '?')))}; "
                   f"resolution {manifest.get('resolution', '?')}; samples per split: {json.dumps(counts)}")
    out += [f"- images scaled to [-1, 1]; random horizontal flip: {'yes' if recipe.data.random_flip else 'no'}"]
    out += [_PREPROCESSING.get(manifest.get("dataset"), _PREPROCESSING[None]), ""]
    world = ts.get("world_size") or ts.get("num_processes")
    hw = ts.get("hardware") or ts.get("device") or ts.get("distributed_type")
    out += ["Optimisation and hardware:", "",
            f"- steps: {step if step is not None else '?'} of {t.max_steps}; global batch {t.global_batch_size}; "
            f"Adam lr {t.lr} (warmup {t.warmup_steps}), eps {t.adam_eps}; grad clip {t.grad_clip}; "
            f"EMA {t.ema_decay}; precision {t.mixed_precision}; seed {t.seed}",
            f"- diffusion: T={d.timesteps}, linear betas {d.beta_start}..{d.beta_end}, predicts {d.mean_type}, "
            f"sampling variance {d.var_type}, loss {d.loss_type}",
            f"- hardware: {hw or 'not recorded'}" + (f"; {world} processes" if world else ""), ""]
    return out


def _model_section(recipe, parameters, sha) -> list[str]:
    kw = recipe.model.unet_kwargs()
    out = ["## Model", "", "U-Net: " + ", ".join(f"{k}={v}" for k, v in kw.items())]
    if parameters:
        out[-1] += f" ({parameters:,} parameters)"
    if sha:
        out += ["", f"sha256 of the checkpoint file these weights come from: `{sha}`"]
    return out + [""]


# What data_prep did to the images, by source (data_prep/preprocess.py); other sources' text is not shown.
_PREPROCESSING = {
    "cifar10": "- CIFAR-10's 32x32 images as published (no crop, no resize)",
    "lsun": "- LSUN: centre crop to the short side, antialiased (Lanczos) resize, as ProGAN's dataset_tool "
            "that the original code's TFRecords came from",
    None: "- centre crop to the short side, antialiased (Lanczos) resize (data_prep/preprocess.py)",
}


def _load_section(repo_id: str, format: str, timesteps: int = 1000) -> list[str]:
    out = ["## How to load", "", "With ddpm-pipeline (any revision, our or diffusers' layout):", "", "```python",
           "from pipeline.hub import load_pretrained", "import torch", "",
           f'p = load_pretrained("{repo_id}")  # .model (U-Net), .diffusion, .recipe',
           'res = p.recipe.model.unet_kwargs()["resolution"]',
           "x = p.diffusion.p_sample_loop(p.model, (16, 3, res, res), generator=torch.Generator().manual_seed(0))",
           "```", "",
           "Sample or evaluate from the command line:", "", "```bash",
           f"python -m eval sample {repo_id} --out samples/", f"python -m eval fid {repo_id} --out eval/", "```", ""]
    if format == "diffusers":
        # The Hub shows this snippet: the repo is a DDPMPipeline (model_index.json, unet/, scheduler/).
        out = out[:2] + ["With diffusers:", "", "```python", "from diffusers import DDPMPipeline",
                         f'pipe = DDPMPipeline.from_pretrained("{repo_id}")',
                         f"image = pipe(num_inference_steps={timesteps}).images[0]  # T = {timesteps}: the paper's sampler",
                         "```", "",
                         "The scheduler config carries this model's T, betas, variance and x_0 clipping; "
                         "`num_inference_steps` below T is a strided schedule (beyond the paper).", ""] + out[2:]
    return out


def _protocol_args(protocol: dict) -> dict | None:
    """The protocol of a metric as model-index `args`: its scalar settings (sampler, samples, split,
    reference, ...), so the metadata says how the number was computed, not only the card's text."""
    args = {k: v for k, v in sorted(protocol.items()) if isinstance(v, (str, int, float, bool)) and v is not None}
    return args or None


def card_metadata(text: str) -> dict[str, Any]:
    """The YAML header of a model card (for tests and tools)."""
    if not text.startswith("---"):
        return {}
    return yaml.safe_load(text.split("---", 2)[1]) or {}
