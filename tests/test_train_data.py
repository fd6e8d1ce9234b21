"""Data pieces of the trainer: sharding, repeated augmentation, split fallback, synthetic set; saver files."""
from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.train_helpers import make_image_folder
from vig.trainer.data import ShardedEvalSampler, SyntheticPatterns, find_split_folder, train_sampler
from vig.trainer.distributed import DistributedContext
from vig.errors import UsageError
from vig.trainer.saver import CheckpointSaver, append_summary, prepare_output_dir


def _ctx(rank: int, world_size: int) -> DistributedContext:
    return DistributedContext(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))


@pytest.mark.parametrize(("num_samples", "world_size"), [(7, 2), (10, 3), (2, 4), (0, 2), (5, 1)])
def test_eval_shards_cover_every_image_exactly_once(num_samples: int, world_size: int) -> None:
    shards = [list(ShardedEvalSampler(num_samples, world_size, rank)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(num_samples))
    assert [len(ShardedEvalSampler(num_samples, world_size, r)) for r in range(world_size)] == [len(s) for s in shards]


def test_training_shards_are_disjoint_and_reshuffled_per_epoch() -> None:
    dataset = list(range(12))
    samplers = [train_sampler(dataset, _ctx(rank, 2), repeated_aug=False, seed=0) for rank in range(2)]
    epochs = []
    for epoch in range(2):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        shards = [list(sampler) for sampler in samplers]
        assert sorted(shards[0] + shards[1]) == dataset
        epochs.append(shards[0])
    assert epochs[0] != epochs[1]


def test_repeated_augmentation_puts_the_copies_on_different_ranks() -> None:
    dataset = list(range(30))
    shards = []
    for rank in range(3):
        sampler = train_sampler(dataset, _ctx(rank, 3), repeated_aug=True, seed=0)
        sampler.set_epoch(1)
        shards.append(list(sampler))
    assert all(len(shard) == 10 for shard in shards)
    # the three copies of an image are spread: each rank holds one copy of the same 10 images
    assert all(Counter(shard) == Counter(shards[0]) for shard in shards)
    assert all(count == 1 for count in Counter(shards[0]).values())


def test_val_split_falls_back_to_validation(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"train": {"a": 1}, "validation": {"a": 1}})
    assert find_split_folder(str(tmp_path), "val") == tmp_path / "validation"
    assert find_split_folder(str(tmp_path), "train") == tmp_path / "train"
    with pytest.raises(UsageError, match="no 'test' split"):
        find_split_folder(str(tmp_path), "test")


def test_synthetic_patterns_are_deterministic_and_balanced() -> None:
    dataset = SyntheticPatterns("train", 8, image_size=16)
    first, label = dataset[5]
    again, _ = SyntheticPatterns("train", 8, image_size=16)[5]
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert first.size == (16, 16) and label == 1
    assert Counter(dataset[i][1] for i in range(8)) == {0: 2, 1: 2, 2: 2, 3: 2}
    other, _ = SyntheticPatterns("val", 8, image_size=16)[5]
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_checkpoint_history_keeps_the_best_epochs(tmp_path: Path) -> None:
    folder = prepare_output_dir(str(tmp_path), "run")
    saver = CheckpointSaver(folder, max_history=2)
    for epoch, metric in enumerate([10.0, 30.0, 20.0, 5.0, 40.0]):
        best = saver.save({"epoch": epoch, "metric": metric, "state_dict": {"w": torch.tensor([epoch])}},
                          epoch, metric)
    assert best == (4, 40.0)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["checkpoint-1.pth.tar", "checkpoint-4.pth.tar", "last.pth.tar", "model_best.pth.tar"]
    assert torch.load(folder / "model_best.pth.tar", weights_only=True)["epoch"] == 4
    assert torch.load(folder / "last.pth.tar", weights_only=True)["epoch"] == 4
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(folder / "last.pth.tar").st_mode & 0o777 == 0o666 & ~umask
    restored = CheckpointSaver(folder, max_history=2)
    assert restored.history == [(4, 40.0), (1, 30.0)] and restored.best == (4, 40.0)


def test_summary_rows_append_and_a_resumed_epoch_replaces_its_row(tmp_path: Path) -> None:
    for epoch, loss in [(0, 1.0), (1, 0.5), (1, 0.25)]:
        append_summary(tmp_path, {"epoch": epoch, "train_loss": loss})
    with open(tmp_path / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["epoch"], row["train_loss"]) for row in rows] == [("0", "1.0"), ("1", "0.25")]
