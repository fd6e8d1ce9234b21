"""Feeding the model: the repeated-augmentation sampler follows --seed."""
from __future__ import annotations

import pytest
import torch

from vig.data import train_sampler
from vig.distributed import DistributedContext

CPU = torch.device("cpu")


def _ctx(rank: int = 0, world_size: int = 1) -> DistributedContext:
    return DistributedContext(rank=rank, world_size=world_size, local_rank=rank, device=CPU)


def _shards(seed: int, epoch: int, world_size: int, size: int = 40) -> list[list[int]]:
    samplers = [train_sampler(list(range(size)), _ctx(rank, world_size), repeated_aug=True, seed=seed)
                for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


@pytest.mark.parametrize("world_size", [1, 3])
def test_repeated_aug_order_follows_the_seed(world_size: int) -> None:
    assert _shards(seed=7, epoch=2, world_size=world_size) == _shards(seed=7, epoch=2, world_size=world_size)
    assert _shards(seed=7, epoch=2, world_size=world_size) != _shards(seed=8, epoch=2, world_size=world_size)
    assert _shards(seed=7, epoch=2, world_size=world_size) != _shards(seed=7, epoch=3, world_size=world_size)
    # timm's semantics stay: the 3 copies of an image are consecutive, dealt out to consecutive ranks
    shards = _shards(seed=8, epoch=2, world_size=world_size)
    if world_size == 3:
        assert all(shard == shards[0] for shard in shards)
    else:
        assert shards[0][:6] == [shards[0][0]] * 3 + [shards[0][3]] * 3
