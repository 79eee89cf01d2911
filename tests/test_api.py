"""The notebook API: one in-memory image and question gives the run folder's tables; runs read back in one call."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from fixtures_data import LOCAL_RECORDS, write_jsonl
from PIL import Image

from analysis import api
from analysis.errors import ConfigError
from analysis.probes.run import ProbeConfig, run_probes
from analysis.pruner.config import PruningConfig
from analysis.trace.run import TraceConfig, run_trace

RECORD = LOCAL_RECORDS[0]


@pytest.fixture(scope="module")
def loaded():
    """The tiny LLaVA, loaded once through the API."""
    return api.load("tiny-llava", device="cpu")


def _image(folder: Path) -> Image.Image:
    """The record's image as the dataset folder holds it."""
    return Image.open(folder / RECORD["image"]).convert("RGB")


def _without_ids(frame: pd.DataFrame) -> pd.DataFrame:
    """A table without the sample id and dataset columns (an in-memory sample has its own)."""
    return frame.drop(columns=[c for c in ("sample_id", "dataset", "family", "reference", "correct") if c in frame])


def test_trace_of_one_image_equals_the_run_folder(tmp_path: Path, loaded) -> None:
    """api.trace on an image and prompt gives the tables a trace run writes for the same sample."""
    data = write_jsonl(tmp_path / "data", [RECORD])
    run = run_trace(
        TraceConfig(model="tiny-llava", dataset=str(data), out=str(tmp_path / "run"), device="cpu", max_new_tokens=2),
        loaded=loaded,
        progress=False,
    )
    stored = api.read_run(run.out_dir)
    tables = api.trace(loaded, _image(data), RECORD["prompt"], max_new_tokens=2)
    assert set(tables) == set(stored.tables) == {"attention", "sinks", "image_tokens", "samples"}
    for name in ("attention", "sinks", "image_tokens"):
        pd.testing.assert_frame_equal(
            _without_ids(tables[name]), _without_ids(stored[name]), check_exact=False, atol=1e-6
        )
    assert tables["samples"]["model_answer"].tolist() == stored["samples"]["model_answer"].tolist()


def test_probe_of_one_image_equals_the_run_folder(tmp_path: Path, loaded) -> None:
    """api.probe gives the probe run's tables for the same sample and options."""
    data = write_jsonl(tmp_path / "data", [RECORD])
    options = {"probes": "knockout,logit_lens", "max_new_tokens": 2}
    run = run_probes(
        ProbeConfig(model="tiny-llava", dataset=str(data), out=str(tmp_path / "run"), device="cpu", **options),
        loaded=loaded,
        progress=False,
    )
    stored = api.read_run(run.out_dir)
    tables = api.probe(
        loaded, _image(data), RECORD["prompt"], RECORD["answer"], probes=["knockout", "logit_lens"], max_new_tokens=2
    )
    for name in ("effects", "logit_lens"):
        pd.testing.assert_frame_equal(
            _without_ids(tables[name]), _without_ids(stored[name]), check_exact=False, atol=1e-6
        )


def test_generate_pruned_and_unpruned(tmp_path: Path, loaded) -> None:
    """A keep-everything config answers as the unpruned model; a pruning config reports its decisions."""
    image = _image(write_jsonl(tmp_path / "data", [RECORD]))
    plain = api.generate(loaded, image, RECORD["prompt"], max_new_tokens=3)
    n_image = plain_image_tokens(loaded, image)
    keep_all = PruningConfig(method="fastv", num_layers=loaded.adapter.num_layers, prune_layer=1, keep_tokens=n_image)
    assert api.generate(loaded, image, RECORD["prompt"], pruning=keep_all, max_new_tokens=3).answers == plain.answers
    values = {"method": "fastv", "num_layers": loaded.adapter.num_layers, "prune_layer": 1, "keep_tokens": 4}
    pruned = api.generate(loaded, image, RECORD["prompt"], pruning=values, max_new_tokens=3)
    # FastV reads layer K-1's attention and drops tokens from layer K on: the rule fired in layer 0.
    assert pruned.selection_layer == [0] and len(pruned.kept_tokens[0]) == 4 < n_image
    # The latency mode answers and decides as the eager runtime, pruned and unpruned.
    fast = api.generate(loaded, image, RECORD["prompt"], pruning=values, max_new_tokens=3, latency=True)
    assert fast == pruned
    assert api.generate(loaded, image, RECORD["prompt"], max_new_tokens=3, latency=True).answers == plain.answers


def plain_image_tokens(loaded, image: Image.Image) -> int:
    """How many image tokens the image becomes."""
    from analysis.data.samples import Sample

    inputs = loaded.adapter.build_inputs(loaded.processor, [Sample("x", [image], prompt="q", question="q")])
    return inputs.layouts[0].n_image_tokens


def test_bad_input_is_one_clear_line(tmp_path: Path, loaded) -> None:
    """No image, a folder that is not a run, or a top-k above the image's tokens: a ConfigError naming the fix."""
    with pytest.raises(ConfigError, match="at least one image"):
        api.trace(loaded, [], "what?")
    with pytest.raises(ConfigError, match="not a run folder"):
        api.read_run(tmp_path)
    image = _image(write_jsonl(tmp_path / "data", [RECORD]))
    with pytest.raises(ConfigError, match="top_k"):
        api.trace(loaded, image, "what?", top_k=10_000)


def test_pruned_context_runs_the_model_on_dropped_tokens(tmp_path: Path, loaded) -> None:
    """Inside api.pruned a forward of the yielded inputs is the pruned model's: keep-everything changes nothing,
    a real budget changes the logits."""
    image = _image(write_jsonl(tmp_path / "data", [RECORD]))
    n_image = plain_image_tokens(loaded, image)
    layers = loaded.adapter.num_layers
    unpruned = PruningConfig(method="none", num_layers=layers)
    with api.pruned(loaded, unpruned, image, RECORD["prompt"]) as inputs, torch.no_grad():
        plain = loaded.model(**inputs.tensors).logits[:, -1]
    keep_all = PruningConfig(method="fastv", num_layers=layers, prune_layer=1, keep_tokens=n_image)
    with api.pruned(loaded, keep_all, image, RECORD["prompt"]) as inputs, torch.no_grad():
        same = loaded.model(**inputs.tensors).logits[:, -1]
    few = PruningConfig(method="fastv", num_layers=layers, prune_layer=1, keep_tokens=2)
    with api.pruned(loaded, few, image, RECORD["prompt"]) as inputs, torch.no_grad():
        pruned = loaded.model(**inputs.tensors).logits[:, -1]
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    assert not torch.allclose(pruned, plain, atol=1e-4)
