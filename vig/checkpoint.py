"""Safe reading of checkpoint files and strict loading of their weights into a model.

Files come in the shapes the published ViG / SViG releases use:

* a bare state dict ``{name: tensor}`` (ViG releases);
* a dict written by timm's checkpoint saver, with ``state_dict`` and optionally ``state_dict_ema``,
  ``optimizer``, ``args`` (an ``argparse.Namespace``), ``epoch``, ``metric``, ... (SViG releases);
* a dict with the weights under ``model`` (and optionally ``model_ema``).

Parameter names may carry the ``module.`` prefix that DistributedDataParallel adds.

Files are unpickled with ``torch.load(weights_only=True)``: only tensors, plain containers and the
few data-only types in `SAFE_GLOBALS` are rebuilt. A file whose unpickling would call anything
else (and so could run code) is refused before anything runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from timm.models import get_pretrained_cfg
from torch import nn

_logger = logging.getLogger(__name__)

# Plain data types that published checkpoints hold besides tensors: the training flags
# (argparse.Namespace) and numpy scalars (metrics) with their dtypes. Nothing here runs code.
_NUMPY_SCALAR = np._core.multiarray.scalar
SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    _NUMPY_SCALAR,
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),
    np.dtype,
    np.dtypes.Float64DType,
    np.dtypes.Float32DType,
    np.dtypes.Int64DType,
    np.dtypes.Int32DType,
    np.dtypes.BoolDType,
]

_WEIGHT_KEYS: tuple[str, ...] = ("state_dict", "model")
_EMA_KEYS: tuple[str, ...] = ("state_dict_ema", "model_ema")
_DDP_PREFIX = "module."
# ``args.model`` of the published MobileViG / GreedyViG training scripts -> the name registered here
# (MobileViG registered the same names; GreedyViG registered GreedyViG_{S,M,B}).
PUBLISHED_MODEL_NAMES: dict[str, str] = {
    "GreedyViG_S": "greedyvig_s", "GreedyViG_M": "greedyvig_m", "GreedyViG_B": "greedyvig_b",
}
_LISTED_KEYS = 5


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; the message is one line naming the file."""


@dataclass
class LoadReport:
    """What `load_checkpoint` did: which entry of the file it used and the keys it could not match.

    With ``strict=True`` the three lists are always empty (a mismatch raises instead).
    """

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[str] = field(default_factory=list)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _refused_global(message: str) -> str | None:
    """The name of the global that the weights-only unpickler refused, if the message names one."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    return found.group(1) if found else None


# sentences of torch's messages that give advice rather than a cause (some suggest weights_only=False)
_ADVICE = re.compile(r"If you are seeing this error|weights_only|Re-running torch\.load|Please file an issue|"
                     r"Check the documentation|In PyTorch 2\.6|You can use|Do it only if|WeightsUnpickler error",
                     re.IGNORECASE)


def whole_reason(text: object, limit: int = 200) -> str:
    """An exception's message as whole sentences on one line: torch's advice dropped, then as many whole
    sentences as fit in ``limit`` characters (the first one always, however long); never cut mid-sentence."""
    sentences = [sentence for sentence in re.split(r"(?<=[.!?])\s+", _one_line(str(text)))
                 if sentence and not _ADVICE.search(sentence)]
    kept: list[str] = []
    for sentence in sentences:
        if kept and len(" ".join([*kept, sentence])) > limit:
            break
        kept.append(sentence)
    return " ".join(kept).rstrip(".") or "no reason given"


def _first_sentence(reason: str) -> str:
    """The unpickler's reason without torch's advice that follows it (which may suggest weights_only=False)."""
    return whole_reason(re.split(r"(?<=[.!?])\s", reason.strip(), maxsplit=1)[0])


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Safely unpickle a checkpoint file onto the CPU and return its top-level dict.

    Raises:
        CheckpointError: the file is missing, truncated, not a PyTorch file, would need code to
            be run to unpickle, or does not hold a dict.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise CheckpointError(f"{name}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _refused_global(str(error))
        if refused is not None:
            raise CheckpointError(
                f"{name}: refused to load: unpickling it would call {refused}, which is not plain data "
                "(a file that can run code is never loaded)"
            ) from None
        rejected = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(error))
        if rejected:
            raise CheckpointError(
                f"{name}: not a PyTorch checkpoint that loads safely (weights-only unpickler: "
                f"{_first_sentence(rejected.group(1))}); only torch.save files of tensors and plain data are "
                "loaded, and no file is ever unpickled in a way that could run code in it"
            ) from None
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint ({whole_reason(error)})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, TypeError,
            AttributeError, KeyError, IndexError) as error:
        detail = f"{type(error).__name__}: {whole_reason(error, limit=160)}"
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint, truncated or corrupt ({detail})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{name}: holds a {type(checkpoint).__name__}, not a checkpoint dict or state dict")
    if not checkpoint:
        raise CheckpointError(f"{name}: holds an empty dict")
    return checkpoint


def _is_state_dict(candidate: Any) -> bool:
    return isinstance(candidate, dict) and bool(candidate) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in candidate.items()
    )


def extract_state_dict(checkpoint: dict[str, Any], use_ema: bool = False,
                       source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Pick the weights out of a checkpoint dict and strip ``module.`` prefixes.

    Args:
        checkpoint: what `read_checkpoint` returned.
        use_ema: take the exponential-moving-average weights (``state_dict_ema`` / ``model_ema``).
        source: the file name, for error messages.

    Returns:
        (state dict, the entry it came from: ``'state_dict'``, ``'state_dict_ema'``, ``'model'``,
        ``'model_ema'`` or ``'bare state dict'``).
    """
    wanted = _EMA_KEYS if use_ema else _WEIGHT_KEYS
    entry = next((key for key in wanted if isinstance(checkpoint.get(key), dict)), None)
    if entry is not None:
        weights = checkpoint[entry]
    elif not use_ema and _is_state_dict(checkpoint):
        entry, weights = "bare state dict", checkpoint
    else:
        kind = "EMA weights" if use_ema else "weights"
        raise CheckpointError(
            f"{source}: no {kind} found (looked for {', '.join(wanted)}"
            f"{'' if use_ema else ' or a bare state dict'}); top-level keys: {', '.join(map(str, list(checkpoint)[:8]))}"
        )
    if not _is_state_dict(weights):
        raise CheckpointError(f"{source}: entry {entry!r} is not a state dict of named tensors")
    stripped = {key[len(_DDP_PREFIX):] if key.startswith(_DDP_PREFIX) else key: value for key, value in weights.items()}
    return stripped, entry


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED_KEYS])
    more = len(keys) - _LISTED_KEYS
    return f"{shown} (+{more} more)" if more > 0 else shown


