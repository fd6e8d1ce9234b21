"""The CIFAR-line comparison table (issue #17): train each CIFAR model with its own recipe for the same
number of epochs through train.py, then print one Markdown table of parameters, MACs, seconds per epoch
and the FINAL epoch's test top-1 (no epoch is picked on the test split).

Each model runs as its own ``train.py`` process, one after another (so the seconds are comparable on
an otherwise idle machine), in ``OUTPUT/table-<model>-<epochs>ep``. A model whose folder already holds a
finished run of that many epochs is not trained again; its summary.csv is read. Seconds per epoch are
the wall-clock seconds of the whole process (start-up, training and validation) divided by the epochs.

    python benchmarks/cifar_table.py ../shared/data/cifar10-subset --epochs 1 [--models A B ...]
        [--output DIR] [-b 128] [-j 1] [-- extra train.py flags, e.g. --amp on a GPU]
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import timm

import vig  # noqa: F401  (registers the models with timm)
from vig.complexity import count_macs, count_parameters

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR_SIZE = 32

# Each model's own recipe as train.py flags, without epochs, batch size, data and output flags.
CONVMIXER_RECIPE = ("--opt adamw --lr 0.005 --weight-decay 0.01 --smoothing 0 --sched onecycle-linear "
                    "--train-crop rrc --scale 0.75 1 --ratio 1 1 --aa tv-rand-n2-m12 --color-jitter 0.2 "
                    "--force-color-jitter --reprob 0.2 --remode const")
# The published CNN + GAT recipe (200 epochs, 5 warm-up) without the warm-up, which short runs cannot hold.
GAT_RECIPE = ("--opt adamw --lr 1e-3 --weight-decay 1e-3 --warmup-epochs 0 --smoothing 0.1 --aa rand-n2-m9 "
              "--reprob 0.1 --tta")
# The published ViG / SViG ImageNet recipe without EMA and warm-up (both need hundreds of epochs).
VIG_RECIPE = ("--opt adamw --lr 2e-3 --weight-decay 0.05 --warmup-epochs 0 --smoothing 0.1 "
              "--aa rand-m9-mstd0.5-inc1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --drop-path 0.1")
RECIPES: dict[str, str] = {
    "cnn_gat_cifar": GAT_RECIPE,
    "convmixer_cifar": CONVMIXER_RECIPE,
    "convmixer_xl_cifar": CONVMIXER_RECIPE,
    "vig_ti_cifar": VIG_RECIPE,
    "svig_ti_cifar": VIG_RECIPE,
    "pvig_ti_cifar": VIG_RECIPE,
}
DEFAULT_MODELS = ("cnn_gat_cifar", "convmixer_cifar", "convmixer_xl_cifar", "vig_ti_cifar", "svig_ti_cifar")


def train_argv(args: argparse.Namespace, model: str, extra: list[str]) -> list[str]:
    """The train.py command line of one model's run."""
    return ["train.py", str(args.data), "--train-split", "train", "--val-split", "test", "--model", model,
            *RECIPES[model].split(), "--epochs", str(args.epochs), "-b", str(args.batch_size),
            "-j", str(args.workers), "--log-interval", "12", "--output", str(args.output),
            "--experiment", f"table-{model}-{args.epochs}ep", *extra]


def final_row(folder: Path, epochs: int) -> dict[str, str] | None:
    """The summary.csv row of the last epoch, or None when the run did not finish ``epochs`` epochs."""
    path = folder / "summary.csv"
    if not path.exists():
        return None
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows[-1] if len(rows) == epochs else None


def run_model(args: argparse.Namespace, model: str, extra: list[str]) -> dict[str, object]:
    """Train one model (unless its finished run is there) and return its table entry."""
    folder = args.output / f"table-{model}-{args.epochs}ep"
    timing = folder / "table_seconds.json"
    argv = train_argv(args, model, extra)
    if final_row(folder, args.epochs) is None:
        print(f"training {model}: {' '.join(['python', *argv])}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"error: train.py for {model} ended with exit code {done.returncode}")
        timing.write_text(json.dumps({"seconds": seconds}))
    row = final_row(folder, args.epochs)
    if row is None:
        sys.exit(f"error: {folder} holds no finished {args.epochs}-epoch run")
    network = timm.create_model(model)
    return {"model": model, "params": count_parameters(network), "macs": count_macs(network, CIFAR_SIZE),
            "seconds_per_epoch": json.loads(timing.read_text())["seconds"] / args.epochs,
            "top1": float(row["eval_top1"]), "command": " ".join(["python", *argv])}


def markdown(entries: list[dict[str, object]], epochs: int) -> str:
    """The table, one row per model."""
    lines = [f"| model | parameters | MACs (32 px) | s / epoch | test top-1 after epoch {epochs} |",
             "|---|---|---|---|---|"]
    for entry in entries:
        lines.append(f"| `{entry['model']}` | {entry['params'] / 1e6:.3f} M | {entry['macs'] / 1e9:.3f} G | "
                     f"{entry['seconds_per_epoch']:.0f} | {entry['top1']:.2f} % |")
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="ImageFolder root with train/ and test/ (CIFAR-10 images)")
    parser.add_argument("--epochs", type=int, required=True, help="epochs of every model's run")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(RECIPES))
    parser.add_argument("--output", type=Path, default=Path("output/cifar_table"), help="root of the run folders")
    parser.add_argument("-b", "--batch-size", type=int, default=128)
    parser.add_argument("-j", "--workers", type=int, default=1)
    args = parser.parse_args(argv)
    args.output = args.output.resolve()
    entries = [run_model(args, model, extra) for model in args.models]
    print("\n".join(f"{entry['model']}: {entry['command']}" for entry in entries))
    print(markdown(entries, args.epochs))


if __name__ == "__main__":
    main()
