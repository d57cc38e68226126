"""The GPU fast path (pipeline/fast_path.py) against the plain path, on CPU where the option runs
there and on CUDA when there is one (`@pytest.mark.cuda`, skipped without a GPU).

Tolerances (float32 reference, tiny U-Net with its weights re-drawn so every path matters):
- SDPA vs explicit softmax(q k^T / sqrt(C)) v attention: 1e-5 absolute;
- channels_last vs NCHW: the loss within 1e-5 relative, all gradients together within 1e-4
  (relative norm of the difference), one Adam step's update within 5e-3 (relative norm: Adam
  divides by sqrt(v), which scales the rounding of small gradients up to steps of size lr);
- fused vs foreach Adam: the update of three steps within 1e-3 (relative norm, as above);
- bf16 autocast vs float32: loss within 3% relative, float32 loss, weights and gradients;
- torch.compile vs eager (slow on CPU): the loss and the gradients within 1e-4 relative.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline import fast_path
from pipeline.diffusion import GaussianDiffusion, linear_beta_schedule
from pipeline.fast_path import FastPath
from pipeline.unet import AttnBlock


def _redrawn(tiny_unet, seed=1):
    net = tiny_unet(seed=seed)
    with torch.no_grad():
        for p in net.parameters():  # leave the near-zero init: exercise every path
            p.normal_(0, 0.05)
    return net


def _batch(seed=0, b=4, res=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, res, res, generator=g) * 2 - 1, torch.randint(0, 100, (b,), generator=g),
            torch.randn(b, 3, res, res, generator=g))


def _loss(diffusion, model, x0, t, noise):
    return diffusion.training_loss(model, x0, t, noise).mean()


DIFF = GaussianDiffusion(linear_beta_schedule(100))


def test_resolve_auto_is_plain_on_cpu_and_fast_on_cuda():
    auto = SimpleNamespace(channels_last="auto", compile="auto", fused_adam="auto", tf32="auto")
    assert fast_path.resolve(auto, "cpu") == FastPath()
    # channels_last stays off under "auto" until a GPU measurement shows it faster; cuDNN's
    # autotuner is on for CUDA.
    cuda_auto = FastPath(channels_last=False, compile=True, fused_adam=True, tf32=True, cudnn_benchmark=True)
    assert fast_path.resolve(auto, torch.device("cuda", 0)) == cuda_auto
    assert fast_path.resolve(auto, "cuda").channels_last is fast_path.AUTO_ON_CUDA["channels_last"]
    # DeepSpeed wraps the module itself: "auto" does not compile there; an explicit true does.
    assert fast_path.resolve(auto, "cuda", deepspeed=True) == dataclasses.replace(cuda_auto, compile=False)
    forced = SimpleNamespace(channels_last=True, compile=False, fused_adam=True, tf32="auto")
    assert fast_path.resolve(forced, "cpu") == FastPath(channels_last=True, fused_adam=True)
    assert fast_path.resolve(forced, "cpu").describe() == "channels_last, fused_adam"


def test_tf32_switch_sets_and_clears_both_backends():
    """TF32 has no effect on CPU; the switch itself is process-wide (matmuls and cuDNN convs)."""
    try:
        fast_path.apply_tf32(FastPath(tf32=True))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        fast_path.apply_tf32(FastPath())
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        fast_path.apply_tf32(FastPath())
        torch.backends.cudnn.allow_tf32 = True  # torch's default


def test_sdpa_attention_matches_explicit_attention():
    torch.manual_seed(0)
    block = AttnBlock(64)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 64, 8, 8)
    # The original's attention written out: softmax(q k^T / sqrt(C)) v over the H*W positions.
    h = block.norm(x).flatten(2).transpose(1, 2)
    q, k, v = block.qkv(h).chunk(3, dim=-1)
    w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(64), dim=-1)
    want = x + block.proj_out(w @ v).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), want, rtol=0, atol=1e-5)


def _step(net, fp, x0, t, noise, steps=1, lr=1e-3):
    """`steps` Adam steps of L_simple on (x0, t, noise) with the fast path `fp`; the last loss."""
    net = fast_path.prepare_module(net, fp)
    opt = torch.optim.Adam(net.parameters(), lr=lr, **fast_path.adam_kwargs(fp))
    model = fast_path.compile_module(net, fp)
    fwd = lambda x, tt: model(fast_path.to_format(x, fp), tt)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = _loss(DIFF, fwd, x0, t, noise)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        opt.step()
    return loss.detach(), grads, {n: p.detach().contiguous() for n, p in net.named_parameters()}


def _rel(a: dict, b: dict, base: dict | None = None) -> float:
    """||a - b|| / ||b - base|| over all tensors together (base: the weights before the update)."""
    base = base or {k: 0.0 for k in b}
    diff = sum((a[k].float() - b[k].float()).square().sum() for k in b)
    ref = sum((b[k].float() - base[k]).square().sum() for k in b)
    return math.sqrt(diff / ref)


def test_channels_last_training_step_matches_nchw(tiny_unet):
    net = _redrawn(tiny_unet).train()
    batch = _batch()
    ref = _step(copy.deepcopy(net), FastPath(), *batch)
    got = _step(copy.deepcopy(net), FastPath(channels_last=True), *batch)
    assert next(p for p in got[2].values() if p.ndim == 4).dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
    assert _rel(got[1], ref[1]) < 1e-4
    assert _rel(got[2], ref[2], net.state_dict()) < 5e-3


def test_fused_adam_matches_foreach(tiny_unet):
    net = _redrawn(tiny_unet).train()
    batch = _batch(1)
    ref = _step(copy.deepcopy(net), FastPath(), *batch, steps=3)
    got = _step(copy.deepcopy(net), FastPath(fused_adam=True), *batch, steps=3)
    assert _rel(got[1], ref[1]) < 1e-5  # the first step's gradients are the same
    assert 0 < _rel(got[2], ref[2], net.state_dict()) < 1e-3


def test_bf16_autocast_keeps_float32_loss_weights_and_gradients(tiny_unet):
    net = _redrawn(tiny_unet).train()
    x0, t, noise = _batch(2)
    ref = _loss(DIFF, net, x0, t, noise)
    seen = {}

    def model(x, tt):
        seen["x_t"] = x.dtype  # what the diffusion arithmetic handed the network
        return net(x, tt)

    fwd = fast_path.autocast_forward(model, torch.bfloat16, "cpu")
    with torch.autocast("cpu", enabled=False):
        loss = _loss(DIFF, fwd, x0, t, noise)
    raw = net(x0, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x0, t).dtype == torch.bfloat16 and raw.dtype == torch.float32  # it did run in bf16
    loss.backward()
    assert seen["x_t"] == torch.float32 and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
    assert loss.item() != ref.item()
    assert abs(loss.item() - ref.item()) < 0.03 * ref.item(), (loss.item(), ref.item())
    # The trainer puts the whole loss under Accelerate's autocast: eq. 4 and eq. 14 stay float32
    # there too (autocast lowers matmuls and convolutions, not elementwise arithmetic).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outer = _loss(DIFF, model, x0, t, noise)
    assert seen["x_t"] == torch.float32 and outer.dtype == torch.float32
    assert abs(outer.item() - ref.item()) < 0.03 * ref.item()


def test_sampling_model_channels_last_bf16_matches_plain(tiny_unet):
    net = _redrawn(tiny_unet)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 90])
    with torch.no_grad():
        want = net(x, t)
        got = fast_path.sampling_model(copy.deepcopy(net), FastPath(channels_last=True))(x, t)
        bf = fast_path.sampling_model(copy.deepcopy(net), FastPath(), torch.bfloat16)(x, t)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert bf.dtype == torch.float32
    assert (bf - want).norm() < 0.05 * want.norm()


def test_compile_clock_reports_the_first_call_only(capsys):
    clock = fast_path.CompileClock(FastPath(compile=True), "step")
    for _ in range(2):
        with clock:
            pass
    out = capsys.readouterr().out
    assert out.count("torch.compile: step took") == 1
    with fast_path.CompileClock(FastPath(), "step"):
        pass
    assert capsys.readouterr().out == ""


def test_compile_failure_falls_back_to_eager_only_when_asked(tiny_unet, capsys):
    """A compiler that fails: with fallback (train.compile "auto") the model runs eagerly, gives
    the eager output and says so in one line; without it (an explicit true) the error reaches
    the caller."""
    import torch._dynamo

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C compiler here")

    net, (x, t) = _redrawn(tiny_unet), (torch.randn(2, 3, 16, 16), torch.tensor([3, 60]))
    with torch.no_grad():
        want = net(x, t)
    saved = torch._dynamo.config.suppress_errors
    try:
        torch._dynamo.reset()
        strict = fast_path.compile_module(net, FastPath(compile=True), backend=broken_backend)
        with pytest.raises(Exception, match="no C compiler here"), torch.no_grad():
            strict(x, t)
        torch._dynamo.reset()
        fast_path._CompileFailure.said = False
        lenient = fast_path.compile_module(net, FastPath(compile=True), fallback=True, backend=broken_backend)
        capsys.readouterr()
        with torch.no_grad():
            torch.testing.assert_close(lenient(x, t), want, rtol=0, atol=0)
            lenient(x, t)
        said = [ln for ln in capsys.readouterr().out.splitlines() if "torch.compile failed" in ln]
        assert said == ["torch.compile failed, running eager instead: RuntimeError: no C compiler here"], said
    finally:
        torch._dynamo.config.suppress_errors = saved
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_unet_matches_eager_on_cpu(tiny_unet):
    """Inductor on CPU (a C++ compiler): a forward+backward+Adam step, compiled vs eager."""
    net = _redrawn(tiny_unet).train()
    batch = _batch(3)
    ref = _step(copy.deepcopy(net), FastPath(), *batch)
    got = _step(copy.deepcopy(net), FastPath(compile=True), *batch)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=0)
    assert _rel(got[1], ref[1]) < 1e-4


# ------------------------------------------------------------------ in the trainer


def test_trainer_fast_path_on_cpu_follows_the_plain_run(tmp_path, capsys):
    """The trainer with channels_last and fused Adam forced on (CPU): it says so, checkpoints
    plain contiguous weights, and lands within 1% (relative norm of the update) of the plain run."""
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed

    from pipeline import build
    from pipeline import checkpoint as ck
    from pipeline.config import load_recipe
    from pipeline.trainer import train
    from support.training import make_tiny_shards, weights, write_recipe

    shards = make_tiny_shards(tmp_path / "shards")
    runs = {}
    for name, extra in (("plain", {}), ("fast", {"channels_last": True, "fused_adam": True})):
        # Dropout off: its masks are drawn in memory order, so NHWC draws other (equally seeded) masks.
        recipe = load_recipe(write_recipe(tmp_path / f"{name}.yaml", shards, tmp_path / name, model={"dropout": 0.0},
                                          train={"max_steps": 3, "checkpoint_every": 3, **extra}))
        try:
            assert train(recipe) == 0
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
        runs[name] = weights(ck.latest_checkpoint(tmp_path / name))
    out = capsys.readouterr().out
    assert "U-Net on cpu: plain path" in out and "U-Net on cpu: channels_last, fused_adam" in out
    set_seed(recipe.train.seed)  # the initial weights, as build_parts makes them
    init = build.unet(recipe.model).state_dict()
    assert _rel(runs["fast"], runs["plain"], init) < 1e-2


# ------------------------------------------------------------------ on a GPU


@pytest.mark.cuda
def test_cuda_fast_path_step_matches_plain_float32(tiny_unet):
    """The whole CUDA fast path (channels_last, compile, fused Adam, TF32, bf16 autocast) against
    strict float32 eager on the same GPU: the loss within 3%, the gradients within 10% (relative
    norm of the difference) and pointing the same way (cosine > 0.99)."""
    net = _redrawn(tiny_unet).train().cuda()
    x0, t, noise = (v.cuda() for v in _batch(4, b=8))
    fast_path.apply_tf32(FastPath())
    ref = _step(copy.deepcopy(net), FastPath(), x0, t, noise)
    fp = FastPath(True, True, True, True)
    fast_path.apply_tf32(fp)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = _step(copy.deepcopy(net), fp, x0, t, noise)
    finally:
        fast_path.apply_tf32(FastPath())
    assert abs(got[0].item() - ref[0].item()) < 0.03 * ref[0].item()
    assert _rel(got[1], ref[1]) < 0.1
    cos = F.cosine_similarity(torch.cat([got[1][k].flatten().float() for k in ref[1]]),
                              torch.cat([ref[1][k].flatten() for k in ref[1]]), dim=0)
    assert cos > 0.99, cos.item()


@pytest.mark.cuda
def test_cuda_sdpa_attention_matches_explicit_in_bf16():
    """SDPA's CUDA kernels under bf16 autocast vs the attention written out in float32: the
    attention branch within 2% (relative norm)."""
    torch.manual_seed(0)
    block = AttnBlock(256).cuda()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.05)
    x = torch.randn(4, 256, 16, 16, device="cuda")
    with torch.no_grad():
        h = block.norm(x).flatten(2).transpose(1, 2)
        q, k, v = block.qkv(h).chunk(3, dim=-1)
        w = torch.softmax(q @ k.transpose(1, 2) / 16.0, dim=-1)
        want = x + block.proj_out(w @ v).transpose(1, 2).reshape(x.shape)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = block(x).float()
    assert (got - want).norm() < 0.02 * (want - x).norm()


def test_eval_computes_in_float32_not_tf32(tmp_path):
    """cuDNN allows TF32 by default: eval's sampling, Inception features and bound must turn it
    off (and the autotuner), whatever a training run in the same process left on."""
    from eval.features import load_extractor
    from eval.nll import run_nll
    from eval.sample import sampling_model
    from pipeline.hub import load_pretrained
    from support.features import register_tiny_features
    from support.model import make_checkpoint, tiny_recipe

    def tf32_flags():
        return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)

    loaded = load_pretrained(str(make_checkpoint(tmp_path / "ckpt", tiny_recipe())))
    on = FastPath(tf32=True, cudnn_benchmark=True)
    for name, call in (("sampling", lambda: sampling_model(loaded, "fp32", "cpu")),
                       ("features", lambda: load_extractor(register_tiny_features())),
                       ("nll", lambda: run_nll(loaded, str(tmp_path / "no-shards"), device="cpu"))):
        fast_path.apply_tf32(on)
        assert tf32_flags() == (True, True, True)
        try:
            call()
        except Exception:  # run_nll fails on the missing shards after it set the flags
            assert name == "nll"
        assert tf32_flags() == (False, False, False), name
