"""Soak test of the training data pipeline on Pillow 13: every timm augmentation op at every magnitude, and
the published recipe over every training image of the CIFAR subset, through `vig.trainer.data.train_transform`.

Pillow 13's `ImageOps.posterize` rejects keeping 0 bits, which timm's posterize ops ask for at the ends
of their magnitude range (PosterizeIncreasing at 10, reached by `rand-m9-mstd0.5-inc1` about once in 660
images; Posterize below 2.5); Pillow < 13 returned a black image there, and so must the transform.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator, Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import (AugMixAugment, AugmentOp, AutoAugment, RandAugment, augmix_ops, auto_augment_policy,
                                    rand_augment_choices)
from torch.utils.data import SequentialSampler
from torchvision import transforms as torchvision_transforms

from tests.shared_files import shared_path
from vig.trainer.cli import parse_args
from vig.trainer.config import AugmentSection, TrainConfig
from vig.trainer.data import DataConfig, augment_ops, build_dataset, build_loader, train_transform

# every --aa policy family timm 1.0.31's create_transform accepts: RandAugment with each of its op tables
# (t<name> picks rand_augment_choices(name); inc0 / inc1 the plain tables), AugMix, and each named AutoAugment
# policy (timm 1.0.31 has no TrivialAugment)
RAND_TABLES = {"rand-inc1": ("", True), "rand-inc0": ("", False), "rand-t3a": ("3a", True),
               "rand-t3aw": ("3aw", True), "rand-tweights": ("weights", True)}
AUTO_AUGMENT_POLICIES = ("original", "originalr", "v0", "v0r", "3a")
POLICIES = (*RAND_TABLES, "augmix", *AUTO_AUGMENT_POLICIES)
# every integer magnitude, and values outside [0, 10] (magnitude-std draws) that AugmentOp clips to the ends
MAGNITUDES = (*range(11), -0.7, 10.6)
SIZES = (32, 224)  # the CIFAR branch and the ImageNet branch of train_transform
PUBLISHED_RECIPE = ["--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--remode", "pixel", "--color-jitter", "0.4"]
IMAGES_PER_MAGNITUDE = 1


def _config(size: int) -> DataConfig:
    return DataConfig(input_size=(3, size, size), interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                      std=IMAGENET_DEFAULT_STD, crop_pct=0.9)


def _args(*flags: str) -> TrainConfig:
    return parse_args([*PUBLISHED_RECIPE, *flags])


def _augmentation(*flags: str) -> AugmentSection:
    return _args(*flags).augmentation


def _table_op_names(policy: str) -> set[str]:
    """The op names of timm's own table behind `policy`."""
    if policy in RAND_TABLES:
        name, increasing = RAND_TABLES[policy]
        return set(rand_augment_choices(name, increasing=increasing))
    if policy == "augmix":
        return {op.name for op in augmix_ops()}
    return {op.name for sub_policy in auto_augment_policy(policy) for op in sub_policy}


def _stage_kind(policy: str) -> str:
    return "rand" if policy.startswith("rand") else "augmix" if policy == "augmix" else "auto"


def _cases() -> list[tuple[str, str]]:
    """(policy, op name): every op of every kind of augmentation stage once, from the first policy holding it."""
    cases: dict[tuple[str, str], tuple[str, str]] = {}
    for policy in POLICIES:
        for name in sorted(_table_op_names(policy)):
            cases.setdefault((_stage_kind(policy), name), (policy, name))
    return list(cases.values())


def _narrowed(transform, name: str) -> AugmentOp:
    """Narrow the augmentation stage of `transform` (in place) to always apply its op `name`, once; the op."""
    op = next(op for op in augment_ops(transform) if op.name == name)
    for stage in transform.transforms:
        if isinstance(stage, RandAugment):
            stage.ops, stage.num_layers, stage.choice_weights = [op], 1, None
        elif isinstance(stage, AugMixAugment):
            stage.ops, stage.depth = [op], 1
        elif isinstance(stage, AutoAugment):
            stage.policy = [[op]]
    op.prob = 1.0
    op.magnitude_std = 0.0  # the magnitude set below, exactly (AugMix draws it uniformly by default)
    return op


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Per-image transforms on one intra-op thread, as in loader workers (two threads on a busy 2-core
    machine made them 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar_images() -> list[Image.Image]:
    """Real 32 x 32 RGB images, the first 16 of every class of the CIFAR-10 subset's training split."""
    train = shared_path("data", "cifar10-subset", "train")
    images = []
    for folder in sorted(entry for entry in train.iterdir() if entry.is_dir()):
        for path in sorted(folder.iterdir())[:16]:
            with Image.open(path) as opened:
                images.append(opened.convert("RGB"))
    return images


def test_the_policies_cover_every_table_of_timm() -> None:
    built = {name for policy in POLICIES for name in (op.name for op in augment_ops(
        train_transform(_augmentation("--aa", policy), _config(224))))}
    tables = set().union(*(_table_op_names(policy) for policy in POLICIES))
    assert built == tables
    assert {"PosterizeIncreasing", "Posterize", "PosterizeOriginal"} <= built


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("policy", "name"), _cases())
def test_every_op_at_every_magnitude_goes_through_the_training_transform(
        policy: str, name: str, size: int, cifar_images: list[Image.Image]) -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    transform = train_transform(_augmentation("--aa", policy), _config(size))
    op = _narrowed(transform, name)
    start = (POLICIES.index(policy) * 7 + len(name)) % len(cifar_images)
    failures = _soak(transform, lambda magnitude: setattr(op, "magnitude", magnitude), MAGNITUDES,
                     IMAGES_PER_MAGNITUDE, cifar_images, start, size)
    assert not failures, f"{policy} {name} at {size} px: " + "; ".join(failures)


