"""User-facing errors: each message says what is wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path


class ToolkitError(Exception):
    """An error caused by the user's input or environment, reported as one line without a traceback."""


class ConfigError(ToolkitError):
    """A command's configuration is invalid or conflicts with an existing run."""


class ModelError(ToolkitError):
    """A model cannot be resolved, loaded or understood by any adapter."""


class DataError(ToolkitError):
    """A dataset, split or sample cannot be loaded or is unusable."""


class RunInterrupted(KeyboardInterrupt):
    """The user interrupted a run (Ctrl-C); its folder keeps every batch committed before that.

    Still a KeyboardInterrupt, so a notebook or a caller's handler sees the interrupt as one."""

    def __init__(self, root: Path, n_kept: int, n_total: int) -> None:
        super().__init__(f"{root} keeps {n_kept} of {n_total} samples (every batch committed before the interrupt)")
        self.root = root
        self.n_kept = n_kept
        self.n_total = n_total
