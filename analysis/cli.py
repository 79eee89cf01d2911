"""Shared plumbing for the ``python -m analysis.*`` commands: logging and one-line user errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from analysis.errors import ToolkitError


def run_cli(body: Callable[[], int], *, verbose: bool = False) -> int:
    """Run a command body; a ToolkitError becomes one line on stderr and exit status 2."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return body()
    except ToolkitError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
