"""User-facing errors: each message says what is wrong and how to fix it."""

from __future__ import annotations


class ToolkitError(Exception):
    """An error caused by the user's input or environment, reported as one line without a traceback."""


class ConfigError(ToolkitError):
    """A command's configuration is invalid or conflicts with an existing run."""


class ModelError(ToolkitError):
    """A model cannot be resolved, loaded or understood by any adapter."""


class DataError(ToolkitError):
    """A dataset, split or sample cannot be loaded or is unusable."""
