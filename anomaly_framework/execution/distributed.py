"""Multi-process runs with torch.distributed, launched by ``torchrun``; a no-op in a plain process.

    torchrun --nproc_per_node=2 main.py --model stfpm --dataset mvtec --category bottle

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; the backend is nccl on GPUs and gloo on the CPU.
Rank 0 alone writes outputs and evaluates; the others only help to fit.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in every single-process run): the process that prints and writes."""
    return rank() == 0


def init_from_env(device: torch.device) -> tuple[torch.device, bool]:
    """Joins the process group ``torchrun`` describes; returns the device to use and whether this call
    started the group (and so must end it). A group already joined (a sweep joins once for all its runs)
    is kept, and this rank's GPU is still the one returned."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, True


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (run folders, stop decisions)."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The average of a number over all ranks."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def all_finite(value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every rank, so that all ranks stop together on a NaN loss."""
    finite = torch.isfinite(value.detach()).all()
    if world_size() > 1:
        flag = finite.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag[0] > 0
    return bool(finite)


def shard(count: int) -> range:
    """This rank's contiguous share of ``count`` items: rank order keeps the single-process order."""
    size, index = world_size(), rank()
    return range(count * index // size, count * (index + 1) // size)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's [n_r, ...] tensor along dim 0, in rank order, on every rank."""
    if world_size() == 1:
        return tensor
    counts = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(count.item())] for part, count in zip(parts, counts)])
