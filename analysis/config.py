"""Typed command configs: dataclasses that generate their CLI and refuse unknown keys."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import types
import typing
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

from analysis.errors import ConfigError

C = TypeVar("C", bound="DataclassInstance")


def option(
    default: Any,
    help: str,
    *,
    identity: bool = True,
    choices: tuple[Any, ...] | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A config field with CLI help; ``identity=False`` marks fields that don't change results; ``aliases`` are
    further flags for it."""
    return dataclasses.field(
        default=default, metadata={"help": help, "identity": identity, "choices": choices, "aliases": aliases}
    )


def _base_type(annotation: Any) -> tuple[type, bool]:
    """The concrete type behind ``X | None`` and whether None is allowed."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # annotations are postponed strings
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0], True
    return annotation, False


# What an optional option takes on the command line to mean None ("--limit all": the whole split).
NONE_WORDS = ("all", "none")


LIMIT_HELP = "{verb} the first N samples of the split, or all; default: all"
DEVICE_HELP = (
    "torch device (cpu, cuda, cuda:1), or auto to shard the model over every visible GPU through accelerate "
    "(--device-map auto is the same flag); default cuda if available"
)
# accelerate and lmms-eval users write --device-map auto for a sharded model.
DEVICE_ALIASES = ("--device-map",)


def optional_type(base: type) -> Any:
    """A CLI type for ``base | None`` options: a value of ``base``, or one of NONE_WORDS for None."""

    def parse(text: str) -> Any:
        if text.strip().lower() in NONE_WORDS:
            return None
        return base(text)

    parse.__name__ = base.__name__  # argparse names the type in its "invalid int value" message
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help, unless the help already says what the default is (None defaults
    mean "derived", which the help text explains)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.default is None:
            return help_text
        return super()._get_help_string(action) or help_text


def add_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one ``--flag`` per dataclass field, with its help text, type and default."""
    for field in dataclasses.fields(config_cls):
        base, optional = _base_type(field.type)
        flags = ["--" + field.name.replace("_", "-"), *field.metadata.get("aliases", ())]
        help_text = field.metadata.get("help", "")
        choices = field.metadata.get("choices")
        if base is bool:
            parser.add_argument(
                *flags, action=argparse.BooleanOptionalAction, default=field.default, help=help_text, dest=field.name
            )
            continue
        parser.add_argument(
            *flags,
            dest=field.name,
            type=optional_type(base) if optional else base,
            default=field.default,
            choices=choices,
            # The parsers use HelpFormatter, which appends the default itself.
            help=help_text,
            metavar=field.name.upper() if choices is None else None,
        )


def command_line(command: str, config_cls: type, values: dict[str, Any]) -> str:
    """The shell command that runs ``command`` with ``values``: a flag for every field that differs from its default."""
    words = command.split()
    for field in dataclasses.fields(config_cls):
        if field.name not in values or values[field.name] == field.default:
            continue
        value = values[field.name]
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        else:
            words += [flag, NONE_WORDS[0] if value is None else str(value)]
    return shlex.join(words)


def from_namespace(config_cls: type[C], namespace: argparse.Namespace) -> C:
    """Build a config from parsed CLI arguments."""
    names = {field.name for field in dataclasses.fields(config_cls)}
    return config_cls(**{name: getattr(namespace, name) for name in names})


def from_dict(config_cls: type[C], values: dict[str, Any]) -> C:
    """Build a config from a mapping; unknown keys are an error that lists the known ones."""
    names = [field.name for field in dataclasses.fields(config_cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown {config_cls.__name__} keys {unknown}; known keys: {names}")
    return config_cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as a JSON-ready mapping."""
    return dataclasses.asdict(config)


def identity_dict(config: Any) -> dict[str, Any]:
    """The fields that determine a run's results (two runs may share a folder only if these match)."""
    return {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(config)
        if field.metadata.get("identity", True)
    }


def run_identity(config: Any, split: str) -> dict[str, Any]:
    """A run's identity: its identity fields, the resolved split and a fingerprint of the model's local weights."""
    from analysis.models.registry import weights_fingerprint

    return {**identity_dict(config), "split": split, "weights": weights_fingerprint(config.model)}


def config_hash(values: dict[str, Any]) -> str:
    """A short stable hash of a JSON-ready mapping."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
