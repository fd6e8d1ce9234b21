"""Feed rate of ONE loader worker with the published training recipe on ImageNet-like JPEG input, by source.

    python benchmarks/feed_rate.py                      # 1,024 images, batch 64, 2 rounds, all sources
    python benchmarks/feed_rate.py --images 256 --rounds 1 --sources folder wds

Makes ImageNet-like input in a temporary folder (the CIFAR-10 subset's training images upsampled to
400 x 300 JPEGs, quality 90) and stores the same JPEG bytes three ways: an ImageFolder tree (`folder`),
webdataset tar shards written by `vig.tools.make_shards` (`wds`, timm's wds reader with its training
shuffle buffer) and a Parquet Hugging Face dataset with the bytes embedded (`hfds`, timm's hfds reader);
then reads each through the trainer's own dataset (decode included) and
training transform (`vig.trainer.data.train_transform`: --aa rand-m9-mstd0.5-inc1, --reprob 0.25, --remode pixel,
colour jitter 0.4, bicubic, 224 px, ImageNet mean / std) with a DataLoader of one worker, for
  float: the CPU path, the worker normalises and randomly erases (float32 batches), and
  uint8:   the CUDA path, the worker stops at the uint8 tensor (normalisation and erasing are left to
           the device, `vig.trainer.data.prefetch_to_device`).
Loader images/s count the images after the first batch (worker start-up excluded), over the wall time
from the first batch to the last. On a shared machine that figure falls with the load, so the images per
CPU-second of the same dataset read in this process (one thread, `time.process_time`) are printed too:
what one worker delivers on a core of its own, less the batch transfer. The paths alternate for --rounds
rounds; the medians are printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vig.tools.make_shards import write_split
from vig.trainer.cli import parse_args as parse_train_args
from vig.trainer.data import DataConfig, ShardedEvalSampler, build_dataset, build_loader, train_transform
from vig.trainer.sources import StreamShard, is_stream

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"
SOURCES = ("folder", "wds", "hfds")
RECIPE = ["--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--remode", "pixel", "--color-jitter", "0.4"]
JPEG_SIZE = (400, 300)
JPEG_QUALITY = 90


def make_jpegs(source: Path, target: Path, count: int) -> int:
    """target/train/<class>/*.jpg: `count` images of source/train, classes in turn, upsampled (bicubic)."""
    classes = sorted(entry for entry in (source / "train").iterdir() if entry.is_dir())
    files = [sorted(folder.iterdir()) for folder in classes]
    made = 0
    for index in range(count):
        folder, images = classes[index % len(classes)], files[index % len(classes)]
        path = images[(index // len(classes)) % len(images)]
        out = target / "train" / folder.name / f"{index:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as opened:
            opened.convert("RGB").resize(JPEG_SIZE, Image.Resampling.BICUBIC).save(out, quality=JPEG_QUALITY)
        made += 1
    return made


def make_wds(root: Path, target: Path, count: int) -> Path:
    """target/train-*.tar (4 shards) and target/_info.json of root/train's JPEGs."""
    target.mkdir()
    shard_size = -(-count // 4)
    info, classes = write_split(root, "train", "train", target, shard_size, seed=0, limit=None)
    (target / "_info.json").write_text(json.dumps({"classes": classes, "splits": {"train": info}}))
    return target


def make_hfds(root: Path, target: Path) -> Path:
    """target/data/train-00000-of-00001.parquet: root/train's JPEG bytes and class labels (datasets)."""
    import datasets

    classes = sorted(entry.name for entry in (root / "train").iterdir())
    paths = [(path, label) for label, name in enumerate(classes) for path in sorted((root / "train" / name).iterdir())]
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=classes))
    table = datasets.Dataset.from_dict({"image": [{"bytes": path.read_bytes(), "path": path.name} for path, _ in paths],
                                        "label": [label for _, label in paths]}, features=features)
    (target / "data").mkdir(parents=True)
    table.to_parquet(str(target / "data" / "train-00000-of-00001.parquet"))
    return target


def source_argv(source: str, folders: dict[str, Path]) -> list[str]:
    """train.py's data arguments that read `source`."""
    if source == "wds":
        return [str(folders["wds"]), "--dataset", "wds/feed"]
    if source == "hfds":
        return [str(folders["cache"]), "--dataset", f"hfds/{folders['hfds']}"]
    return [str(folders["folder"])]


def measure(data_argv: list[str], device_normalize: bool, batch_size: int, workers: int) -> tuple[float, float]:
    """(images per second the loader delivers after its first batch, images per CPU-second in this process)."""
    train_config = parse_train_args([*data_argv, *RECIPE, "-b", str(batch_size)])
    config = DataConfig(input_size=(3, 224, 224), interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                        std=IMAGENET_DEFAULT_STD, crop_pct=0.9)
    dataset, _ = build_dataset(train_config.data, "train", is_training=True, seed=train_config.loop.seed)
    dataset.transform = train_transform(train_config.augmentation, config, device_normalize)
    sampler = StreamShard(dataset) if is_stream(dataset) else ShardedEvalSampler(len(dataset), 1, 0)
    loader = build_loader(dataset, sampler, batch_size, workers, is_training=True, device=torch.device("cpu"))
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    count = sum(images.shape[0] for images, _ in batches)
    loader_rate = count / (time.perf_counter() - start)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    start = time.process_time()
    if is_stream(dataset):
        dataset.set_loader_cfg(num_workers=1)
        read = sum(1 for _ in islice(dataset, len(dataset)))
    else:
        read = len(dataset)
        for index in range(read):
            dataset[index]
    cpu_rate = read / (time.process_time() - start)
    torch.set_num_threads(threads)
    return loader_rate, cpu_rate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/feed_rate.py", description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="CIFAR-10 subset (train/<class>/*.png)")
    parser.add_argument("--images", type=int, default=1024, help="JPEGs to make and read")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements of each path")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES, help="sources to read")
    args = parser.parse_args(argv)
    if args.images < 2 * args.batch_size:
        parser.error(f"--images must be at least twice --batch-size ({2 * args.batch_size})")
    if not (args.source / "train").is_dir():
        parser.error(f"no {args.source / 'train'}; pass --source DIR (DIR/train/<class>/*.png)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("vig.make_shards").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="feed_rate_") as folder:
        root = Path(folder)
        made = make_jpegs(args.source, root / "folder", args.images)
        folders = {"folder": root / "folder", "cache": root / "cache"}
        if "wds" in args.sources:
            folders["wds"] = make_wds(root / "folder", root / "wds", args.images)
        if "hfds" in args.sources:
            folders["hfds"] = make_hfds(root / "folder", root / "hfds")
        rates: dict[tuple[str, str], list[tuple[float, float]]] = {
            (source, path): [] for source in args.sources for path in ("float", "uint8")}
        load = os.getloadavg()[0]
        for _ in range(args.rounds):
            for source, path in rates:
                rates[source, path].append(measure(source_argv(source, folders), path == "uint8", args.batch_size,
                                                   args.workers))
    print(f"{made} JPEGs of {JPEG_SIZE[0]} x {JPEG_SIZE[1]}, batch {args.batch_size}, {args.workers} worker(s), "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the start, torch {torch.__version__}")
    print("| source | path | loader images/s | images per CPU-second | rounds (loader / CPU) |")
    print("|---|---|---|---|---|")
    for (source, path), values in rates.items():
        loader_rates, cpu_rates = zip(*values)
        rounds = ", ".join(f"{a:.0f} / {b:.0f}" for a, b in values)
        print(f"| {source} | {path} | {statistics.median(loader_rates):.0f} | {statistics.median(cpu_rates):.0f} | "
              f"{rounds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
