"""``python -m analysis.pruner export RUN_DIR -o config.json``: derive a pruning config from a calibration run.

``sweep`` evaluates configs against FLOPs-matched baselines; ``ceiling`` reads from a probe run how much any
image-token pruning can cut before it changes answers.
"""

from __future__ import annotations

import argparse
import sys

from analysis.cli import run_cli
from analysis.config import (
    DEVICE_ALIASES,
    DEVICE_HELP,
    LIMIT_HELP,
    HelpFormatter,
    add_arguments,
    from_namespace,
    optional_type,
)
from analysis.errors import ConfigError
from analysis.models.registry import DEFAULT_MODEL
from analysis.pruner.ceiling import CeilingConfig
from analysis.pruner.config import LAYER0_RULES
from analysis.pruner.export import ExportConfig, derive, describe, write


def main(argv: list[str] | None = None) -> int:
    """Parse the subcommand and run it."""
    parser = argparse.ArgumentParser(prog="python -m analysis.pruner", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export", help="choose a VisiPruner config from a probe run", formatter_class=HelpFormatter
    )
    export.add_argument("run_dir", help="probe run with knockout (upto/from) and contribution probes")
    export.add_argument("-o", "--output", required=True, help="our config JSON; the authors' JSON goes beside it")
    add_arguments(export, ExportConfig)
    sweep = commands.add_parser(
        "sweep",
        help="accuracy vs FLOPs of VisiPruner configs and FLOPs-matched baselines",
        formatter_class=HelpFormatter,
    )
    sweep.add_argument("configs", nargs="*", help="pruning config JSON files (ours or the authors')")
    sweep.add_argument("--model", default=DEFAULT_MODEL, help="model alias, hub id or local path")
    sweep.add_argument("--dataset", default="shapes-vqa", help="dataset name or local path")
    sweep.add_argument("--split", default=None, help="dataset split")
    sweep.add_argument("--limit", type=optional_type(int), default=None, help=LIMIT_HELP.format(verb="evaluate"))
    sweep.add_argument("--prune-layer", type=int, default=2, help="layer K of FastV and random pruning")
    sweep.add_argument("--batch-size", type=int, default=16, help="samples per generate call")
    sweep.add_argument(
        "--authors-rule",
        action="store_true",
        help="also run each VisiPruner config under the authors' rule (shallow weights zeroed after "
        "the softmax in the prefill only, selection rule in the model's dtype)",
    )
    sweep.add_argument(
        "--authors-layer0",
        default="auto",
        choices=("auto", *LAYER0_RULES),
        help="with --authors-rule or an authors' JSON: which of their layer-0 rules runs; auto: theirs "
        "for a LLaVA-1.5-7B or -13B architecture (other models with a shallow stage must name one)",
    )
    sweep.add_argument(
        "--budgets",
        action="store_true",
        help="also run every one-shot method at the classic token budgets (64 / 128 / 192 of LLaVA-1.5's 576 image "
        "tokens, scaled to the model's), with bootstrap intervals and per-family scores",
    )
    sweep.add_argument("--device", *DEVICE_ALIASES, default=None, help=DEVICE_HELP)
    sweep.add_argument(
        "-o", "--output", default=None, help="also write the table as CSV (the budget table beside it, -budgets.csv)"
    )
    ceiling = commands.add_parser(
        "ceiling",
        help="FLOPs cut of exiting vision at each layer next to the answers it changes, from a probe run",
        formatter_class=HelpFormatter,
    )
    ceiling.add_argument("run_dir", help="probe run with 'from' knockouts (python -m analysis.probes)")
    add_arguments(ceiling, CeilingConfig)
    args = parser.parse_args(argv)
    if args.command == "sweep":
        return run_cli(lambda: _sweep(args))
    if args.command == "ceiling":
        return run_cli(lambda: _ceiling(args))
    config = from_namespace(ExportConfig, args)

    def body() -> int:
        result = derive(args.run_dir, config)
        if not result.met:
            raise ConfigError(describe(result))
        sys.stdout.write(f"{describe(result)}\n{write(result, args.output).describe()}\n")
        return 0

    return run_cli(body)


def _ceiling(args: argparse.Namespace) -> int:
    """Print the per-layer ceiling table of a probe run and what it says about the target cut."""
    from analysis.models.registry import load_text_config
    from analysis.pruner.ceiling import ceiling, describe, model_of
    from analysis.pruner.flops import DecoderShape

    config = from_namespace(CeilingConfig, args)
    config.validate()
    shape = DecoderShape.from_config(load_text_config(model_of(args.run_dir)))
    sys.stdout.write(describe(ceiling(args.run_dir, shape, config), config) + "\n")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """Evaluate the configs and their matched baselines; print (and optionally save) the table."""
    from pathlib import Path

    from analysis.data.loaders import load_samples
    from analysis.distributed import current_world, rank_device
    from analysis.models.registry import default_device, load_model
    from analysis.pruner.config import config_for_model
    from analysis.pruner.sweep import budget_sweep, sweep
    from analysis.results import atomic_write_bytes

    if not args.configs and not args.budgets:
        raise ConfigError("pruner sweep needs config files to match, --budgets, or both")
    world = current_world()  # under torchrun the ranks share the samples and rank 0 reports
    samples = load_samples(args.dataset, args.split, args.limit)
    device = rank_device(world, args.device or default_device())
    loaded = load_model(args.model, device=device, replica=(world.local_rank, world.local_size))
    adapter = loaded.adapter
    configs = [
        config_for_model(path, adapter.model_type, adapter.text_config, args.authors_layer0) for path in args.configs
    ]
    if configs:
        table = sweep(
            loaded,
            samples,
            configs,
            prune_layer=args.prune_layer,
            batch_size=args.batch_size,
            authors_rule=args.authors_rule,
            authors_layer0=None if args.authors_layer0 == "auto" else args.authors_layer0,
            progress=world.main,
        )
        columns = ["method", "settings", "accuracy", "agreement", "flops_cut", "flops_cut_fastv", "kept_tokens"]
        if world.main:
            sys.stdout.write(table[columns].to_string(index=False, float_format=lambda v: f"{v:.2f}") + "\n")
        if args.output and world.main:
            atomic_write_bytes(Path(args.output), table.to_csv(index=False).encode())
    if args.budgets:
        budgets = budget_sweep(
            loaded, samples, prune_layer=args.prune_layer, batch_size=args.batch_size, progress=world.main
        )
        columns = ["method", "settings", "accuracy", "accuracy_low", "accuracy_high", "agreement", "flops_cut"]
        if world.main:
            sys.stdout.write(budgets[columns].to_string(index=False, float_format=lambda v: f"{v:.2f}") + "\n")
        if args.output and world.main:
            path = Path(args.output)
            atomic_write_bytes(path.with_name(f"{path.stem}-budgets.csv"), budgets.to_csv(index=False).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
