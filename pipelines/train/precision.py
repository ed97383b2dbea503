"""Which number format and memory layout the step runs in, on GPUs and on CPUs.

``train.precision: auto`` means bf16 autocast on a GPU, and on a CPU only where the CPU
multiplies bf16 natively (Intel AMX or AVX-512 BF16): there oneDNN's bf16 convolutions
run several times faster than fp32; elsewhere autocast emulates bf16 and is slower.
Measured on this project's 2-core machines, one SimCLR step of ``resnet18_3stage`` at
batch 128 x 2 views of 32 px (``docs/PERFORMANCE.md``): on an "Intel(R) Xeon(R)
Processor" without AMX or AVX-512 BF16, bf16 autocast takes 2.41 s and fp32 0.68 s;
channels-last takes 0.64 s in fp32. ``train.channels_last`` (default on) keeps the model
and the views in NHWC on every device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from ssl_models.methods import Batch, StepOutput

Precision = Literal["auto", "fp32", "bf16"]


def cpu_has_fast_bf16() -> bool:
    """The CPU multiplies bf16 in hardware: Intel AMX tiles or AVX-512 BF16."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_precision(device: torch.device, precision: Precision) -> Literal["fp32", "bf16"]:
    """``auto`` made concrete for ``device``: bf16 on a GPU or a CPU with native bf16."""
    if precision != "auto":
        return precision
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return "bf16"
    return "fp32"


def in_mixed_precision(
    forward: Callable[[Batch], StepOutput], device: torch.device, precision: Precision
) -> Callable[[Batch], StepOutput]:
    """``forward`` under bf16 autocast when ``resolve_precision`` says bf16, else as it is.
    (The backward pass runs outside autocast, as torch recommends.)"""
    if resolve_precision(device, precision) != "bf16":
        return forward

    def forward_in_bf16(batch: Batch) -> StepOutput:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return forward(batch)

    return forward_in_bf16
