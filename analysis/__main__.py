"""``python -m analysis``: list the commands, the registered models and the datasets."""

from __future__ import annotations

import argparse
import sys

from analysis.cli import run_cli

# Every command of the toolkit, as ``python -m <module>``, with what it does.
COMMANDS = {
    "analysis.trace": "per-layer attention statistics of a model over a dataset, to a run folder",
    "analysis.probes": "causal probes (knockouts, masking, KV removal, logit lens, contributions, token ablation)",
    "analysis.stages": "stage boundaries S and D with bootstrap intervals, and critical tokens, from a probe run",
    "analysis.findings": "the paper's findings (sinks, S and D, masking, logit lens, critical tokens) as one table",
    "analysis.evaluate": "accuracy per question family, optionally under a pruning config",
    "analysis.pruner": "export a VisiPruner config from a probe run; sweep configs against baselines; ceiling",
    "analysis.organism.train": "train the model organism",
    "analysis.benchmarks.trace_overhead": "GPU benchmark: tracing against a plain forward",
    "analysis.benchmarks.pruned_speed": "GPU benchmark: pruned prefill and generate against the unpruned model",
    "analysis.benchmarks.probe_time": "CPU time of each probe against a plain evaluation",
}


def main(argv: list[str] | None = None) -> int:
    """List the commands, model aliases and/or dataset names."""
    listing = "\n".join(f"  python -m {name:36s} {what}" for name, what in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="VisiPruner analysis toolkit: how a multimodal LLM fuses vision and language, layer by layer.",
        epilog=f"commands (each takes --help):\n{listing}",
    )
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
