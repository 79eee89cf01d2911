"""``python -m analysis.findings RUN [RUN ...]``: the paper's findings as one table, from recorded runs.

Give it the trace and probe runs of one model (e.g. the six notebooks' folders under
``runs/notebooks/MODEL``); each finding is read from whichever run holds its table, and a finding whose table no
run holds is listed as not measured, with the command that records it. Rows: the image's share of the prompt,
sinks (top-1 attended positions shared across samples, value norms of the most attended tokens), the stage
boundaries S and D with their intervals, abruptness and per-family boundaries (knockout), the redundancy paradox
(masking), the layer where the answer surfaces (logit lens) and critical image tokens (token ablation).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.cli import run_cli
from analysis.config import add_arguments, from_namespace
from analysis.errors import ConfigError
from analysis.plots import logit_lens_ranks
from analysis.results import SAMPLES_TABLE, read_manifest, read_table
from analysis.stages import StageConfig, analyse, critical_tokens

SINK_TOP_K = 5  # the most attended image tokens compared with the rest, as the value-norm figure marks them


@dataclass
class Finding:
    """One row of the findings table."""

    finding: str
    value: str
    source: str  # the run folder it was read from, or the command that would record it


def _locate(runs: list[Path], table: str, probe: str | None = None) -> tuple[Path, pd.DataFrame] | None:
    """The first run holding ``table`` (with rows of ``probe``, for the shared effects table), and that table."""
    for run in runs:
        try:
            frame = read_table(run, table).to_pandas()
        except ConfigError:
            continue
        if probe is not None:
            frame = frame[frame["probe"] == probe]
        if len(frame):
            return run, frame
    return None


def _layer_range(series: pd.Series, fmt: str, unit: str = "") -> str:
    """'a-b (layer i / j)' for a per-layer series: its smallest and largest values and the layers holding them."""
    return (
        f"{format(series.min(), fmt)}{unit}-{format(series.max(), fmt)}{unit} "
        f"(layer {int(series.idxmin())} / {int(series.idxmax())})"
    )


def image_share(samples: pd.DataFrame) -> str:
    """Mean share of the prompt's tokens that are image tokens."""
    samples = samples[samples["image_starts"].notna() & samples["n_tokens"].notna()]
    if samples.empty:
        return "not recorded (the samples table holds no token layout)"
    spans = samples.apply(lambda row: sum(e - s for s, e in zip(row.image_starts, row.image_ends, strict=True)), 1)
    share = spans / samples["n_tokens"]
    return f"{share.mean():.0%} ({spans.median():.0f} of {samples['n_tokens'].median():.0f} tokens, median)"


def sink_findings(tokens: pd.DataFrame, query: str = "last") -> list[tuple[str, str]]:
    """How concentrated the top-1 attended image position is across samples, and the value L1 of the most
    attended tokens against the rest, per layer (a sink takes attention with a small value vector)."""
    column = f"{query}_attention"
    top1 = tokens.loc[tokens.groupby(["layer", "sample_id"])[column].idxmax(), ["layer", "token_index"]]
    n_samples = tokens["sample_id"].nunique()
    shared = top1.groupby("layer")["token_index"].agg(lambda index: index.value_counts().iloc[0] / n_samples)
    ranked = tokens.assign(
        top=tokens.groupby(["layer", "sample_id"])[column].rank(method="first", ascending=False) <= SINK_TOP_K
    )
    means = ranked.groupby(["layer", "sample_id", "top"])["value_l1"].mean().unstack("top")
    ratio = (means[True] / means[False]).groupby("layer").median()
    return [
        (
            "share of samples whose top-1 attended image token (last position) is the layer's commonest one",
            _layer_range(shared, ".0%"),
        ),
        (
            f"value L1 of the {SINK_TOP_K} most attended image tokens / the rest (median over samples; a sink is < 1)",
            _layer_range(ratio, ".2f", "x"),
        ),
    ]


def masking_findings(effects: pd.DataFrame) -> list[tuple[str, str]]:
    """Share of answers changed by hiding the most attended / random / least attended / all image tokens from
    the text below each depth (random subsets pooled per sample first)."""
    masking = effects[effects["probe"] == "masking"].assign(changed=lambda e: (~e["top1_match"]).astype(float))
    per_sample = masking.groupby(["variant", "layer_end", "sample_id"])["changed"].mean()
    shares = per_sample.groupby(["variant", "layer_end"]).mean().unstack("variant")
    order = [v for v in ("top", "random", "bottom", "all") if v in shares.columns]
    rows = []
    for depth, row in shares.iterrows():
        cells = ", ".join(f"{variant} {row[variant]:.1%}" for variant in order)
        rows.append((f"answers changed when image tokens are hidden in layers < {depth}", cells))
    return rows


