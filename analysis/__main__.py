"""``python -m analysis``: list the registered models and datasets."""

from __future__ import annotations

import argparse
import sys

from analysis.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    """List model aliases and/or dataset names."""
    parser = argparse.ArgumentParser(prog="python -m analysis", description="VisiPruner analysis toolkit.")
    parser.add_argument("--list-models", action="store_true", help="list model aliases and their sources")
    parser.add_argument("--list-datasets", action="store_true", help="list dataset names")
    args = parser.parse_args(argv)
    if not (args.list_models or args.list_datasets):
        parser.print_help()
        return 0

    def body() -> int:
        if args.list_models:
            from analysis.models.adapters import supported_model_types
            from analysis.models.registry import list_models

            sys.stdout.write("models (any hub id or local path of a supported model_type also works):\n")
            for alias, description in list_models().items():
                sys.stdout.write(f"  {alias:18s} {description}\n")
            sys.stdout.write(f"supported model_type: {', '.join(supported_model_types())}\n")
        if args.list_datasets:
            from analysis.data import list_datasets

            sys.stdout.write("datasets (a local folder with samples.jsonl or parquet files also works):\n")
            for name, description in list_datasets().items():
                sys.stdout.write(f"  {name:18s} {description}\n")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
