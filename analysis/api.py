"""The Python API for notebook users: trace, probe or prune one image and question held in memory, and read runs.

Everything here returns pandas DataFrames with the columns of the run folders' tables (``analysis.results``), so
code written against a run folder works on an in-memory result and the other way round::

    from analysis import api
    loaded = api.load("shapes-llava")
    tables = api.trace(loaded, image, "What colour is the circle?")
    tables["attention"].query("query == 'last'").groupby(["layer", "key_region"]).mass.mean()
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from analysis.data.samples import Sample
from analysis.errors import ConfigError
from analysis.models.adapters import ModelInputs
from analysis.models.registry import LoadedModel, default_device, load_model
from analysis.pruner.config import PruningConfig, config_for_model, parse_config

__all__ = ["PrunedAnswers", "Run", "generate", "load", "probe", "pruned", "read_run", "trace"]


def load(name: str, *, device: str | None = None, dtype: str = "auto") -> LoadedModel:
    """A model by alias, hub id or local path, with its processor and family adapter (SDPA attention)."""
    return load_model(name, dtype=dtype, device=device or default_device())


def _samples(images: Image.Image | Sequence[Image.Image], question: str, answer: str | None) -> list[Sample]:
    """One in-memory sample; several images go in order before the question unless it marks them with <image>."""
    pictures = [images] if isinstance(images, Image.Image) else list(images)
    if not pictures:
        raise ConfigError("give at least one image; the toolkit analyses image-text inputs")
    return [Sample("sample", pictures, prompt=question, question=question, answer=answer)]


def _inputs(
    loaded: LoadedModel, images: Image.Image | Sequence[Image.Image], question: str, answer: str | None = None
) -> tuple[list[Sample], ModelInputs]:
    """The one sample and its model inputs on the model's device."""
    samples = _samples(images, question, answer)
    return samples, loaded.adapter.build_inputs(loaded.processor, samples, device=loaded.device)


def _frames(tables: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Arrow tables as DataFrames."""
    return {name: table.to_pandas() for name, table in tables.items()}


def trace(
    loaded: LoadedModel,
    images: Image.Image | Sequence[Image.Image],
    question: str,
    *,
    top_k: int = 5,
    max_new_tokens: int = 8,
) -> dict[str, pd.DataFrame]:
    """The trace tables (attention, sinks, image_tokens, samples) of one image-question pair, no run folder."""
    from analysis.generation import generate_answers
    from analysis.trace.run import batch_tables, check_top_k
    from analysis.trace.tracer import trace_batch

    samples, inputs = _inputs(loaded, images, question)
    check_top_k(top_k, inputs.layouts[0].n_image_tokens, samples[0].sample_id, option="top_k")
    stats, _ = trace_batch(loaded.adapter, inputs, top_k=top_k)
    answers = generate_answers(loaded, inputs, max_new_tokens)
    return _frames(batch_tables(samples, inputs, stats, answers, top_k))


def probe(
    loaded: LoadedModel,
    images: Image.Image | Sequence[Image.Image],
    question: str,
    answer: str,
    *,
    probes: Sequence[str] = ("knockout", "logit_lens", "contribution"),
    **options: Any,
) -> dict[str, pd.DataFrame]:
    """The tables of the chosen probes for one image, question and reference answer (options as ProbeConfig's)."""
    from analysis.probes.run import ProbeConfig, probe_batch

    config = ProbeConfig(model=loaded.name, probes=",".join(probes), **options)
    config.validate(loaded.adapter.num_layers)
    samples, inputs = _inputs(loaded, images, question, answer)
    return _frames(probe_batch(loaded, config, config.selected(), samples, inputs))


@dataclass
class Run:
    """A run folder read into memory: its manifest and every committed table."""

    path: Path
    manifest: dict[str, Any]
    tables: dict[str, pd.DataFrame]

    def __getitem__(self, table: str) -> pd.DataFrame:
        """One table by name (``run["attention"]``)."""
        if table not in self.tables:
            raise KeyError(f"{self.path} has no table {table!r}; it has {', '.join(sorted(self.tables))}")
        return self.tables[table]


def read_run(path: str | Path) -> Run:
    """Every table of a finished or interrupted run folder (committed parts only) as DataFrames."""
    from analysis.results import read_manifest, read_table

    manifest = read_manifest(path, made_by="analysis.trace (or analysis.probes, analysis.evaluate)")
    names = sorted(manifest.get("tables", {}))
    return Run(Path(path), manifest, {name: read_table(path, name).to_pandas() for name in names})


def _config(loaded: LoadedModel, pruning: PruningConfig | str | Path | dict[str, Any]) -> PruningConfig:
    """A pruning config for the model from an object, a JSON file (ours or the authors') or its values."""
    if isinstance(pruning, PruningConfig):
        return pruning
    if isinstance(pruning, dict):
        return parse_config(pruning, loaded.adapter.num_layers)
    return config_for_model(pruning, loaded.adapter.model_type, loaded.adapter.text_config)


@dataclass
class PrunedAnswers:
    """Pruned greedy answers and what the rule decided, per sample."""

    answers: list[str | None]
    kept_tokens: list[list[int]]  # image-token ordinals kept, per sample
    selection_layer: list[int]  # layer whose attention the rule read (tokens go from the next on); -1: never fired
    exit_layer: list[int]


@contextmanager
def pruned(
    loaded: LoadedModel,
    pruning: PruningConfig | str | Path | dict[str, Any],
    images: Image.Image | Sequence[Image.Image],
    question: str,
) -> Iterator[Any]:
    """Inside the block the model runs one image-question pair with the config's image tokens really dropped.

    Yields the model inputs; call ``loaded.model`` on them (forward or generate) inside the block.
    """
    from analysis.pruner.runtime import pruned_runtime

    config = _config(loaded, pruning)
    _, inputs = _inputs(loaded, images, question)
    with pruned_runtime(loaded.model, config, inputs.layouts):
        yield inputs


def generate(
    loaded: LoadedModel,
    images: Image.Image | Sequence[Image.Image],
    question: str,
    *,
    pruning: PruningConfig | str | Path | dict[str, Any] | None = None,
    max_new_tokens: int = 8,
    latency: bool = False,
) -> PrunedAnswers:
    """The greedy answer to one image and question, pruned by ``pruning`` (None: the unpruned model); ``latency``:
    in the latency mode (static buffers, CUDA graphs on CUDA; eager, with the reason logged, where it cannot run)."""
    from analysis.generation import decode_answers, generate_answers
    from analysis.pruner.latency import latency_generate
    from analysis.pruner.runtime import pruned_runtime

    config = (
        _config(loaded, pruning)
        if pruning is not None
        else PruningConfig(method="none", num_layers=loaded.adapter.num_layers)
    )
    _, inputs = _inputs(loaded, images, question)
    fast = latency_generate(loaded, inputs, max_new_tokens, config) if latency else None
    if fast is not None:
        answers = decode_answers(loaded.processor.tokenizer, fast.tokens)
        decisions = fast.decisions(inputs)
    else:
        with pruned_runtime(loaded.model, config, inputs.layouts) as runtime:
            answers = generate_answers(loaded, inputs, max_new_tokens)
        decisions = runtime.decisions(inputs.layouts)
    return PrunedAnswers(
        answers,
        [list(map(int, kept)) for kept in decisions.kept],
        [int(layer) for layer in decisions.selection_layer],
        [int(layer) for layer in decisions.exit_layer],
    )
