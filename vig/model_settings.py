"""How a model is built (`ModelSettings`), what a checkpoint records of it, and how a command line's settings
merge with the recorded ones.

`recorded_settings` reads the settings a checkpoint's training flags (``args``) or its classifier weights hold;
`merge_settings` combines them with given settings: a given model name or class count that contradicts the
checkpoint is a `SettingConflict`, other given settings win (`setting_overrides` lists them for a warning).
The file reading itself is `vig.checkpoint`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.models import get_pretrained_cfg

from vig.checkpoint import CheckpointError

# ``args.model`` of the published MobileViG / GreedyViG training scripts -> the name registered here
# (MobileViG registered the same names; GreedyViG registered GreedyViG_{S,M,B}).
PUBLISHED_MODEL_NAMES: dict[str, str] = {
    "GreedyViG_S": "greedyvig_s", "GreedyViG_M": "greedyvig_m", "GreedyViG_B": "greedyvig_b",
}
SETTING_NAMES: tuple[str, ...] = ("model", "img_size", "num_classes", "start_thresh", "dec")
# settings whose contradiction by a flag is an error (the weights cannot fit), not a warning
_BINDING_SETTINGS = ("model", "num_classes")


@dataclass
class ModelSettings:
    """How a model is built: registered name, input size, class count, SViG thresholds, extra kwargs.

    ``None`` (or an empty ``model_kwargs``) means "not given" on a command line, or "not recorded" in a
    checkpoint.
    """

    model: str | None = None
    img_size: int | None = None
    num_classes: int | None = None
    start_thresh: float | None = None
    dec: float | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def _recorded_args(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The training flags a checkpoint carries (``args`` as a dict or an ``argparse.Namespace``), else {}."""
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def classifier_outputs(model_name: str | None, state_dict: dict[str, torch.Tensor]) -> int | None:
    """Class count of the classifier weights in ``state_dict``, found through the model's timm pretrained
    config (its ``classifier`` entry names the module); None when that is unknown or absent."""
    if not model_name:
        return None
    try:
        config = get_pretrained_cfg(model_name)
    except (RuntimeError, ValueError):
        return None
    classifier = getattr(config, "classifier", None) if config is not None else None
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    for name in names:
        weight = state_dict.get(f"{name}.weight")
        if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
            return int(weight.shape[0])
    return None


def recorded_settings(checkpoint: dict[str, Any], state_dict: dict[str, torch.Tensor],
                      model_name: str | None = None) -> ModelSettings:
    """What ``checkpoint`` records of how its model was built (``model_name``: the model to assume when the
    checkpoint does not name one, as for bare state dicts).

    The flags of a train.py run (``args``: ``model`` or the top-level ``arch``, ``img_size``,
    ``num_classes``, ``start_thresh``, ``dec``, ``model_kwargs``); a class count that the flags
    leave open (taken from the data) is read off the classifier weights of ``state_dict``. A bare
    state dict (published ViG releases) records nothing but that class count, once the model is known.
    """
    args = _recorded_args(checkpoint)

    def number(key: str, kind: type) -> Any:
        value = args.get(key)
        return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    model = checkpoint.get("arch") if isinstance(checkpoint.get("arch"), str) else args.get("model")
    model = PUBLISHED_MODEL_NAMES.get(model, model) if isinstance(model, str) and model else None
    num_classes = number("num_classes", int)
    if num_classes is None:
        num_classes = classifier_outputs(model or model_name, state_dict)
    kwargs = args.get("model_kwargs")
    return ModelSettings(
        model=model,
        img_size=number("img_size", int),
        num_classes=num_classes,
        start_thresh=number("start_thresh", float),
        dec=number("dec", float),
        model_kwargs=dict(kwargs) if isinstance(kwargs, dict) else {},
    )


@dataclass(frozen=True)
class SettingOverride:
    """A setting given for the weights of ``source`` that differs from the one the checkpoint records
    (``key``: the entry of ``model_kwargs``, else None)."""

    name: str
    given: Any
    recorded: Any
    source: str
    key: str | None = None


class SettingConflict(CheckpointError):
    """A given model name or class count that contradicts the checkpoint: its weights cannot fit."""

    def __init__(self, conflict: SettingOverride) -> None:
        self.conflict = conflict
        super().__init__(f"{conflict.name} {conflict.given} contradicts {conflict.source}, which holds a "
                         f"{conflict.name.replace('_', ' ')} of {conflict.recorded}")


def setting_overrides(given: ModelSettings, recorded: ModelSettings, source: str) -> list[SettingOverride]:
    """The settings of ``given`` that are set and differ from ``recorded`` (the checkpoint ``source``'s),
    in `SETTING_NAMES` order, then the differing ``model_kwargs`` entries."""
    differing = [SettingOverride(name, getattr(given, name), getattr(recorded, name), source)
                 for name in SETTING_NAMES
                 if None not in (getattr(given, name), getattr(recorded, name))
                 and getattr(given, name) != getattr(recorded, name)]
    differing.extend(SettingOverride("model_kwargs", value, recorded.model_kwargs[key], source, key)
                     for key, value in given.model_kwargs.items()
                     if key in recorded.model_kwargs and recorded.model_kwargs[key] != value)
    return differing


def merge_settings(given: ModelSettings, recorded: ModelSettings, source: str) -> ModelSettings:
    """The settings to build a model for the weights of ``source``: each one from ``given`` where set,
    else from ``recorded`` (the checkpoint, see `recorded_settings`).

    A given ``model`` or ``num_classes`` that contradicts the checkpoint is an error (the weights cannot
    fit another architecture or classifier); ``img_size``, ``start_thresh``, ``dec`` and each
    ``model_kwargs`` key win (evaluating at another resolution or threshold is a legitimate
    experiment; `setting_overrides` lists them, for the caller to report). The class count of the
    checkpoint also applies when ``given`` has none.

    Raises:
        SettingConflict: ``model`` or ``num_classes`` contradicts the checkpoint (one line naming both).
    """
    for difference in setting_overrides(given, recorded, source):
        if difference.name in _BINDING_SETTINGS:
            raise SettingConflict(difference)
    merged = ModelSettings(model_kwargs={**recorded.model_kwargs, **given.model_kwargs})
    for name in SETTING_NAMES:
        flag = getattr(given, name)
        setattr(merged, name, flag if flag is not None else getattr(recorded, name))
    return merged
