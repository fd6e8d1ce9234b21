"""Command-line flags of train.py, the `-c config.yaml` defaults, and validation of user input.

Flag names and meanings follow timm's published training script (docs/training.md, "timm train.py flags", lists
where they differ), plus the ViG/SViG additions (`--pretrain_path`, `--start-thresh`, `--dec`,
`--repeated-aug`, `--tta`) and `--kd-pretrained-path` / `--log-tensorboard`. `parse_args` returns the
typed `vig.trainer.config.TrainConfig`, whose sections check the values; every user mistake found
here or there raises `UsageError` with a one-line message.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import logging
import sys
import types
import typing
from typing import Any, Iterator, Sequence

import yaml

from vig.console import OneLineErrorParser
from vig.errors import UsageError
from vig.model_settings import ModelSettings, SettingConflict, SettingOverride, merge_settings, setting_overrides
from vig.trainer.config import FLIP_TTA, SECTION_TITLES, FlagSpec, TrainConfig, flag_fields

_LOGGER = logging.getLogger(__name__)

# keys that configs written by earlier versions hold, of flags since removed: accepted with the value that did
# nothing, refused with any other
RETIRED_KEYS = {
    # datasets >= 4.0 (this project needs >= 5.2) runs no loading scripts: the flag could only fail
    "dataset_trust_remote_code": (False, "--dataset-trust-remote-code was removed: the datasets release this "
                                         "project needs (>= 5.2) runs no loading scripts; convert the dataset to "
                                         "parquet / data files"),
}


def _flag_groups() -> Iterator[tuple[str | None, type]]:
    """Where the flags are declared: `TrainConfig` itself (``-c``; no --help group), then each section with its
    --help group title."""
    yield None, TrainConfig
    hints = typing.get_type_hints(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
        if dataclasses.is_dataclass(hints[item.name]):
            yield SECTION_TITLES[item.name], hints[item.name]


# the K=V flags (parsed into a dict of Python literals): the config fields marked ``kwargs``
KWARGS_FLAGS = tuple(item.name for _, section in _flag_groups() for item, spec in flag_fields(section) if spec.kwargs)


def parse_model_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """Turn ["k=v", ...] into a dict; values are Python literals when they parse as one, else strings."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-kwargs expects key=value pairs, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return kwargs


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, but a help text that states its default itself ("(default: the model's)")
    does not get a second one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _value_shape(annotation: Any) -> tuple[Any, int | str | None]:
    """argparse ``type`` and ``nargs`` of a config field's annotation: ``int | None`` -> (int, None),
    ``tuple[float, float]`` -> (float, 2), ``tuple[float, ...]`` -> (float, None: the flag says + or *)."""
    options = [option for option in typing.get_args(annotation) if option is not type(None)]
    if typing.get_origin(annotation) in (types.UnionType, typing.Union) and len(options) == 1:
        annotation = options[0]
    if typing.get_origin(annotation) is tuple:
        items = typing.get_args(annotation)
        if len(items) == 2 and items[1] is Ellipsis:
            return (None if items[0] is str else items[0]), None
        return (None if items[0] is str else items[0]), len(items)
    return (annotation if annotation in (int, float) else None), None


def _add_flag(group: Any, item: dataclasses.Field, spec: FlagSpec, annotation: Any) -> None:
    """One argparse argument for a config field, its default the field's."""
    default = item.default if item.default is not dataclasses.MISSING else item.default_factory()  # type: ignore[misc]
    options: dict[str, Any] = {"default": default, "help": spec.help, "metavar": spec.metavar}
    if spec.choices is not None:
        options["choices"] = spec.choices
    if annotation is bool:
        del options["metavar"]
        options["action"] = "store_true"
    elif spec.kwargs:
        options.update(nargs="*", metavar=spec.metavar or "K=V")
    else:
        value_type, nargs = _value_shape(annotation)
        if value_type is not None:
            options["type"] = value_type
        if spec.nargs is not None or nargs is not None:
            options["nargs"] = spec.nargs or nargs
        if spec.const is not None:
            options["const"] = spec.const
    if spec.positional:
        group.add_argument(item.name, nargs="?", **{key: value for key, value in options.items() if key != "nargs"})
    else:
        group.add_argument(*(spec.names or (_option(item.name),)), dest=item.name, **options)


def build_parser() -> argparse.ArgumentParser:
    """All flags of train.py, generated from the fields of `TrainConfig` and its sections (one group each)."""
    parser = OneLineErrorParser(prog="train.py", formatter_class=_HelpFormatter,
                                description="Train or evaluate ViG / SViG (or any timm) models, on one device or "
                                            "distributed.",
                                allow_abbrev=False)  # a prefix is no flag: --checkpoint is not --checkpoint-hist
    for title, section in _flag_groups():
        _add_flags(parser if title is None else parser.add_argument_group(title), section)
    return parser


def _add_flags(group: Any, section: type) -> None:
    """The flags of one config section (or of `TrainConfig` itself) into ``group``."""
    hints = typing.get_type_hints(section)
    for item, spec in flag_fields(section):
        _add_flag(group, item, spec, hints[item.name])


def _read_config(path: str) -> dict[Any, Any]:
    """The mapping a YAML config file holds ({} for an empty file)."""
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except OSError as err:
        raise UsageError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UsageError(f"config {path} must be a mapping of flag names to values")
    return loaded


