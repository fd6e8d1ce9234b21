"""Experiment logs besides summary.csv: Weights & Biases (`--log-wandb`) and TensorBoard (`--log-tensorboard`).

summary.csv stays the record of a run; these sinks receive the same per-epoch row (every number in it,
keyed by its column name, at step = epoch) on the primary rank. Both packages are optional
(``pip install 'vig-toolkit[logging]'``); asking for a sink whose package is missing is a one-line
UsageError before training starts. wandb honours its own environment (WANDB_MODE=offline writes the run under
./wandb, or WANDB_DIR, without a network).
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from vig.errors import UsageError

if TYPE_CHECKING:
    from vig.trainer.config import LoggingSection

__all__ = ["ExperimentLoggers"]

_LOGGER = logging.getLogger(__name__)


def _import(module: str, package: str, flag: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{flag} needs the package {package}: pip install 'vig-toolkit[logging]'") from None


class ExperimentLoggers:
    """The sinks the logging section asks for; `log(row)` writes one summary row to each, `close()` ends them.

    ``flags`` (the run's flat flags, `TrainConfig.to_flags`) become the W&B run's config.
    """

    def __init__(self, section: LoggingSection, flags: Mapping[str, Any], run_name: str, enabled: bool) -> None:
        self.wandb_run: Any = None
        self.writer: Any = None
        if not enabled:
            return
        if section.log_wandb:
            wandb = _import("wandb", "wandb", "--log-wandb")
            self.wandb_run = wandb.init(project=section.wandb_project, name=run_name, tags=list(section.wandb_tags),
                                        config={key: value for key, value in flags.items()
                                                if isinstance(value, (str, int, float, bool, list, type(None)))})
        if section.log_tensorboard:
            tensorboard = _import("torch.utils.tensorboard", "tensorboard", "--log-tensorboard")
            folder = Path(section.log_tensorboard)
            self.writer = tensorboard.SummaryWriter(log_dir=str(folder))
            _LOGGER.info("TensorBoard event files in %s", folder)

    def log(self, row: dict[str, Any]) -> None:
        """One epoch's summary row (column -> number; 'epoch' is the step)."""
        epoch = int(row["epoch"])
        values = {key: float(value) for key, value in row.items() if key != "epoch"}
        if self.wandb_run is not None:
            self.wandb_run.log({"epoch": epoch, **values}, step=epoch)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
