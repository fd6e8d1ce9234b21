"""torchrun worker of tests/test_train_distributed.py: train.py's main, then this rank's weights to a file.

Usage: torchrun ... tests/train_worker.py OUT_DIR TRAIN_PY_ARGS...

Runs `train.main(TRAIN_PY_ARGS)` unchanged, watching two calls of vig.trainer.setup / run: the model as this rank
created it (before DDP makes every rank start from rank 0's), and what `train` returns, and the edge
targets the batch-graph model builds for its edge loss in the training loop (`vig.models.batch_graph.edge_targets`),
and how often DDP's no_sync was entered. Writes
OUT_DIR/rank<RANK>.pth holding the state dicts "initial", "model" and "ema" (None without --model-ema),
"edge_targets": one (targets, edge target (B, B)) pair per training step of this rank, and "no_sync": the
number of no_sync entries (backward passes without gradient all-reduce).
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import train
from vig.models import batch_graph
from vig.trainer import run as trainer_run
from vig.trainer import setup as trainer_setup
from vig.trainer.config import ModelSection, TrainConfig
from vig.trainer.distributed import DistributedContext


def main(out_dir: Path, train_argv: list[str]) -> int:
    seen: dict[str, Any] = {"edge_targets": [], "no_sync": 0}
    no_sync = DistributedDataParallel.no_sync

    def watched_no_sync(self: DistributedDataParallel):  # noqa: ANN202 - a context manager
        seen["no_sync"] += 1
        return no_sync(self)

    build_model = trainer_setup.build_model
    train_loop = trainer_run.train
    edge_targets = batch_graph.edge_targets

    def watched_edge_targets(targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        edge = edge_targets(targets, smoothing)
        seen["edge_targets"].append((targets.detach().clone(), edge.detach().clone()))
        return edge

    def watched_build_model(settings: ModelSection, num_classes: int, *args: Any, **kwargs: Any) -> nn.Module:
        model = build_model(settings, num_classes, *args, **kwargs)
        seen["initial"] = copy.deepcopy(model.state_dict())
        return model

    def watched_train(config: TrainConfig, ctx: DistributedContext) -> tuple[nn.Module, nn.Module | None]:
        model, model_ema = train_loop(config, ctx)
        seen["model"] = model.state_dict()
        seen["ema"] = model_ema.state_dict() if model_ema is not None else None
        return model, model_ema

    DistributedDataParallel.no_sync = watched_no_sync
    trainer_setup.build_model = watched_build_model
    trainer_run.train = watched_train
    batch_graph.edge_targets = watched_edge_targets
    status = train.main(train_argv)
    if status == 0:
        torch.save(seen, out_dir / f"rank{os.environ['RANK']}.pth")
    return status


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
