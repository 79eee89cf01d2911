"""Shared plumbing for the ``python -m analysis.*`` commands: logging, one-line user errors, interrupts."""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from analysis.errors import RunInterrupted, ToolkitError

# The exit status of a process stopped by SIGINT, as shells report it.
INTERRUPTED_STATUS = 130


def resume_command(command: str, argv: Sequence[str], root: Path) -> str:
    """The command line that continues an interrupted run: the same arguments, its folder and --resume."""
    args = [arg for arg in argv if arg != "--no-resume"]
    if not any(arg == "--out" or arg.startswith("--out=") for arg in args):
        args += ["--out", str(root)]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([*command.split(), *args])


def run_cli(
    body: Callable[[], int], *, verbose: bool = False, command: str | None = None, argv: Sequence[str] | None = None
) -> int:
    """Run a command body; a ToolkitError becomes one line on stderr and exit status 2, Ctrl-C one line and 130.

    ``command`` and ``argv`` (default ``sys.argv[1:]``) make the interrupt message print the command that resumes.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from analysis.models.hf import untested_release

    warning = untested_release()
    if warning:
        logging.getLogger("analysis").warning(warning)
    try:
        return body()
    except RunInterrupted as stop:
        arguments = sys.argv[1:] if argv is None else argv
        continuation = f"; continue with: {resume_command(command, arguments, stop.root)}" if command else ""
        sys.stderr.write(f"interrupted: {stop}{continuation}\n")
        return INTERRUPTED_STATUS
    except KeyboardInterrupt:
        sys.stderr.write("interrupted before any new result was written\n")
        return INTERRUPTED_STATUS
    except ToolkitError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
