"""``python -m analysis.evaluate``: accuracy of a model's greedy answers on a dataset, overall and per family."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from analysis.cli import run_cli
from analysis.config import (
    DEVICE_ALIASES,
    DEVICE_HELP,
    LIMIT_HELP,
    HelpFormatter,
    add_arguments,
    from_namespace,
    option,
    to_dict,
)
from analysis.data import DEFAULT_DATASET
from analysis.data.samples import Sample, batched
from analysis.data.scoring import is_correct
from analysis.distributed import current_world
from analysis.errors import ConfigError
from analysis.generation import generate_answers
from analysis.models.adapters import ModelInputs
from analysis.models.registry import DEFAULT_MODEL, DTYPES, LoadedModel, default_device, load_model
from analysis.pruner.config import LAYER0_RULES, PRUNING_RUNTIMES
from analysis.results import (
    atomic_write_json,
    default_run_dir,
    git_hash,
    package_versions,
    read_table,
    table_schema,
)
from analysis.runs import RunSpec, start_run

logger = logging.getLogger(__name__)

PREDICTIONS_TABLE = "predictions"
PRUNED_TABLE = "pruned_predictions"
PREDICTIONS_SCHEMA = table_schema(
    [
        ("sample_id", pa.string()),
        ("family", pa.string()),
        ("question", pa.string()),
        ("reference", pa.string()),
        ("prediction", pa.string()),
        ("correct", pa.bool_()),
    ],
    "One row per sample: the greedy answer of the unpruned model and whether it matches the reference.",
)
PRUNED_SCHEMA = table_schema(
    [
        ("sample_id", pa.string()),
        ("family", pa.string()),
        ("reference", pa.string()),
        ("baseline_answer", pa.string()),
        ("pruned_answer", pa.string()),
        ("baseline_correct", pa.bool_()),
        ("pruned_correct", pa.bool_()),
        ("agrees", pa.bool_()),
        ("selection_layer", pa.int16()),
        ("exit_layer", pa.int16()),
        ("n_tokens", pa.int32()),
        ("n_image", pa.int32()),
        ("n_kept", pa.int32()),
        ("flops", pa.float64()),
        ("flops_full", pa.float64()),
        ("flops_fastv", pa.float64()),
        ("flops_fastv_full", pa.float64()),
        ("vision_attention_flops", pa.float64()),
        ("vision_attention_flops_full", pa.float64()),
    ],
    "One row per sample: unpruned and pruned greedy answers, their correctness and agreement, the pruning "
    "decisions (selection and exit layer, -1 = never; image tokens kept) and the exact prefill FLOPs of both.",
)


@dataclass
class EvalConfig:
    """Everything that defines an evaluation; written to its run folder's manifest."""

    model: str = option(DEFAULT_MODEL, "model alias, hub id or local path")
    dataset: str = option(DEFAULT_DATASET, "dataset name or local path")
    split: str | None = option(None, "dataset split; default: the dataset's evaluation split")
    data_dir: str | None = option(None, "local copy of a hub benchmark's parquet files", identity=False)
    limit: int | None = option(None, LIMIT_HELP.format(verb="evaluate"))
    batch_size: int = option(16, "samples per generate call (answers do not depend on it)", identity=False)
    max_new_tokens: int = option(8, "greedy answer length")
    dtype: str = option("auto", "weights dtype", choices=tuple(DTYPES))
    device: str | None = option(None, DEVICE_HELP, identity=False, aliases=DEVICE_ALIASES)
    max_memory: str | None = option(
        None,
        "with --device auto: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB (the rest is offloaded to disk)",
        identity=False,
    )
    out: str | None = option(None, "output folder; default runs/eval/<model>/<dataset>-<split>", identity=False)
    resume: bool = option(False, "continue an interrupted evaluation in --out (same config required)", identity=False)
    # The config's content, not its path, is part of the run's identity (see run_evaluation).
    pruning_config: str | None = option(
        None,
        "pruning config JSON (ours or the authors'): also report pruned accuracy, agreement, FLOPs, kept tokens",
        aliases=("--config",),
        identity=False,
    )
    authors_layer0: str = option(
        "auto",
        "for an authors' JSON with a shallow stage: which of their layer-0 rules runs; auto: theirs for a "
        "LLaVA-1.5-7B or -13B architecture (other models must name one)",
        choices=("auto", *LAYER0_RULES),
    )
    pruning_runtime: str = option(
        "drop",
        "how the pruned model runs: drop (tokens leave hidden states and KV cache), mask (same outputs, no saving) "
        "or latency (drop, from static buffers replayed as CUDA graphs; unpruned answers too)",
        choices=PRUNING_RUNTIMES,
    )

    def validate(self) -> None:
        """Reject values that cannot work, before loading anything."""
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be >= 1 (or all, the default, for the whole split)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("--batch-size and --max-new-tokens must be >= 1")

    def output_dir(self, split: str) -> Path:
        """The run folder, defaulting to one derived from model, dataset and split."""
        return Path(self.out) if self.out else default_run_dir("eval", self.model, self.dataset, split)


def _prediction_rows(
    loaded: LoadedModel, batch: Sequence[Sample], max_new_tokens: int, latency: bool = False
) -> list[dict[str, Any]]:
    """Greedy answers of the unpruned model for one batch, scored (``latency``: in the latency mode)."""
    device = loaded.device
    inputs = loaded.adapter.build_inputs(loaded.processor, batch, device=device)
    return [
        {
            "sample_id": sample.sample_id,
            "family": sample.family,
            "question": sample.question,
            "reference": sample.answer,
            "prediction": answer,
            "correct": is_correct(answer or "", sample),
        }
        for sample, answer in zip(batch, generate_answers(loaded, inputs, max_new_tokens, latency=latency), strict=True)
    ]


