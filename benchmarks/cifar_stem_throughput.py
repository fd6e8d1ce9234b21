"""CPU training throughput of the CIFAR-stem models, for planning runs (issue #17; not a test).

Times ``--steps`` training steps (forward, backward and a timm AdamW step) of each model at the given
batch on random 32 x 32 input, and prints a Markdown table with images per second of the last step
(the first steps include one-off allocation). Run it on an otherwise idle machine: the figure is only
as good as the CPU time the step got.

    python benchmarks/cifar_stem_throughput.py [--batch-size 64] [--steps 3] [--threads N] [--models A B ...]
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
from timm.optim import create_optimizer_v2

import vig  # noqa: F401  (registers the models with timm)

MODELS = ("vig_ti_cifar", "svig_ti_cifar", "pvig_ti_cifar")


def step_seconds(model: torch.nn.Module, batch_size: int, steps: int) -> list[float]:
    """Wall-clock seconds of each of ``steps`` training steps on random (batch_size, 3, 32, 32) images."""
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    images = torch.randn(batch_size, 3, 32, 32)
    targets = torch.randint(0, model.num_classes, (batch_size,))
    model.train()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"models to time (default: {' '.join(MODELS)})")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch_size}, {args.steps} steps")
    print("| model | seconds per step | last step (img/s) |")
    print("|---|---|---|")
    for name in args.models:
        seconds = step_seconds(timm.create_model(name), args.batch_size, args.steps)
        print(f"| {name} | {', '.join(f'{s:.2f}' for s in seconds)} | {args.batch_size / seconds[-1]:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
