"""Where a run happens: the device, the launcher's rank and world size, and what a modality hands the training
loop (`Setup`). Below both the loop (train.py) and the modalities (text set-up in train.py, image.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import DifflmError


@dataclass
class Setup:
    """What the loop needs from a modality: training and held-out rows, the model, its loss as a module."""

    tokenizer: Any  # None in image mode
    train_rows: torch.Tensor
    dev_rows: torch.Tensor
    model: torch.nn.Module
    objective: Callable[[torch.nn.Module], torch.nn.Module]  # model -> loss module (TextObjective, ImageObjective)
    counts: dict = field(default_factory=dict)  # split sizes (and truncations) for the model card


def world_size() -> int:
    """The number of processes under a distributed launcher (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank under a distributed launcher (0 without one)."""
    return int(os.environ.get("RANK", "0"))


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when a GPU is visible (cuda:LOCAL_RANK under a launcher), else cpu."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DifflmError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DifflmError(f"device {name!r} requested but no CUDA GPU is visible; use device=auto or cpu")
    return device
