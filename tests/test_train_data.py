"""Data pieces of the trainer: sharding, repeated augmentation, split fallback, synthetic set; saver files."""
from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.datasets import ImageFolder

from tests.shared_files import shared_path
from tests.train_helpers import make_image_folder
from vig.trainer.cli import parse_args
from vig.trainer.data import (DataConfig, ShardedEvalSampler, SyntheticPatterns, find_split_folder, train_sampler,
                              train_transform)
from vig.trainer.distributed import DistributedContext
from vig.trainer.setup import eval_sampler
from vig.errors import UsageError
from vig.trainer.saver import CheckpointSaver, append_summary, prepare_output_dir


def _ctx(rank: int, world_size: int) -> DistributedContext:
    return DistributedContext(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))


@pytest.mark.parametrize(("num_samples", "world_size"), [(7, 2), (10, 3), (2, 4), (0, 2), (5, 1)])
def test_eval_shards_cover_every_image_exactly_once(num_samples: int, world_size: int) -> None:
    shards = [list(ShardedEvalSampler(num_samples, world_size, rank)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(num_samples))
    assert [len(ShardedEvalSampler(num_samples, world_size, r)) for r in range(world_size)] == [len(s) for s in shards]


@pytest.mark.parametrize(("num_samples", "world_size"), [(7, 2), (10, 3), (2, 4), (0, 2), (50, 1)])
def test_shuffled_eval_shards_cover_every_image_once_in_one_fixed_order(num_samples: int, world_size: int) -> None:
    def shards(seed: int) -> list[list[int]]:
        return [list(ShardedEvalSampler(num_samples, world_size, rank, shuffle_seed=seed)) for rank in range(world_size)]

    assert sorted(i for shard in shards(3) for i in shard) == list(range(num_samples))
    assert shards(3) == shards(3)
    assert [len(ShardedEvalSampler(num_samples, world_size, r, 3)) for r in range(world_size)] == [
        len(s) for s in shards(3)]
    if num_samples >= 10:
        assert shards(3) != shards(4)
        assert [i for shard in shards(3) for i in shard] != list(range(num_samples))


@pytest.mark.parametrize(("model", "kwargs", "mixes_classes"), [
    ("bgnn", dict(backbone="mobilenetv3_small_050", edge_features=8), True), ("resnet10t", {}, False)])
def test_batch_dependent_models_evaluate_class_sorted_folders_in_mixed_batches(model: str, kwargs: dict,
                                                                               mixes_classes: bool) -> None:
    test_set = ImageFolder(str(shared_path("data", "cifar10-subset", "test")))
    built = timm.create_model(model, num_classes=10, **kwargs)
    sampler = eval_sampler(42, test_set, _ctx(0, 1), built)
    first_batch = list(sampler)[:64]
    classes = {test_set.targets[i] for i in first_batch}
    assert (len(classes) >= 8) == mixes_classes
    assert sorted(sampler) == list(range(len(test_set)))


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


def _cifar_config(size: int) -> DataConfig:
    return DataConfig(input_size=(3, size, size), interpolation="bilinear", mean=(0.4914, 0.4822, 0.4465),
                      std=(0.2470, 0.2435, 0.2616), crop_pct=1.0)


def _real_image() -> Image.Image:
    folder = shared_path("data", "cifar10-subset", "train")
    first = sorted(sorted(entry for entry in folder.iterdir() if entry.is_dir())[0].iterdir())[0]
    with Image.open(first) as opened:
        return opened.convert("RGB")


RECIPE_TRANSFORM = ["--train-crop", "rrc", "--scale", "0.75", "1", "--ratio", "1", "1", "--aa", "tv-rand-n2-m12",
                    "--color-jitter", "0.2", "--force-color-jitter", "--reprob", "0.2", "--remode", "const"]


# (flags, input size, crop (kind, scale, ratio), tv RandAugment (n, m, bins) or None,
#  colour jitter strength or None, index of the jitter (after the augmentation policy), erasing (p, mode) or None)
@pytest.mark.parametrize(
    ("argv", "size", "crop", "tv_rand", "jitter", "erasing"),
    [
        ([], 32, ("pad", None, None), None, 0.4, None),
        (RECIPE_TRANSFORM, 32, ("rrc", (0.75, 1.0), (1.0, 1.0)), (2, 12, 31), 0.2, (0.2, "const")),
        (["--aa", "tv-rand-n1-m5-b11", "--reprob", "0.5"], 32, ("pad", None, None), (1, 5, 11), None, (0.5, "pixel")),
        (["--train-crop", "rrc", "--aa", "tv-rand"], 32, ("rrc", (0.08, 1.0), (0.75, 4 / 3)), (2, 9, 31), None, None),
        (["--aa", "tv-rand-m30", "--force-color-jitter"], 224, ("rrc", (0.08, 1.0), (0.75, 4 / 3)), (2, 30, 31),
         0.4, None),
        (["--scale", "0.5", "0.9", "--ratio", "0.8", "1.25", "--color-jitter", "0.3"], 224,
         ("rrc", (0.5, 0.9), (0.8, 1.25)), None, 0.3, None),
    ],
    ids=["cifar-default", "convmixer-recipe", "tv-rand-pad", "rrc-timm-ranges", "tv-rand-224", "rrc-224-ranges"],
)
def test_training_crop_policy_jitter_and_erasing_follow_the_flags(
        argv: list[str], size: int, crop: tuple, tv_rand: tuple | None, jitter: float | None,
        erasing: tuple | None) -> None:
    transform = train_transform(parse_args(argv).augmentation, _cifar_config(size))
    steps = list(transform.transforms)
    kind, scale, ratio = crop
    if kind == "pad":
        assert isinstance(steps[0], transforms.RandomCrop) and steps[0].size == (32, 32) and steps[0].padding == 4
    else:
        assert isinstance(steps[0], RandomResizedCropAndInterpolation) and steps[0].size == (size, size)
        torch.testing.assert_close(steps[0].scale, scale)
        torch.testing.assert_close(steps[0].ratio, ratio)
    assert isinstance(steps[1], transforms.RandomHorizontalFlip) and steps[1].p == 0.5
    policies = [step for step in steps if isinstance(step, transforms.RandAugment)]
    assert not any(isinstance(step, RandAugment) for step in steps)  # never timm's RandAugment here
    if tv_rand is None:
        assert policies == []
    else:
        assert steps[2] is policies[0] and len(policies) == 1
        assert (policies[0].num_ops, policies[0].magnitude, policies[0].num_magnitude_bins) == tv_rand
    jitters = [index for index, step in enumerate(steps) if isinstance(step, transforms.ColorJitter)]
    if jitter is None:
        assert jitters == []
    else:
        assert jitters == [3 if tv_rand else 2]  # after the flip and the policy, before the tensor
        torch.testing.assert_close(steps[jitters[0]].brightness, (1 - jitter, 1 + jitter))
        torch.testing.assert_close(steps[jitters[0]].saturation, (1 - jitter, 1 + jitter))
        assert steps[jitters[0]].hue is None
    erasers = [step for step in steps if isinstance(step, RandomErasing)]
    if erasing is None:
        assert erasers == []
    else:
        assert erasers == [steps[-1]] and (erasers[0].probability, erasers[0].mode) == erasing
    torch.manual_seed(0)
    out = transform(_real_image())
    assert out.shape == (3, size, size) and out.dtype == torch.float32


@pytest.mark.parametrize(
    ("argv", "size", "message"),
    [
        (["--scale", "0.75", "1"], 32, "--scale set the random-resized crop, but this run trains on the padded crop"),
        (["--ratio", "1", "1"], 32, "--ratio set the random-resized crop"),
        (["--scale", "0.75", "1", "--ratio", "1", "1"], 32, "--scale and --ratio set the random-resized crop"),
        (["--train-crop", "pad"], 224, "--train-crop pad is the padded crop of 32-px inputs; this run's input is 224"),
    ],
)
def test_contradictory_crop_flags_are_one_line_errors(argv: list[str], size: int, message: str) -> None:
    augmentation = parse_args(argv).augmentation
    with pytest.raises(UsageError) as info:
        train_transform(augmentation, _cifar_config(size))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("side", [1, 7, 23, 32])
def test_the_padded_crop_takes_images_smaller_than_the_crop(side: int) -> None:
    """A 1 x 1 image crashed RandomCrop(32, padding=4) in a loader worker; now it is zero-padded up to the crop,
    and a 32-px image gets the same crop as before (the same generator state)."""
    transform = train_transform(parse_args(["--reprob", "0"]).augmentation, _cifar_config(32))
    image = _real_image().resize((side, side))
    torch.manual_seed(0)
    out = transform(image)
    assert out.shape == (3, 32, 32) and torch.isfinite(out).all()
    if side == 32:
        torch.manual_seed(0)
        plain = transforms.Compose([transforms.RandomCrop(32, padding=4)] + list(transform.transforms[1:]))(image)
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
