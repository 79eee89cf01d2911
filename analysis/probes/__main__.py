"""``python -m analysis.probes``: causal probes (knockouts, shallow masking, KV removal, logit lens, contributions)."""

from __future__ import annotations

import argparse
import sys

from analysis.cli import run_cli
from analysis.config import HelpFormatter, add_arguments, from_namespace
from analysis.distributed import current_world
from analysis.probes.run import ProbeConfig, run_probes


def build_parser() -> argparse.ArgumentParser:
    """The probe command's parser, generated from ProbeConfig."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.probes",
        description="Run causal probes over a dataset and write parquet tables plus a manifest to a run folder.",
        formatter_class=HelpFormatter,
    )
    add_arguments(parser, ProbeConfig)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the probes, print where results went."""
    args = build_parser().parse_args(argv)
    config = from_namespace(ProbeConfig, args)

    def body() -> int:
        result = run_probes(config, progress=not args.quiet)
        if not current_world().main:  # under torchrun, rank 0 reports for every rank
            return 0
        sys.stdout.write(f"results: {result.out_dir.resolve()} ({result.n_samples} samples, {result.n_new} new)\n")
        return 0

    return run_cli(body, command="python -m analysis.probes", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
