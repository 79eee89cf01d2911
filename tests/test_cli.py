"""What a new user meets at the command line: devices, interrupts, limits, run folders, hints, modes, progress."""

from __future__ import annotations

import json
import os
import shlex
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from fixtures_data import LOCAL_RECORDS, write_jsonl

from analysis import __main__ as toolkit_main
from analysis import evaluate as evaluate_module
from analysis import runs
from analysis.evaluate import main as evaluate_main
from analysis.probes import run as probes_run
from analysis.probes.__main__ import main as probes_main
from analysis.pruner.__main__ import main as pruner_main
from analysis.results import read_table
from analysis.stages import main as stages_main
from analysis.trace import run as trace_run
from analysis.trace.__main__ import main as trace_main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _dataset(root: Path, copies: int = 2) -> str:
    """A local dataset of len(LOCAL_RECORDS) * copies samples with unique ids."""
    records = [{**record, "id": f"{record['id']}-{copy}"} for copy in range(copies) for record in LOCAL_RECORDS]
    return str(write_jsonl(root / "data", records))


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failed command printed on stderr (progress bars and log lines aside)."""
    lines = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.startswith(("error:", "interrupted")) or "Traceback" in line
    ]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("device", "fix"),
    [("cuda", "--device cpu"), ("cuda:7", "--device cpu"), ("gpu", "use cpu, cuda, cuda:N, mps or auto")],
)
def test_unusable_device_is_one_line_naming_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], device: str, fix: str
) -> None:
    """--device cuda on a CPU-only torch, or an unknown device name, fails in one line before anything is written."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    assert (
        trace_main(["--model", "tiny-llava", "--dataset", _dataset(tmp_path), "--device", device, "--out", str(out)])
        == 2
    )
    line = _error_line(capsys)
    assert fix in line and device in line
    assert not out.exists()


