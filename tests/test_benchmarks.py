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