def logit_lens_findings(lens: pd.DataFrame) -> list[tuple[str, str]]:
    """The first layer where the answer is the median top-1 from there on, and how high task words get."""
    ranks = logit_lens_ranks(lens)
    answer = ranks.loc["answer"]
    settled = [layer for layer in answer.index if (answer.loc[layer:] == 0).all()]
    rows = [
        (
            "logit lens: the answer's median rank at the last position is 0 from layer",
            f"{settled[0]}" if settled else "never",
        )
    ]
    words = ranks.drop(index="answer")
    if not words.empty:
        best = words.min(axis=1)
        rows.append(
            (
                "logit lens: best median rank of each task word over the layers",
                ", ".join(f"{word} {int(rank)}" for word, rank in best.items()),
            )
        )
    return rows


def critical_findings(run: Path, threshold: float) -> list[tuple[str, str]]:
    """Samples with critical tokens, their counts, and how often attention or contribution rankings pick them."""
    critical = critical_tokens(run, threshold)
    if critical is None:
        return []
    counts = critical["n_critical"]
    with_any = critical[counts > 0]
    value = (
        f"{len(with_any)} of {len(critical)} samples; {int(counts.sum())} tokens in all, of "
        f"{critical['n_image_tokens'].median():.0f} per sample"
    )
    overlaps = [c for c in critical.columns if c.startswith("overlap_")]
    if overlaps and len(with_any):
        value += "; also picked by " + ", ".join(
            f"{c.removeprefix('overlap_')} {with_any[c].mean():.0%}" for c in overlaps
        )
    return [
        (
            f"critical image tokens (hiding one in the fusion band changes the answer or costs > {threshold:g} nats)",
            value,
        )
    ]


def _layer(value: object) -> str:
    """A boundary layer as text; 'none' where the curve never settles within the tolerance."""
    return "none" if value is None or pd.isna(value) else str(int(value))  # type: ignore[call-overload]


def stage_findings(run: Path, config: StageConfig) -> list[tuple[str, str]]:
    """S, D (and the KV-removal check) with their bootstrap intervals, abruptness and per-family boundaries."""
    report = analyse(run, config)
    b, intervals = report.overall, report.intervals

    def ci(name: str) -> str:
        if intervals.empty or name not in intervals.index:
            return ""
        return f" [{intervals.loc[name, 'low']:.0f}-{intervals.loc[name, 'high']:.0f}]"

    rows = [
        ("S: image access starts to matter at layer", f"{_layer(b.shallow_end)}{ci('shallow_end')}"),
        ("D: image access no longer matters from layer", f"{_layer(b.deep_start)}{ci('deep_start')}"),
        (
            f"abruptness: layers holding {config.mass:.0%} of the rise",
            f"{b.layers_holding_mass}{ci('layers_holding_mass')}",
        ),
    ]
    if report.curves_have_kv:
        rows.append(
            (
                "KV-removal check: removing image KV from layer L on changes nothing from",
                f"{_layer(b.kv_deep_start)}{ci('kv_deep_start')}",
            )
        )
    if not report.by_family.empty:
        families = report.by_family.iterrows()
        rows.append(
            (
                "per family S / D",
                ", ".join(f"{name} {_layer(row.shallow_end)}/{_layer(row.deep_start)}" for name, row in families),
            )
        )
    return rows


def findings(runs: list[Path], config: StageConfig) -> list[Finding]:
    """Every finding the runs hold a table for; the rest as not measured, with the command that records them."""
    for run in runs:
        read_manifest(run, made_by="analysis.probes")
    rows: list[Finding] = []

    def add(
        table: str,
        command: str,
        compute: Callable[[Path, pd.DataFrame], list[tuple[str, str]]],
        probe: str | None = None,
    ) -> None:
        located = _locate(runs, table, probe)
        if located is None:
            rows.append(Finding(f"({probe or table})", "not measured", command))
            return
        run, frame = located
        rows.extend(Finding(finding, value, str(run)) for finding, value in compute(run, frame))

    add(
        SAMPLES_TABLE,
        "python -m analysis.trace",
        lambda _, samples: [("image share of the prompt", image_share(samples))],
    )
    add("image_tokens", "python -m analysis.trace", lambda _, tokens: sink_findings(tokens))
    add(
        "effects",
        "python -m analysis.probes --probes knockout,kv_removal",
        lambda run, _: stage_findings(run, config),
        probe="knockout",
    )
    add(
        "effects",
        "python -m analysis.probes --probes masking",
        lambda _, effects: masking_findings(effects),
        probe="masking",
    )
    add("logit_lens", "python -m analysis.probes --probes logit_lens", lambda _, lens: logit_lens_findings(lens))
    add(
        "token_ablation",
        "python -m analysis.probes --probes token_ablation,contribution",
        lambda run, _: critical_findings(run, config.critical_threshold),
    )
    return rows


def format_findings(rows: list[Finding]) -> str:
    """The findings as a Markdown table."""
    lines = ["| finding | value | run |", "| --- | --- | --- |"]
    lines += [f"| {row.finding} | {row.value} | {row.source} |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the findings table of a model's runs."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.findings", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="trace and probe run folders of one model")
    add_arguments(parser, StageConfig)
    args = parser.parse_args(argv)
    config = from_namespace(StageConfig, args)

    def body() -> int:
        sys.stdout.write(format_findings(findings(args.runs, config)) + "\n")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