def _interrupt_second_call(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
    """Make ``module.name`` raise KeyboardInterrupt on its second call, as Ctrl-C in the second batch would."""
    real: Callable[..., object] = getattr(module, name)
    calls = {"n": 0}

    def interrupted(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


@pytest.mark.parametrize("command", ["trace", "probes", "evaluate"])
def test_ctrl_c_says_what_was_kept_and_how_to_continue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """Ctrl-C prints one line with what the folder keeps and the exact command that continues; that command works."""
    mains = {
        "trace": (trace_main, trace_run, "trace_batch", "samples"),
        "probes": (probes_main, probes_run, "probe_batch", "samples"),
        "evaluate": (evaluate_main, evaluate_module, "_prediction_rows", "predictions"),
    }
    main, module, name, table = mains[command]
    data = _dataset(tmp_path)
    out = tmp_path / "run"
    argv = [
        "--model",
        "tiny-llava",
        "--dataset",
        data,
        "--batch-size",
        "3",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--max-new-tokens",
        "2",
    ]
    if command == "probes":
        argv += ["--probes", "knockout,contribution", "--knockout-modes", "single"]
    with monkeypatch.context() as patch:
        _interrupt_second_call(patch, module, name)
        assert main(argv) == 130
    line = _error_line(capsys)
    n_samples = 2 * len(LOCAL_RECORDS)
    assert line.startswith("interrupted:") and f"keeps 3 of {n_samples} samples" in line
    continuation = line.split("continue with: ", 1)[1]
    words = shlex.split(continuation)
    assert words[:3] == ["python", "-m", f"analysis.{command}"] and words[-1] == "--resume"
    assert main(words[3:]) == 0
    assert sorted(read_table(out, table).to_pandas()["sample_id"]) == sorted(
        f"{r['id']}-{c}" for c in range(2) for r in LOCAL_RECORDS
    )


def test_interrupt_before_any_result_says_nothing_was_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the model loads is one line, exit status 130."""

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "load_model", interrupted)
    assert trace_main(["--dataset", _dataset(tmp_path), "--out", str(tmp_path / "run")]) == 130
    assert "before any new result was written" in _error_line(capsys)


@pytest.mark.parametrize(
    "build",
    [
        lambda: __import__("analysis.trace.__main__", fromlist=["build_parser"]).build_parser(),
        lambda: __import__("analysis.probes.__main__", fromlist=["build_parser"]).build_parser(),
    ],
)
@pytest.mark.parametrize("word", ["all", "none", "ALL"])
def test_limit_all_means_the_whole_split(build: Callable[[], object], word: str) -> None:
    """--limit all (or none) parses to the whole split, which is also the default."""
    parser = build()
    assert parser.parse_args(["--limit", word]).limit is None  # type: ignore[attr-defined]
    assert parser.parse_args([]).limit is None  # type: ignore[attr-defined]
    assert parser.parse_args(["--limit", "7"]).limit == 7  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "command", [["analysis.trace"], ["analysis.probes"], ["analysis.evaluate"], ["analysis.pruner", "sweep"]]
)
def test_every_limit_help_is_true(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Each dataset command documents --limit the same way: N or all, default all; no 'default: None'."""
    mains = {
        "analysis.trace": trace_main,
        "analysis.probes": probes_main,
        "analysis.evaluate": evaluate_main,
        "analysis.pruner": pruner_main,
    }
    with pytest.raises(SystemExit):
        mains[command[0]]([*command[1:], "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "first N samples of the split, or all; default: all" in text
    assert "(default: None)" not in text


def test_limit_zero_names_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--limit 0 says to pass a positive N or all, and all is accepted by the same command."""
    data = _dataset(tmp_path, copies=1)
    assert (
        evaluate_main(["--model", "tiny-llava", "--dataset", data, "--limit", "0", "--out", str(tmp_path / "bad")]) == 2
    )
    assert "or all" in _error_line(capsys)
    assert (
        evaluate_main(
            [
                "--model",
                "tiny-llava",
                "--dataset",
                data,
                "--limit",
                "all",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "all"),
            ]
        )
        == 0
    )
    assert len(pd.read_parquet(tmp_path / "all" / "predictions")) == len(LOCAL_RECORDS)


def test_evaluate_out_follows_the_run_folder_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """evaluate --out refuses a trace run and an evaluation of another config, refuses an unfinished one without
    --resume, and accepts re-running a finished one of the same config."""
    data = _dataset(tmp_path, copies=1)
    base = ["--model", "tiny-llava", "--dataset", data, "--device", "cpu", "--max-new-tokens", "2"]
    trace_dir, eval_dir = tmp_path / "trace", tmp_path / "eval"
    assert trace_main([*base, "--out", str(trace_dir), "--quiet"]) == 0
    capsys.readouterr()
    before = sorted(path.name for path in trace_dir.rglob("*"))
    assert evaluate_main([*base, "--out", str(trace_dir)]) == 2
    assert "holds a run of analysis.trace, not of analysis.evaluate" in _error_line(capsys)
    assert sorted(path.name for path in trace_dir.rglob("*")) == before
    assert evaluate_main([*base, "--out", str(eval_dir)]) == 0
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["command"] == "analysis.evaluate"
    assert (
        evaluate_main([*base, "--out", str(eval_dir), "--config", str(CONFIGS / "shapes-llava.visipruner.json")]) == 2
    )
    assert "different config" in _error_line(capsys)
    assert evaluate_main([*base[:-1], "3", "--out", str(eval_dir)]) == 2
    assert "max_new_tokens" in _error_line(capsys)
    assert evaluate_main([*base, "--out", str(eval_dir)]) == 0  # a finished run of the same config: nothing to do
    assert len(pd.read_parquet(eval_dir / "predictions")) == len(LOCAL_RECORDS)


def test_export_hint_adds_the_missing_probe_as_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """export on a run without contributions prints a command that adds them to that run; it works as printed,
    the manifest records the addition and the added table equals one recorded from the start."""
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    base = ["--limit", "4", "--batch-size", "2", "--device", "cpu", "--knockout-modes", "upto,from"]
    assert probes_main([*base, "--probes", "knockout", "--out", str(run), "--quiet"]) == 0
    assert pruner_main(["export", str(run), "-o", str(tmp_path / "config.json"), "--device", "cpu"]) == 2
    line = _error_line(capsys)
    words = shlex.split(line.split("add it to the run with: ", 1)[1])
    assert words[:3] == ["python", "-m", "analysis.probes"] and "--resume" in words
    assert probes_main(words[3:]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["identity"]["probes"] == "knockout,contribution"
    assert [entry["probes"] for entry in manifest["extended"]] == [["contribution"]]
    assert probes_main([*base, "--probes", "knockout,contribution", "--out", str(fresh), "--quiet"]) == 0
    for table in ("contributions", "effects", "samples"):
        added = read_table(run, table).to_pandas()
        expected = read_table(fresh, table).to_pandas()
        columns = [c for c in ("sample_id", "layer", "variant", "layer_start", "ordinal", "position") if c in added]
        pd.testing.assert_frame_equal(
            added.sort_values(columns).reset_index(drop=True), expected.sort_values(columns).reset_index(drop=True)
        )


def test_adding_a_probe_into_a_table_the_run_holds_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """masking writes the effects table that knockout filled: adding it says to use a new folder."""
    run = tmp_path / "run"
    base = [
        "--model",
        "tiny-llava",
        "--dataset",
        _dataset(tmp_path, copies=1),
        "--device",
        "cpu",
        "--knockout-modes",
        "single",
        "--out",
        str(run),
    ]
    assert probes_main([*base, "--probes", "knockout", "--quiet"]) == 0
    assert probes_main([*base, "--probes", "knockout,masking", "--resume"]) == 2
    assert "would write into the effects table" in _error_line(capsys)


def test_stages_without_kv_removal_names_the_probe_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No 'layer None [95% CI nan-nan]': the report names the command that adds the KV-removal probe, which works."""
    run = tmp_path / "run"
    assert (
        probes_main(
            [
                "--limit",
                "3",
                "--device",
                "cpu",
                "--probes",
                "knockout",
                "--knockout-modes",
                "upto,from",
                "--out",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )
    assert stages_main([str(run), "--n-bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    assert "kv_deep_start" not in printed and "nan" not in printed
    kv_line = next(line for line in printed.splitlines() if line.startswith("KV-removal check"))
    words = shlex.split(kv_line.split("add it with: ", 1)[1].rstrip(")"))
    assert probes_main(words[3:]) == 0
    assert stages_main([str(run), "--n-bootstrap", "20"]) == 0
    kv_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("KV-removal check"))
    assert "layer " in kv_line and "None" not in kv_line


def test_output_files_get_the_usual_mode(tmp_path: Path) -> None:
    """Run files are created as open() would create them under the umask (0644 under 022), not mkstemp's 0600."""
    previous = os.umask(0o022)
    try:
        assert (
            trace_main(
                [
                    "--model",
                    "tiny-llava",
                    "--dataset",
                    _dataset(tmp_path, copies=1),
                    "--device",
                    "cpu",
                    "--out",
                    str(tmp_path / "run"),
                    "--max-new-tokens",
                    "0",
                    "--quiet",
                ]
            )
            == 0
        )
    finally:
        os.umask(previous)
    files = [path for path in (tmp_path / "run").rglob("*") if path.is_file()]
    assert files and {stat.S_IMODE(path.stat().st_mode) for path in files} == {0o644}


def test_long_commands_show_progress_in_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pruned evaluate and pruner sweep draw progress bars counted in samples."""
    assert (
        evaluate_main(
            [
                "--split",
                "validation",
                "--limit",
                "4",
                "--config",
                str(CONFIGS / "shapes-llava.visipruner.json"),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "pruned"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "evaluate (unpruned and pruned)" in err and "4/4" in err and "sample" in err
    assert (
        pruner_main(
            [
                "sweep",
                str(CONFIGS / "shapes-llava.visipruner.json"),
                "--limit",
                "2",
                "--batch-size",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    # Clean answers, the config and its FLOPs-matched baselines (all of which run on the LLaVA organism), 2 samples.
    from analysis.pruner.sweep import BASELINES

    passes = 2 * (2 + len(BASELINES))
    assert "sweep" in err and f"{passes}/{passes}" in err and "sample" in err


def test_ablation_band_errors_name_the_real_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--ablation-layers 5:3 is reported as reversed; 0:13 names the model's layers 0..11."""
    base = ["--limit", "2", "--device", "cpu", "--probes", "token_ablation", "--out", str(tmp_path / "out")]
    assert probes_main([*base, "--ablation-layers", "5:3"]) == 2
    line = _error_line(capsys)
    assert "START must be below END" in line and "3:5" in line and "0..12" not in line
    assert probes_main([*base, "--ablation-layers", "0:13"]) == 2
    assert "layers 0..11" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_top_k_beyond_the_image_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--top-k 500 on a 64-token image is one error line before anything is written, not a silent clamp."""
    out = tmp_path / "out"
    assert trace_main(["--limit", "2", "--top-k", "500", "--device", "cpu", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert "--top-k 500 exceeds the 64 image tokens" in line and "--top-k <= 64" in line
    assert not out.exists()


def test_no_transformers_future_warnings(tmp_path: Path) -> None:
    """A trace, the probes and a pruned evaluation run without a FutureWarning (transformers' deprecations)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert trace_main(["--limit", "2", "--device", "cpu", "--out", str(tmp_path / "t"), "--quiet"]) == 0
        assert (
            probes_main(
                [
                    "--limit",
                    "2",
                    "--device",
                    "cpu",
                    "--knockout-modes",
                    "single",
                    "--out",
                    str(tmp_path / "p"),
                    "--quiet",
                ]
            )
            == 0
        )
        assert (
            evaluate_main(
                [
                    "--split",
                    "validation",
                    "--limit",
                    "2",
                    "--config",
                    str(CONFIGS / "shapes-llava.visipruner.json"),
                    "--device",
                    "cpu",
                    "--out",
                    str(tmp_path / "e"),
                ]
            )
            == 0
        )
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not future, future


def test_toolkit_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """python -m analysis --help lists the commands, and each listed one exists with a main()."""
    import importlib
    import importlib.util

    with pytest.raises(SystemExit):
        toolkit_main.main(["--help"])
    text = capsys.readouterr().out
    for name in toolkit_main.COMMANDS:
        assert f"python -m {name}" in text
        spec = importlib.util.find_spec(name)
        assert spec is not None, name
        module = importlib.import_module(f"{name}.__main__" if spec.submodule_search_locations else name)
        assert callable(module.main)


def test_offline_hub_benchmark_names_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dataset gqa without network ends in one line naming --data-dir (the flag), not data_dir."""
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert trace_main(["--model", "tiny-llava", "--dataset", "gqa", "--out", str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert "--data-dir" in line and "pass data_dir" not in line
    assert not (tmp_path / "out").exists()
