"""Pruning methods by name: one file each (a typed config and a rule), registered here, imported on first use."""

from __future__ import annotations

from typing import Any

from analysis.errors import ConfigError
from analysis.pruner.methods.base import HiddenObservation, MethodConfig, PruningMethod, SelectionState
from analysis.registry import Registry

METHODS: Registry[type[PruningMethod]] = Registry(
    "pruning method",
    {
        "visipruner": "analysis.pruner.methods.visipruner:VisiPruner",
        "fastv": "analysis.pruner.methods.fastv:FastV",
        "random": "analysis.pruner.methods.random_tokens:RandomTokens",
        "pre_llm": "analysis.pruner.methods.pre_llm:PreLLM",
        "dart": "analysis.pruner.methods.dart:DART",
        "cdpruner": "analysis.pruner.methods.cdpruner:CDPruner",
        "pyramiddrop": "analysis.pruner.methods.pyramiddrop:PyramidDrop",
        "visionzip": "analysis.pruner.methods.visionzip:VisionZip",
        "none": "analysis.pruner.methods.unpruned:Unpruned",
    },
    hint="Write a PruningMethod subclass with its MethodConfig and add it to METHODS in "
    "analysis/pruner/methods/__init__.py, or call register_method(YourMethod)",
    error=ConfigError,
)


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Add a pruning method under its ``name`` (an error if the name is taken)."""
    return METHODS.register(cls.name, cls)


def method_for(config: Any) -> PruningMethod:
    """The method object of a pruning config, its parameters read from the config by name."""
    cls = METHODS.get(config.method)
    return cls(cls.config_type.from_values(config))


def sweep_baselines() -> list[str]:
    """The methods ``pruner sweep`` compares with VisiPruner at matched FLOPs."""
    return [name for name in METHODS.names() if METHODS.get(name).sweep_baseline]


__all__ = [
    "METHODS",
    "HiddenObservation",
    "MethodConfig",
    "PruningMethod",
    "SelectionState",
    "method_for",
    "register_method",
    "sweep_baselines",
]
