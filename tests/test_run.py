"""The trace command end to end: run folder contents, resume after a crash, and bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import FAMILIES
from fixtures_data import LOCAL_RECORDS, write_jsonl, write_pope

from analysis import results
from analysis.errors import ConfigError
from analysis.results import TRACE_SCHEMAS, read_table
from analysis.trace.__main__ import main
from analysis.trace.run import TraceConfig, run_trace

N_SAMPLES = 7


def _dataset(root: Path) -> Path:
    """A local jsonl dataset of seven one- and two-image samples."""
    records = []
    for index in range(N_SAMPLES):
        record = dict(LOCAL_RECORDS[index % len(LOCAL_RECORDS)])
        record["id"] = f"r{index}"
        records.append(record)
    return write_jsonl(root / "data", records)


def _config(root: Path, **overrides) -> TraceConfig:
    """A tiny-llava trace config over the local dataset, three samples per batch."""
    values = dict(
        model="tiny-llava",
        dataset=str(_dataset(root)),
        limit=None,
        batch_size=3,
        out=str(root / "run"),
        max_new_tokens=2,
        device="cpu",
    )
    values.update(overrides)
    return TraceConfig(**values)


def _table_ids(run: Path, table: str) -> list[str]:
    """Sample ids of a table in part order (with repetitions)."""
    return read_table(run, table).column("sample_id").to_pylist()


def test_run_folder_contents(tmp_path: Path) -> None:
    """Every table holds every sample with the declared schema; the manifest records config and versions."""
    result = run_trace(_config(tmp_path), progress=False)
    assert result.n_samples == N_SAMPLES
    run = result.out_dir
    assert _table_ids(run, "samples") == [f"r{i}" for i in range(N_SAMPLES)]
    for name, schema in TRACE_SCHEMAS.items():
        table = read_table(run, name)
        assert table.schema.equals(schema, check_metadata=False)
        assert set(table.column("sample_id").to_pylist()) == {f"r{i}" for i in range(N_SAMPLES)}
        part = pq.read_schema(next((run / name).glob("part-*.parquet")))
        assert part.metadata[b"schema_version"] == str(results.SCHEMA_VERSION).encode()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["finished"]
    assert manifest["config"]["batch_size"] == 3 and manifest["model"]["model_type"] == "llava"
    assert {"torch", "transformers", "nnsight", "pyarrow"} <= set(manifest["package_versions"])
    assert "git_hash" in manifest and manifest["schema_version"] == results.SCHEMA_VERSION
    attention = read_table(run, "attention").to_pandas()
    n_layers, n_heads = manifest["model"]["num_layers"], manifest["model"]["num_heads"]
    assert len(attention) == N_SAMPLES * n_layers * n_heads * 9
    samples = read_table(run, "samples").to_pandas().set_index("sample_id")
    assert len(samples.loc["r3", "image_starts"]) == 2
    assert samples["model_answer"].notna().all()


def test_resume_after_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed while writing its second batch resumes without losing or duplicating samples."""
    reference = run_trace(_config(tmp_path, out=str(tmp_path / "reference")), progress=False).out_dir
    real_write = results.atomic_write_table
    calls = {"samples": 0}

    def dying_write(path: Path, table) -> None:
        if path.parent.name == "samples":
            calls["samples"] += 1
            if calls["samples"] == 2:
                raise KeyboardInterrupt  # killed after the other tables of batch 2 were written
        real_write(path, table)

    monkeypatch.setattr(results, "atomic_write_table", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_trace(_config(tmp_path), progress=False)
    monkeypatch.setattr(results, "atomic_write_table", real_write)
    run = tmp_path / "run"
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"
    assert len(list((run / "attention").glob("part-*.parquet"))) == 2  # one orphan part

    with pytest.raises(ConfigError, match="unfinished run.*--resume"):
        run_trace(_config(tmp_path), progress=False)
    result = run_trace(_config(tmp_path, resume=True, batch_size=2), progress=False)
    assert result.n_new == N_SAMPLES - 3
    for name in TRACE_SCHEMAS:
        resumed = read_table(run, name).to_pandas()
        expected = read_table(reference, name).to_pandas()
        assert sorted(resumed["sample_id"].unique()) == sorted(expected["sample_id"].unique())
        keys = [
            c
            for c in ("sample_id", "layer", "head", "query", "key_region", "image_index", "token_index")
            if c in expected
        ]
        resumed = resumed.sort_values(keys).reset_index(drop=True)
        expected = expected.sort_values(keys).reset_index(drop=True)
        assert len(resumed) == len(expected), f"{name}: duplicated or lost rows"
        numeric = [c for c in expected.columns if expected[c].dtype.kind == "f"]
        assert ((resumed[numeric] - expected[numeric]).abs().max() < 1e-5).all()


def test_different_config_refused(tmp_path: Path) -> None:
    """An output folder holding another config is refused, naming what differs, and is left untouched."""
    run_trace(_config(tmp_path), progress=False)
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(ConfigError, match="top_k: 5 -> 3"):
        run_trace(_config(tmp_path, top_k=3, resume=True), progress=False)
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before
    # The same config again finds the run complete and adds nothing.
    assert run_trace(_config(tmp_path), progress=False).n_new == 0
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI expecting a user error; return its single stderr line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err)
    return errors[0]


