"""Numeric precision: which precisions this machine offers, autocast, and the dtype the diffusion math runs in.

The networks may run in bf16 (torch autocast over fp32 weights, or weights that DeepSpeed cast to bf16); the
diffusion math (times, noise levels, latents, losses) always runs in at least fp32.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .errors import DifflmError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_supported() -> bool:
    """A CUDA GPU with bf16 is here. (CPUs compute bf16 too, but slower than fp32 without AMX: not offered.)"""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def check_precision(name: str, option: str) -> None:
    """A one-line error for a precision that is unknown or that this machine does not offer."""
    if name not in PRECISIONS:
        raise DifflmError(f"{option} {name!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    if name == "bf16" and not bf16_supported():
        raise DifflmError(f"{option}=bf16 needs a CUDA GPU with bf16 support; use fp32 here")
    if name == "fp16" and not torch.cuda.is_available():
        raise DifflmError(f"{option}=fp16 needs a CUDA GPU; use fp32 here")


def autocast(device_type: str, dtype: Optional[torch.dtype]):
    """torch.autocast to `dtype` (bf16, fp16) on this device type; no autocast for None or fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def latent_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the diffusion math runs in: at least fp32, whatever the weights are stored in. With weights cast
    to bf16, times t = i/T would round to multiples of up to 8/T and alpha_bar to 3 significant digits."""
    return torch.promote_types(weight.dtype, torch.float32)
