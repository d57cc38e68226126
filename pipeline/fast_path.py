"""The fast path for the U-Net on a GPU: memory layout, compilation, fused Adam, TF32.

Each option is a recipe field of `train` (pipeline.config.TrainConfig): `channels_last`,
`compile`, `fused_adam`, `tf32`, each `true`, `false` or `"auto"`. "auto" turns an option on
for CUDA and off elsewhere, so a CPU run (tests, `make quickstart`) takes the plain path that
the reference tests check, and a GPU run takes the fast one. bf16 is `train.mixed_precision`
(Accelerate's autocast: float32 master weights and Adam state, bf16 matmuls and convolutions);
the diffusion arithmetic around the model and the loss stay float32 (`training_loss` casts the
network output back to the data's dtype before eq. 14), see `autocast_forward`.

Correctness of each option against the plain path on CPU: tests/test_fast_path.py (tolerances
stated there); speed of each on a GPU: bench/gpu.sh.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

OPTIONS = ("channels_last", "compile", "fused_adam", "tf32")


@dataclass(frozen=True)
class FastPath:
    """The resolved options (booleans) for one run on one device."""
    channels_last: bool = False
    compile: bool = False
    fused_adam: bool = False
    tf32: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        on = [name for name in OPTIONS if getattr(self, name)]
        return ", ".join(on) if on else "plain path"


def resolve(settings, device, deepspeed: bool = False) -> FastPath:
    """Booleans from a TrainConfig-like object whose fields are True, False or "auto".

    "auto" means on for CUDA. torch.compile is left off by "auto" under DeepSpeed, whose engine
    wraps the module itself; set `train.compile: true` to compile there anyway."""
    cuda = torch.device(device).type == "cuda"

    def pick(name: str, auto: bool) -> bool:
        value = getattr(settings, name, "auto")
        return auto if value == "auto" else bool(value)

    return FastPath(channels_last=pick("channels_last", cuda), compile=pick("compile", cuda and not deepspeed),
                    fused_adam=pick("fused_adam", cuda), tf32=pick("tf32", cuda))


def apply_tf32(fp: FastPath) -> None:
    """TF32 tensor cores for the float32 matmuls and convolutions (the parts bf16 autocast leaves
    in float32, and whole runs with mixed_precision "no"): 10-bit mantissas in the products,
    float32 accumulation. A process-wide switch; no effect on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = fp.tf32
    torch.backends.cudnn.allow_tf32 = fp.tf32


def prepare_module(net: nn.Module, fp: FastPath) -> nn.Module:
    """The U-Net in the chosen memory layout (in place). channels_last (NHWC) lets cuDNN and the
    compiled kernels run the convolutions without layout transposes; weights keep float32."""
    return net.to(memory_format=fp.memory_format)


def to_format(x: torch.Tensor, fp: FastPath) -> torch.Tensor:
    """An input batch in the model's layout (a no-op for the plain path)."""
    return x.contiguous(memory_format=fp.memory_format) if fp.channels_last else x


def adam_kwargs(fp: FastPath) -> dict:
    """Adam's implementation: fused (one kernel for all tensors) or torch's default (foreach).
    Both compute the same update up to float rounding."""
    return {"fused": True} if fp.fused_adam else {}


def compile_module(model: nn.Module, fp: FastPath, fallback: bool = False, **kwargs) -> nn.Module:
    """torch.compile (Inductor) when `fp.compile`; compilation happens lazily at the first call
    (see `CompileClock`). The returned module shares parameters with `model`.

    fallback: a compilation that fails (no C compiler, an unsupported GPU for Triton) warns and
    runs eager instead of stopping the run; the trainer asks for it when "auto" chose to compile,
    and an explicit `train.compile: true` fails loudly instead."""
    if not fp.compile:
        return model
    if fallback:
        from torch import _dynamo  # imported here: only compiling runs need it

        _dynamo.config.suppress_errors = True  # process-wide: failed frames run eagerly
    return torch.compile(model, **kwargs)


class CompileClock:
    """Reports how long the first call took (compilation included) when compiling."""

    def __init__(self, fp: FastPath, label: str, enabled: bool = True):
        self.active, self.label = fp.compile and enabled, label
        self.start: Optional[float] = None

    def __enter__(self):
        if self.active:
            self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.active and exc[0] is None:
            print(f"torch.compile: {self.label} took {time.perf_counter() - self.start:.1f} s "
                  "(compilation included)", flush=True)
            self.active = False
        return False


def autocast_forward(model: Callable, dtype: Optional[torch.dtype], device_type: str) -> Callable:
    """model(x, t) with only the network under autocast, its output cast back to float32:
    q_sample, the posterior and the loss around it stay float32 (sampling and benchmarks)."""

    def forward(x, t):
        ctx = torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            out = model(x, t)
        return out.float()

    return forward


def sampling_model(net: nn.Module, fp: FastPath, dtype: Optional[torch.dtype] = None, **compile_kwargs) -> Callable:
    """A model(x_t, t) for the samplers of pipeline/sampling.py: the layout, torch.compile and
    bf16 autocast as chosen. The sampler's own arithmetic (eqs. 11-12) stays float32."""
    net = prepare_module(net.eval(), fp)
    compiled = compile_module(net, fp, **compile_kwargs)
    device_type = next(net.parameters()).device.type
    inner = autocast_forward(compiled, dtype, device_type)
    return lambda x, t: inner(to_format(x, fp), t)
