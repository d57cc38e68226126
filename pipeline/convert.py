"""Weights and configs between our `pipeline.unet.UNet` and diffusers' `UNet2DModel`.

The paper's model is a `UNet2DModel` with `freq_shift=1`, `flip_sin_to_cos=False` (the
original's embedding [sin, cos] with frequencies exp(-log(10000) i / (half - 1))),
`downsample_padding=0` (TF 'SAME' padding of a stride-2 conv: one pixel bottom/right),
GroupNorm(32, eps 1e-6), a single attention head and `AttnDownBlock2D` / `AttnUpBlock2D` at the
resolutions with attention. The paper's forward process is a `DDPMScheduler` with the linear
schedule; `ddpm_scheduler_config` and `diffusion_settings_from_diffusers` map our `diffusion`
section to its config and back. diffusers is not imported here: this is pure key/config mapping,
and a layout we cannot represent is a ValueError naming the key.

A learned Sigma (the original's `learned` variance type, Table 2) has 2C output channels, and
its weights map to a 2C-channel `UNet2DModel` like any other. Its scheduler does not: the
original's (and our) second half of the output is log sigma^2, while diffusers'
`variance_type="learned"` means sigma^2 itself (`DDPMScheduler.step` takes its square root).
Neither direction has a faithful config, so both are refused: `ddpm_scheduler_config` for our
learned Sigma, `diffusion_settings_from_diffusers` for a diffusers "learned" model (read as
ours, its sigma^2 would be taken for log sigma^2). To step diffusers' scheduler with one of our
outputs, exponentiate the second half first (`torch.cat([eps, logvar.exp()], 1)`), as
tests/test_learned_variance.py checks.
"""

from __future__ import annotations

import inspect
import re

import torch

from pipeline.unet import GN_EPS, GN_GROUPS, UNet

_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
           "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}
_FIXED = {"temb_dense0": "time_embedding.linear_1", "temb_dense1": "time_embedding.linear_2",
          "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out",
          "mid_block_1": "mid_block.resnets.0", "mid_block_2": "mid_block.resnets.1",
          "mid_attn_1": "mid_block.attentions.0"}
_FIXED_BACK = {v: k for k, v in _FIXED.items()}


def _attn_to_diffusers(prefix: str, rest: str, value: torch.Tensor, out: dict) -> None:
    name, param = rest.rsplit(".", 1)
    if name == "qkv":  # our fused q/k/v projection -> to_q, to_k, to_v
        for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
            out[f"{prefix}.{part}.{param}"] = chunk.clone()
    else:
        out[f"{prefix}.{ {'norm': 'group_norm', 'proj_out': 'to_out.0'}[name] }.{param}"] = value


def to_diffusers(state_dict: dict) -> dict:
    """Our UNet state_dict -> a diffusers `UNet2DModel` state_dict (same tensors, renamed)."""
    out: dict = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn|resample)\.(\d+\.)?(.+)", key)
        if m:
            side, i, kind, j, rest = m.groups()
            blocks = f"{side}_blocks.{i}"
            if kind == "block":
                name, param = rest.split(".", 1)
                out[f"{blocks}.resnets.{j[:-1]}.{_RESNET[name]}.{param}"] = value
            elif kind == "attn":
                _attn_to_diffusers(f"{blocks}.attentions.{j[:-1]}", rest, value, out)
            else:
                sampler = "downsamplers" if side == "down" else "upsamplers"
                out[f"{blocks}.{sampler}.0.{rest}"] = value
            continue
        head, rest = key.split(".", 1)
        if head not in _FIXED:
            raise KeyError(f"to_diffusers: unexpected key {key!r}")
        if head == "mid_attn_1":
            _attn_to_diffusers(_FIXED[head], rest, value, out)
        elif head.startswith("mid_block"):
            name, param = rest.split(".", 1)
            out[f"{_FIXED[head]}.{_RESNET[name]}.{param}"] = value
        else:
            out[f"{_FIXED[head]}.{rest}"] = value
    return out


