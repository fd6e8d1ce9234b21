"""A model built from a checkpoint file: the one read / merge / build / load sequence of train.py
(--initial-checkpoint, --evaluate), distillation (the teacher of --kd-pretrained-path) and vig-visualize.

`read_model_checkpoint` reads the file once and merges the settings its training flags record with the given
ones (`vig.trainer.cli.merge_flag_settings`: a flag that overrides a recorded setting is logged, one that
contradicts the weights is a UsageError); `CheckpointModel.build` builds the model (`vig.models.factory`) and
loads the weights strictly. `model_from_checkpoint` does both at once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from vig.checkpoint import CheckpointError, extract_state_dict, load_state_dict_into, read_checkpoint
from vig.errors import UsageError
from vig.model_settings import ModelSettings, recorded_settings
from vig.models.factory import create_model
from vig.trainer.cli import merge_flag_settings

_LOGGER = logging.getLogger(__name__)


@dataclass
class CheckpointModel:
    """A checkpoint read for its model: the file's dict and the settings to build the model with (the given
    settings merged with those the checkpoint records). ``flag`` names the file in messages ('' for none)."""

    path: str
    checkpoint: dict[str, Any]
    settings: ModelSettings
    flag: str = ""

    def _fail(self, err: Exception) -> UsageError:
        return UsageError(f"{self.flag}: {err}" if self.flag else str(err))

    def load_into(self, model: nn.Module, use_ema: bool = False) -> None:
        """Strictly load the checkpoint's (EMA) weights into ``model``; one-line UsageError when they do not fit."""
        try:
            state_dict, entry = extract_state_dict(self.checkpoint, use_ema, self.path)
            load_state_dict_into(model, state_dict, self.path, entry)
        except CheckpointError as err:
            raise self._fail(err) from None
        _LOGGER.info("loaded %sweights from %s", "EMA " if use_ema else "", self.path)

    def build(self, settings: ModelSettings | None = None, num_classes: int | None = None, use_ema: bool = False,
              label: str = "model", **create_kwargs: Any) -> nn.Module:
        """The model of ``settings`` (default: the merged `settings`) with ``num_classes`` outputs (default: the
        settings'), built by `build_checked` (``label``, ``create_kwargs``) and holding the checkpoint's (EMA)
        weights."""
        model = build_checked(settings or self.settings, num_classes, label, **create_kwargs)
        self.load_into(model, use_ema)
        return model


def build_checked(settings: ModelSettings, num_classes: int | None = None, label: str = "model",
                  **create_kwargs: Any) -> nn.Module:
    """`vig.models.factory.create_model`, the TypeError / ValueError of a model that rejects an argument turned
    into a one-line UsageError "``label`` NAME: reason"."""
    try:
        return create_model(settings, num_classes, **create_kwargs)
    except (TypeError, ValueError) as err:  # constructors reject bad arguments with these
        raise UsageError(f"{label} {settings.model}: {err}") from None


def read_model_checkpoint(path: str, given: ModelSettings, flag: str = "", default_model: str | None = None,
                          use_class_count: bool = True) -> CheckpointModel:
    """Read ``path`` and merge ``given`` with the settings it records (``default_model``: the model a bare state
    dict is assumed to be when ``given`` names none). Without ``use_class_count`` the recorded class count is
    left out (training takes its class count from the data). Errors are one-line UsageErrors, prefixed with
    ``flag``."""
    prefix = f"{flag}: " if flag else ""
    try:
        checkpoint = read_checkpoint(path)
        state_dict, _ = extract_state_dict(checkpoint, source=path)
        recorded = recorded_settings(checkpoint, state_dict, model_name=given.model or default_model)
    except CheckpointError as err:
        raise UsageError(prefix + str(err)) from None
    if not use_class_count:
        recorded.num_classes = None
    merged = merge_flag_settings(given, recorded, path, prefix=prefix)
    return CheckpointModel(path, checkpoint, merged, flag)


def model_from_checkpoint(path: str, given: ModelSettings, flag: str = "", label: str = "model",
                          use_ema: bool = False, **create_kwargs: Any) -> tuple[nn.Module, ModelSettings]:
    """`read_model_checkpoint` then `CheckpointModel.build`: the model holding the checkpoint's weights, and the
    settings it was built with."""
    source = read_model_checkpoint(path, given, flag)
    return source.build(use_ema=use_ema, label=label, **create_kwargs), source.settings
