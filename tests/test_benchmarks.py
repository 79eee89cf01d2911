"""Benchmark scripts run end to end (tiny preset, CPU); their figures are not asserted."""

from __future__ import annotations

import re

import pytest
import torch

from analysis.benchmarks import trace_overhead


def test_trace_overhead_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The tracing benchmark prints one row per batch size."""
    assert (
        trace_overhead.main(
            [
                "--preset",
                "tiny",
                "--batch-sizes",
                "1",
                "2",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--device",
                "cpu",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device: cpu") and len(lines) == 4


def test_probe_time_prints_the_run_time_against_the_baseline(capsys) -> None:
    """The probe benchmark runs on a tiny model and prints the baseline, each probe and the total."""
    from analysis.benchmarks import probe_time

    assert (
        probe_time.main(
            [
                "--model",
                "tiny-llava",
                "--limit",
                "2",
                "--batch-size",
                "2",
                "--probes",
                "logit_lens,contribution",
                "--each",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    for label in ("greedy evaluation (baseline)", "logit_lens", "contribution", "all probes together"):
        assert label in printed


def test_pruned_speed_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The pruned-runtime benchmark prints one row per variant and batch size, FastV matched to VisiPruner's FLOPs."""
    from analysis.benchmarks import pruned_speed

    assert (
        pruned_speed.main(
            [
                "--preset",
                "tiny",
                "--batch-sizes",
                "1",
                "2",
                "--repeats",
                "3",
                "--rounds",
                "2",
                "--warmup",
                "0",
                # Several decoding steps: with one, generate and time to first token are within each other's noise on
                # a busy CPU, and the decode rate is not measurable.
                "--new-tokens",
                "6",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--rule-cost",
                "--methods",
                "dart",
                "cdpruner",
                "pyramiddrop",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device: cpu") and len(lines) == 2 + 2 * 8
    assert lines[2].split()[2] == "unpruned" and "visipruner keep 4 @1 exit @2" in lines[3] and "fastv keep" in lines[4]
    assert [lines[row].split()[2] for row in (5, 6, 7)] == ["dart", "cdpruner", "pyramiddrop"]
    assert lines[8].startswith("    1 vision tower alone")
    assert lines[9].startswith("    1 selection rule evaluated in 3 layers")
    unpruned = lines[2].split()
    # The unpruned row is its own baseline: speedups of exactly 1 (prefill at counts, roofline, generate, time to
    # first token), and a decode rate.
    assert [unpruned[i] for i in (-13, -11, -8, -2)] == ["1.000"] * 4 and float(unpruned[-1]) > 0
    # Every pruned variant, matched to VisiPruner's prefill FLOPs, has an ideal prefill speedup above 1, and a
    # roofline ideal of at least 1 (fewer tokens never move more bytes or FLOPs).
    assert all(float(lines[row].split()[-15]) > 1 for row in range(3, 8))
    assert all(float(lines[row].split()[-11]) >= 1 for row in range(3, 8))
    assert "measured peaks:" in lines[0] and "TFLOP/s" in lines[0]


def test_interleaved_rotates_and_counts_calls() -> None:
    """Each step is called warm-up + rounds x ceil(repeats / rounds) times (+1 per round inside a context)."""
    from contextlib import contextmanager

    from analysis.benchmarks.pruned_speed import Timed, interleaved

    calls: list[str] = []
    entered: list[str] = []

    @contextmanager
    def context():  # type: ignore[no-untyped-def]
        entered.append("b")
        yield

    entries = [Timed("a", lambda: calls.append("a")), Timed("b", lambda: calls.append("b"), context)]
    timed = interleaved(entries, torch.device("cpu"), warmup=1, repeats=4, rounds=2)
    assert calls.count("a") == 1 + 4 and calls.count("b") == 1 + 2 + 4 and len(entered) == 1 + 2
    # The second round starts with the second entry.
    assert calls[1 + 1 + 2 + 3] == "b"
    assert set(timed) == {"a", "b"} and all(m.seconds > 0 and m.spread >= 0 for m in timed.values())


def test_compile_around_attention_leaves_attention_eager() -> None:
    """--compile wraps each layer's MLP and norms in torch.compile and leaves the attention, where hooks live, alone."""
    from analysis.benchmarks.pruned_speed import compile_around_attention
    from analysis.benchmarks.trace_overhead import TINY, build_model

    model = build_model(TINY, torch.device("cpu"), torch.float32)
    compile_around_attention(model)
    for layer in model.model.language_model.layers:
        assert layer.self_attn._compiled_call_impl is None
        assert all(
            getattr(layer, name)._compiled_call_impl is not None
            for name in ("mlp", "input_layernorm", "post_attention_layernorm")
        )


def test_pruned_speed_latency_rows(capsys: pytest.CaptureFixture[str]) -> None:
    """--latency adds one row per variant in the latency mode, VisiPruner's rule live near the pinned schedule."""
    from analysis.benchmarks import pruned_speed

    argv = "--preset tiny --batch-sizes 1 --repeats 2 --rounds 1 --warmup 0 --new-tokens 3 --device cpu"
    assert pruned_speed.main([*argv.split(), "--dtype", "float32", "--latency"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "latency mode" in line]
    assert len(rows) == 4
    assert "unpruned" in rows[0] and "x1.000" in rows[0]
    assert "visipruner live: kept" in rows[1] and "@1.0" in rows[1]
    assert "its live decisions pinned" in rows[2] and "fastv live" in rows[3]
    kept = float(rows[1].split("kept ")[1].split()[0])
    assert 1 <= kept <= 8  # about the pinned 4 of the tiny preset's image tokens


def test_pruned_speed_latency_only_leaves_the_eager_rows_out(capsys: pytest.CaptureFixture[str]) -> None:
    """--latency-only prints the latency mode's four rows and none of the eager table's."""
    from analysis.benchmarks import pruned_speed

    argv = "--preset tiny --batch-sizes 1 --repeats 1 --rounds 1 --warmup 0 --new-tokens 2 --device cpu"
    assert pruned_speed.main([*argv.split(), "--dtype", "float32", "--latency-only"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if "latency mode" in line]) == 4
    # The eager table's rows start with the batch size and the prompt's token count; so does its header.
    assert not re.search(r"^\s*1\s+\d+\s", out, re.MULTILINE) and "prefill x" not in out
    assert "vision tower alone" not in out


def test_mean_layer_tokens_averages_each_samples_schedule() -> None:
    """Two samples' schedules (one selects at layer 0 keeping 2 of 4 and exits after 1, one never selects) give
    their per-layer means, by hand."""
    import numpy as np

    from analysis.benchmarks.pruned_speed import mean_layer_tokens
    from analysis.pruner.flops import LayerTokens
    from analysis.pruner.simulate import Decisions

    decisions = Decisions(np.array([0, -1]), np.array([1, -1]), [[0, 3], [0, 1, 2, 3]], [4, 4])
    # sample 0: layer 0 sees 4 image tokens, layer 1 sees 2, layer 2 none; sample 1 sees 4 everywhere.
    assert mean_layer_tokens(decisions, 10, 3) == [LayerTokens(10, 4), LayerTokens(9, 3), LayerTokens(8, 2)]


def test_latency_host_counts_the_host_work_outside_the_stand_in_replays(capsys: pytest.CaptureFixture[str]) -> None:
    """One row per variant; the rules' host work after their read-backs is counted, the unpruned model has none."""
    from analysis.benchmarks import latency_host

    assert latency_host.main(["--preset", "tiny", "--batch-sizes", "1", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("    1 ")]
    assert [row.split()[1] for row in rows] == ["unpruned", "visipruner", "fastv"]
    counts = [int(row.split("operations")[1].split()[0]) for row in rows]
    after = [int(row.split("after reads")[1].split()[0].rstrip(",")) for row in rows]
    assert all(count > 0 for count in counts) and after[0] == 0 and after[1] > 0
    assert "x1.00" in rows[0]


def test_a_recorded_replay_reruns_the_step_on_new_inputs() -> None:
    """The stand-in for a graph: after recording, changing the input and replaying refills the recorded output."""
    from analysis.benchmarks.latency_host import RecordedReplay

    values = torch.arange(4.0)
    recording = RecordedReplay()
    with recording:
        out = (values * 2).sum()
    values.copy_(torch.ones(4))
    recording.replay()
    assert out.item() == 8.0