def from_diffusers(state_dict: dict) -> dict:
    """A diffusers `UNet2DModel` state_dict (the paper's layout) -> our UNet state_dict."""
    out: dict = {}
    qkv: dict = {}  # our attention prefix -> {param: {q/k/v: tensor}}
    for key, value in state_dict.items():
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                         r"\.(\d+)\.(.+)", key)
        mm = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            side, i, kind, j, rest = m.groups()
            prefix = f"{side}.{i}." + {"resnets": f"block.{j}", "attentions": f"attn.{j}"}.get(
                kind, "resample")
        elif mm:
            kind, j, rest = mm.groups()
            prefix = {("resnets", "0"): "mid_block_1", ("resnets", "1"): "mid_block_2",
                      ("attentions", "0"): "mid_attn_1"}[(kind, j)]
        else:
            name, param = key.rsplit(".", 1)
            if name not in _FIXED_BACK:
                raise KeyError(f"from_diffusers: unexpected key {key!r}")
            out[f"{_FIXED_BACK[name]}.{param}"] = value
            continue
        name, param = rest.rsplit(".", 1)
        if kind == "resnets":
            out[f"{prefix}.{_RESNET_BACK[name]}.{param}"] = value
        elif kind == "attentions":
            if name in ("to_q", "to_k", "to_v"):
                qkv.setdefault(prefix, {}).setdefault(param, {})[name] = value
            else:
                out[f"{prefix}.{ {'group_norm': 'norm', 'to_out.0': 'proj_out'}[name] }.{param}"] = value
        else:
            out[f"{prefix}.{rest}"] = value
    for prefix, params in qkv.items():
        for param, parts in params.items():
            out[f"{prefix}.qkv.{param}"] = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]])
    return out