def load_checkpoint(model: nn.Module, path: str | os.PathLike, use_ema: bool = False,
                    strict: bool = True) -> LoadReport:
    """Load the weights of a checkpoint file into ``model``.

    Args:
        model: the module to fill. If it has a method ``adapt_state_dict(state_dict) -> state_dict``
            (the ViG models resize the position embedding there) it is applied first.
        path: a bare state dict or a checkpoint dict (see the module docstring).
        use_ema: load ``state_dict_ema`` (``--model-ema``) instead of ``state_dict``.
        strict: with True (default) every key must be present in both and every shape must
            agree. With False, tensors that do not fit are skipped with a logged warning
            (fine-tuning with another class count).

    Returns:
        a `LoadReport`.

    Raises:
        CheckpointError: unreadable file, missing entry, or (strict) a key / shape mismatch; the
            message names the file and the first offending keys.
    """
    name = os.fspath(path)
    state_dict, entry = extract_state_dict(read_checkpoint(name), use_ema, name)
    return load_state_dict_into(model, state_dict, name, entry, strict)


def load_state_dict_into(model: nn.Module, state_dict: dict[str, torch.Tensor], name: str, entry: str,
                         strict: bool = True) -> LoadReport:
    """Load an extracted state dict into ``model`` as `load_checkpoint` does; ``name`` / ``entry`` (the file
    and the entry the weights came from) appear in the messages."""
    adapt = getattr(model, "adapt_state_dict", None)
    if callable(adapt):
        state_dict = adapt(state_dict)
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    mis_shaped = [
        f"{key} (file {tuple(state_dict[key].shape)}, model {tuple(own[key].shape)})"
        for key in own if key in state_dict and state_dict[key].shape != own[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listed(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped {_listed(mis_shaped)}")
    if problems and strict:
        raise CheckpointError(
            f"{name}: {entry} does not fit {type(model).__name__} (wrong model size or class count?): "
            + "; ".join(problems)
        )
    fitting = {key: value for key, value in state_dict.items() if key in own and value.shape == own[key].shape}
    model.load_state_dict(fitting, strict=False)
    if problems:
        _logger.warning("%s: loaded %s non-strictly, skipped: %s", name, entry, "; ".join(problems))
    else:
        _logger.info("%s: loaded %s (%d tensors)", name, entry, len(fitting))
    return LoadReport(
        source=entry,
        missing=missing,
        unexpected=unexpected,
        mis_shaped=[item.split(" ", 1)[0] for item in mis_shaped],
    )


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn`` for this project's models: what `load_checkpoint` does before loading.

    Takes a bare state dict or a checkpoint dict, strips ``module.`` prefixes, and applies the model's
    ``adapt_state_dict`` when it has one (the ViG models resize ``pos_embed`` to their grid). Of a checkpoint
    dict it uses the ``state_dict`` / ``model`` entry, or ``state_dict_ema`` / ``model_ema`` where the model's
    pretrained config (a published tag, `vig.models.pretrained.VigPretrainedCfg`) says its weights are the
    EMA ones. A tag of headless weights (pretrained ``num_classes`` 0) on a model without a classifier drops the
    file's classifier tensors. So ``timm.create_model(name, pretrained=True)``, the same with
    ``pretrained_cfg_overlay=dict(file=path)`` (any ``img_size``), and
    ``timm.models.load_checkpoint(model, path, filter_fn=checkpoint_filter_fn)`` load published files.
    """
    config = getattr(model, "pretrained_cfg", None) or {}
    use_ema = bool(config.get("use_ema")) and any(isinstance(state_dict.get(key), dict) for key in _EMA_KEYS)
    weights, _ = extract_state_dict(state_dict, use_ema=use_ema, source="pretrained weights")
    if config.get("num_classes") == 0 and getattr(model, "num_classes", None) == 0:
        classifier = config.get("classifier")
        names = [classifier] if isinstance(classifier, str) else list(classifier or [])
        weights = {key: value for key, value in weights.items()
                   if not any(key in (f"{name}.weight", f"{name}.bias") for name in names)}
    adapt = getattr(model, "adapt_state_dict", None)
    return adapt(weights) if callable(adapt) else weights


# --- construction settings recorded in checkpoints ---------------------------------------------------------

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
