"""Webdataset shards (`--dataset wds/...`) and local Hugging Face datasets (`--dataset hfds/...`), read by timm.

wds: timm's `ReaderWds` over tar shards in DIR, with DIR/_info.json (or _info.yaml) giving each split's
shard file names and sample counts (`vig.tools.make_shards` writes both). The stream has no sampler:
timm deals the split's shards out to the rank x loader-worker slots (slot rank * workers + worker takes
shards slot, slot + slots, ...), training shuffles the shard order from --seed + epoch and the samples in
a buffer, and every slot yields ceil(num_samples / slots) samples per epoch, rounded up to a whole
batch in training, restarting its shards when they run out. Each image is therefore seen exactly once
per epoch when the shards split evenly: the split's shard count a multiple of world size x --workers,
every shard the same number of images, a multiple of --batch-size in training. Otherwise some images
are seen twice or not at all in an epoch (logged as a warning at start).

hfds: timm's `ReaderHfds` (`datasets.load_dataset(NAME, split=...)`), map-style, so the trainer's
samplers and sharding apply unchanged. NAME is a local folder that `load_dataset` reads without the hub:
an image folder tree (DIR/<split>/<class>/<image>, labels from the class folders), or a folder of
Parquet / Arrow files named by split (e.g. train-00000-of-00001.parquet, as `Dataset.to_parquet`
writes). Folders written by `save_to_disk` are not readable by `load_dataset`.
"""
from __future__ import annotations

import logging
import multiprocessing
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from PIL import Image
from timm.data import create_dataset
from timm.data.dataset import IterableImageDataset
from torch.utils.data import IterableDataset

from vig.errors import CorruptImageError, UsageError

if TYPE_CHECKING:
    from vig.trainer.config import DataSection

_LOGGER = logging.getLogger(__name__)

WDS_PREFIX = "wds/"
HFDS_PREFIX = "hfds/"
STREAM_PREFIXES = (WDS_PREFIX,)
INFO_NAMES = ("_info.json", "_info.yaml")

# what PIL raises for bytes that are not a decodable image (truncated, garbage, unreadable)
UNDECODABLE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def is_stream(dataset: Any) -> bool:
    """True for a source without random access (webdataset shards): no sampler, no len before set-up."""
    return isinstance(dataset, IterableDataset)


