"""One device rule for every stage: a device setting becomes an *indexed* device (CUDA's index
from torchrun's LOCAL_RANK), two devices are compared in that form, and TF32 is set once.

Torch keeps `cuda` and `cuda:0` apart (`torch.device("cuda") != torch.device("cuda", 0)`) while a
tensor always reports the indexed form, so a check against a bare `cuda` is never true; every
comparison here goes through `canonical_device`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

# Devices with a single instance, whose index (None or 0) means nothing.
_UNINDEXED = ("cpu", "meta")


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def cuda_unavailable_reason() -> str:
    """Why torch cannot use CUDA here (for the `auto` fallback and the `cuda` error)."""
    if not torch.backends.cuda.is_built():
        return f"this torch {torch.__version__} is built without CUDA"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    driver = Path("/proc/driver/nvidia/version")
    if sys.platform == "linux" and not driver.exists():
        return "no NVIDIA driver is loaded on this machine"
    # A build for a newer CUDA than the driver supports reports no device at all.
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU; if "
            "one is installed, its driver may be too old for that CUDA")


def canonical_device(device: torch.device | str) -> torch.device:
    """`device` in the form a tensor on it reports: cpu/meta unindexed, cuda with its index."""
    device = torch.device(device)
    if device.type in _UNINDEXED:
        return torch.device(device.type)
    if device.index is None and device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """True when `a` and `b` name one device (`cuda` and `cuda:0` do when 0 is current)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    return canonical_device(a) == canonical_device(b)


def pick_device(name: str, field: str = "device") -> torch.device:
    """A device setting (`auto`, `cpu`, `cuda`, `cuda:N`, `meta`) as an indexed torch.device.

    `cuda` (and `auto` with CUDA) is cuda:LOCAL_RANK, made the current device, so every torchrun
    rank of every stage gets its own GPU. `cuda` without CUDA is a ValueError naming `field`;
    `auto` without CUDA is the CPU (`stage_device` logs why).
    """
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    device = torch.device(name)
    if device.type != "cuda":
        return canonical_device(device)
    if not torch.cuda.is_available():
        raise ValueError(f"{field}={name} but CUDA is not available ({cuda_unavailable_reason()}); "
                         f"use {field}=auto or {field}=cpu")
    index = _local_rank() if device.index is None else device.index
    n = torch.cuda.device_count()
    if index >= n:
        raise ValueError(f"{field}={name}: this process wants cuda:{index} (LOCAL_RANK="
                         f"{_local_rank()}) but {n} GPU(s) are visible; start at most {n} "
                         "processes per node")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def model_device(model: nn.Module) -> torch.device:
    """Where a module's parameters live (cpu for a module without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def enable_tf32() -> None:
    """Let float32 matmuls and convolutions use TF32 on GPUs that have it (no-op elsewhere)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def stage_device(stage: str, name: str, field: str) -> torch.device:
    """`pick_device` for a stage's start: also enables TF32 and logs the device it chose."""
    device = pick_device(name, field)
    enable_tf32()
    if device.type == "cuda":
        logger.info(f"{stage}: device {device} (LOCAL_RANK={_local_rank()}, TF32 on)")
    elif name == "auto":
        logger.warning(f"{stage}: device cpu, as {field}=auto finds no GPU: "
                       f"{cuda_unavailable_reason()}")
    else:
        logger.info(f"{stage}: device {device}")
    return device
