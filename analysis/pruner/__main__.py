"""``python -m analysis.pruner export RUN_DIR -o config.json``: derive a pruning config from a calibration run."""

from __future__ import annotations

import argparse
import sys

from analysis.cli import run_cli
from analysis.config import add_arguments, from_namespace
from analysis.errors import ConfigError
from analysis.pruner.export import ExportConfig, derive, describe, write


def main(argv: list[str] | None = None) -> int:
    """Parse the subcommand and run it."""
    parser = argparse.ArgumentParser(prog="python -m analysis.pruner", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="choose a VisiPruner config from a probe run",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    export.add_argument("run_dir", help="probe run with knockout (upto/from) and contribution probes")
    export.add_argument("-o", "--output", required=True, help="our config JSON; the authors' JSON goes beside it")
    add_arguments(export, ExportConfig)
    args = parser.parse_args(argv)
    config = from_namespace(ExportConfig, args)

    def body() -> int:
        result = derive(args.run_dir, config)
        if not result.met:
            raise ConfigError(describe(result))
        ours, authors = write(result, args.output)
        sys.stdout.write(f"{describe(result)}\nwrote {ours} and {authors}\n")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