def evaluate(config: EvalConfig, *, loaded: LoadedModel | None = None, progress: bool = True) -> pd.DataFrame:
    """Greedy-decode every sample and score it, in memory; returns one row per sample."""
    from tqdm.auto import tqdm

    from analysis.data.loaders import load_samples

    config.validate()
    samples = load_samples(config.dataset, config.split, config.limit, data_dir=config.data_dir)
    if loaded is None:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device or default_device())
    rows = []
    with tqdm(total=len(samples), desc="evaluate", unit="sample", disable=not progress) as bar:
        for batch in batched(samples, config.batch_size):
            rows += _prediction_rows(loaded, batch, config.max_new_tokens, config.pruning_runtime == "latency")
            bar.update(len(batch))
    return pd.DataFrame(rows, columns=PREDICTIONS_SCHEMA.names)


@dataclass
class EvalResult:
    """A finished evaluation: its folder, its per-sample table and the summary written beside it."""

    out_dir: Path
    per_sample: pd.DataFrame
    summary: dict[str, Any]
    n_new: int


def run_evaluation(config: EvalConfig, *, loaded: LoadedModel | None = None, progress: bool = True) -> EvalResult:
    """Evaluate into a run folder (manifest, identity check, resumable parts), unpruned or under a pruning config.

    An unpruned run writes the ``predictions`` table and ``summary.json`` (accuracy per family); a pruned run the
    ``pruned_predictions`` table and ``pruned_summary.json`` (accuracy of both, agreement, FLOPs cut, kept tokens).
    """
    from analysis.pruner.config import PruningConfig, config_for_model, read_config_values
    from analysis.pruner.evaluation import evaluate_pruned, summarize

    config.validate()
    pruned = config.pruning_config is not None
    table = PRUNED_TABLE if pruned else PREDICTIONS_TABLE
    spec = RunSpec(
        "analysis.evaluate",
        config,
        {table: PRUNED_SCHEMA if pruned else PREDICTIONS_SCHEMA},
        config.output_dir,
        commit_table=table,
        description="evaluate (unpruned and pruned)" if pruned else "evaluate",
    )
    if config.pruning_config is not None:
        path = config.pruning_config
        spec.identity_extra = {"pruning": read_config_values(path)}

        def pruning_for(model: LoadedModel, _samples: list[Sample]) -> PruningConfig:
            adapter = model.adapter
            return config_for_model(path, adapter.model_type, adapter.text_config, config.authors_layer0)

        spec.prepare = pruning_for
    with start_run(spec, loaded=loaded, progress=progress) as run:
        model, pruning = run.loaded, run.prepared

        def rows(batch: Sequence[Sample], inputs: ModelInputs) -> dict[str, pa.Table]:
            if pruning is None:
                latency = config.pruning_runtime == "latency"
                return {table: pa.Table.from_pylist(_prediction_rows(model, batch, config.max_new_tokens, latency))}
            per_sample = evaluate_pruned(
                model,
                batch,
                pruning,
                batch_size=len(batch),
                max_new_tokens=config.max_new_tokens,
                runtime=config.pruning_runtime,
            )
            return {table: pa.Table.from_pandas(per_sample, preserve_index=False)}

        run.process(rows)
        per_sample = read_table(run.folder.root, table).to_pandas()
        summary: dict[str, Any] = {"config": {**to_dict(config), "split": run.split}}
        if pruning is not None:
            summary.update(pruning=pruning.to_json(), summary=summarize(per_sample))
            summary_name = "pruned_summary.json"
        else:
            summary["accuracy"] = accuracy_table(per_sample).to_dict(orient="index")
            summary_name = "summary.json"
        summary.update(package_versions=package_versions(), git_hash=git_hash())
        atomic_write_json(run.folder.root / summary_name, summary)
    return EvalResult(run.folder.root, per_sample, summary, len(run.pending))


def accuracy_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (%) and count per family, plus an 'overall' row."""
    by_family = predictions.groupby("family")["correct"].agg(["mean", "size"])
    overall = pd.DataFrame({"mean": [predictions["correct"].mean()], "size": [len(predictions)]}, index=["overall"])
    table = pd.concat([by_family, overall])
    table["mean"] *= 100
    return table.rename(columns={"mean": "accuracy", "size": "n"})


def main(argv: list[str] | None = None) -> int:
    """Evaluate, write predictions and a summary, print the accuracy table."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.evaluate", description=__doc__, formatter_class=HelpFormatter
    )
    add_arguments(parser, EvalConfig)
    args = parser.parse_args(argv)
    config = from_namespace(EvalConfig, args)

    def body() -> int:
        result = run_evaluation(config, progress=True)
        if not current_world().main:  # under torchrun, rank 0 reports for every rank
            return 0
        lines = [f"results: {result.out_dir.resolve()} ({len(result.per_sample)} samples, {result.n_new} new)"]
        if config.pruning_config:
            pruning = result.summary["pruning"]
            rule = f"{pruning['rule']} rule" + (
                f", layer 0: {pruning['provenance']['layer0_rule']}" if "layer0_rule" in pruning["provenance"] else ""
            )
            lines.append(f"{'pruning':>22s}: {pruning['method']}, {rule}")
            lines += [f"{key:>22s}: {value:8.2f}" for key, value in result.summary["summary"].items()]
        else:
            lines.append(accuracy_table(result.per_sample).to_string(float_format=lambda v: f"{v:.2f}"))
        sys.stdout.write("\n".join(lines) + "\n")
        return 0

    return run_cli(body, command="python -m analysis.evaluate", argv=argv)


if __name__ == "__main__":
    sys.exit(main())
