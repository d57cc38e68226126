"""The DDPM U-Net (Ho et al. 2020, Appendix B), as in the original `diffusion_tf/models/unet.py`.

PixelCNN++-style residual blocks (GroupNorm(32, eps 1e-6) -> swish -> conv3x3, plus the time
embedding, -> GroupNorm -> swish -> dropout -> conv3x3), a sinusoidal time embedding through a
2-layer MLP, single-head self-attention at the resolutions in `attn_resolutions` and in the
middle, `num_res_blocks` blocks per level on the way down and `num_res_blocks + 1` (with skip
concatenation) on the way up, stride-2 conv downsampling and nearest + conv3x3 upsampling.

The structure (which blocks have attention, which change channels) is fixed at construction,
so `forward` has no shape-dependent Python branches: it is ready for `torch.compile` and
`channels_last`. `pipeline/convert.py` maps these weights to diffusers' `UNet2DModel` and back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.presets import PRESETS

GN_GROUPS = 32
GN_EPS = 1e-6


def _init(module: nn.Module, scale: float = 1.0) -> nn.Module:
    """The original's `default_init`: variance_scaling(scale, 'fan_avg', 'uniform'), zero bias.

    scale=0 in the original means 1e-10 ("near-zero"): the last conv of each block, the attention
    output and the final conv start as (almost) identity maps of the residual stream.
    """
    scale = max(scale, 1e-10)
    nn.init.xavier_uniform_(module.weight, gain=math.sqrt(scale))
    nn.init.zeros_(module.bias)
    return module


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(GN_GROUPS, ch, eps=GN_EPS)


def timestep_embedding(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding as in the original (and Transformer): [sin(t f), cos(t f)]."""
    args = t.to(freqs.dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = _init(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = _init(nn.Linear(temb_ch, out_ch))
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _init(nn.Conv2d(out_ch, out_ch, 3, padding=1), scale=0.0)
        # 1x1 "network in network" shortcut only where the channel count changes.
        self.nin_shortcut = _init(nn.Conv2d(in_ch, out_ch, 1)) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        # temb_act is swish(temb), computed once per forward rather than once per block.
        # In-place adds go into fresh conv/linear outputs, which their backward does not need:
        # one activation-sized allocation less each (diffusers allocates and also divides by
        # output_scale_factor=1).
        h = self.conv1(F.silu(self.norm1(x)))
        h = h.add_(self.temb_proj(temb_act)[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h.add_(self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual, zero-init output."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        # q, k, v in one matmul; the original's three 1x1 "nin" layers, stacked.
        self.qkv = _init(nn.Linear(ch, 3 * ch))
        self.proj_out = _init(nn.Linear(ch, ch), scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # [B, C, H, W] -> [B, HW, C]: a view for channels_last input, one copy otherwise.
        h = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)  # [B, 1, HW, C] each
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(q k^T / sqrt(C)) v
        h = self.proj_out(h)
        # [B, HW, C] -> [B, C, H, W] is a view with channels_last strides; adding it to the
        # (contiguous) residual first gives a contiguous output, so the next conv's weight
        # gradient keeps the parameter's layout (DDP's gradient buckets require it).
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = _init(nn.Conv2d(ch, ch, 3, stride=2, padding=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TF 'SAME' padding for a stride-2 3x3 conv on an even size pads one pixel at the
        # bottom/right only; padding=1 would shift the sampling grid.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = _init(nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks, each followed by attention or nothing, then a resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self.resample = resample


class UNet(nn.Module):
    def __init__(self, resolution: int, in_channels: int = 3, out_channels: int = 3, ch: int = 128,
                 ch_mult=(1, 2, 2, 2), num_res_blocks: int = 2, attn_resolutions=(16,),
                 dropout: float = 0.1):
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        if ch % GN_GROUPS:
            raise ValueError(f"UNet: ch={ch} must be a multiple of {GN_GROUPS} (GroupNorm groups)")
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"UNet: resolution {resolution} is not divisible by "
                             f"2**{len(ch_mult) - 1} (ch_mult={ch_mult})")
        self.config = dict(resolution=resolution, in_channels=in_channels,
                           out_channels=out_channels, ch=ch, ch_mult=ch_mult,
                           num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                           dropout=dropout)
        temb_ch = 4 * ch
        half = ch // 2
        # Frequencies exp(-log(10000) i / (half - 1)), i < half: the original's embedding.
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)
        self.temb_dense0 = _init(nn.Linear(ch, temb_ch))
        self.temb_dense1 = _init(nn.Linear(temb_ch, temb_ch))
        self.conv_in = _init(nn.Conv2d(in_channels, ch, 3, padding=1))

        n = len(ch_mult)
        skip_chs, cur, res = [ch], ch, resolution
        self.down = nn.ModuleList()
        for i in range(n):
            out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(cur, out, temb_ch, dropout))
                attns.append(AttnBlock(out) if res in attn_resolutions else nn.Identity())
                cur = out
                skip_chs.append(cur)
            last = i == n - 1
            self.down.append(Level(blocks, attns, nn.Identity() if last else Downsample(cur)))
            if not last:
                skip_chs.append(cur)
                res //= 2

        self.mid_block_1 = ResnetBlock(cur, cur, temb_ch, dropout)
        self.mid_attn_1 = AttnBlock(cur)
        self.mid_block_2 = ResnetBlock(cur, cur, temb_ch, dropout)

        self.up = nn.ModuleList()  # self.up[0] is the lowest resolution (applied first)
        for i in reversed(range(n)):
            out = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(cur + skip_chs.pop(), out, temb_ch, dropout))
                attns.append(AttnBlock(out) if res in attn_resolutions else nn.Identity())
                cur = out
            self.up.append(Level(blocks, attns, Upsample(cur) if i != 0 else nn.Identity()))
            if i != 0:
                res *= 2
        assert not skip_chs

        self.norm_out = _norm(cur)
        self.conv_out = _init(nn.Conv2d(cur, out_channels, 3, padding=1), scale=0.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = timestep_embedding(t, self.freqs).to(self.temb_dense0.weight.dtype)
        temb = self.temb_dense1(F.silu(self.temb_dense0(temb)))
        temb = F.silu(temb)  # every block's temb_proj sees swish(temb)

        hs = [self.conv_in(x)]
        h = hs[-1]
        for level in self.down:
            for block, attn in zip(level.block, level.attn):
                h = attn(block(h, temb))
                hs.append(h)
            if not isinstance(level.resample, nn.Identity):
                h = level.resample(h)
                hs.append(h)

        h = self.mid_block_2(self.mid_attn_1(self.mid_block_1(h, temb)), temb)

        for level in self.up:
            for block, attn in zip(level.block, level.attn):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            h = level.resample(h)

        return self.conv_out(F.silu(self.norm_out(h)))


def build_unet(name: str, **overrides) -> UNet:
    """A preset of `PRESETS` (e.g. "cifar10", "lsun256"), with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}; choose one of {sorted(PRESETS)}")
    return UNet(**{**PRESETS[name], **overrides})