def _soak(transform: Callable, set_magnitude: Callable[[float], None], magnitudes: Sequence[float],
          images_per_magnitude: int, cifar_images: list[Image.Image], start: int, size: int) -> list[str]:
    """Run ``transform`` on ``images_per_magnitude`` real images at each magnitude (set through
    ``set_magnitude``), checking each output is a finite float (3, size, size) tensor; return the
    failing magnitudes (the first error of each) instead of stopping at the first."""
    failures = []
    for step, magnitude in enumerate(magnitudes):
        set_magnitude(magnitude)
        for k in range(images_per_magnitude):
            image = cifar_images[(start + step * images_per_magnitude + k) % len(cifar_images)]
            try:
                out = transform(image)
            except Exception as err:  # the soak lists every failing magnitude, not just the first
                failures.append(f"m={magnitude}: {type(err).__name__}: {err}")
                break
            assert out.shape == (3, size, size) and out.dtype == torch.float32
            assert bool(torch.isfinite(out).all())
    return failures


def _keeps_no_bits(op: AugmentOp, magnitude: float) -> bool:
    bounded = max(0.0, min(magnitude, op.magnitude_max or 10.0))
    return op.name.startswith("Posterize") and op.level_fn(bounded, op.hparams)[0] < 1


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("policy", "name", "magnitude"), [
    (policy, name, magnitude) for policy in POLICIES if policy != "augmix" for name in sorted(_table_op_names(policy))
    for magnitude in MAGNITUDES if _keeps_no_bits(AugmentOp(name), magnitude)])
def test_posterize_keeping_no_bits_gives_the_black_image_of_pillow_before_13(
        policy: str, name: str, magnitude: float, size: int, cifar_images: list[Image.Image]) -> None:
    transform = train_transform(_augmentation("--aa", policy, "--reprob", "0"), _config(size))
    _narrowed(transform, name).magnitude = magnitude
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    black = ((0 - mean) / std)[:, None, None].expand(3, size, size)
    for image in cifar_images[:3]:
        torch.testing.assert_close(transform(image), black)


@pytest.mark.parametrize("bits", range(-3, 9))
def test_guarded_posterize_matches_pillow_before_13_bit_for_bit(bits: int, cifar_images: list[Image.Image]) -> None:
    transform = train_transform(_augmentation("--aa", "rand-inc0"), _config(32))
    op = next(op for op in augment_ops(transform) if op.name == "Posterize")
    # Pillow < 13: ImageOps.posterize maps every channel value v to v & ~(2 ** (8 - bits) - 1)
    mask = ~(2 ** (8 - bits) - 1)
    for image in cifar_images[:4]:
        pixels = np.asarray(image)
        out = op.aug_fn(image, bits)
        assert out.mode == image.mode and out.size == image.size
        np.testing.assert_array_equal(np.asarray(out), pixels.astype(np.int64) & mask)


def test_published_recipe_transforms_every_training_image_of_the_subset() -> None:
    root = shared_path("data", "cifar10-subset")
    args = _args(str(root), "--train-split", "train")
    dataset, classes = build_dataset(args.data, "train", is_training=True)
    dataset.transform = train_transform(args.augmentation, _config(224))
    # is_training=False keeps the last partial batch, so that every image goes through the transform
    loader = build_loader(dataset, SequentialSampler(dataset), batch_size=100, workers=2, is_training=False,
                          device=torch.device("cpu"))
    torch.manual_seed(0)  # the workers' augmentation seeds
    seen = 0
    for images, targets in loader:
        assert images.shape[1:] == (3, 224, 224) and images.dtype == torch.float32
        assert bool(torch.isfinite(images).all())
        seen += images.shape[0]
    assert len(classes) == 10 and seen == len(dataset) == 4660


TV_RAND_BINS = 31  # torchvision's default number of magnitude bins: magnitudes 0 .. 30
TV_RAND_OPS = tuple(torchvision_transforms.RandAugment()._augmentation_space(TV_RAND_BINS, (32, 32)))


@pytest.mark.parametrize("bins", [2, 11, TV_RAND_BINS, 101])
def test_torchvision_posterize_keeps_at_least_four_bits_so_pillow_13_needs_no_guard(bins: int) -> None:
    transform = train_transform(_augmentation("--aa", f"tv-rand-m0-b{bins}"), _config(32))
    policy = next(step for step in transform.transforms if isinstance(step, torchvision_transforms.RandAugment))
    assert policy.num_magnitude_bins == bins
    bits, _ = policy._augmentation_space(bins, (32, 32))["Posterize"]
    assert int(bits.min()) == 4 and int(bits.max()) == 8


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", TV_RAND_OPS)
def test_every_torchvision_op_at_every_magnitude_goes_through_the_training_transform(
        name: str, size: int, cifar_images: list[Image.Image]) -> None:
    torch.manual_seed(0)
    transform = train_transform(_augmentation("--aa", "tv-rand-n1", "--force-color-jitter", "--color-jitter", "0.2"),
                                _config(size))
    policy = next(step for step in transform.transforms if isinstance(step, torchvision_transforms.RandAugment))
    space = policy._augmentation_space
    policy._augmentation_space = lambda bins, image_size: {name: space(bins, image_size)[name]}  # always this op
    start = (TV_RAND_OPS.index(name) * 7) % len(cifar_images)
    # two images per magnitude: both signs of a signed op, most of the time
    failures = _soak(transform, lambda magnitude: setattr(policy, "magnitude", magnitude), range(TV_RAND_BINS),
                     2, cifar_images, start, size)
    assert not failures, f"torchvision {name} at {size} px: " + "; ".join(failures)
