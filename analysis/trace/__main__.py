"""``python -m analysis.trace``: trace per-layer attention statistics of a model over a dataset."""

from __future__ import annotations

import argparse
import sys

from analysis.cli import run_cli
from analysis.config import HelpFormatter, add_arguments, from_namespace
from analysis.distributed import current_world
from analysis.trace.run import TraceConfig, run_trace
from analysis.trace.summary import format_summary, layer_summary


def build_parser() -> argparse.ArgumentParser:
    """The trace command's argument parser, generated from TraceConfig."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.trace",
        description=(
            "Trace per-layer, per-head attention statistics (mass on system / image / instruction tokens, "
            "image-token sinks, value norms) and write parquet tables plus a manifest to a run folder."
        ),
        formatter_class=HelpFormatter,
    )
    add_arguments(parser, TraceConfig)
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no per-layer summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the trace, print where results went and a per-layer summary."""
    args = build_parser().parse_args(argv)
    config = from_namespace(TraceConfig, args)

    def body() -> int:
        result = run_trace(config, progress=not args.quiet)
        if not current_world().main:  # under torchrun, rank 0 reports for every rank
            return 0
        sys.stdout.write(f"results: {result.out_dir.resolve()} ({result.n_samples} samples, {result.n_new} new)\n")
        if not args.quiet:
            sys.stdout.write("per-layer means over samples and heads:\n")
            sys.stdout.write(format_summary(layer_summary(result.out_dir)) + "\n")
        return 0

    return run_cli(body, command="python -m analysis.trace", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
