"""torch.distributed plumbing: process group from torchrun's environment, gradient averaging, clean exit.

Single process (no RANK/WORLD_SIZE in the environment) is world size 1 and every call is a no-op.
Under torchrun (or `pagoda train --gpus N`, which starts the same elastic launcher):

    torchrun --nproc-per-node 8 -m pagoda.cli train --res 128 ...                       # one node
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
             -m pagoda.cli train --res 128 ...                                          # two nodes
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' = this rank's CUDA device when available, else CPU; 'cpu' / 'cuda' force it."""
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def all_reduce_mean_(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """In-place mean over ranks (one flat buffer: one collective however many tensors)."""
    if not info.enabled or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def average_gradients(params, info: DistInfo) -> None:
    """Average .grad of `params` across ranks, as DDP's reducer does (missing grads count as zeros)."""
    if not info.enabled:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_mean_([p.grad for p in params], info)


def broadcast_(tensors: list[torch.Tensor], info: DistInfo, src: int = 0) -> None:
    """Copy rank src's tensors to every rank (initial weights)."""
    if info.enabled:
        for t in tensors:
            dist.broadcast(t, src)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Barrier then destroy the group: gloo can abort at exit otherwise. Call after freeing models."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
