"""Exponential moving average of the weights (the paper samples from EMA weights, decay 0.9999).

The shadow copy is float32 and is updated with one fused `torch._foreach_lerp_` over all
tensors per step, not a Python loop per tensor. It reads the module's *full* parameters, which
under DDP and DeepSpeed ZeRO-1/2 are replicated on every rank after the optimizer step (ZeRO-2
shards gradients and optimizer state, and all-gathers the updated weights), so every rank holds
the same EMA without any communication. ZeRO-3 shards the weights themselves and is refused by
the trainer.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def warmup_decay(decay: float, n: int) -> float:
    """The decay of EMA update n (0-based) with train.ema_warmup: min(decay, (1 + n) / (10 + n)),
    the warm-up of TensorFlow's ExponentialMovingAverage(num_updates) and diffusers' EMAModel
    default. Update 0 uses 0.1; 0.9999 is reached after ~90,000 updates, so a paper-length run
    ends where the constant decay would, while a short run's EMA follows its weights early on."""
    return min(decay, (1.0 + n) / (10.0 + n))


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, for every parameter of `model`."""

    def __init__(self, model: nn.Module, decay: float, device: torch.device | str | None = None):
        self.decay = float(decay)
        named = [(n, p) for n, p in model.named_parameters()]
        self.names = [n for n, _ in named]
        # float32 even when the live weights are bf16/fp16: increments of (1 - 0.9999) * diff
        # vanish in 8-bit mantissas.
        self.shadow = [p.detach().to(device or p.device, torch.float32, copy=True) for _, p in named]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """One EMA step; `decay` overrides self.decay for this step (the warm-up, `warmup_decay`)."""
        params = [p.detach() for p in model.parameters()]
        if len(params) != len(self.shadow):
            raise RuntimeError(f"EMA holds {len(self.shadow)} tensors, model has {len(params)}")
        if any(p.dtype != torch.float32 for p in params):
            params = [p.float() for p in params]
        # lerp(a, b, w) = a + w (b - a) = decay * a + (1 - decay) * b: the EMA in one fused call.
        torch._foreach_lerp_(self.shadow, params, 1.0 - (self.decay if decay is None else decay))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the EMA weights under the model's own state_dict keys (float32, on CPU)."""
        return {n: t.detach().to("cpu", copy=True).contiguous() for n, t in zip(self.names, self.shadow)}

    def digest(self) -> str:
        """sha256 of the EMA tensors' bytes (name order): equal on every rank, or ranks diverged."""
        h = hashlib.sha256()
        for n, t in zip(self.names, self.shadow):
            h.update(n.encode())
            # reshape(-1): a channels_last [O, I, 1, 1] counts as contiguous with a last stride != 1.
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tensors, e.g. {missing[0]}")
        for n, t in zip(self.names, self.shadow):
            t.copy_(state[n].to(t.device, torch.float32))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into `model` (same architecture), e.g. a sampling copy."""
        for p, s in zip(model.parameters(), self.shadow):
            p.copy_(s.to(p.device, p.dtype))
