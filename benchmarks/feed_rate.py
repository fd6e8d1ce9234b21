"""Feed rate of ONE loader worker with the published training recipe on ImageNet-like JPEG input.

    python benchmarks/feed_rate.py                      # 1,024 images, batch 64, 2 rounds
    python benchmarks/feed_rate.py --images 256 --rounds 1

Makes ImageNet-like input in a temporary folder (the CIFAR-10 subset's training images upsampled to
400 x 300 JPEGs, quality 90), then reads it through the trainer's own dataset (decode included) and
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
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vig.trainer.cli import parse_args as parse_train_args
from vig.trainer.data import DataConfig, ShardedEvalSampler, build_dataset, build_loader, train_transform

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"
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


def measure(root: Path, device_normalize: bool, batch_size: int, workers: int) -> tuple[float, float]:
    """(images per second the loader delivers after its first batch, images per CPU-second in this process)."""
    args = parse_train_args([str(root), *RECIPE])
    config = DataConfig(input_size=(3, 224, 224), interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                        std=IMAGENET_DEFAULT_STD, crop_pct=0.9)
    dataset, _ = build_dataset(args, "train", is_training=True)
    dataset.transform = train_transform(args, config, device_normalize)
    loader = build_loader(dataset, ShardedEvalSampler(len(dataset), 1, 0), batch_size, workers, is_training=True,
                          device=torch.device("cpu"))
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    count = sum(images.shape[0] for images, _ in batches)
    loader_rate = count / (time.perf_counter() - start)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    start = time.process_time()
    for index in range(len(dataset)):
        dataset[index]
    cpu_rate = len(dataset) / (time.process_time() - start)
    torch.set_num_threads(threads)
    return loader_rate, cpu_rate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/feed_rate.py", description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="CIFAR-10 subset (train/<class>/*.png)")
    parser.add_argument("--images", type=int, default=1024, help="JPEGs to make and read")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements of each path")
    args = parser.parse_args(argv)
    if args.images < 2 * args.batch_size:
        parser.error(f"--images must be at least twice --batch-size ({2 * args.batch_size})")
    if not (args.source / "train").is_dir():
        parser.error(f"no {args.source / 'train'}; pass --source DIR (DIR/train/<class>/*.png)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="feed_rate_") as folder:
        made = make_jpegs(args.source, Path(folder), args.images)
        rates: dict[str, list[tuple[float, float]]] = {"float": [], "uint8": []}
        load = os.getloadavg()[0]
        for _ in range(args.rounds):
            for name in rates:
                rates[name].append(measure(Path(folder), name == "uint8", args.batch_size, args.workers))
    print(f"{made} JPEGs of {JPEG_SIZE[0]} x {JPEG_SIZE[1]}, batch {args.batch_size}, {args.workers} worker(s), "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the start, torch {torch.__version__}")
    print("| path | loader images/s | images per CPU-second | rounds (loader / CPU) |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        loader_rates, cpu_rates = zip(*values)
        rounds = ", ".join(f"{a:.0f} / {b:.0f}" for a, b in values)
        print(f"| {name} | {statistics.median(loader_rates):.0f} | {statistics.median(cpu_rates):.0f} | {rounds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
