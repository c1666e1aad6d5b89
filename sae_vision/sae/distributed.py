"""torchrun/DDP plumbing for training: joining and leaving the process group, the device of this
rank, wrapping the SAE in DDP, and the few collectives the trainer needs. With one process every
function here is a no-op, so single-process code never checks."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from sae_vision.activations import stage_device


def world_info() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device: str) -> tuple[torch.device, bool]:
    """This rank's device (activations.pick_device: cuda:LOCAL_RANK), logged, with TF32 on; joins
    the torchrun process group when WORLD_SIZE says so. Returns (device, created)."""
    dev = stage_device("train", device, "train.device")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return dev, False
    if dist.is_initialized():
        return dev, False
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev, True


@contextlib.contextmanager
def process_group(device: str) -> Iterator[tuple[torch.device, int, int]]:
    """(device, rank, world) of this process for the block; a group it created is left on exit."""
    dev, created = setup_distributed(device)
    try:
        yield (dev, *world_info())
    finally:
        if created:
            # The DDP wrapper sits in a reference cycle, so only the cyclic GC frees it, and with
            # it the gloo process group its reducer holds: at any later moment, or at interpreter
            # exit while the peer is already gone (rank 1 aborted with "terminate called without
            # an active exception"). Free it now, while the group and the peer are alive.
            gc.collect()
            # Ranks leave together: tearing gloo down while a peer still talks aborts the process.
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()


def wrap_ddp(sae: torch.nn.Module) -> torch.nn.Module:
    """The module the training step calls: `sae` itself, or `sae` in DDP under a process group."""
    if world_info()[1] <= 1:
        return sae
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = next(sae.parameters()).device
    return DDP(sae, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) `t` across ranks in place; returns it."""
    if world_info()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank."""
    if world_info()[1] <= 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def broadcast_from_rank0(tensors) -> None:
    """Overwrite each tensor with rank 0's values (in place)."""
    if world_info()[1] > 1:
        for t in tensors:
            dist.broadcast(t, src=0)


def barrier() -> None:
    """Wait for every rank."""
    if world_info()[1] > 1:
        dist.barrier()
