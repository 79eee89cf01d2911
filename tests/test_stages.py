"""Stage analysis on synthetic probe runs with known boundaries."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from fixtures_runs import DEEP_START, N_LAYERS, SHALLOW_END, write_synthetic_run

from analysis.errors import ConfigError
from analysis.probes.run import PROBE_SCHEMAS
from analysis.results import SAMPLES_TABLE, RunFolder
from analysis.stages import StageConfig, analyse, main


def test_exact_boundaries_recovered(tmp_path: Path) -> None:
    """Noise-free curves give S, D and the KV boundary exactly, overall and per family."""
    run = write_synthetic_run(tmp_path / "run", 20)
    report = analyse(run, StageConfig(n_bootstrap=20))
    b = report.overall
    assert (b.shallow_end, b.deep_start, b.kv_deep_start) == (SHALLOW_END, DEEP_START, DEEP_START)
    assert b.layers_holding_mass == 1  # cutting layers [0, S] is the single step of f_upto: abrupt
    assert set(report.by_family["shallow_end"]) == {SHALLOW_END}
    assert set(report.by_family["deep_start"]) == {DEEP_START}
    assert (report.intervals["low"] == report.intervals["high"]).all()


def test_bootstrap_intervals_cover_truth_on_noisy_data(tmp_path: Path) -> None:
    """With 2% spurious flips and an 80% effect, the 95% intervals contain the true boundaries."""
    run = write_synthetic_run(tmp_path / "noisy", 300, noise=0.02, effect=0.8, seed=3)
    config = StageConfig(tolerance=0.05, n_bootstrap=200)
    report = analyse(run, config)
    for name, truth in (("shallow_end", SHALLOW_END), ("deep_start", DEEP_START), ("kv_deep_start", DEEP_START)):
        low, high = report.intervals.loc[name, ["low", "high"]]
        assert low <= truth <= high, (name, low, high)


def test_missing_probe_names_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run without the needed knockouts says which probe to run."""
    run = write_synthetic_run(tmp_path / "run", 4)
    assert main([str(run), "--query", "last"]) == 2
    error = capsys.readouterr().err
    assert "last->image:upto" in error and "python -m analysis.probes" in error


def test_other_schema_version_refused(tmp_path: Path) -> None:
    """Parquet written under another schema version is refused with the fix."""
    import json

    run = write_synthetic_run(tmp_path / "run", 4)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["schema_version"] = 0
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="schema version 0"):
        analyse(run, StageConfig(n_bootstrap=0))


def test_thresholds_validated() -> None:
    """Out-of-range thresholds are refused."""
    with pytest.raises(ConfigError, match="--onset"):
        StageConfig(onset=1.5).validate()


def test_critical_tokens_recovered(tmp_path: Path) -> None:
    """Known critical tokens (flip or large log-prob drop) are found exactly, with overlap statistics."""
    run = write_synthetic_run(tmp_path / "run", 6)
    truth = {f"s{i:04d}": {i % 5, (i + 2) % 5} for i in range(6)}
    ablation, contributions = [], []
    for sample_id, critical in truth.items():
        for ordinal in range(8):
            flip = ordinal == min(critical)
            drop = -3.0 if ordinal == max(critical) else -0.1
            ablation.append(
                {
                    "sample_id": sample_id,
                    "image_index": 0,
                    "token_index": ordinal,
                    "ordinal": ordinal,
                    "layer_start": 4,
                    "layer_end": 8,
                    "delta_logprob": drop,
                    "kl": 0.1,
                    "top1_match": not flip,
                }
            )
            for layer in range(N_LAYERS):
                # In the band the critical tokens are the most attended; before it token 7 is the sink.
                attention = (
                    (0.5 if ordinal in critical else 0.01) if 4 <= layer < 8 else (0.6 if ordinal == 7 else 0.02)
                )
                contributions.append(
                    {
                        "sample_id": sample_id,
                        "layer": layer,
                        "image_index": 0,
                        "token_index": ordinal,
                        "position": 10 + ordinal,
                        "attention": attention,
                        "cosine_without": 0.99,
                        "norm": attention,
                    }
                )
    folder = RunFolder(run, {})
    for name, rows in (("token_ablation", ablation), ("contributions", contributions)):
        from analysis.results import atomic_write_table

        atomic_write_table(run / name / "part-00000.parquet", pa.Table.from_pylist(rows, schema=PROBE_SCHEMAS[name]))
    assert folder.part_indices(SAMPLES_TABLE) == {0}
    report = analyse(run, StageConfig(n_bootstrap=0))
    critical = report.critical
    assert {sample: set(ordinals) for sample, ordinals in critical["critical_ordinals"].items()} == truth
    assert (critical["n_critical"] == 2).all()
    assert (critical["overlap_top_attended"] == 1.0).all() and (critical["overlap_sinks"] <= 0.5).all()
