"""What the Hub tests push and load: run directories with a tiny U-Net's weights (and results),
and diffusers models in the layout of the google/ddpm-* uploads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from eval.results import write_result
from pipeline import build
from pipeline.config import Recipe, save_recipe
from pipeline.weights import weights_sha256
from support.model import TINY_UNET

# The tiny U-Net at 8x8 (attention at 4x4): small Hub repos.
TINY = dict(TINY_UNET, resolution=8, attn_resolutions=(4,))


def make_run(root: Path, seed: int = 0, step: int = 40, results: bool = True) -> Path:
    """A run directory in the layout of docs/interfaces.md, with a tiny U-Net's weights."""
    recipe = Recipe.from_dict({"model": TINY, "diffusion": {"var_type": "fixed_large"},
                               "data": {"shards": "data/cifar10"}, "train": {"max_steps": 100},
                               "run": {"name": "cifar10-tiny", "output_dir": str(root)}})
    torch.manual_seed(seed)
    model = build.unet(recipe.model)
    with torch.no_grad():  # conv_out starts at zero: perturb so outputs say something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = root / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    save_recipe(recipe, root / "config.yaml")
    save_recipe(recipe, ckpt / "config.yaml")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(ckpt / "ema.safetensors"))
    save_file({k: v + 1 for k, v in state.items()}, str(ckpt / "model.safetensors"))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 2,
                                                         "command": "accelerate launch pipeline/train.py x.yaml"}))
    (root / "checkpoints" / "latest").write_text(ckpt.name)
    (root / "samples").mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(root / "samples" / f"step-{step:08d}.png")
    if results:
        write_result(ckpt, "fid", {"fid": 123.4}, {"num_samples": 64, "reference": "train split, 50k",
                                                   "sampler": "ancestral", "var_type": "fixed_large"},
                     {"source": str(ckpt), "weights_sha256": weights_sha256(model)})
        write_result(ckpt, "nll", {"bpd": 7.5}, {"split": "test", "T": 1000},
                     {"source": str(ckpt), "weights_sha256": weights_sha256(model)})
    return root


def outputs(model, seed=1, res=8):
    """The model's output on fixed inputs: equal outputs, equal weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, res, res, generator=g)
    t = torch.tensor([0, 637])
    with torch.no_grad():
        return model(x, t)


def google_style_unet(seed=0):
    """A small UNet2DModel with the config layout of google/ddpm-cifar10-32 (attention at the
    second level, paper's time embedding: flip_sin_to_cos=False, freq_shift=1)."""
    from diffusers import UNet2DModel  # the test extra, and slow to import: only the interop tests

    torch.manual_seed(seed)
    m = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=None, norm_eps=1e-6, norm_num_groups=32, downsample_padding=0,
                    flip_sin_to_cos=False, freq_shift=1, time_embedding_type="positional", act_fn="silu",
                    center_input_sample=False, mid_block_scale_factor=1, dropout=0.0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()
