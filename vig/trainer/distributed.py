"""Process-group setup from torchrun / torch.distributed.launch, and small collective helpers.

One process per device: nccl on CUDA, gloo on CPU. The environment (LOCAL_RANK, RANK, WORLD_SIZE,
set by both launchers) wins over the `--local-rank` flag that torch.distributed.launch also passes.

Restarts (`torchrun --max-restarts`): by default the launcher's agents keep one TCPStore at
MASTER_ADDR:MASTER_PORT for the whole job (TORCHELASTIC_USE_AGENT_STORE=True in the workers'
environment), so a plain `env://` start of a restarted worker group reads the keys the previous group
left there, among them the address of a killed worker (pytorch/pytorch#135712). Here the ranks of each
group first agree on a fresh round number through that store (`agree_on_round`) and build the process
group under a prefix of their own. TORCHELASTIC_RESTART_COUNT cannot serve as that number: an agent
whose workers did not fail does not increment it, so it differs between nodes.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from vig.errors import UsageError

_LOGGER = logging.getLogger(__name__)

ROUND_KEY = "vig/round"
_POLL_SECONDS = 0.01


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


def init_distributed(local_rank_flag: int | None = None, device_type: str | None = None) -> DistributedContext:
    """Start the process group when launched with WORLD_SIZE > 1; otherwise a single process on one device.

    Args:
        local_rank_flag: the value of `--local-rank` (used only when LOCAL_RANK is not in the environment).
        device_type: `--device`: 'cuda' (cuda:LOCAL_RANK, nccl), 'cpu' (gloo), or None for cuda when
            available, else cpu. 'cuda' without a CUDA device is a UsageError.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_flag if local_rank_flag is not None else 0))
    rank = int(os.environ.get("RANK", local_rank if world_size > 1 else 0))
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    if device_type != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1 and not dist.is_initialized():
        init_kwargs: dict[str, Any] = {"backend": backend}
        if backend == "nccl":
            init_kwargs["device_id"] = device
        where = ""
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=dist.default_pg_timeout)
            round_index = agree_on_round(store, rank, world_size, dist.default_pg_timeout)
            init_kwargs.update(store=dist.PrefixStore(f"{ROUND_KEY}/{round_index}/{world_size}/group", store),
                               rank=rank, world_size=world_size)
            where = f", round {round_index} of the launcher's store"
        else:
            init_kwargs["init_method"] = "env://"
        dist.init_process_group(**init_kwargs)
        rank = dist.get_rank()
        world_size = dist.get_world_size()
        _LOGGER.info("process group %s: rank %d of %d on %s%s", backend, rank, world_size, device, where)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def agree_on_round(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> int:
    """A round number that every rank of this worker group gets and no earlier group on `store` got.

    Rank 0 opens round g by incrementing the counter ROUND_KEY, waits until the world_size - 1 other
    ranks have joined g, then marks g ready. Every other rank joins the round the counter shows and waits
    for it to be ready, moving on when the counter moves. A round left by an earlier group is never
    taken: if that group completed it, a newcomer's join exceeds world_size - 1 and is refused; if not
    (a rank was killed before joining, or rank 0 before marking it ready), it never becomes ready, and
    the newcomer follows the counter to the round its own rank 0 opens. Workers of the earlier group are
    all stopped before the launcher starts a new group, so none of them can join the new round.

    Args:
        store: the store every rank of the group reaches (the launcher's shared TCPStore).
        rank, world_size: this process's place in the group.
        timeout: how long to wait for the other ranks before raising DistStoreError.
    """
    deadline = time.monotonic() + timeout.total_seconds()

    def keys(round_index: int) -> tuple[str, str]:
        base = f"{ROUND_KEY}/{round_index}/{world_size}"
        return f"{base}/joined", f"{base}/ready"

    def wait(what: str) -> None:
        if time.monotonic() > deadline:
            raise dist.DistStoreError(f"rank {rank} of {world_size}: {what} within {timeout}")
        time.sleep(_POLL_SECONDS)

    if rank == 0:
        round_index = store.add(ROUND_KEY, 1)
        joined, ready = keys(round_index)
        while store.add(joined, 0) < world_size - 1:
            wait(f"round {round_index}: only {store.add(joined, 0)} other ranks joined")
        store.set(ready, "1")
        return round_index
    seen, member = 0, False
    while True:
        round_index = store.add(ROUND_KEY, 0)
        if round_index != seen:
            seen = round_index
            joined, ready = keys(round_index)
            member = store.add(joined, 1) <= world_size - 1
        if member and store.check([ready]):
            return round_index
        wait(f"rank 0 opened no round this rank could join (last seen: {seen})")


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