def diffusers_config(unet_kwargs: dict) -> dict:
    """`UNet(**unet_kwargs)` -> the kwargs of the equivalent diffusers `UNet2DModel`."""
    k = {**{p: v.default for p, v in _unet_defaults().items()}, **unet_kwargs}
    ch_mult, attn = tuple(k["ch_mult"]), tuple(k["attn_resolutions"])
    res = [k["resolution"] // 2 ** i for i in range(len(ch_mult))]
    down = ["AttnDownBlock2D" if r in attn else "DownBlock2D" for r in res]
    up = ["AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(res)]
    return dict(
        sample_size=k["resolution"], in_channels=k["in_channels"], out_channels=k["out_channels"],
        center_input_sample=False, time_embedding_type="positional", freq_shift=1,
        flip_sin_to_cos=False, down_block_types=tuple(down), mid_block_type="UNetMidBlock2D",
        up_block_types=tuple(up), block_out_channels=tuple(k["ch"] * m for m in ch_mult),
        layers_per_block=k["num_res_blocks"], mid_block_scale_factor=1, downsample_padding=0,
        downsample_type="conv", upsample_type="conv", dropout=float(k["dropout"]), act_fn="silu",
        attention_head_dim=None, norm_num_groups=GN_GROUPS, norm_eps=GN_EPS,
        resnet_time_scale_shift="default", add_attention=True,
    )


def _unet_defaults():
    return {n: p for n, p in inspect.signature(UNet.__init__).parameters.items()
            if n != "self" and p.default is not inspect.Parameter.empty}


def unet_kwargs_from_diffusers(config: dict) -> dict:
    """A diffusers `UNet2DModel` config -> `UNet` kwargs; ValueError if it is not the DDPM layout."""
    expect = dict(freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, act_fn="silu",
                  norm_num_groups=GN_GROUPS, resnet_time_scale_shift="default",
                  time_embedding_type="positional", mid_block_scale_factor=1,
                  center_input_sample=False, add_attention=True, class_embed_type=None,
                  mid_block_type="UNetMidBlock2D", downsample_type="conv", upsample_type="conv")
    for key, want in expect.items():
        if key in config and config[key] != want:
            raise ValueError(f"diffusers config: {key}={config[key]!r}, the DDPM U-Net needs {want!r}")
    if abs(float(config.get("norm_eps", GN_EPS)) - GN_EPS) > 1e-12:
        raise ValueError(f"diffusers config: norm_eps={config['norm_eps']!r}, the DDPM U-Net needs {GN_EPS}")
    chans = list(config["block_out_channels"])
    ch = chans[0]
    if any(c % ch for c in chans):
        raise ValueError(f"diffusers config: block_out_channels={chans} are not multiples of {ch}")
    head = config.get("attention_head_dim")
    if head is not None and any(h != c for h, c in zip(_as_list(head, len(chans)), chans)):
        raise ValueError(f"diffusers config: attention_head_dim={head!r}; the DDPM U-Net has one "
                         f"head (None or equal to the channels)")
    size = config["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    attn = tuple(size // 2 ** i for i, b in enumerate(down) if b == "AttnDownBlock2D")
    want_up = ["AttnUpBlock2D" if size // 2 ** i in attn else "UpBlock2D"
               for i in reversed(range(len(down)))]
    if any(b not in ("DownBlock2D", "AttnDownBlock2D") for b in down) or up != want_up:
        raise ValueError(f"diffusers config: down_block_types={down}, up_block_types={up} "
                         f"are not the DDPM layout")
    return dict(resolution=size, in_channels=config.get("in_channels", 3),
                out_channels=config.get("out_channels", 3), ch=ch,
                ch_mult=tuple(c // ch for c in chans), num_res_blocks=config["layers_per_block"],
                attn_resolutions=attn, dropout=float(config.get("dropout", 0.0)))


def _as_list(x, n):
    return list(x) if isinstance(x, (list, tuple)) else [x] * n


# diffusers' "learned" is sigma^2, ours (the original's) log sigma^2: refused both ways (docstring).
LEARNED_IS_LOG_VARIANCE = (
    "variance_type 'learned': diffusers reads the second half of the output as sigma^2, this "
    "pipeline (like the original) as log sigma^2; a diffusers 'learned' model cannot be read as ours, "
    "nor ours written as one")


def ddpm_scheduler_config(diffusion) -> dict:
    """diffusers' DDPMScheduler config for our `diffusion` recipe section (the paper's schedule);
    ValueError for a parameterisation diffusers has no name for."""
    pred = {"eps": "epsilon", "x0": "sample"}.get(diffusion.mean_type)
    if pred is None:
        raise ValueError(f"diffusion.mean_type={diffusion.mean_type!r} has no diffusers equivalent")
    if diffusion.var_type == "learned":
        raise ValueError(LEARNED_IS_LOG_VARIANCE)
    return {"_class_name": "DDPMScheduler", "num_train_timesteps": diffusion.timesteps,
            "beta_start": diffusion.beta_start, "beta_end": diffusion.beta_end, "beta_schedule": "linear",
            "trained_betas": None, "variance_type": diffusion.var_type, "clip_sample": True,
            "clip_sample_range": 1.0, "prediction_type": pred}


def diffusion_settings_from_diffusers(unet_config: dict, scheduler: dict | None) -> dict:
    """Our `diffusion` recipe section for a diffusers repo: from its DDPMScheduler config when
    there is one, else the paper's (T=1000, linear betas 1e-4..0.02; sigma^2 = beta for CIFAR-10
    at 32x32, beta-tilde for the 256x256 models, Sec. 4 / Appendix B). ValueError for a schedule,
    variance or parameterisation that is not the paper's."""
    if scheduler is None:
        size = unet_config.get("sample_size") or 0
        size = size[0] if isinstance(size, (list, tuple)) else size
        large = int(size) <= 32
        return {"timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "mean_type": "eps",
                "var_type": "fixed_large" if large else "fixed_small"}
    if scheduler.get("trained_betas") is not None or scheduler.get("beta_schedule", "linear") != "linear":
        raise ValueError(f"beta_schedule {scheduler.get('beta_schedule')!r} is not the paper's linear schedule")
    var = scheduler.get("variance_type", "fixed_small")
    if var == "learned":
        raise ValueError(LEARNED_IS_LOG_VARIANCE)
    if var not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance_type {var!r} is not supported (want fixed_small or fixed_large)")
    _fixed_variance_channels(unet_config, var)
    pred = {"epsilon": "eps", "sample": "x0"}.get(scheduler.get("prediction_type", "epsilon"))
    if pred is None:
        raise ValueError(f"prediction_type {scheduler.get('prediction_type')!r} is not supported")
    try:
        return {"timesteps": int(scheduler.get("num_train_timesteps", 1000)),
                "beta_start": float(scheduler.get("beta_start", 1e-4)),
                "beta_end": float(scheduler.get("beta_end", 0.02)), "mean_type": pred, "var_type": var}
    except (TypeError, ValueError) as e:
        raise ValueError(f"num_train_timesteps / beta_start / beta_end must be numbers: {e}") from None


def _fixed_variance_channels(unet_config: dict, var: str) -> None:
    """A fixed variance needs a U-Net with as many outputs as inputs (twice as many is a learned one)."""
    c_in, c_out = unet_config.get("in_channels", 3), unet_config.get("out_channels", 3)
    if c_out != c_in:
        raise ValueError(f"variance_type {var!r} with a U-Net of {c_in} input and {c_out} output channels "
                         f"(a fixed variance has as many outputs as inputs; a learned one twice as many)")