def _flag_name(action: argparse.Action) -> str:
    long_options = [option for option in action.option_strings if option.startswith("--")]
    return long_options[0] if long_options else str(action.metavar or action.dest)


def _flag_tokens(action: argparse.Action, value: Any) -> list[str]:
    """The command-line tokens that give ``action`` the config value ``value``; UsageError if no tokens can."""
    name = _flag_name(action)
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise UsageError(f"{name} is a switch: expected true or false, got {value!r}")
        return [name] if value != action.default else []
    many = action.nargs not in (None, "?")
    values = value if many and isinstance(value, list) else [value]
    if any(isinstance(item, bool) or not isinstance(item, (str, int, float)) for item in values):
        expected = "a value or a list of values" if many else "one value"
        raise UsageError(f"{name} takes {expected}, got {value!r}")
    strings = [str(item) for item in values]
    if not action.option_strings:
        return ["--", *strings]
    return [name, *strings] if many else [f"{name}={strings[0]}"]


def _config_value(parser: argparse.ArgumentParser, action: argparse.Action, value: Any) -> Any:
    """``value`` from a config, converted and checked as the flag's tokens would be (type, choices, nargs)."""
    if value is None and action.nargs != 0:
        if action.default is not None:
            raise UsageError(f"{_flag_name(action)} takes a value, not null (its default is {action.default!r})")
        return None
    if action.dest == "tta" and isinstance(value, bool):  # the seed recipe's switch: true = flip TTA
        return FLIP_TTA if value else 0
    if action.dest in KWARGS_FLAGS and isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise UsageError(f"{_flag_name(action)} takes a mapping with string keys, got {value!r}")
        return dict(value)
    parsed = getattr(parser.parse_args(_flag_tokens(action, value)), action.dest)
    return parse_model_kwargs(parsed) if action.dest in KWARGS_FLAGS else parsed


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Map a YAML config's keys (dashes or underscores) onto parser destinations, with checked values.

    Each value goes through the parser as the equivalent flag tokens, so a config is held to the same
    types, choices and value counts as the command line.
    """
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    defaults = {}
    for key, value in _read_config(path).items():
        dest = str(key).replace("-", "_")
        if dest in RETIRED_KEYS:
            harmless, reason = RETIRED_KEYS[dest]
            if value != harmless:
                raise UsageError(f"config {path}: key {key!r}: {reason}")
            continue
        if dest not in actions:
            raise UsageError(f"config {path}: unknown key {key!r}")
        try:
            defaults[dest] = _config_value(parser, actions[dest], value)
        except UsageError as err:
            raise UsageError(f"config {path}: key {key!r}: {err}") from None
    return defaults


def bare_tta_as_flip(argv: Sequence[str]) -> list[str]:
    """``argv`` with a bare ``--tta`` (the seed recipe's switch) spelled ``--tta=2`` when the next token is not an
    integer: argparse would otherwise take the next token, e.g. the data folder of ``--tta /data``, as the factor."""
    tokens = list(argv)
    for index, token in enumerate(tokens):
        if token == "--":
            break
        if token == "--tta":
            following = tokens[index + 1] if index + 1 < len(tokens) else ""
            if not following.lstrip("-").isdigit():
                tokens[index] = f"--tta={FLIP_TTA}"
    return tokens


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse flags (after applying `-c config.yaml` defaults) into the checked, typed run config."""
    argv = bare_tta_as_flip(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # -c alone, read before the other flags' defaults
    config_parser = OneLineErrorParser(add_help=False, allow_abbrev=False)
    _add_flags(config_parser, TrainConfig)
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_config_defaults(parser, known.config))
    flags = vars(parser.parse_args(argv))
    for key in KWARGS_FLAGS:
        if not isinstance(flags[key], dict):
            flags[key] = parse_model_kwargs(flags[key])
    return TrainConfig.from_flags(flags)


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def conflict_message(error: SettingConflict) -> str:
    """The flag advice for a model name / class count that contradicts a checkpoint (one line)."""
    conflict = error.conflict
    option = _option(conflict.name)
    return (f"{option} {conflict.given} contradicts {conflict.source}, which holds a "
            f"{conflict.name.replace('_', ' ')} of {conflict.recorded}; drop {option} to use the checkpoint's")


def override_message(override: SettingOverride) -> str:
    """The warning for a flag that wins over a checkpoint's recorded setting."""
    if override.key is not None:
        return (f"--model-kwargs {override.key}={override.given!r} overrides {override.key} of {override.source} "
                f"(trained with {override.recorded!r})")
    return (f"{_option(override.name)} {override.given} overrides {override.name} of {override.source} "
            f"(trained with {override.recorded})")


def merge_flag_settings(given: ModelSettings, recorded: ModelSettings, source: str, prefix: str = "") -> ModelSettings:
    """`vig.model_settings.merge_settings` of the flags' settings with a checkpoint's, worded in flags: each flag
    that overrides a recorded setting logs a warning, a contradiction is a UsageError (``prefix`` + advice)."""
    try:
        merged = merge_settings(given, recorded, source)
    except SettingConflict as err:
        raise UsageError(prefix + conflict_message(err)) from None
    for override in setting_overrides(given, recorded, source):
        _LOGGER.warning("%s", override_message(override))
    return merged
