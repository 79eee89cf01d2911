"""The trace command's pure core: dataset + model -> run folder of parquet tables and a manifest."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from analysis.config import DEVICE_ALIASES, DEVICE_HELP, LIMIT_HELP, option
from analysis.data import DEFAULT_DATASET
from analysis.data.samples import Sample
from analysis.errors import ConfigError
from analysis.generation import add_sample_row, generate_answers
from analysis.layout import REGION_NAMES, TokenLayout
from analysis.models.adapters import ModelInputs
from analysis.models.registry import DEFAULT_MODEL, DTYPES, LoadedModel
from analysis.results import SAMPLES_TABLE, TRACE_SCHEMAS, default_run_dir
from analysis.runs import RunSpec, start_run
from analysis.trace.tracer import QUERY_GROUPS, TraceStats, trace_batch

logger = logging.getLogger(__name__)


@dataclass
class TraceConfig:
    """Everything that defines a trace run; written to the run's manifest."""

    model: str = option(DEFAULT_MODEL, "model alias, hub id or local path (see `python -m analysis --list-models`)")
    dataset: str = option(DEFAULT_DATASET, "dataset name or local path (see `python -m analysis --list-datasets`)")
    split: str | None = option(None, "dataset split; default: the dataset's evaluation split")
    data_dir: str | None = option(
        None, "folder with a local copy of a hub benchmark's parquet files; default: load from the hub", identity=False
    )
    limit: int | None = option(None, LIMIT_HELP.format(verb="trace"))
    batch_size: int = option(4, "samples per forward pass (results do not depend on it)", identity=False)
    out: str | None = option(None, "output folder; default runs/trace/<model>/<dataset>-<split>", identity=False)
    resume: bool = option(False, "continue an interrupted run in --out (same config required)", identity=False)
    dtype: str = option("auto", "weights dtype; statistics are always computed in float32", choices=tuple(DTYPES))
    device: str | None = option(None, DEVICE_HELP, identity=False, aliases=DEVICE_ALIASES)
    max_memory: str | None = option(
        None,
        "with --device auto: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB (the rest is offloaded to disk)",
        identity=False,
    )
    top_k: int = option(
        5,
        "sink statistics: share of image-directed attention on the top-k image tokens (at most "
        "a sample's image tokens; a smaller image caps it, and the sinks table's top_k column holds "
        "the k used)",
    )
    max_new_tokens: int = option(8, "greedy answer length for the model_answer column; 0 skips generation")
    revision: str | None = option(None, "hub revision (branch, tag or commit) of the model")

    def validate(self) -> None:
        """Reject values that cannot work, before any model or data is loaded."""
        problems = []
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be >= 1 (or all, the default, for the whole split)")
        if self.batch_size < 1:
            problems.append("--batch-size must be >= 1")
        if self.top_k < 1:
            problems.append("--top-k must be >= 1")
        if self.max_new_tokens < 0:
            problems.append("--max-new-tokens must be >= 0")
        if problems:
            raise ConfigError("; ".join(problems))

    def output_dir(self, split: str) -> Path:
        """The run folder, defaulting to one derived from model, dataset and split."""
        return Path(self.out) if self.out else default_run_dir("trace", self.model, self.dataset, split)


@dataclass
class TraceResult:
    """Where a finished run lives and how many samples it holds."""

    out_dir: Path
    n_samples: int
    n_new: int


def run_trace(config: TraceConfig, *, loaded: LoadedModel | None = None, progress: bool = True) -> TraceResult:
    """Trace a dataset and write (or extend, with ``resume``) a run folder."""
    config.validate()
    spec = RunSpec(
        "analysis.trace",
        config,
        TRACE_SCHEMAS,
        config.output_dir,
        prepare=lambda model, samples: _check_top_k(config.top_k, model, samples[0]),
    )

    with start_run(spec, loaded=loaded, progress=progress) as run:
        model = run.loaded

        def tables(batch: Sequence[Sample], inputs: ModelInputs) -> dict[str, pa.Table]:
            stats, _ = trace_batch(model.adapter, inputs, top_k=config.top_k)
            return batch_tables(
                batch, inputs, stats, generate_answers(model, inputs, config.max_new_tokens), config.top_k
            )

        run.process(tables)
    logger.info("wrote %d samples (%d new) to %s", len(run.samples), len(run.pending), run.folder.root)
    return TraceResult(out_dir=run.folder.root, n_samples=len(run.samples), n_new=len(run.pending))


def _check_top_k(top_k: int, loaded: LoadedModel, sample: Sample) -> None:
    """Refuse a sink top-k larger than a sample's image (checked on the first sample, before anything is written)."""
    device = loaded.device
    n_image = loaded.adapter.build_inputs(loaded.processor, [sample], device=device).layouts[0].n_image_tokens
    check_top_k(top_k, n_image, sample.sample_id)


def check_top_k(top_k: int, n_image: int, sample_id: str, option: str = "--top-k") -> None:
    """Refuse a sink top-k larger than a sample's image tokens; ``option`` names the setting in the message."""
    if top_k > n_image:
        raise ConfigError(
            f"{option} {top_k} exceeds the {n_image} image tokens of sample {sample_id!r}; choose {option} <= {n_image}"
        )


