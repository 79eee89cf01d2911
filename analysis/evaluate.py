"""``python -m analysis.evaluate``: accuracy of a model's greedy answers on a dataset, overall and per family."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from analysis.cli import run_cli
from analysis.config import add_arguments, from_namespace, option, to_dict
from analysis.data.scoring import is_correct
from analysis.errors import ConfigError
from analysis.data.samples import batched
from analysis.models.registry import DTYPES, LoadedModel, default_device, load_model
from analysis.pruner.config import PRUNING_RUNTIMES
from analysis.results import atomic_write_json, atomic_write_table, default_run_dir, git_hash, package_versions
from analysis.trace.run import DEFAULT_DATASET, DEFAULT_MODEL, generate_answers

logger = logging.getLogger(__name__)

PREDICTIONS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()), ("family", pa.string()), ("question", pa.string()),
        ("reference", pa.string()), ("prediction", pa.string()), ("correct", pa.bool_()),
    ],
    metadata={"schema_version": "1"},
)


@dataclass
class EvalConfig:
    """Everything that defines an evaluation; written beside its results."""

    model: str = option(DEFAULT_MODEL, "model alias, hub id or local path")
    dataset: str = option(DEFAULT_DATASET, "dataset name or local path")
    split: str | None = option(None, "dataset split; default: the dataset's evaluation split")
    data_dir: str | None = option(None, "local copy of a hub benchmark's parquet files")
    limit: int | None = option(None, "evaluate the first N samples; none = all")
    batch_size: int = option(16, "samples per generate call")
    max_new_tokens: int = option(8, "greedy answer length")
    dtype: str = option("auto", "weights dtype", choices=tuple(DTYPES))
    device: str | None = option(None, "torch device; default cuda if available")
    out: str | None = option(None, "output folder; default runs/eval/<model>/<dataset>-<split>")
    pruning_config: str | None = option(
        None, "pruning config JSON (ours or the authors'): also report pruned accuracy, agreement, FLOPs, kept tokens",
        aliases=("--config",),
    )
    pruning_runtime: str = option(
        "drop", "how the pruned model runs: drop (tokens leave hidden states and KV cache) or mask (same outputs, "
        "no saving)", choices=PRUNING_RUNTIMES,
    )

    def validate(self) -> None:
        """Reject values that cannot work, before loading anything."""
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be >= 1 (omit it for the whole split)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("--batch-size and --max-new-tokens must be >= 1")


def evaluate(config: EvalConfig, *, loaded: LoadedModel | None = None, progress: bool = True) -> pd.DataFrame:
    """Greedy-decode every sample and score it; returns one row per sample."""
    from tqdm.auto import tqdm

    from analysis.data.loaders import load_samples

    config.validate()
    samples = load_samples(config.dataset, config.split, config.limit, data_dir=config.data_dir)
    if loaded is None:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device or default_device())
    device = next(loaded.model.parameters()).device
    rows = []
    for batch in tqdm(batched(samples, config.batch_size), desc="evaluate", disable=not progress):
        inputs = loaded.adapter.build_inputs(loaded.processor, batch, device=device)
        for sample, answer in zip(batch, generate_answers(loaded, inputs, config.max_new_tokens)):
            rows.append(
                {
                    "sample_id": sample.sample_id, "family": sample.family, "question": sample.question,
                    "reference": sample.answer, "prediction": answer, "correct": is_correct(answer or "", sample),
                }
            )
    return pd.DataFrame(rows, columns=PREDICTIONS_SCHEMA.names)


def accuracy_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (%) and count per family, plus an 'overall' row."""
    by_family = predictions.groupby("family")["correct"].agg(["mean", "size"])
    overall = pd.DataFrame({"mean": [predictions["correct"].mean()], "size": [len(predictions)]}, index=["overall"])
    table = pd.concat([by_family, overall])
    table["mean"] *= 100
    return table.rename(columns={"mean": "accuracy", "size": "n"})


def _evaluate_pruned(config: EvalConfig, split: str, out: Path) -> int:
    """Evaluate the unpruned and pruned model side by side and print the comparison."""
    from analysis.data.loaders import load_samples
    from analysis.pruner.config import load_config
    from analysis.pruner.evaluation import evaluate_pruned, summarize

    config.validate()
    samples = load_samples(config.dataset, config.split, config.limit, data_dir=config.data_dir)
    loaded = load_model(config.model, dtype=config.dtype, device=config.device or default_device())
    pruning = load_config(config.pruning_config, loaded.adapter.num_layers)
    per_sample = evaluate_pruned(loaded, samples, pruning, batch_size=config.batch_size,
                                 max_new_tokens=config.max_new_tokens, runtime=config.pruning_runtime)
    summary = summarize(per_sample)
    atomic_write_table(out / "pruned_predictions.parquet", pa.Table.from_pandas(per_sample, preserve_index=False))
    atomic_write_json(out / "pruned_summary.json", {"config": {**to_dict(config), "split": split},
                                                   "pruning": pruning.to_json(), "summary": summary,
                                                   "package_versions": package_versions(), "git_hash": git_hash()})
    lines = [f"results: {out.resolve()}"] + [f"{key:>22s}: {value:8.2f}" for key, value in summary.items()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Evaluate, write predictions and a summary, print the accuracy table."""
    parser = argparse.ArgumentParser(prog="python -m analysis.evaluate", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, EvalConfig)
    args = parser.parse_args(argv)
    config = from_namespace(EvalConfig, args)

    def body() -> int:
        from analysis.data.loaders import resolve_split

        split = resolve_split(config.dataset, config.split)
        out = Path(config.out) if config.out else default_run_dir("eval", config.model, config.dataset, split)
        if config.pruning_config:
            return _evaluate_pruned(config, split, out)
        predictions = evaluate(config)
        table = accuracy_table(predictions)
        atomic_write_table(out / "predictions.parquet", pa.Table.from_pandas(predictions, PREDICTIONS_SCHEMA, preserve_index=False))
        atomic_write_json(
            out / "summary.json",
            {"config": {**to_dict(config), "split": split}, "accuracy": table.to_dict(orient="index"),
             "package_versions": package_versions(), "git_hash": git_hash()},
        )
        sys.stdout.write(f"results: {out.resolve()}\n{table.to_string(float_format=lambda v: f'{v:.2f}')}\n")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
