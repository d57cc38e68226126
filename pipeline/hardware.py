"""Can this device run that precision? One answer for the trainer and the tests.

The question is asked of the library that would fail later: DeepSpeed's accelerator for a
DeepSpeed run (its engine raises "Type fp16 is not supported on your device" inside
`deepspeed.initialize`, on every rank), torch for CUDA, and Accelerate's own rule for a
plain CPU run (it silently runs fp16 as float32 without a loss scaler there).
"""

from __future__ import annotations

import logging

import torch


def precision_problem(precision: str, device_type: str, deepspeed: bool = False) -> str | None:
    """None if `precision` ('no', 'bf16', 'fp16') can run on `device_type` (with DeepSpeed or
    not); otherwise a one-line reason that names the precision, the device and what to use."""
    if precision == "no":
        return None
    if deepspeed:
        # Imported here: DeepSpeed takes seconds to import and only DeepSpeed runs need it.
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        supported = acc.is_fp16_supported() if precision == "fp16" else acc.is_bf16_supported()
        if not supported:
            return (f"{precision} is not supported by DeepSpeed's {acc.device_name()} accelerator "
                    f"on this {_device_description(device_type)}; use {_alternative(precision, device_type, True)}")
        return None
    if device_type == "cpu" and precision == "fp16":
        return ("fp16 cannot run on cpu: Accelerate runs it as float32 without a loss scaler "
                "(fp16 autocast needs a GPU); use bf16 or no")
    if device_type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        return f"bf16 is not supported on {torch.cuda.get_device_name()}; use fp16 or no"
    return None


def _alternative(precision: str, device_type: str, deepspeed: bool) -> str:
    other = "bf16" if precision == "fp16" else "fp16"
    return f"{other} or no" if precision_problem(other, device_type, deepspeed) is None else "no"


def _device_description(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.backends.cpu.get_cpu_capability()})"


class _NoCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


def quiet_deepspeed_cpu_notice() -> None:
    """Accelerate imports DeepSpeed when it is installed, and DeepSpeed then warns on every CPU
    run that it found no GPU. The trainer already names its device ("U-Net on cpu"), so that
    warning says nothing that applies; every other DeepSpeed message stays."""
    logging.getLogger("DeepSpeed").addFilter(_NoCpuNotice())
