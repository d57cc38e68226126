"""The paper's U-Net sizes as plain keyword dicts (no torch): the recipe schema validates
`model.preset` against them and `pipeline.unet.UNet(**PRESETS[name])` builds one."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # Appendix B: 35.7M parameters, dropout 0.1 on CIFAR-10.
    "cifar10": dict(resolution=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attn_resolutions=(16,), dropout=0.1),
    # 256x256 models: 114M (CelebA-HQ, LSUN) and the larger 256M LSUN model (ch=192).
    "celebahq256": dict(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                        attn_resolutions=(16,), dropout=0.0),
    "lsun256": dict(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                    attn_resolutions=(16,), dropout=0.0),
    "lsun256_large": dict(resolution=256, ch=192, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                          attn_resolutions=(16,), dropout=0.0),
}
