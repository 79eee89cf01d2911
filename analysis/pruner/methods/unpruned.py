"""The unpruned reference: a method that keeps every token, so evaluation compares like with like."""

from __future__ import annotations

from dataclasses import dataclass

from analysis.pruner.methods.base import MethodConfig, PruningMethod


@dataclass(frozen=True)
class UnprunedConfig(MethodConfig):
    """No parameters."""


class Unpruned(PruningMethod):
    """Keeps everything; the executors leave the model untouched."""

    name = "none"
    config_type = UnprunedConfig
    label = "unpruned"
    description = "no pruning (the reference)"
    prunes = False
