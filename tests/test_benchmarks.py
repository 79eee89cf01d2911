"""Benchmark scripts run end to end (tiny preset, CPU); their figures are not asserted."""

from __future__ import annotations

import pytest

from analysis.benchmarks import trace_overhead


def test_trace_overhead_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The tracing benchmark prints one row per batch size."""
    assert trace_overhead.main(["--preset", "tiny", "--batch-sizes", "1", "2", "--repeats", "1", "--warmup", "0",
                                "--device", "cpu", "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device: cpu") and len(lines) == 4


def test_probe_time_prints_the_run_time_against_the_baseline(capsys) -> None:
    """The probe benchmark runs on a tiny model and prints the baseline, each probe and the total."""
    from analysis.benchmarks import probe_time

    assert probe_time.main(["--model", "tiny-llava", "--limit", "2", "--batch-size", "2",
                            "--probes", "logit_lens,contribution", "--each"]) == 0
    printed = capsys.readouterr().out
    for label in ("greedy evaluation (baseline)", "logit_lens", "contribution", "all probes together"):
        assert label in printed


def test_pruned_speed_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The pruned-runtime benchmark prints one row per variant and batch size, FastV matched to VisiPruner's FLOPs."""
    from analysis.benchmarks import pruned_speed

    assert pruned_speed.main(["--preset", "tiny", "--batch-sizes", "1", "2", "--repeats", "1", "--warmup", "0",
                              "--new-tokens", "2", "--device", "cpu", "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device: cpu") and len(lines) == 2 + 2 * 3
    assert "visipruner keep 4 @1 exit @2" in lines[3] and "fastv keep" in lines[4]
