"""The extension points CONTRIBUTING.md describes, exercised: a pruning method and a probe added from outside the
package run through the executors and the run driver like the built-in ones."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from fixtures_data import LOCAL_RECORDS, write_jsonl

from analysis.errors import ConfigError
from analysis.hooks.attention import LastRowObservation
from analysis.models.registry import load_model
from analysis.probes.base import PROBE_KINDS, Probe, ProbeBatch, register_probe
from analysis.probes.run import ProbeConfig, run_probes
from analysis.pruner.config import PruningConfig
from analysis.pruner.evaluation import evaluate_pruned
from analysis.pruner.methods import METHODS, MethodConfig, PruningMethod, SelectionState, register_method
from analysis.results import read_table, table_schema


@dataclass(frozen=True)
class StrideConfig(MethodConfig):
    """Keep every ``stride``-th image token from layer ``prune_layer`` on."""

    prune_layer: int = 2
    stride: int = 2


class Stride(PruningMethod):
    """A one-shot method that needs no attention: every stride-th image token survives."""

    name = "stride_example"
    config_type = StrideConfig
    params: StrideConfig

    def problems(self, num_layers: int) -> list[str]:
        return [] if self.params.stride >= 1 else [f"stride must be >= 1, not {self.params.stride}"]

    def observes(self, layer: int, state: SelectionState) -> bool:
        return layer == self.params.prune_layer - 1

    def decide(self, state: SelectionState, observation: LastRowObservation) -> None:
        keep = torch.zeros_like(state.image_valid)
        keep[:, :: self.params.stride] = True
        state.keep = keep & state.image_valid
        state.selection_layer[:] = observation.layer

    def first_pruned_layer(self) -> int | None:
        return self.params.prune_layer


MASS_SCHEMA = table_schema(
    [("sample_id", pa.string()), ("layer", pa.int16()), ("image_attention", pa.float32())],
    "Head-mean attention of the last prompt position on all image tokens, per layer (clean pass).",
)


class ImageMassProbe(Probe):
    """A probe reading the shared clean pass only: how much the last position attends to the image, per layer."""

    name = "image_mass_example"
    tables = {"image_mass": MASS_SCHEMA}

    def rows(self, batch: ProbeBatch) -> dict[str, pa.Table]:
        rows = [
            {"sample_id": sample_id, "layer": layer, "image_attention": float(record["attention"][row].sum())}
            for layer, record in sorted(batch.observer.records.items())
            for row, sample_id in enumerate(batch.ids)
        ]
        return {"image_mass": pa.Table.from_pylist(rows, schema=MASS_SCHEMA)}


@pytest.fixture()
def stride_method() -> Iterator[type[PruningMethod]]:
    """The example method registered for one test."""
    register_method(Stride)
    yield Stride
    METHODS.unregister(Stride.name)


@pytest.fixture()
def mass_probe() -> Iterator[type[Probe]]:
    """The example probe registered for one test."""
    register_probe(ImageMassProbe)
    yield ImageMassProbe
    PROBE_KINDS.unregister(ImageMassProbe.name)


def test_a_registered_method_runs_in_both_executors(stride_method, samples) -> None:
    """Mask-based and token-dropping runs agree; stride 1 keeps every token and so every answer."""
    loaded = load_model("tiny-llava")
    layers = loaded.adapter.num_layers
    config = PruningConfig(method=stride_method.name, num_layers=layers, prune_layer=1, options={"stride": 3})
    masked = evaluate_pruned(loaded, samples, config, batch_size=4, max_new_tokens=3, runtime="mask")
    dropped = evaluate_pruned(loaded, samples, config, batch_size=4, max_new_tokens=3, runtime="drop")
    assert masked["pruned_answer"].tolist() == dropped["pruned_answer"].tolist()
    assert masked["n_kept"].tolist() == dropped["n_kept"].tolist()
    assert (masked["n_kept"] == np.ceil(masked["n_image"] / 3)).all() and (masked["flops"] < masked["flops_full"]).all()
    keep_all = PruningConfig(method=stride_method.name, num_layers=layers, prune_layer=1, options={"stride": 1})
    unpruned = evaluate_pruned(loaded, samples, keep_all, batch_size=4, max_new_tokens=3, runtime="drop")
    assert unpruned["agrees"].all()


def test_a_registered_method_is_validated_and_listed(stride_method) -> None:
    """Its own problems, unknown options and a taken name are errors; an unknown method lists the registered."""
    with pytest.raises(ConfigError, match="stride must be >= 1"):
        PruningConfig(method=stride_method.name, num_layers=4, options={"stride": 0}).validate(4)
    with pytest.raises(ConfigError, match=r"unknown options \['strid'\]"):
        PruningConfig(method=stride_method.name, num_layers=4, options={"strid": 2}).validate(4)
    with pytest.raises(ConfigError, match="already registered"):
        register_method(Stride)
    with pytest.raises(ConfigError, match=f"choose from .*{stride_method.name}"):
        PruningConfig(method="magic", num_layers=4).validate(4)


def test_a_registered_probe_writes_its_table(mass_probe, tmp_path: Path) -> None:
    """The run driver writes the new probe's table beside the samples table, one row per sample and layer."""
    data = write_jsonl(tmp_path / "data", LOCAL_RECORDS[:3])
    config = ProbeConfig(
        model="tiny-llava",
        dataset=str(data),
        probes=mass_probe.name,
        out=str(tmp_path / "run"),
        device="cpu",
        max_new_tokens=2,
    )
    run_probes(config, progress=False)
    table = read_table(tmp_path / "run", "image_mass").to_pandas()
    assert len(table) == 3 * load_model("tiny-llava").adapter.num_layers
    assert table["image_attention"].between(0, 1).all()
    with pytest.raises(ConfigError, match="unknown probes"):
        ProbeConfig(probes="image_mass_exampl").selected()
