"""Process-group setup from torchrun / torch.distributed.launch, and small collective helpers.

One process per device: nccl on CUDA, gloo on CPU. The environment (LOCAL_RANK, RANK, WORLD_SIZE,
set by both launchers) wins over the `--local-rank` flag that torch.distributed.launch also passes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: rank among world_size processes, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def init_distributed(local_rank_flag: int | None = None) -> DistributedContext:
    """Start the process group when launched with WORLD_SIZE > 1; otherwise a single process on one device.

    Args:
        local_rank_flag: the value of `--local-rank` (used only when LOCAL_RANK is not in the environment).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_flag if local_rank_flag is not None else 0))
    rank = int(os.environ.get("RANK", local_rank if world_size > 1 else 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1 and not dist.is_initialized():
        init_kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://"}
        if backend == "nccl":
            init_kwargs["device_id"] = device
        dist.init_process_group(**init_kwargs)
        rank = dist.get_rank()
        world_size = dist.get_world_size()
        _LOGGER.info("process group %s: rank %d of %d on %s", backend, rank, world_size, device)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    """Tear the process group down if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Sum a float64 tensor of any shape over all ranks (identity when not distributed)."""
    if not ctx.distributed:
        return values
    reduced = values.to(ctx.device if ctx.device.type == "cuda" else "cpu").clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def all_gather_objects(value: Any, ctx: DistributedContext) -> list[Any]:
    """Collect one picklable value from every rank, in rank order."""
    if not ctx.distributed:
        return [value]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, ctx: DistributedContext) -> Any:
    """Rank 0's value on every rank."""
    if not ctx.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(ctx: DistributedContext) -> None:
    """Wait for every rank (no-op for one process)."""
    if ctx.distributed:
        dist.barrier()
