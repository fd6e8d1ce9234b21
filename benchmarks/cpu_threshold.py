"""CPU cost of max-relative aggregation over threshold masks, and what it does to SViG-Ti training.

Prints two tables: (1) the aggregation op alone, forward + backward, for the three mask paths
(`max_relative_dense`, `max_relative_scatter` over the mask's edge list, `max_relative_ranked`) on
random masks of a given density; (2) training images/s (forward, backward, AdamW step) of
svig_ti_224_gelu and vig_ti_224_gelu at ``--img-size`` (16 x 16 = 256 nodes at 256).

    PYTHONPATH=$PWD python benchmarks/cpu_threshold.py [--threads 2] [--batch 32] [--skip-models | --skip-op]

With ``--skip-op`` and PYTHONPATH at an older checkout it times that checkout's models (the "before").
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import timm
import torch

import vig  # noqa: F401  (registers the models with timm)

PATHS: tuple[str, ...] = ("dense", "scatter", "ranked")


def _path(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The aggregation called ``name``; imported here so that ``--skip-op`` also times code without it."""
    from gcn_lib import mask_to_edge_index, max_relative_dense, max_relative_ranked, max_relative_scatter
    return {
        "dense": max_relative_dense,
        "scatter": lambda x, mask: max_relative_scatter(x, mask_to_edge_index(mask)),
        "ranked": max_relative_ranked,
    }[name]


def _median_seconds(step: Callable[[], object], repeats: int) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def op_table(batch: int, channels: list[int], nodes: int, densities: list[float], paths: list[str],
             repeats: int) -> list[str]:
    """Markdown rows: milliseconds of one forward + backward of each path."""
    rows = ["| B | C | N | mask density | " + " | ".join(f"{p} fwd+bwd ms" for p in paths) + " |",
            "|---" * (4 + len(paths)) + "|"]
    gen = torch.Generator().manual_seed(0)
    for c in channels:
        for density in densities:
            x = torch.randn(batch, c, nodes, 1, generator=gen).requires_grad_()
            mask = torch.rand(batch, nodes, nodes, generator=gen) < density
            grad = torch.randn(batch, c, nodes, 1, generator=gen)
            cells = []
            for name in paths:
                def step(fn=_path(name)) -> None:
                    x.grad = None
                    fn(x, mask).backward(grad)
                cells.append(f"{1000 * _median_seconds(step, repeats):,.0f}")
            rows.append(f"| {batch} | {c} | {nodes} | {density:g} | " + " | ".join(cells) + " |")
    return rows


def train_images_per_second(name: str, img_size: int, batch: int, steps: int) -> float:
    """Median images/s of a forward + backward + AdamW step (after one warm-up step)."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=img_size, num_classes=10).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, img_size, img_size)
    labels = torch.randint(0, 10, (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return batch / _median_seconds(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="training batch")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    parser.add_argument("--op-batch", type=int, default=64)
    parser.add_argument("--channels", type=int, nargs="+", default=[192, 384])
    parser.add_argument("--nodes", type=int, default=256)
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.9, 0.1, 0.035])
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--skip-op", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if not args.skip_op:
        print("\n".join(op_table(args.op_batch, args.channels, args.nodes, args.densities, args.paths, args.repeats)))
    if not args.skip_models:
        print(f"\n| model | img_size | batch | train img/s |\n|---|---|---|---|")
        for name in ("svig_ti_224_gelu", "vig_ti_224_gelu"):
            ips = train_images_per_second(name, args.img_size, args.batch, args.steps)
            print(f"| {name} | {args.img_size} | {args.batch} | {ips:.1f} |", flush=True)


if __name__ == "__main__":
    main()
