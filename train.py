"""Train or evaluate ViG / SViG (or any timm) models; see README.md and `python train.py --help`.

Runs as `python train.py`, under `torchrun` and under `python -m torch.distributed.launch`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Sequence

from vig.console import fail, format_table
from vig.errors import RunError, UsageError
from vig.trainer.cli import parse_args
from vig.trainer.run import run
from vig.trainer.signals import Interrupted


def _setup_logging() -> None:
    """INFO on rank 0; errors alone on the other ranks, whose warnings would repeat rank 0's once per process."""
    primary = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if primary else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def _print_result(result: dict[str, Any]) -> None:
    """A readable table, then the result as one JSON object on the last line of standard output."""
    rows = [("model", result["model"]), ("checkpoint", result["checkpoint"] + (" (EMA)" if result["ema"] else "")),
            ("input", f"{result['img_size']} px, {result['num_classes']} classes"),
            ("graph", result["graph"]), ("flip TTA", "on" if result["tta"] else "off"),
            ("images", result["count"]),
            ("batches", f"{result['batch_size']} images, last {', '.join(map(str, result['last_batch_sizes']))}"),
            ("loss", f"{result['loss']:.4f}"),
            ("top-1 %", f"{result['top1']:.2f}"), ("top-5 %", f"{result['top5']:.2f}")]
    print(format_table(rows))
    print(json.dumps(result), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (2 for a user mistake, 1 for a run stopped by its data,
    numerics or storage)."""
    _setup_logging()
    rank = int(os.environ.get("RANK", "0"))
    try:
        config = parse_args(argv)
        result = run(config)
    except UsageError as err:
        if rank == 0:
            fail(None, err)
        return 2
    except RunError as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        elif err.rank_local:
            print(f"error: rank {rank}: {err}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as err:  # logged, with the checkpoint it saved, by the primary rank
        return 128 + err.signum
    except KeyboardInterrupt:  # Ctrl-C before training started or after it ended
        if rank == 0:
            print("error: interrupted (Ctrl-C); nothing of this run's training was lost", file=sys.stderr, flush=True)
        return 130
    if result is not None:
        _print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