def test_cli_prints_results_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI says where results went and prints one summary line per layer."""
    out = tmp_path / "cli"
    assert main(["--dataset", str(_dataset(tmp_path)), "--out", str(out), "--limit", "2", "--quiet"]) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    assert main(["--dataset", str(_dataset(tmp_path)), "--out", str(tmp_path / "cli2"), "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    # The default model is the 12-layer organism.
    assert "last->image" in printed and len([ln for ln in printed.splitlines() if ln.strip()[:1].isdigit()]) == 12


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "llava-9000"], "unknown model 'llava-9000'"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_cli_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    """Bad arguments give one error line and write nothing."""
    out = tmp_path / "out"
    line = _cli_error(capsys, ["--dataset", str(_dataset(tmp_path)), "--out", str(out), *extra])
    assert message in line
    assert not out.exists()


def test_cli_bad_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sample without an image, an unreadable image and a missing split stop the run before any output."""
    out = tmp_path / "out"
    no_image = write_jsonl(tmp_path / "no_image", [{"id": "t1", "question": "what is two plus two?", "answer": "4"}])
    assert "no image" in _cli_error(capsys, ["--dataset", str(no_image), "--out", str(out)])
    corrupt = write_jsonl(
        tmp_path / "corrupt", [{"id": "c1", "image": "images/bad.png", "question": "q", "answer": "a"}]
    )
    (corrupt / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert "c1" in _cli_error(capsys, ["--dataset", str(corrupt), "--out", str(out)])
    pope = write_pope(tmp_path / "hub")
    line = _cli_error(capsys, ["--dataset", "pope", "--data-dir", str(pope), "--split", "nope", "--out", str(out)])
    assert "nope" in line and "test" in line
    assert not out.exists()


def test_cli_models_without_image_understanding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A VLM whose config has no image token, and a text-only model, are refused with the fix."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from analysis.models.llava import LlavaAdapter

    out = tmp_path / "out"
    data = str(_dataset(tmp_path))
    model = LlavaAdapter.tiny_model()
    model.config.image_token_id = 5  # an ordinary word: the model has no image token its processor emits
    model.save_pretrained(tmp_path / "no_image_token")
    LlavaAdapter.tiny_processor().save_pretrained(tmp_path / "no_image_token")
    assert "is not the processor's image token" in _cli_error(
        capsys, ["--model", str(tmp_path / "no_image_token"), "--dataset", data, "--out", str(out)]
    )
    LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    ).save_pretrained(tmp_path / "text_only")
    line = _cli_error(capsys, ["--model", str(tmp_path / "text_only"), "--dataset", data, "--out", str(out)])
    assert "model_type 'llama'" in line
    assert not out.exists()