def _corrupt_reason(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _wds_reader_class() -> type:
    from timm.data.readers import reader_wds  # needs webdataset: imported only for wds/ sources

    if reader_wds.wds is None:
        raise UsageError("--dataset wds/... needs the webdataset package (pip install 'vig-toolkit[data]')")

    class CheckedWdsReader(reader_wds.ReaderWds):
        """timm's ReaderWds whose undecodable samples stop the run naming shard and key, or with
        `skip_corrupt` are dropped, counted and logged (the slot reads on to fill its epoch)."""

        def __init__(self, *args: Any, skip_corrupt: bool = False, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.skip_corrupt = skip_corrupt
            self.corrupt_count = multiprocessing.Value("q", 0)

        def _lazy_init(self) -> None:
            super()._lazy_init()
            for stage in self.ds.pipeline:
                decode = stage.args[0] if getattr(stage, "args", None) else None
                if isinstance(decode, partial) and decode.func is reader_wds._decode:
                    stage.args = (partial(self._checked_decode, decode), *stage.args[1:])
                    stage.kw["handler"] = self._handler

        def _checked_decode(self, decode: Callable[[dict], Any], sample: dict) -> Any:
            try:
                return self._keyed_by_input_key(decode(sample))
            except UNDECODABLE as err:
                name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
                if not self.skip_corrupt:
                    raise CorruptImageError(f"corrupt image {name}: {_corrupt_reason(err)} "
                                            "(rewrite the shard, or pass --skip-corrupt)") from None
                with self.corrupt_count.get_lock():
                    self.corrupt_count.value += 1
                _LOGGER.warning("skipping corrupt image %s: %s", name, _corrupt_reason(err))
                return None

        def _keyed_by_input_key(self, decoded: dict | None) -> dict | None:
            """The decoded sample with its image under the first name of --input-key.

            timm 1.0.31's `_decode` returns the image under the key 'jpg' whatever --input-key read, and its
            pipeline then renames the field named by --input-key to 'image': for any key list without 'jpg'
            (e.g. --input-key png) that field is missing and the rename fails. Keyed here as the rename
            expects; a timm that keys the image by the input key leaves nothing to do."""
            first = self.input_key.split(";")[0]
            if decoded is not None and first not in decoded and "jpg" in decoded:
                decoded[first] = decoded.pop("jpg")
            return decoded

        @staticmethod
        def _handler(err: BaseException) -> bool:
            if isinstance(err, CorruptImageError):
                raise err
            return reader_wds.log_and_continue(err)

    return CheckedWdsReader


def wds_dataset(data: DataSection, split: str, is_training: bool,
                seed: int) -> tuple[IterableImageDataset, list[str]]:
    """One split of the shards in data.data_dir (timm IterableImageDataset) and its class names.

    Class names come from the info file's `classes` list (written by `vig.tools.make_shards`), else
    `class0 ...` up to --num-classes.
    """
    root = data.data_dir
    if root is None:
        raise UsageError(f"--dataset {data.dataset} reads shards from DIR: give the folder holding them")
    from timm.data.readers.reader_wds import _load_info

    info = _load_info(root, INFO_NAMES)
    if not info and "tar" not in split:
        raise UsageError(f"no {' or '.join(INFO_NAMES)} in {root}: it lists the shards and sample counts of each "
                         f"split (write shards with python -m vig.tools.make_shards)")
    if "tar" not in split and split not in info.get("splits", {}):
        raise UsageError(f"split {split!r} not in {root}/_info: splits {', '.join(info.get('splits', {}))}")
    num_samples = data.train_num_samples if is_training else data.val_num_samples
    reader = _wds_reader_class()(
        root, split=split, is_training=is_training, num_samples=num_samples, batch_size=data.batch_size,
        seed=seed, input_key=data.input_key or "jpg;png;webp", input_img_mode=data.input_img_mode,
        target_key=data.target_key or None, skip_corrupt=data.skip_corrupt)
    dataset = IterableImageDataset(root, reader=reader, split=split, is_training=is_training)
    classes = info.get("classes")
    if not classes:
        if data.num_classes is None:
            raise UsageError(f"{root}/_info lists no 'classes': give --num-classes")
        classes = [f"class{index}" for index in range(data.num_classes)]
    return dataset, list(classes)


def hfds_dataset(data: DataSection, splits: tuple[str, ...]) -> tuple[Any, list[str]]:
    """The first of `splits` that a local Hugging Face dataset holds (timm ImageDataset over ReaderHfds) and
    its class names. DIR, when given, is the datasets cache (timm's `root`)."""
    name = data.dataset[len(HFDS_PREFIX):]
    if not Path(name).is_dir():
        raise UsageError(f"--dataset {data.dataset}: no folder {name} (hfds/ reads a local dataset folder, "
                         "never the hub)")
    extra: dict[str, Any] = {}
    if data.input_key:
        extra["input_key"] = data.input_key
    if data.target_key:
        extra["target_key"] = data.target_key
    reason = ""
    for split in splits:
        try:
            dataset = create_dataset(data.dataset, root=data.data_dir, split=split, is_training=False,
                                     input_img_mode=data.input_img_mode, **extra)
            break
        except (FileNotFoundError, ValueError, KeyError) as err:
            reason = _corrupt_reason(err)
    else:
        raise UsageError(f"--dataset {data.dataset}: cannot load split {' or '.join(map(repr, splits))} of "
                         f"{name}: {reason}")
    classes = dataset.reader.class_to_idx
    if not classes:
        if data.num_classes is None:
            raise UsageError(f"{name} has no class-label feature {data.target_key or 'label'!r}: give --num-classes")
        return dataset, [f"class{index}" for index in range(data.num_classes)]
    return dataset, sorted(classes, key=classes.get)


def check_even_shards(dataset: IterableImageDataset, world_size: int, workers: int, batch_size: int,
                      is_training: bool) -> None:
    """Warn when this split's shards do not split evenly over world_size x workers slots (see the module doc)."""
    info = dataset.reader.split_info
    slots = world_size * max(1, workers)
    lengths = set(info.shard_lengths)
    per_slot = dataset.reader.num_samples / slots
    uneven = []
    if len(info.filenames) % slots:
        uneven.append(f"{len(info.filenames)} shards over {slots} slots (processes x workers)")
    if len(lengths) > 1:
        uneven.append(f"shards of {min(lengths)} to {max(lengths)} images")
    if is_training and per_slot % batch_size:
        uneven.append(f"{per_slot:g} images per slot, not a multiple of --batch-size {batch_size}")
    if uneven:
        _LOGGER.warning("split %r: %s; some images are read twice or not at all per epoch", info.name or "?",
                        "; ".join(uneven))


class StreamShard:
    """What the trainer's samplers give for a stream: this rank's images per epoch (len) and set_epoch,
    which seeds the shard shuffle; the order is the stream's own (shuffle_seed None)."""

    shuffle_seed = None

    def __init__(self, dataset: IterableImageDataset) -> None:
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        """Seed epoch `epoch`'s shard shuffle (--seed + epoch) and drop the pipeline a main-process read (-j 0)
        built, whose sample-shuffle generator would carry one epoch's draws into the next: every epoch's order
        then follows from the seed and the epoch alone, so a resumed run repeats the uninterrupted one.
        (Loader workers build their pipeline afresh each epoch, seeded from the per-epoch torch seed.)"""
        self.dataset.set_epoch(epoch)
        self.dataset.reader.ds = None

    def __len__(self) -> int:
        return len(self.dataset)


def take_stream_corrupt_count(dataset: IterableImageDataset) -> int:
    """Corrupt samples the stream's reader dropped (this process and its workers) since the last call."""
    counter = getattr(dataset.reader, "corrupt_count", None)
    if counter is None:
        return 0
    with counter.get_lock():
        count, counter.value = counter.value, 0
    return count
