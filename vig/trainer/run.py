"""Training and evaluation runs: what train.py calls.

`run(config)` configures the failpoints (`vig.trainer.faults`), sets up the process group (see
vig.trainer.distributed), then trains (`vig.trainer.loop.train`: set-up in `vig.trainer.setup`, epochs in
`vig.trainer.loop`, one step in `vig.trainer.step`) or with `--evaluate` measures a checkpoint on the validation
split (`vig.trainer.evaluation`) and returns the result (primary rank only).

Fault tolerance: `--resume auto` continues from the run folder's interrupted.pth.tar (left by
SIGTERM / SIGUSR1 / SIGINT, `vig.trainer.resume`) or last.pth.tar (torchrun --max-restarts), repairing
what a kill in the save sequence left (`vig.trainer.saver`); each epoch reseeds every random generator
from (seed, epoch, rank), so a run resumed from the checkpoint of epoch k repeats the uninterrupted run
bit for bit; a damaged, foreign or
code-carrying checkpoint, a corrupt image and a non-finite loss end the run with one line.
"""
from __future__ import annotations

from typing import Any

from vig.trainer.config import TrainConfig
from vig.trainer.distributed import init_distributed, shutdown_distributed
from vig.trainer.evaluation import evaluate
from vig.trainer.faults import configure_from_env
from vig.trainer.loop import train
from vig.trainer.run_lock import release_run_lock
from vig.trainer.setup import seed_everything

__all__ = ["run"]


def run(config: TrainConfig) -> dict[str, Any] | None:
    """Train, or evaluate with --evaluate (returns the result dict on the primary rank)."""
    configure_from_env()
    ctx = init_distributed(config.distributed.local_rank, config.distributed.device)
    try:
        seed_everything(config.loop.seed, ctx.rank)
        if config.loop.evaluate:
            return evaluate(config, ctx)
        train(config, ctx)
        return None
    finally:
        release_run_lock()
        shutdown_distributed()
