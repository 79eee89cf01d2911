"""The findings table: every row read from the run that holds its table, checked against direct computation."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from fixtures_runs import DEEP_START, SHALLOW_END, write_synthetic_run

from analysis.findings import findings, format_findings, image_share, main, masking_findings, sink_findings
from analysis.probes.run import ProbeConfig, run_probes
from analysis.results import read_table
from analysis.stages import StageConfig, critical_tokens
from analysis.trace.run import TraceConfig, run_trace

FAST = StageConfig(n_bootstrap=50, critical_threshold=0.001)  # a tiny threshold so a random model has critical tokens


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> tuple[Path, Path, Path]:
    """A trace run and two probe runs (stages; everything else) of the tiny LLaVA on six ShapesVQA questions."""
    root = tmp_path_factory.mktemp("findings")
    common = {"model": "tiny-llava", "dataset": "shapes-vqa", "limit": 6, "device": "cpu", "max_new_tokens": 2}
    run_trace(TraceConfig(**common, out=str(root / "trace")), progress=False)
    run_probes(
        ProbeConfig(**common, out=str(root / "stages"), probes="knockout,kv_removal", knockout_modes="upto,from"),
        progress=False,
    )
    run_probes(
        ProbeConfig(
            **common, out=str(root / "other"), probes="masking,logit_lens,token_ablation,contribution", mask_seeds=2
        ),
        progress=False,
    )
    return root / "trace", root / "stages", root / "other"


def _values(rows: list) -> dict[str, str]:
    return {row.finding: row.value for row in rows}


def test_every_finding_from_the_run_holding_it(tiny_runs: tuple[Path, Path, Path]) -> None:
    """Each row names the run its table came from, and its numbers equal a direct computation on that table."""
    trace, stages, other = tiny_runs
    rows = findings([other, trace, stages], FAST)
    assert not [row for row in rows if row.value == "not measured"]
    sources = {row.finding.split(":")[0]: row.source for row in rows}
    assert sources["image share of the prompt"] == str(other)  # the first run given that has a samples table
    assert sources["S"] == sources["D"] == str(stages)
    assert sources["logit lens"] == str(other)
    values = _values(rows)

    samples = read_table(trace, "samples").to_pandas()
    share = ((samples["image_ends"].str[0] - samples["image_starts"].str[0]) / samples["n_tokens"]).mean()
    assert values["image share of the prompt"].startswith(f"{share:.0%} (")

    effects = read_table(other, "effects").to_pandas()
    top = effects[(effects["probe"] == "masking") & (effects["variant"] == "top")]
    for depth, group in top.groupby("layer_end"):
        changed = (~group["top1_match"]).mean()
        assert f"top {changed:.1%}" in values[f"answers changed when image tokens are hidden in layers < {depth}"]

    critical = critical_tokens(other, FAST.critical_threshold)
    assert critical is not None
    row = next(value for finding, value in values.items() if finding.startswith("critical image tokens"))
    assert row.startswith(f"{(critical['n_critical'] > 0).sum()} of 6 samples; {critical['n_critical'].sum()} tokens")

    table = format_findings(rows)
    assert table.splitlines()[0] == "| finding | value | run |" and len(table.splitlines()) == len(rows) + 2


def test_stage_rows_recover_known_boundaries(tmp_path: Path) -> None:
    """On a synthetic run whose fusion band is [S, D), the rows give S and D with intervals, and per family."""
    run = write_synthetic_run(tmp_path / "run", 60, image_span=(100, 10, 90))
    values = _values(findings([run], StageConfig(n_bootstrap=100)))
    assert values["S: image access starts to matter at layer"] == f"{SHALLOW_END} [{SHALLOW_END}-{SHALLOW_END}]"
    assert values["D: image access no longer matters from layer"].startswith(f"{DEEP_START} [")
    assert values["per family S / D"] == f"a {SHALLOW_END}/{DEEP_START}, b {SHALLOW_END}/{DEEP_START}"
    assert values["image share of the prompt"] == "80% (80 of 100 tokens, median)"
    # What the run lacks is listed with the command that records it.
    missing = {
        row.finding: row.source for row in findings([run], StageConfig(n_bootstrap=0)) if row.value == "not measured"
    }
    assert missing == {
        "(image_tokens)": "python -m analysis.trace",
        "(masking)": "python -m analysis.probes --probes masking",
        "(logit_lens)": "python -m analysis.probes --probes logit_lens",
        "(token_ablation)": "python -m analysis.probes --probes token_ablation,contribution",
    }


def test_sink_rows_on_a_planted_sink() -> None:
    """A token at one position taking most attention with a small value vector: always top-1, value ratio < 1."""
    rows = []
    for sample in range(4):
        for layer in range(2):
            for token in range(10):
                sink = token == 3
                rows.append(
                    {
                        "sample_id": f"s{sample}",
                        "layer": layer,
                        "token_index": token,
                        "last_attention": 0.5 if sink else 0.05 + 0.001 * ((token + sample) % 7),
                        "value_l1": 1.0 if sink else 10.0,
                    }
                )
    (_, shared), (_, ratio) = sink_findings(pd.DataFrame(rows))
    assert shared.startswith("100%-100%")
    # Top 5 = the sink (1.0) and four others (10.0) against five others: 8.2 / 10.
    assert ratio.startswith("0.82x-0.82x")


def test_masking_pools_random_seeds_per_sample() -> None:
    """Random subsets count once per sample (the mean over seeds), so seeds do not weigh samples."""
    effects = pd.DataFrame(
        [
            {"probe": "masking", "variant": "random", "layer_end": 2, "sample_id": "a", "top1_match": m}
            for m in (False, True, True, True)
        ]
        + [{"probe": "masking", "variant": "random", "layer_end": 2, "sample_id": "b", "top1_match": False}]
    )
    assert masking_findings(effects) == [("answers changed when image tokens are hidden in layers < 2", "random 62.5%")]


def test_image_share_counts_every_image() -> None:
    """Several images per prompt add up."""
    samples = pd.DataFrame({"image_starts": [[2, 20]], "image_ends": [[12, 30]], "n_tokens": [40]})
    assert image_share(samples) == "50% (20 of 40 tokens, median)"


def test_not_a_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder that holds no run ends in one error line naming the command that makes one."""
    assert main([str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error:") and "python -m analysis.probes" in error[0]


def test_boundary_that_never_settles_reads_none(tmp_path: Path) -> None:
    """With answers flipping outside the fusion band too, D is 'none', not a number or NaN."""
    run = write_synthetic_run(tmp_path / "run", 40, noise=0.3)
    values = _values(findings([run], StageConfig(n_bootstrap=0)))
    assert values["D: image access no longer matters from layer"] == "none"
    assert all(part.endswith("/none") for part in values["per family S / D"].split(", "))
    assert values["image share of the prompt"] == "not recorded (the samples table holds no token layout)"
