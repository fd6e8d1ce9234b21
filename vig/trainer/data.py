"""Datasets, transforms, samplers and loaders for training and validation.

Sources: an ImageFolder tree (timm `create_dataset`), torchvision CIFAR-10/100, or the embedded
synthetic pattern set (no download; used when no data folder is given). Training batches are sharded
per epoch over ranks (timm `RepeatAugSampler` with `--repeated-aug`, shuffled from seed and epoch);
validation visits every image exactly once across ranks, without the padding of a DistributedSampler.
ImageFolder images are fully decoded when read: a corrupt file stops the run naming the file, or with
`--skip-corrupt` is replaced by the next readable image and counted. With `device_normalize` the
transforms end in a uint8 tensor and `prefetch_to_device` (timm `PrefetchLoader`) normalises and
randomly erases the batches on the device, as timm's prefetcher does.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment, create_dataset, create_transform, resolve_data_config
from timm.data.auto_augment import AugMixAugment, AugmentOp, AutoAugment, RandAugment
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import PrefetchLoader
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.transforms import MaybePILToTensor, MaybeToTensor
from timm.data.transforms_factory import transforms_imagenet_train
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms

from vig.errors import CorruptImageError, UsageError
from vig.trainer.distributed import DistributedContext
from vig.trainer.sources import (HFDS_PREFIX, WDS_PREFIX, StreamShard, UNDECODABLE, check_even_shards, hfds_dataset,
                                 is_stream, take_stream_corrupt_count, wds_dataset)

if TYPE_CHECKING:
    from vig.trainer.config import AugmentSection, DataSection

_LOGGER = logging.getLogger(__name__)

SYNTHETIC_DATASET = "synthetic"

REPEATED_AUG_REPEATS = 3
CIFAR_SIZE = 32
CIFAR_CROP_PADDING = 4
TRAIN_CROPS = ("pad", "rrc")  # random crop of the 4-px-padded 32-px image; random-resized crop
TV_RAND_PREFIX = "tv-rand"
# torchvision RandAugment's defaults: num_ops, magnitude, num_magnitude_bins
TV_RAND_DEFAULTS = {"n": 2, "m": 9, "b": 31}
SPLIT_FALLBACKS = {"val": ("val", "validation"), "validation": ("validation", "val")}


class SyntheticPatterns(Dataset):
    """Procedurally generated, learnable image set: four texture classes in random colours.

    Image i of a split is a deterministic function of (seed, split, i): class i % 4 is horizontal
    stripes, vertical stripes, a checkerboard or concentric rings, at a random frequency and phase,
    in two random contrasting colours, plus pixel noise. Items are (PIL RGB image of
    image_size x image_size, or its transform, label).
    """

    classes = ("horizontal", "vertical", "checker", "rings")

    def __init__(self, split: str, num_samples: int, image_size: int = 64, seed: int = 0,
                 transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.split_id = 0 if split == "train" else 1
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.transform = transform

    def __len__(self) -> int:
        return self.num_samples

    def render(self, index: int) -> tuple[Image.Image, int]:
        """The untransformed image and label of item `index`."""
        rng = np.random.default_rng([self.seed, self.split_id, index])
        label = index % len(self.classes)
        size = self.image_size
        coords = (np.arange(size) + 0.5) / size
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        cycles = rng.uniform(2.5, 5.0)
        phase = rng.uniform(0, 2 * np.pi)
        if label == 0:
            wave = np.sin(2 * np.pi * cycles * yy + phase)
        elif label == 1:
            wave = np.sin(2 * np.pi * cycles * xx + phase)
        elif label == 2:
            wave = np.sin(2 * np.pi * cycles * xx + phase) * np.sin(2 * np.pi * cycles * yy + phase)
        else:
            centre = rng.uniform(0.3, 0.7, size=2)
            radius = np.hypot(yy - centre[0], xx - centre[1])
            wave = np.sin(2 * np.pi * cycles * radius + phase)
        weight = (wave > 0).astype(np.float64)[..., None]
        colour_a = rng.uniform(0.0, 1.0, size=3)
        colour_b = np.clip(1.0 - colour_a + rng.uniform(-0.2, 0.2, size=3), 0.0, 1.0)
        pixels = weight * colour_a + (1 - weight) * colour_b + rng.normal(0.0, 0.08, size=(size, size, 3))
        image = Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8), mode="RGB")
        return image, label

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.render(index)
        return (self.transform(image) if self.transform is not None else image), label


SYNTHETIC_SIZES = {"train": 768, "val": 256}


class ShardedEvalSampler(Sampler[int]):
    """Positions rank, rank + world_size, ... of the evaluation order: every index on exactly one rank, no padding.

    The order is the dataset's own, or with ``shuffle_seed`` one fixed permutation drawn from that seed (the
    same in every epoch and every run with the seed). Models whose predictions depend on the other images
    of their batch (the batch-graph head) are evaluated in the shuffled order, so that their batches are not
    the class-sorted runs of an ImageFolder.
    """

    def __init__(self, num_samples: int, world_size: int, rank: int, shuffle_seed: int | None = None) -> None:
        self.num_samples = num_samples
        self.world_size = world_size
        self.rank = rank
        self.shuffle_seed = shuffle_seed

    def __iter__(self) -> Iterator[int]:
        if self.shuffle_seed is None:
            return iter(range(self.rank, self.num_samples, self.world_size))
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.shuffle_seed))
        return iter(order[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def dataset_kind(data: DataSection) -> str:
    """'synthetic', 'folder', 'wds', 'hfds' or the torch/* name, from --dataset and whether a data folder was given."""
    for prefix in (WDS_PREFIX, HFDS_PREFIX):
        if data.dataset.startswith(prefix):
            return prefix[:-1]
    if data.dataset == SYNTHETIC_DATASET or (data.dataset == "" and data.data_dir is None):
        return SYNTHETIC_DATASET
    return data.dataset or "folder"


def _image_count_hint(folder: Path) -> bool:
    """True if some class sub-folder of `folder` holds at least one image file."""
    extensions = tuple(get_img_extensions())
    for _, _, files in os.walk(folder):
        if any(name.lower().endswith(extensions) for name in files):
            return True
    return False


def find_split_folder(root: str, split: str) -> Path:
    """root/split, with 'val' falling back to 'validation'; UsageError naming the folder and the expected
    layout root/<split>/<class>/<image> when it is missing, empty or holds images without class folders."""
    root_path = Path(root)
    layout = f"expected layout: {root_path / split}/<class>/<image>"
    if not root_path.is_dir():
        raise UsageError(f"data folder {root} does not exist ({layout})")
    candidates = SPLIT_FALLBACKS.get(split, (split,))
    for name in candidates:
        folder = root_path / name
        if folder.is_dir():
            if not _image_count_hint(folder):
                raise UsageError(f"no images under {folder} (expected {folder}/<class>/<image>)")
            extensions = tuple(get_img_extensions())
            if any(entry.is_file() and entry.name.lower().endswith(extensions) for entry in os.scandir(folder)):
                raise UsageError(f"images lie directly in {folder}; put them in one sub-folder per class "
                                 f"(expected {folder}/<class>/<image>)")
            return folder
    tried = ", ".join(f"{root_path / name}/" for name in candidates)
    held = sorted(entry.name for entry in os.scandir(root_path) if entry.is_dir() and not entry.name.startswith("."))
    holds = f"it holds {', '.join(held)}" if held else "it holds no folders"
    raise UsageError(f"no '{split}' split under {root}; {holds}: looked for {tried} ({layout})")


def require_same_classes(data: DataSection, train_classes: list[str], val_classes: list[str]) -> None:
    """UsageError (one line) when the training and validation splits do not hold the same class names."""
    if train_classes == val_classes:
        return
    if dataset_kind(data) == "folder":
        train_where = find_split_folder(data.data_dir, data.train_split)
        val_where = find_split_folder(data.data_dir, data.val_split)
    else:
        train_where, val_where = f"split {data.train_split!r}", f"split {data.val_split!r}"
    train_names, val_names = set(train_classes), set(val_classes)
    only_train = [name for name in train_classes if name not in val_names]
    only_val = [name for name in val_classes if name not in train_names]
    differences = []
    if only_train:
        differences.append(f"only in training: {', '.join(only_train[:5])}{' ...' if len(only_train) > 5 else ''}")
    if only_val:
        differences.append(f"only in validation: {', '.join(only_val[:5])}{' ...' if len(only_val) > 5 else ''}")
    raise UsageError(f"class lists differ between {train_where} ({len(train_classes)} classes) and {val_where} "
                     f"({len(val_classes)} classes): {'; '.join(differences) or 'same names, other order'}")


class CheckedImageFolder(Dataset):
    """The images of a map-style timm reader (ImageFolder, Hugging Face dataset), fully decoded when read,
    corrupt files named.

    Items are (transform(PIL RGB image) or the image, class index). A file that does not decode raises
    `CorruptImageError` naming it; with `skip_corrupt` it is replaced by the next readable image of the
    split (batch shapes stay fixed) and counted. The count is shared with DataLoader workers; read it
    with `take_corrupt_count`.
    """

    def __init__(self, reader: Any, skip_corrupt: bool, transform: Callable[[Image.Image], Any] | None = None,
                 source: str = "") -> None:
        self.reader = reader
        self.skip_corrupt = skip_corrupt
        self.transform = transform
        self.source = source or str(reader.root)
        self._corrupt_count = multiprocessing.Value("q", 0)

    def __len__(self) -> int:
        return len(self.reader)

    def _name(self, index: int) -> str:
        return self.reader._filename(index, absolute=True) or f"{self.source} item {index}"

    def take_corrupt_count(self) -> int:
        """Corrupt files met (in this process and its loader workers) since the last call; resets to 0."""
        with self._corrupt_count.get_lock():
            count, self._corrupt_count.value = self._corrupt_count.value, 0
        return count

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            source, target = self.reader[position][:2]
            try:
                with source, Image.open(source) as opened:
                    image = opened.convert("RGB")
            except UNDECODABLE as err:
                reason = " ".join(str(err).split()) or type(err).__name__
                path = self._name(position)
                if not self.skip_corrupt:
                    raise CorruptImageError(f"corrupt image {path}: {reason} "
                                            "(remove or replace it, or pass --skip-corrupt)") from None
                with self._corrupt_count.get_lock():
                    self._corrupt_count.value += 1
                _LOGGER.warning("skipping corrupt image %s: %s", path, reason)
                continue
            return (self.transform(image) if self.transform is not None else image), target
        raise CorruptImageError(f"no image under {self.source} could be decoded")


def take_corrupt_count(dataset: Dataset) -> int:
    """Corrupt files skipped by `dataset` since the last call (0 for sources that are not image files)."""
    if is_stream(dataset):
        return take_stream_corrupt_count(dataset)
    return dataset.take_corrupt_count() if isinstance(dataset, CheckedImageFolder) else 0


def _folder_classes(dataset: Dataset) -> dict[str, int]:
    return dict(dataset.reader.class_to_idx)


def empty_class_folders(data: DataSection, classes: list[str]) -> str | None:
    """One warning line naming the class folders of an ImageFolder tree that hold no image in either split (the
    reader drops them, as timm's and torchvision's do, so the class count leaves them out); None when there are
    none or the source is not a folder tree. A folder empty in one split only is a class-list difference
    (`require_same_classes`)."""
    if dataset_kind(data) != "folder":
        return None
    known = set(classes)
    empty: list[str] = []
    for split in (data.train_split, data.val_split):
        folder = find_split_folder(data.data_dir, split)
        empty += [str(entry.path) for entry in sorted(os.scandir(folder), key=lambda entry: entry.name)
                  if entry.is_dir() and not entry.name.startswith(".") and entry.name not in known]
    if not empty:
        return None
    shown = ", ".join(empty[:4]) + (f" and {len(empty) - 4} more" if len(empty) > 4 else "")
    return (f"class folder(s) without images dropped: {shown}; the model gets {len(classes)} classes (timm and "
            "torchvision drop empty class folders too)")


def build_dataset(data: DataSection, split: str, is_training: bool, seed: int = 0) -> tuple[Dataset, list[str]]:
    """One split of the selected source, without transform, and its class names (index order); ``seed``
    shuffles a wds/ stream's shards (--seed)."""
    kind = dataset_kind(data)
    if kind == SYNTHETIC_DATASET:
        key = "train" if is_training else "val"
        dataset = SyntheticPatterns(key, SYNTHETIC_SIZES[key], seed=0)
        return dataset, list(SyntheticPatterns.classes)
    if kind == "wds":
        return wds_dataset(data, split, is_training, seed)
    if kind == "hfds":
        dataset, classes = hfds_dataset(data, SPLIT_FALLBACKS.get(split, (split,)))
        return CheckedImageFolder(dataset.reader, data.skip_corrupt, source=data.dataset), classes
    if kind == "folder":
        folder = find_split_folder(data.data_dir, split)
        dataset = create_dataset("", root=str(folder), split=split, search_split=False, is_training=is_training)
        classes = _folder_classes(dataset)
        return CheckedImageFolder(dataset.reader, data.skip_corrupt), sorted(classes, key=classes.get)
    root = data.data_dir or "data"
    try:
        dataset = create_dataset(kind, root=root, split=split, is_training=is_training,
                                 download=data.dataset_download)
    except RuntimeError as err:
        raise UsageError(f"{kind} not found under {root}: {err} (add --dataset-download)") from None
    except OSError as err:  # failed download (no network: URLError) or unwritable root
        reason = getattr(err, "reason", None) or err.strerror or err
        raise UsageError(f"cannot download {kind} into {root}: {reason}") from None
    return dataset, list(dataset.classes)


@dataclass
class DataConfig:
    """Resolved preprocessing: input_size (C, H, W), interpolation, mean, std, crop_pct."""

    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float


def resolve_preprocessing(data: DataSection, img_size: int | None, model: torch.nn.Module) -> DataConfig:
    """Flags where given (``img_size``: the model section's), else the model's pretrained config (timm
    `resolve_data_config`)."""
    overrides: dict[str, Any] = {}
    if img_size is not None:
        overrides["img_size"] = img_size
    if data.interpolation:
        overrides["interpolation"] = data.interpolation
    for key in ("mean", "std", "crop_pct"):
        if getattr(data, key) is not None:
            overrides[key] = getattr(data, key)
    config = resolve_data_config(args=overrides, model=model)
    if data.crop_pct is not None and tuple(config["input_size"][1:]) == (CIFAR_SIZE, CIFAR_SIZE):
        raise UsageError(f"--crop-pct {data.crop_pct:g}: {CIFAR_SIZE} x {CIFAR_SIZE} inputs are evaluated as the plain "
                         "centred image, without the resize that --crop-pct sets; drop it")
    return DataConfig(input_size=tuple(config["input_size"]), interpolation=config["interpolation"],
                      mean=tuple(config["mean"]), std=tuple(config["std"]), crop_pct=config["crop_pct"])


def is_cifar_input(config: DataConfig) -> bool:
    """True when the model input is CIFAR-sized (32 x 32): such runs use the CIFAR transforms below."""
    return tuple(config.input_size[1:]) == (CIFAR_SIZE, CIFAR_SIZE)


def _posterize_keeping_no_bits_is_black(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, keeping Pillow < 13's answer for fewer than 1 kept bit: a black image (same mode, size).

    timm's PosterizeIncreasing keeps 0 bits at magnitude 10 (RandAugment `inc1`, reached by `mstd`
    draws clipped at 10) and fewer beyond (`mmax`), its Posterize keeps 0 bits below magnitude 2.5.
    Pillow < 13 mapped every channel value v to v & ~(2 ** (8 - bits) - 1), which is 0 for every v when
    bits < 1; Pillow 13 raises ValueError.
    """
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


# timm augmentation functions that fail on Pillow 13 at some magnitude -> the same op with Pillow < 13's result
_PRE_PILLOW13_OPS: dict[Callable[..., Image.Image], Callable[..., Image.Image]] = {
    auto_augment.posterize: _posterize_keeping_no_bits_is_black,
}


def augment_ops(transform: Callable) -> list[AugmentOp]:
    """The timm AugmentOps of the RandAugment / AugMix / AutoAugment stages of a Compose transform."""
    ops: list[AugmentOp] = []
    for stage in getattr(transform, "transforms", [transform]):
        if isinstance(stage, (RandAugment, AugMixAugment)):
            ops.extend(stage.ops)
        elif isinstance(stage, AutoAugment):
            ops.extend(op for sub_policy in stage.policy for op in sub_policy)
    return ops


def _with_pre_pillow13_ops(transform: transforms.Compose) -> transforms.Compose:
    """`transform` with the aug functions of its AugmentOps that Pillow 13 rejects replaced (in place)."""
    for op in augment_ops(transform):
        op.aug_fn = _PRE_PILLOW13_OPS.get(op.aug_fn, op.aug_fn)
    return transform


def is_tv_rand_policy(policy: str | None) -> bool:
    """True when an `--aa` value names torchvision's RandAugment (`tv-rand...`) rather than a timm policy."""
    return policy is not None and policy.startswith(TV_RAND_PREFIX)


def tv_rand_augment(policy: str) -> transforms.RandAugment:
    """torchvision's RandAugment from `--aa tv-rand[-n<ops>][-m<magnitude>][-b<bins>]` (e.g. tv-rand-n2-m12).

    Unset keys take torchvision's defaults (n 2, m 9, b 31 magnitude bins); the magnitude is a bin index,
    0 .. bins - 1. Interpolation (nearest) and fill (black) are torchvision's defaults. Posterize keeps
    8 - round(4 * m / (bins - 1)) >= 4 bits, which Pillow 13 accepts at every magnitude. UsageError (one
    line) for a malformed string or out-of-range values.
    """
    usage = f"--aa {policy!r}: expected {TV_RAND_PREFIX}[-n<ops>][-m<magnitude>][-b<bins>], e.g. {TV_RAND_PREFIX}-n2-m12"
    rest = policy[len(TV_RAND_PREFIX):]
    if rest and not rest.startswith("-"):
        raise UsageError(usage)
    values = dict(TV_RAND_DEFAULTS)
    given: set[str] = set()
    for part in rest.split("-")[1:]:
        match = re.fullmatch(r"([nmb])(\d+)", part)
        if match is None or match.group(1) in given:
            raise UsageError(usage)
        given.add(match.group(1))
        values[match.group(1)] = int(match.group(2))
    if values["n"] < 1:
        raise UsageError(f"--aa {policy!r}: needs at least one op per image (n >= 1)")
    if values["b"] < 2:
        raise UsageError(f"--aa {policy!r}: needs at least 2 magnitude bins (b >= 2)")
    if values["m"] >= values["b"]:
        raise UsageError(f"--aa {policy!r}: magnitude {values['m']} is not a bin of 0 .. {values['b'] - 1}")
    return transforms.RandAugment(num_ops=values["n"], magnitude=values["m"], num_magnitude_bins=values["b"])


def train_crop(augmentation: AugmentSection, config: DataConfig) -> str:
    """The training crop, `--train-crop` or its default: 'pad' for 32-px inputs, 'rrc' otherwise.

    UsageError (one line) for the padded crop on inputs of another size, and for `--scale` / `--ratio`
    (the random-resized crop's ranges) with the padded crop, where they would be ignored.
    """
    crop = augmentation.train_crop or ("pad" if is_cifar_input(config) else "rrc")
    if crop != "pad":
        return crop
    if not is_cifar_input(config):
        height, width = config.input_size[1:]
        raise UsageError(f"--train-crop pad is the padded crop of {CIFAR_SIZE}-px inputs; this run's input is "
                         f"{height} x {width} (use --train-crop rrc)")
    given = [flag for flag, value in (("--scale", augmentation.scale), ("--ratio", augmentation.ratio))
             if value is not None]
    if given:
        raise UsageError(f"{' and '.join(given)} set the random-resized crop, but this run trains on the padded "
                         f"crop (--train-crop pad, the default for {CIFAR_SIZE}-px inputs); add --train-crop rrc")
    return crop


def train_transform(augmentation: AugmentSection, config: DataConfig, device_normalize: bool = False) -> Callable:
    """Training transform of a PIL image -> normalised float (C, H, W) tensor, or uint8 with `device_normalize`.

    Stages (timm `transforms_imagenet_train`): the crop and a horizontal flip; the augmentation (colour
    jitter, or the `--aa` policy, which replaces the jitter unless `--force-color-jitter` keeps it after
    the policy); normalise; `--reprob` random erasing. The crop (`train_crop`) is timm's random-resized
    crop with `--scale` / `--ratio` ('rrc', default except at 32 px) or, for 32-px inputs, a random
    32 x 32 crop of the image padded by 4 pixels ('pad'). `--aa tv-rand-...` is torchvision's
    RandAugment (`tv_rand_augment`) in place of timm's policy. With `device_normalize` the transform
    stops at the uint8 tensor (timm's prefetcher transforms); `prefetch_to_device` then normalises and
    erases. timm `--aa` ops keep their Pillow < 13 results where Pillow 13 rejects the magnitude
    (posterize keeping no bits).
    """
    crop = train_crop(augmentation, config)
    tv_rand = is_tv_rand_policy(augmentation.aa)
    keeps_jitter = augmentation.force_color_jitter or not tv_rand
    primary, augment, finish = transforms_imagenet_train(
        config.input_size[1:], scale=augmentation.scale, ratio=augmentation.ratio,
        color_jitter=augmentation.color_jitter if keeps_jitter else None,
        force_color_jitter=augmentation.force_color_jitter,
        auto_augment=None if tv_rand else augmentation.aa, interpolation=config.interpolation, mean=config.mean,
        std=config.std, re_prob=augmentation.reprob, re_mode=augmentation.remode, re_count=augmentation.recount,
        separate=True,
        use_prefetcher=device_normalize)
    crop_and_flip = list(primary.transforms)
    if crop == "pad":
        # images smaller than the crop are zero-padded up to it first, as the evaluation's centre crop does
        crop_and_flip = [transforms.RandomCrop(CIFAR_SIZE, padding=CIFAR_CROP_PADDING, pad_if_needed=True),
                         transforms.RandomHorizontalFlip()]
    policy = [tv_rand_augment(augmentation.aa)] if tv_rand else []
    return _with_pre_pillow13_ops(
        transforms.Compose(crop_and_flip + policy + list(augment.transforms) + list(finish.transforms)))


def eval_transform(config: DataConfig, device_normalize: bool = False) -> Callable:
    """Evaluation transform of a PIL image -> normalised float (C, H, W) tensor, or uint8 with `device_normalize`.

    ImageNet-style inputs: resize to size / crop_pct, centre crop, normalise (timm). CIFAR-sized
    inputs: the plain 32 x 32 image, normalised (the centre crop only acts on images of another size).
    With `device_normalize` the transform stops at the uint8 tensor; `prefetch_to_device` normalises.
    """
    if not is_cifar_input(config):
        return create_transform(config.input_size, is_training=False, interpolation=config.interpolation,
                                mean=config.mean, std=config.std, crop_pct=config.crop_pct,
                                use_prefetcher=device_normalize)
    if device_normalize:
        return transforms.Compose([transforms.CenterCrop(CIFAR_SIZE), MaybePILToTensor()])
    return transforms.Compose([transforms.CenterCrop(CIFAR_SIZE), MaybeToTensor(),
                               transforms.Normalize(mean=torch.tensor(config.mean), std=torch.tensor(config.std))])


class SeededRepeatAugSampler(RepeatAugSampler):
    """timm's RepeatAugSampler shuffled from seed + epoch (as torch's DistributedSampler) instead of the epoch alone."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, num_repeats: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, num_repeats=num_repeats)
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        self.epoch = self.seed + epoch  # timm seeds its shuffle generator with self.epoch
        try:
            return super().__iter__()  # the shard is drawn here, as a list
        finally:
            self.epoch = epoch


def train_sampler(dataset: Dataset, ctx: DistributedContext, repeated_aug: bool, seed: int,
                  num_repeats: int = REPEATED_AUG_REPEATS) -> Sampler[int] | StreamShard:
    """Per-epoch shuffled shard of this rank (call `set_epoch`), the order drawn from seed + epoch;
    repeated augmentation (`num_repeats` copies of each image, --aug-repeats) spreads the copies of an
    image over ranks. A stream shards and shuffles itself (`StreamShard`, see `vig.trainer.sources`)."""
    if is_stream(dataset):
        if repeated_aug:
            raise UsageError("--repeated-aug needs random access to the images; a wds/ stream has none "
                             "(drop --repeated-aug / --aug-repeats)")
        return StreamShard(dataset)
    if repeated_aug:
        return SeededRepeatAugSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                      num_repeats=num_repeats, seed=seed)
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)


def eval_shard(dataset: Dataset, world_size: int, rank: int,
               shuffle_seed: int | None = None) -> ShardedEvalSampler | StreamShard:
    """This rank's share of the validation images: `ShardedEvalSampler`, or for a stream its own shards."""
    if is_stream(dataset):
        return StreamShard(dataset)
    return ShardedEvalSampler(len(dataset), world_size, rank, shuffle_seed=shuffle_seed)


def build_loader(dataset: Dataset, sampler: Sampler[int] | StreamShard, batch_size: int, workers: int,
                 is_training: bool, device: torch.device) -> DataLoader:
    """DataLoader over this rank's shard; training drops the last incomplete batch. A stream (no sampler)
    is told the worker count first: its per-epoch length depends on it."""
    if isinstance(sampler, StreamShard):
        dataset.set_loader_cfg(num_workers=workers)
        reader = dataset.reader
        check_even_shards(dataset, reader.dist_num_replicas, workers, batch_size, is_training)
        if is_training and len(sampler) < batch_size:
            raise UsageError(f"the training stream of each process has {len(sampler)} images, fewer than "
                             f"--batch-size {batch_size}; lower the batch size or add data")
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                          drop_last=is_training)
    if is_training and len(sampler) < batch_size:
        raise UsageError(f"the training shard of each process has {len(sampler)} images, fewer than "
                         f"--batch-size {batch_size}; lower the batch size or add data")
    # workers are started per epoch, so their seeds follow the per-epoch seed of the main process
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=is_training)


def device_normalizes(device: torch.device) -> bool:
    """Whether runs on `device` load uint8 batches and normalise / randomly erase them on it (CUDA, as timm's
    prefetcher); on the CPU the loader workers deliver normalised float batches."""
    return device.type == "cuda"


def prefetch_to_device(loader: DataLoader, config: DataConfig, device: torch.device, re_prob: float = 0.0,
                       re_mode: str = "const", re_count: int = 1) -> PrefetchLoader:
    """Batches of a `device_normalize` loader (uint8 (B, C, H, W)) moved to `device`, normalised there with
    the config's mean / std to float32 and, with `re_prob` > 0, randomly erased there (timm `PrefetchLoader`;
    on CUDA the copy of the next batch overlaps the work on the current one)."""
    return PrefetchLoader(loader, mean=config.mean, std=config.std, channels=config.input_size[0], device=device,
                          re_prob=re_prob, re_mode=re_mode, re_count=re_count)
