"""The evaluate command: per-family accuracy table, outputs, and batch-independent answers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAMILIES
from fixtures_data import LOCAL_RECORDS, write_jsonl

from analysis.evaluate import EvalConfig, accuracy_table, evaluate, main


def test_accuracy_table_counts_families() -> None:
    """Accuracy per family and overall, in percent."""
    predictions = pd.DataFrame({"family": ["a", "a", "b"], "correct": [True, False, True]})
    table = accuracy_table(predictions)
    assert table.loc["a", "accuracy"] == 50 and table.loc["overall", "n"] == 3
    assert table.loc["overall", "accuracy"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("model", [FAMILIES[name] for name in sorted(FAMILIES)])
def test_answers_do_not_depend_on_batching(tmp_path: Path, model: str) -> None:
    """Greedy answers of a left-padded batch equal those of one-sample batches."""
    data = str(write_jsonl(tmp_path / "data", LOCAL_RECORDS))
    batched = evaluate(EvalConfig(model=model, dataset=data, batch_size=4, device="cpu"), progress=False)
    single = evaluate(EvalConfig(model=model, dataset=data, batch_size=1, device="cpu"), progress=False)
    assert batched["prediction"].tolist() == single["prediction"].tolist()
    assert len(batched) == len(LOCAL_RECORDS)


def test_cli_writes_predictions_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI prints the table and writes the predictions table and summary.json."""
    data = str(write_jsonl(tmp_path / "data", LOCAL_RECORDS))
    out = tmp_path / "eval"
    assert main(["--dataset", data, "--out", str(out), "--device", "cpu"]) == 0
    assert "overall" in capsys.readouterr().out
    assert len(pd.read_parquet(out / "predictions")) == len(LOCAL_RECORDS)
    assert "overall" in json.loads((out / "summary.json").read_text())["accuracy"]
    assert main(["--dataset", data, "--limit", "0", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_cli_evaluates_a_pruning_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--config`` (the issue's spelling of ``--pruning-config``) runs the shipped config, ours or the authors' JSON;
    a config for another depth is refused before anything is written."""
    configs = Path(__file__).resolve().parent.parent / "configs"
    data = str(write_jsonl(tmp_path / "data", LOCAL_RECORDS))
    for flag, name in (
        ("--config", "shapes-llava.visipruner.json"),
        ("--pruning-config", "shapes-llava.visipruner.authors.json"),
    ):
        out = tmp_path / name
        assert (
            main(
                [
                    "--split",
                    "validation",
                    "--limit",
                    "16",
                    flag,
                    str(configs / name),
                    "--out",
                    str(out),
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        summary = json.loads((out / "pruned_summary.json").read_text())["summary"]
        assert 0 < summary["flops_cut"] < 100 and 0 <= summary["agreement"] <= 100
        assert "flops_cut" in capsys.readouterr().out
    deeper = json.loads((configs / "shapes-llava.visipruner.json").read_text())
    deeper["num_layers"] = 32
    (tmp_path / "deeper.json").write_text(json.dumps(deeper))
    assert (
        main(
            [
                "--dataset",
                data,
                "--config",
                str(tmp_path / "deeper.json"),
                "--out",
                str(tmp_path / "bad"),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "32-layer model but this model has 12 layers" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_latency_runtime_answers_as_drop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--pruning-runtime latency``: the same pruned and unpruned answers and decisions as the eager runtime."""
    config = str(Path(__file__).resolve().parent.parent / "configs" / "shapes-llava.visipruner.json")
    tables = {}
    for runtime in ("drop", "latency"):
        out = tmp_path / runtime
        argv = ["--split", "validation", "--limit", "12", "--config", config, "--out", str(out), "--device", "cpu"]
        assert main([*argv, "--pruning-runtime", runtime]) == 0
        tables[runtime] = pd.read_parquet(out / "pruned_predictions").sort_values("sample_id", ignore_index=True)
    capsys.readouterr()
    columns = ["baseline_answer", "pruned_answer", "selection_layer", "exit_layer", "n_kept", "flops"]
    pd.testing.assert_frame_equal(tables["drop"][columns], tables["latency"][columns])
    plain = tmp_path / "plain"
    argv = ["--split", "validation", "--limit", "12", "--out", str(plain), "--device", "cpu"]
    assert main([*argv, "--pruning-runtime", "latency"]) == 0
    predictions = pd.read_parquet(plain / "predictions").sort_values("sample_id", ignore_index=True)
    assert predictions["prediction"].tolist() == tables["drop"]["baseline_answer"].tolist()
