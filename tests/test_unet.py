"""The paper's U-Net: parameter counts, structure, time embedding, init, memory formats."""

import math

import pytest
import torch

from pipeline.presets import PRESETS
from pipeline.unet import AttnBlock, UNet, build_unet, timestep_embedding

# Appendix B / the original code's counts: within 0.1%.
PAPER_PARAMS = {"cifar10": 35.75e6, "celebahq256": 113.67e6, "lsun256": 113.67e6,
                "lsun256_large": 255.68e6}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):  # no memory, no init cost
        net = build_unet(name)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 1e-3, (name, n)
    if name == "cifar10":
        assert n == 35_746_307  # the original TF model, exactly


def test_presets_are_the_design_table():
    assert PRESETS["cifar10"]["ch_mult"] == (1, 2, 2, 2) and PRESETS["cifar10"]["dropout"] == 0.1
    assert PRESETS["lsun256_large"]["ch"] == 192
    with pytest.raises(ValueError, match="preset"):
        build_unet("imagenet")


def test_forward_shapes_and_near_zero_init(tiny_unet):
    net = tiny_unet(seed=0)
    x = torch.randn(3, 3, 16, 16)
    out = net(x, torch.tensor([0, 10, 999]))
    assert out.shape == x.shape and out.dtype == torch.float32
    # The final conv starts near zero (scale 1e-10), as in the original.
    assert out.abs().max() < 1e-3
    six = UNet(resolution=64, ch=32, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,), dropout=0.0)
    assert six(torch.randn(1, 3, 64, 64), torch.tensor([5])).shape == (1, 3, 64, 64)


def test_attention_only_at_the_chosen_resolutions():
    net = UNet(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,))
    down = [[isinstance(a, AttnBlock) for a in level.attn] for level in net.down]
    up = [[isinstance(a, AttnBlock) for a in level.attn] for level in net.up]
    assert down == [[False, False], [True, True], [False, False]]
    assert up == [[False] * 3, [True] * 3, [False] * 3]  # up[0] is the lowest resolution
    assert isinstance(net.mid_attn_1, AttnBlock)


def test_timestep_embedding_is_the_original_formula():
    net = UNet(resolution=16, ch=32, ch_mult=(1,), attn_resolutions=())
    t = torch.tensor([0, 1, 500, 999])
    emb = timestep_embedding(t, net.freqs)
    half = 16
    for row, tv in zip(emb, t.tolist()):
        want = [math.sin(tv * math.exp(-math.log(10000) * i / (half - 1))) for i in range(half)]
        want += [math.cos(tv * math.exp(-math.log(10000) * i / (half - 1))) for i in range(half)]
        torch.testing.assert_close(row, torch.tensor(want), rtol=1e-4, atol=2e-4)


def test_channels_last_gives_the_same_output(tiny_unet):
    net = tiny_unet(seed=1)
    with torch.no_grad():
        for p in net.parameters():  # leave the near-zero init: exercise every path
            p.normal_(0, 0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 600])
    with torch.no_grad():
        ref = net(x, t)
        cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_train_mode(tiny_unet):
    net = tiny_unet(seed=2, dropout=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([7])
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t))
        net.train()
        assert not torch.equal(net(x, t), net(x, t))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple of 32"):
        UNet(resolution=32, ch=48)
    with pytest.raises(ValueError, match="divisible"):
        UNet(resolution=20, ch=32, ch_mult=(1, 2, 2, 2))


@pytest.mark.slow
def test_torch_compile_full_graph(tiny_unet):
    """No shape-dependent Python in forward: one graph, no breaks."""
    net = tiny_unet(seed=3)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), net(x, t), rtol=1e-5, atol=1e-6)
