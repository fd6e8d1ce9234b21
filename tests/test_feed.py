"""Feeding the model: the repeated-augmentation sampler follows --seed; the device path (uint8 batches,
normalisation and random erasing on the device with timm's PrefetchLoader) that CUDA runs use, forced on CPU;
the feed-rate benchmark script on a few images."""
from __future__ import annotations

import importlib.util
import math
import random

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from tests.shared_files import shared_path
from tests.train_helpers import REPO_ROOT
from vig.trainer.cli import parse_args
from vig.trainer.config import TrainConfig
from vig.trainer.data import (DataConfig, ShardedEvalSampler, build_dataset, build_loader, device_normalizes,
                              eval_transform, prefetch_to_device, train_sampler, train_transform)
from vig.trainer.distributed import DistributedContext
from vig.trainer.engine import resolve_precision, train_one_epoch
from vig.trainer.step import PlainLoss, TrainStep

CPU = torch.device("cpu")
RECIPE = ["--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--remode", "pixel", "--color-jitter", "0.4"]


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


def test_only_cuda_normalizes_on_the_device() -> None:
    assert device_normalizes(torch.device("cuda", 0)) and not device_normalizes(CPU)


def _config(size: int) -> DataConfig:
    return DataConfig(input_size=(3, size, size), interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                      std=IMAGENET_DEFAULT_STD, crop_pct=0.9)


def _args(*flags: str) -> TrainConfig:
    return parse_args([str(shared_path("data", "cifar10-subset")), *RECIPE, *flags])


def _images(split: str, count: int) -> Dataset:
    """`count` real CIFAR images of the subset's `split` (every class), as the project's folder dataset."""
    dataset, _ = build_dataset(_args().data, split, is_training=split == "train")
    return Subset(dataset, range(0, len(dataset), len(dataset) // count)[:count])


def _loader(subset: Subset, transform, batch_size: int, is_training: bool) -> DataLoader:
    subset.dataset.transform = transform
    return build_loader(subset, ShardedEvalSampler(len(subset), 1, 0), batch_size, workers=0,
                        is_training=is_training, device=CPU)


@pytest.mark.parametrize("size", [32, 224])
def test_device_normalised_eval_batches_equal_the_cpu_normalised_ones(size: int) -> None:
    subset = _images("test", 24)
    config = _config(size)
    expected = list(_loader(subset, eval_transform(config), 8, is_training=False))
    raw = _loader(subset, eval_transform(config, device_normalize=True), 8, is_training=False)
    assert next(iter(raw))[0].dtype == torch.uint8
    got = list(prefetch_to_device(raw, config, CPU))
    assert len(got) == len(expected) == 3
    for (images, targets), (want_images, want_targets) in zip(got, expected):
        assert images.dtype == torch.float32 and images.shape == (8, 3, size, size)
        torch.testing.assert_close(images, want_images)
        torch.testing.assert_close(targets, want_targets)


@pytest.mark.parametrize("size", [32, 224])
def test_device_path_training_batches_are_uint8_then_normalised_and_erased_on_the_device(size: int) -> None:
    config = _config(size)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None] * 255
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None] * 255
    loader = _loader(_images("train", 8), train_transform(_args().augmentation, config, device_normalize=True), 8,
                     is_training=True)
    images, targets = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, size, size)
    fixed = DataLoader(TensorDataset(images, targets), batch_size=8)
    (plain, _), = list(prefetch_to_device(fixed, config, CPU))
    torch.testing.assert_close(plain, (images.float() - mean) / std)
    random.seed(0)
    torch.manual_seed(0)
    (erased, erased_targets), = list(prefetch_to_device(fixed, config, CPU, re_prob=1.0, re_mode="pixel"))
    assert erased.dtype == torch.float32 and erased.shape == (8, 3, size, size)
    torch.testing.assert_close(erased_targets, targets)
    # every image has one erased rectangle of about 2 % to 1/3 of its area (timm's bounds, sides rounded)
    changed = (erased != plain).any(dim=1).float().mean(dim=(1, 2))
    assert bool(((changed >= 0.01) & (changed <= 0.4)).all()), changed


def test_mixup_and_a_training_step_work_on_device_normalised_batches() -> None:
    config = _config(32)
    torch.manual_seed(0)
    transform = train_transform(_args().augmentation, config, device_normalize=True)
    loader = prefetch_to_device(_loader(_images("train", 16), transform, 8, is_training=True), config, CPU,
                                re_prob=0.25, re_mode="pixel")
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    step = TrainStep(model, optimizer, PlainLoss(SoftTargetCrossEntropy()), resolve_precision(False, None, CPU),
                     mixup=mixup)
    stats = train_one_epoch(0, loader, step, _ctx(), num_updates=0, log_interval=1)
    assert stats.images == 16 and stats.num_updates == 2 and math.isfinite(stats.loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_feed_rate_script_reports_both_paths_of_every_source(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("feed_rate", REPO_ROOT / "benchmarks" / "feed_rate.py")
    feed_rate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(feed_rate)
    source = shared_path("data", "cifar10-subset")
    assert feed_rate.main(["--source", str(source), "--images", "16", "--batch-size", "8", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|")[3:5] for line in out.splitlines()
            if line.startswith(("| folder", "| wds", "| hfds"))}
    assert set(rows) == {(source, path) for source in ("folder", "wds", "hfds") for path in ("float", "uint8")}
    assert all(float(value) > 0 for values in rows.values() for value in values)
    assert out.startswith("16 JPEGs of 400 x 300, batch 8, 1 worker(s)")
