"""The fast path for the U-Net on a GPU: memory layout, compilation, fused Adam, TF32.

Each option is a recipe field of `train` (pipeline.config.TrainConfig): `channels_last`,
`compile`, `fused_adam`, `tf32`, each `true`, `false` or `"auto"`. "auto" turns on for CUDA
only the options a GPU measurement showed faster (bench/gpu.sh, bench/RESULTS.md) and
everything off elsewhere, so a CPU run (tests, `make quickstart`) takes the plain path that
the reference tests check. cuDNN's autotuner (`torch.backends.cudnn.benchmark`) is on for
training on CUDA: the shapes are fixed, so its one search per shape pays for itself. bf16 is `train.mixed_precision`
(Accelerate's autocast: float32 master weights and Adam state, bf16 matmuls and convolutions);
the diffusion arithmetic around the model and the loss stay float32 (`training_loss` casts the
network output back to the data's dtype before eq. 14), see `autocast_forward`.

Correctness of each option against the plain path on CPU: tests/test_fast_path.py (tolerances
stated there); speed of each on a GPU: bench/gpu.sh.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

OPTIONS = ("channels_last", "compile", "fused_adam", "tf32")
# What "auto" turns on for CUDA. channels_last stays off until a GPU measurement shows it
# faster: CUDA GroupNorm works on contiguous NCHW, so NHWC pays layout copies around each of
# the U-Net's ~50 GroupNorms, forward and backward.
AUTO_ON_CUDA = {"channels_last": False, "compile": True, "fused_adam": True, "tf32": True}


@dataclass(frozen=True)
class FastPath:
    """The resolved options (booleans) for one run on one device."""
    channels_last: bool = False
    compile: bool = False
    fused_adam: bool = False
    tf32: bool = False
    cudnn_benchmark: bool = False  # not a recipe field: on for training on CUDA

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        on = [name for name in OPTIONS + ("cudnn_benchmark",) if getattr(self, name)]
        return ", ".join(on) if on else "plain path"


def resolve(settings, device, deepspeed: bool = False) -> FastPath:
    """Booleans from a TrainConfig-like object whose fields are True, False or "auto".

    "auto" means AUTO_ON_CUDA's choice on CUDA, off elsewhere. torch.compile is left off by
    "auto" under DeepSpeed, whose engine wraps the module itself; set `train.compile: true` to
    compile there anyway."""
    cuda = torch.device(device).type == "cuda"

    def pick(name: str, auto: bool = True) -> bool:
        value = getattr(settings, name, "auto")
        return cuda and AUTO_ON_CUDA[name] and auto if value == "auto" else bool(value)

    return FastPath(channels_last=pick("channels_last"), compile=pick("compile", not deepspeed),
                    fused_adam=pick("fused_adam"), tf32=pick("tf32"), cudnn_benchmark=cuda)


def apply_tf32(fp: FastPath) -> None:
    """TF32 tensor cores for the float32 matmuls and convolutions (the parts bf16 autocast leaves
    in float32, and whole runs with mixed_precision "no"): 10-bit mantissas in the products,
    float32 accumulation. A process-wide switch; no effect on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = fp.tf32
    torch.backends.cudnn.allow_tf32 = fp.tf32
    torch.backends.cudnn.benchmark = fp.cudnn_benchmark


def strict_fp32() -> None:
    """fp32 means fp32: TF32 off for cuBLAS and cuDNN (cuDNN allows it by default) and no
    autotuner (its choice may differ between runs). Eval calls this before it samples, computes
    Inception features or the bound, so a paper-protocol figure is computed in float32."""
    apply_tf32(FastPath())

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
    (see `CompileClock`). The returned module shares parameters with `model`. Shapes are static
    (`dynamic=False`) unless asked otherwise: a training step's shapes never change, and a
    dynamic graph, which torch picks after a second shape, is slower.

    fallback: a compilation that fails (no C compiler, an unsupported GPU for Triton) prints one
    line saying why and runs eager instead of stopping the run; the trainer asks for it when
    "auto" chose to compile, and an explicit `train.compile: true` fails loudly instead."""
    if not fp.compile:
        return model
    if fallback:
        from torch import _dynamo  # imported here: only compiling runs need it

        _dynamo.config.suppress_errors = True  # process-wide: failed frames run eagerly
        _say_when_compile_fails()
    kwargs.setdefault("dynamic", False)
    return torch.compile(model, **kwargs)


class _CompileFailure(logging.Filter):
    """Dynamo logs a suppressed compile error as a warning with a long traceback: say it once,
    in one line, and drop the rest."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if not _CompileFailure.said:
            _CompileFailure.said = True
            err = record.exc_info[1] if record.exc_info else None
            while err is not None and (getattr(err, "inner_exception", None) or err.__cause__):
                err = getattr(err, "inner_exception", None) or err.__cause__  # the compiler's own error
            why = f"{type(err).__name__}: {err}" if err is not None else record.getMessage()
            print(f"torch.compile failed, running eager instead: {why.strip().splitlines()[0][:300]}", flush=True)
        return False


def _say_when_compile_fails() -> None:
    log = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(f, _CompileFailure) for f in log.filters):
        log.addFilter(_CompileFailure())


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