def test_sink_statistics_by_hand() -> None:
    """Top-k share, entropy and top indices of known image-attention rows, padding slots ignored."""
    import numpy as np
    import torch

    from analysis.trace.run import _sink_table
    from analysis.trace.tracer import sink_statistics

    rows = torch.zeros(1, 1, 2, 5)
    rows[0, 0, 0, :4] = torch.tensor([0.1, 0.4, 0.0, 0.3])  # last query: 0.8 of its mass on images
    rows[0, 0, 1, :4] = 0.25
    valid = torch.tensor([[True, True, True, True, False]])  # a fifth slot of batch padding
    top_values, top_indices, entropy = sink_statistics(rows, valid, top_k=2)
    table = _sink_table(
        "x", rows.sum(-1)[0:1].numpy(), top_values.numpy(), top_indices.numpy(), entropy.numpy(), k=2, n_image=4
    ).to_pylist()
    last, instruction = table
    p = np.array([0.125, 0.5, 0.375])
    assert last["query"] == "last" and abs(last["image_mass"] - 0.8) < 1e-6
    assert abs(last["top_k_share"] - 0.875) < 1e-6 and last["top_indices"] == [1, 3]
    assert abs(last["entropy"] - float(-(p * np.log(p)).sum())) < 1e-6
    assert abs(instruction["normalized_entropy"] - 1.0) < 1e-6 and instruction["top_k_share"] == pytest.approx(0.5)
    assert all(index < 4 for index in instruction["top_indices"])


def test_resume_refuses_retrained_weights(tmp_path: Path) -> None:
    """A folder traced with one checkpoint is not resumed with other weights saved at the same path."""
    import shutil

    from analysis.organism import ORGANISM_DIR

    checkpoint = tmp_path / "organism"
    shutil.copytree(ORGANISM_DIR, checkpoint)
    config = _config(tmp_path, model=str(checkpoint), dataset="shapes-vqa", limit=2, batch_size=2)
    run_trace(config, progress=False)
    run_trace(config, progress=False)  # the same weights: a finished run, nothing left to do
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte belongs to the last tensor: "retrained" weights, same names and shapes
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="weights: '[0-9a-f]+' -> '[0-9a-f]+'"):
        run_trace(replace(config, resume=True), progress=False)


# Processors with a video part (Qwen VL, LLaVA-OneVision) cannot be saved or loaded without their video processor,
# whose class needs torchvision (not a dependency); the README's support matrix says so.
# Every family: an image-and-video processor saves and loads without its video part when torchvision is missing.
SAVABLE_FAMILIES = sorted(FAMILIES)


@pytest.mark.parametrize("family", SAVABLE_FAMILIES)
def test_a_saved_model_traces_by_path(tmp_path: Path, family: str) -> None:
    """A family's tiny model saved with save_pretrained (model and processor) traces by path through the command,
    with the same tables as the built-in model."""
    from analysis.models.registry import load_model

    folder = tmp_path / "checkpoint"
    loaded = load_model(FAMILIES[family])
    loaded.model.save_pretrained(folder)
    loaded.processor.save_pretrained(folder)
    data = str(_dataset(tmp_path))
    for name, model in (("builtin", FAMILIES[family]), ("saved", str(folder))):
        argv = ["--model", model, "--dataset", data, "--limit", "3", "--out", str(tmp_path / name), "--quiet"]
        assert main([*argv, "--device", "cpu"]) == 0
    for table in ("attention", "sinks", "image_tokens"):
        builtin = read_table(tmp_path / "builtin", table).to_pandas()
        saved = read_table(tmp_path / "saved", table).to_pandas()
        assert builtin.equals(saved), table


def test_device_map_is_the_device_flag_under_its_accelerate_name() -> None:
    """``--device-map auto`` (as accelerate and lmms-eval users write it) sets the same field as ``--device auto``,
    on every command that loads a model."""
    import argparse

    from analysis.config import add_arguments, from_namespace
    from analysis.evaluate import EvalConfig
    from analysis.plan import build_parser
    from analysis.probes.run import ProbeConfig

    for config_cls in (TraceConfig, ProbeConfig, EvalConfig):
        parser = argparse.ArgumentParser()
        add_arguments(parser, config_cls)
        for flag in ("--device", "--device-map"):
            assert from_namespace(config_cls, parser.parse_args([flag, "auto"])).device == "auto"
    plan_args = build_parser().parse_args(["--model", "qwen2.5-vl-72b", "--questions", "10", "--device-map", "auto"])
    assert plan_args.device == "auto"
