"""Write webdataset tar shards of an ImageFolder tree, with the _info.json timm's wds reader reads.

    vig-make-shards /data/imagenet /data/imagenet-wds --shard-size 1000
    vig-make-shards cifar10-subset shards --splits train test:val --limit 200 --shard-size 50

Each split SRC[:NAME] reads ROOT/SRC/<class>/<image> and writes OUT/NAME-000000.tar, ... of
--shard-size images each (the last shard holds the rest). Images are shuffled once (--seed) before
sharding, so that shards mix classes, and stored as their file's bytes (not decoded; an undecodable
file is met by the trainer, see --skip-corrupt): .jpg/.jpeg as `jpg`, .png as `png`, .webp as `webp`,
other formats re-encoded as PNG. Each sample holds `cls` (class index, classes sorted by name as in an
ImageFolder) and `json` ({"label", "class", "filename", "index"}). OUT/_info.json lists per split the
shard file names, their image counts and the total (timm's `splits` format) and the class names.
Train with `train.py OUT --dataset wds/NAME`. Each image is read once per epoch when a split's shard
count is a multiple of processes x --workers and its shards are equal (choose --shard-size so).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Sequence

from PIL import Image

from vig.console import OneLineErrorParser, fail
from vig.errors import UsageError

_LOGGER = logging.getLogger("vig.make_shards")

INFO_NAME = "_info.json"
KEPT_FORMATS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
IMAGE_SUFFIXES = (*KEPT_FORMATS, ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def list_split(folder: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image path, class index) of folder/<class>/<image>, classes sorted by name, and the class names."""
    if not folder.is_dir():
        raise UsageError(f"no split folder {folder} (expected {folder}/<class>/<image>)")
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    samples = [(path, index) for index, name in enumerate(classes)
               for path in sorted((folder / name).rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise UsageError(f"no images under {folder} (expected {folder}/<class>/<image>)")
    return samples, classes


def encoded(path: Path) -> tuple[str, bytes]:
    """(webdataset extension, bytes) of an image file: its own bytes when the reader decodes the format."""
    kept = KEPT_FORMATS.get(path.suffix.lower())
    if kept is not None:
        return kept, path.read_bytes()
    buffer = io.BytesIO()
    with Image.open(path) as opened:
        opened.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def write_split(root: Path, source: str, name: str, out: Path, shard_size: int, seed: int,
                limit: int | None) -> tuple[dict, list[str]]:
    """Write the shards of one split; its timm split-info dict and its class names."""
    try:
        import webdataset as wds
    except ImportError:
        raise UsageError("vig-make-shards needs the webdataset package (pip install 'vig-toolkit[data]')") from None

    samples, classes = list_split(root / source)
    random.Random(seed).shuffle(samples)
    samples = samples[:limit] if limit is not None else samples
    filenames, lengths = [], []
    start = time.perf_counter()
    num_shards = -(-len(samples) // shard_size)
    for shard in range(num_shards):
        chunk = samples[shard * shard_size:(shard + 1) * shard_size]
        filename = f"{name}-{shard:06d}.tar"
        with wds.TarWriter(str(out / filename)) as writer:
            for offset, (path, label) in enumerate(chunk):
                index = shard * shard_size + offset
                extension, data = encoded(path)
                meta = {"label": label, "class": classes[label], "filename": str(path.relative_to(root)),
                        "index": index}
                writer.write({"__key__": f"{name}{index:08d}", extension: data, "cls": str(label).encode(),
                              "json": json.dumps(meta).encode()})
        filenames.append(filename)
        lengths.append(len(chunk))
        done = sum(lengths)
        _LOGGER.info("%s: shard %d/%d, %d/%d images, %.0f img/s", name, shard + 1, num_shards, done, len(samples),
                     done / max(time.perf_counter() - start, 1e-9))
    return {"name": name, "num_samples": sum(lengths), "filenames": filenames, "shard_lengths": lengths}, classes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("root", type=Path, help="ImageFolder root: ROOT/<split>/<class>/<image>")
    parser.add_argument("out", type=Path, help="output folder for the shards and _info.json")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], metavar="SRC[:NAME]",
                        help="split folders to write, each optionally renamed (test:val)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="write only the first N images of each (shuffled) split")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size must be positive, got {args.shard_size}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be positive, got {args.limit}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as err:
        return fail("vig-make-shards", err)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        if (args.out / INFO_NAME).exists():
            raise UsageError(f"{args.out / INFO_NAME} exists: write the shards to a new folder")
        splits, class_lists = {}, []
        for entry in args.splits:
            source, _, name = entry.partition(":")
            info, classes = write_split(args.root, source, name or source, args.out, args.shard_size, args.seed,
                                        args.limit)
            splits[info["name"]] = info
            class_lists.append(classes)
        if any(classes != class_lists[0] for classes in class_lists):
            raise UsageError(f"the splits of {args.root} do not hold the same class folders")
        (args.out / INFO_NAME).write_text(json.dumps({"name": args.root.name, "classes": class_lists[0],
                                                      "splits": splits}, indent=1))
    except UsageError as err:
        return fail("vig-make-shards", err)
    _LOGGER.info("wrote %s", args.out / INFO_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