def batch_tables(
    batch: Sequence[Sample],
    inputs: ModelInputs,
    stats: TraceStats,
    answers: list[str | None],
    top_k: int,
) -> dict[str, pa.Table]:
    """Turn one batch's layer reductions into the run's long-format tables (vectorised per sample)."""
    from analysis.data.scoring import is_correct

    on_device = {
        name: getattr(stats, name)  # leading layer axis
        for name in ("region_mass", "image_rows", "value_l1", "top_values", "top_indices", "entropy")
    }
    # The per-token rows are reduced where they are (one small transfer instead of every head's rows).
    image_rows = on_device.pop("image_rows")  # (L, B, H, 2, N)
    on_device.update(image_mass=image_rows.sum(-1), head_mean=image_rows.mean(2))
    stacked = {name: tensor.cpu().numpy() for name, tensor in on_device.items()}
    region_mass, head_mean, value_l1 = stacked["region_mass"], stacked["head_mean"], stacked["value_l1"]
    parts: dict[str, list[pa.Table]] = {name: [] for name in TRACE_SCHEMAS}
    sample_columns: dict[str, list[Any]] = {name: [] for name in TRACE_SCHEMAS[SAMPLES_TABLE].names}
    for row, (sample, layout) in enumerate(zip(batch, inputs.layouts, strict=True)):
        n_image = layout.n_image_tokens
        parts["attention"].append(_attention_table(sample.sample_id, region_mass[:, row]))
        parts["sinks"].append(
            _sink_table(
                sample.sample_id,
                stacked["image_mass"][:, row],
                stacked["top_values"][:, row],
                stacked["top_indices"][:, row],
                stacked["entropy"][:, row],
                min(top_k, n_image),
                n_image,
            )
        )
        parts["image_tokens"].append(
            _image_token_table(sample.sample_id, layout, head_mean[:, row, :, :n_image], value_l1[:, row, :n_image])
        )
        answer = answers[row]
        correct = None if answer is None or sample.answer is None else bool(is_correct(answer, sample))
        add_sample_row(sample_columns, sample, layout, answer, correct)
    tables = {name: pa.concat_tables(tables) for name, tables in parts.items() if name != SAMPLES_TABLE}
    tables[SAMPLES_TABLE] = pa.table(sample_columns, schema=TRACE_SCHEMAS[SAMPLES_TABLE])
    return tables


def _strings(names: Sequence[str], codes: np.ndarray) -> pa.Array:
    """A string column ``names[codes]``, built in Arrow from the codes (no Python object per row)."""
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(list(names), pa.string())).cast(
        pa.string()
    )


def _grid(*sizes: int) -> list[np.ndarray]:
    """Flattened index arrays of a C-ordered grid of the given sizes (like numpy.indices, raveled)."""
    return [axis.ravel() for axis in np.indices(sizes)]


def _attention_table(sample_id: str, mass: np.ndarray) -> pa.Table:
    """Rows of (layer, head, query group, key region) mass for one sample; ``mass`` is (L, H, 3, 3)."""
    layer, head, group, region = _grid(*mass.shape)
    return pa.table(
        {
            "sample_id": _strings([sample_id], np.zeros(mass.size, dtype=np.int32)),
            "layer": layer,
            "head": head,
            "query": _strings(QUERY_GROUPS, group),
            "key_region": _strings(REGION_NAMES, region),
            "mass": mass.ravel(),
        },
        schema=TRACE_SCHEMAS["attention"],
    )


def _sink_table(
    sample_id: str,
    image_mass: np.ndarray,
    top_values: np.ndarray,
    top_indices: np.ndarray,
    entropy: np.ndarray,
    k: int,
    n_image: int,
) -> pa.Table:
    """Sink statistics rows for one sample; arrays are (L, H, 2[, k_max]) from the tracer."""
    safe_mass = np.where(image_mass > 0, image_mass, 1.0)
    top_share = top_values[..., :k].sum(-1) / safe_mass
    normalized = entropy / np.log(n_image) if n_image > 1 else np.zeros_like(entropy)
    layer, head, group = _grid(*image_mass.shape)
    n_rows = image_mass.size
    top_indices = pa.ListArray.from_arrays(
        np.arange(0, n_rows * k + 1, k, dtype=np.int32),
        pa.array(np.ascontiguousarray(top_indices[..., :k]).reshape(-1).astype(np.int32)),
    )
    return pa.table(
        {
            "sample_id": _strings([sample_id], np.zeros(n_rows, dtype=np.int32)),
            "layer": layer,
            "head": head,
            "query": _strings(QUERY_GROUPS[:2], group),
            "image_mass": image_mass.ravel(),
            "top_k": np.full(n_rows, k),
            "top_k_share": top_share.ravel(),
            "entropy": entropy.ravel(),
            "normalized_entropy": normalized.ravel(),
            "top_indices": top_indices,
        },
        schema=TRACE_SCHEMAS["sinks"],
    )


def _image_token_table(sample_id: str, layout: TokenLayout, head_mean: np.ndarray, value_l1: np.ndarray) -> pa.Table:
    """Per image token and layer for one sample: value L1 and head-mean attention received (``head_mean`` is
    (L, 2, n_image): last and instruction rows)."""
    n_layers, n_image = value_l1.shape
    image_index, token_index = layout.image_token_coordinates
    piece, row, col = layout.image_token_cells
    return pa.table(
        {
            "sample_id": _strings([sample_id], np.zeros(n_layers * n_image, dtype=np.int32)),
            "layer": np.repeat(np.arange(n_layers), n_image),
            "image_index": np.tile(image_index, n_layers),
            "token_index": np.tile(token_index, n_layers),
            "piece": np.tile(piece, n_layers),
            "row": np.tile(row, n_layers),
            "col": np.tile(col, n_layers),
            "position": np.tile(layout.image_positions, n_layers),
            "value_l1": value_l1.ravel(),
            "last_attention": head_mean[:, 0].ravel(),
            "instruction_attention": head_mean[:, 1].ravel(),
        },
        schema=TRACE_SCHEMAS["image_tokens"],
    )
