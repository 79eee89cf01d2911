"""Stage analysis: where image information enters the text stream and from where vision stops mattering.

``python -m analysis.stages RUN_DIR`` reads a probe run (knockout ``upto`` and ``from`` curves,
optionally KV removal) and prints the shallow->middle and middle->deep boundaries with bootstrap
confidence intervals, a per-family breakdown and how abrupt fusion is.

Definitions, with f_upto(L) / f_from(L) the share of samples whose top-1 next token changes when
image keys are hidden from the query region in layers [0, L] / [L, n):
- shallow->middle boundary S: the first L with f_upto(L) >= onset * f_all (image access starts to matter);
- middle->deep boundary D: the first L such that f_from(L') <= tolerance for every L' >= L
  (from D on, image access can be removed without changing answers);
- abruptness: the fewest layers whose increments of f_upto hold ``mass`` of its total rise.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.cli import run_cli
from analysis.config import add_arguments, from_namespace, option
from analysis.errors import ConfigError
from analysis.results import read_table


@dataclass
class StageConfig:
    """How boundaries are read off the curves."""

    query: str = option("instruction", "query region whose image access was knocked out (a knockout variant)")
    key: str = option("image", "key region of the knockout variant")
    onset: float = option(0.1, "S: share of the all-layer effect at which image access starts to matter")
    tolerance: float = option(0.01, "D: largest share of changed answers that counts as 'no change'")
    mass: float = option(0.8, "abruptness: share of the total rise held by the fewest layers")
    critical_threshold: float = option(
        1.0, "critical token: hiding it flips the answer or costs more than this many nats"
    )
    n_bootstrap: int = option(1000, "bootstrap resamples of samples for confidence intervals")
    confidence: float = option(0.95, "confidence level of the intervals")
    seed: int = option(0, "bootstrap seed")

    def validate(self) -> None:
        """Reject thresholds outside their ranges."""
        for name in ("onset", "tolerance", "mass", "confidence"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(f"--{name} must be in (0, 1), got {value}")
        if self.n_bootstrap < 0:
            raise ConfigError("--n-bootstrap must be >= 0")


@dataclass
class Curves:
    """Per-sample changed-answer indicators: rows = samples, columns = layer L."""

    upto: pd.DataFrame
    from_: pd.DataFrame
    kv: pd.DataFrame | None


@dataclass
class Boundaries:
    """Stage boundaries and abruptness of one set of samples."""

    shallow_end: int | None
    deep_start: int | None
    kv_deep_start: int | None
    layers_holding_mass: int | None
    n_samples: int


def load_curves(run_dir: str | Path, config: StageConfig) -> tuple[Curves, pd.Series]:
    """Changed-answer matrices from a probe run, and each sample's family."""
    try:
        effects = read_table(run_dir, "effects").to_pandas()
    except ConfigError as error:
        raise ConfigError(
            f"{error}. Stage boundaries need knockout curves: run `python -m analysis.probes --probes "
            f"knockout,kv_removal --knockout-modes upto,from --knockout-queries {config.query}`"
        ) from None
    knockouts = effects[effects["probe"] == "knockout"]
    changed = {}
    for mode in ("upto", "from"):
        variant = f"{config.query}->{config.key}:{mode}"
        rows = knockouts[knockouts["variant"] == variant]
        if rows.empty:
            raise ConfigError(
                f"{run_dir} has no '{variant}' knockouts; run `python -m analysis.probes --probes knockout "
                f"--knockout-modes upto,from --knockout-queries {config.query} --knockout-key {config.key}`"
            )
        layer = rows["layer_end"] - 1 if mode == "upto" else rows["layer_start"]
        changed[mode] = (~rows["top1_match"]).astype(float).groupby([rows["sample_id"], layer]).mean().unstack()
    kv = None
    try:
        kv_rows = read_table(run_dir, "kv_removal").to_pandas()
        kv = (~kv_rows["agrees"]).astype(float).groupby([kv_rows["sample_id"], kv_rows["layer_start"]]).mean().unstack()
    except ConfigError:
        pass
    samples = read_table(run_dir, "samples").to_pandas().set_index("sample_id")
    return Curves(changed["upto"], changed["from"], kv), samples["family"]


def boundaries(curves: Curves, config: StageConfig) -> Boundaries:
    """Boundaries of the mean curves over the samples in ``curves``."""
    upto = curves.upto.mean()
    from_ = curves.from_.mean()
    total = max(float(upto.iloc[-1]), float(from_.iloc[0]))
    shallow_end = None
    if total > 0:
        reached = upto[upto >= config.onset * total]
        shallow_end = int(reached.index[0]) if len(reached) else None
    deep_start = first_quiet_layer(from_, config.tolerance)
    kv_deep = first_quiet_layer(curves.kv.mean(), config.tolerance) if curves.kv is not None else None
    increments = upto.diff().fillna(upto.iloc[0]).clip(lower=0).to_numpy()
    layers_holding = None
    if increments.sum() > 0:
        ordered = np.sort(increments)[::-1].cumsum() / increments.sum()
        layers_holding = int(np.searchsorted(ordered, config.mass - 1e-12) + 1)
    return Boundaries(shallow_end, deep_start, kv_deep, layers_holding, len(curves.upto))


def first_quiet_layer(curve: pd.Series, tolerance: float) -> int | None:
    """The first layer from which the curve stays <= tolerance."""
    loud = curve[curve > tolerance]
    if loud.empty:
        return int(curve.index[0])
    after = curve.index[curve.index > loud.index[-1]]
    return int(after[0]) if len(after) else None


def subset(curves: Curves, samples: pd.Index) -> Curves:
    """The curves of some samples (repeats allowed, for bootstrapping)."""
    return Curves(
        curves.upto.loc[samples],
        curves.from_.loc[samples],
        None if curves.kv is None else curves.kv.loc[samples],
    )


def bootstrap(curves: Curves, config: StageConfig) -> pd.DataFrame:
    """Percentile confidence intervals of every boundary over resampled samples."""
    rng = np.random.default_rng(config.seed)
    ids = curves.upto.index.to_numpy()
    draws = []
    for _ in range(config.n_bootstrap):
        picked = pd.Index(rng.choice(ids, size=len(ids), replace=True))
        draws.append(vars(boundaries(subset(curves, picked), config)))
    table = pd.DataFrame(draws).drop(columns="n_samples").astype(float)
    alpha = (1 - config.confidence) / 2
    return pd.DataFrame(
        {"low": table.quantile(alpha), "high": table.quantile(1 - alpha), "undefined": table.isna().mean()}
    )


def critical_tokens(run_dir: str | Path, threshold: float) -> pd.DataFrame | None:
    """Per sample: the image tokens whose single removal in the fusion band changes the answer, and overlaps.

    A token is critical when hiding it flips the top-1 answer token or lowers the reference answer's
    log-prob by more than ``threshold`` nats. Each sample's critical set is compared with the same number
    of tokens ranked by (a) last-position attention in the band, (b) attention in the layers before the
    band (the shallow sinks) and (c) contribution norm ||c_j|| in the band (VisiPruner's selection score),
    as the share of critical tokens those rankings also pick. None when the run has no token_ablation table.
    """
    try:
        ablation = read_table(run_dir, "token_ablation").to_pandas()
    except ConfigError:
        return None
    ablation["critical"] = (~ablation["top1_match"]) | (ablation["delta_logprob"] < -threshold)
    start, end = int(ablation["layer_start"].iloc[0]), int(ablation["layer_end"].iloc[0])
    try:
        contributions = read_table(run_dir, "contributions").to_pandas()
    except ConfigError:
        contributions = None
    rows = []
    for sample_id, group in ablation.groupby("sample_id", sort=False):
        critical = set(group.loc[group["critical"], "ordinal"])
        row = {
            "sample_id": sample_id,
            "n_image_tokens": len(group),
            "n_critical": len(critical),
            "critical_ordinals": sorted(critical),
        }
        if contributions is not None and critical:
            tokens = contributions[contributions["sample_id"] == sample_id]
            tokens = tokens.assign(ordinal=tokens.groupby("layer").cumcount())
            band = tokens[(tokens["layer"] >= start) & (tokens["layer"] < end)].groupby("ordinal")
            shallow = tokens[tokens["layer"] < start].groupby("ordinal")
            rankings = {
                "top_attended": band["attention"].mean(),
                "sinks": shallow["attention"].mean(),
                "top_contribution": band["norm"].mean(),
            }
            for name, score in rankings.items():
                if len(score):
                    picked = set(score.nlargest(len(critical)).index)
                    row[f"overlap_{name}"] = len(picked & critical) / len(critical)
        rows.append(row)
    return pd.DataFrame(rows).set_index("sample_id")


# The report's column of the KV-removal curve (present only when the run recorded that probe).
KV_CURVE = "kv removal from L (changed)"


@dataclass
class StageReport:
    """Everything ``python -m analysis.stages`` prints."""

    overall: Boundaries
    intervals: pd.DataFrame
    by_family: pd.DataFrame
    curves: pd.DataFrame
    critical: pd.DataFrame | None = None
    run_dir: str = "RUN"

    @property
    def curves_have_kv(self) -> bool:
        """Whether the run recorded the KV-removal probe."""
        return KV_CURVE in self.curves.columns

    @property
    def kv_command(self) -> str:
        """The command that adds the KV-removal probe to the run."""
        from analysis.probes.run import extend_command

        return extend_command(self.run_dir, ["kv_removal"])


def analyse(run_dir: str | Path, config: StageConfig) -> StageReport:
    """Boundaries, their intervals and a per-family breakdown for one probe run."""
    config.validate()
    curves, family = load_curves(run_dir, config)
    overall = boundaries(curves, config)
    intervals = bootstrap(curves, config) if config.n_bootstrap else pd.DataFrame()
    per_family = []
    for name, members in family.groupby(family).groups.items():
        members = pd.Index(members).intersection(curves.upto.index)
        if len(members):
            per_family.append({"family": name, **vars(boundaries(subset(curves, members), config))})
    table = pd.DataFrame({"upto (changed)": curves.upto.mean(), "from (changed)": curves.from_.mean()})
    if curves.kv is not None:
        table[KV_CURVE] = curves.kv.mean()
    table.index.name = "layer L"
    by_family = pd.DataFrame(per_family).set_index("family") if per_family else pd.DataFrame()
    if curves.kv is None:
        by_family = by_family.drop(columns=["kv_deep_start"], errors="ignore")  # not measured, not "None"
    return StageReport(
        overall, intervals, by_family, table, critical_tokens(run_dir, config.critical_threshold), str(run_dir)
    )


def format_report(report: StageReport, config: StageConfig) -> str:
    """A readable text report."""
    b = report.overall
    lines = [
        f"samples: {b.n_samples}; knockout {config.query}->{config.key}; onset {config.onset}, "
        f"tolerance {config.tolerance}",
        "",
        "share of samples whose top-1 answer token changes:",
        report.curves.to_string(float_format=lambda v: f"{v:.3f}"),
        "",
    ]

    def interval(name: str) -> str:
        if report.intervals.empty or name not in report.intervals.index:
            return ""
        row = report.intervals.loc[name]
        return f"  [{config.confidence:.0%} CI {row['low']:.0f}-{row['high']:.0f}]"

    lines += [
        f"shallow -> middle boundary S (image access starts to matter): layer {b.shallow_end}{interval('shallow_end')}",
        f"middle -> deep boundary D (image access no longer matters):   layer {b.deep_start}{interval('deep_start')}",
        "KV-removal check (removing image KV from L on changes nothing): "
        + (
            f"layer {b.kv_deep_start}{interval('kv_deep_start')}"
            if report.curves_have_kv
            else f"not measured (the run has no kv_removal table; add it with: {report.kv_command})"
        ),
        f"abruptness: {b.layers_holding_mass} layer(s) hold {config.mass:.0%} of the rise of f_upto"
        f"{interval('layers_holding_mass')}",
    ]
    if not report.by_family.empty:
        lines += ["", "per question family:", report.by_family.to_string()]
    if report.critical is not None:
        counts = report.critical["n_critical"]
        lines += [
            "",
            f"critical image tokens per sample (of {report.critical['n_image_tokens'].median():.0f}): mean "
            f"{counts.mean():.2f}, median {counts.median():.0f}, 90th percentile {counts.quantile(0.9):.0f}, "
            f"none in {(counts == 0).mean():.0%} of samples",
            "count distribution: " + ", ".join(f"{k}: {v}" for k, v in counts.value_counts().sort_index().items()),
        ]
        overlaps = [c for c in report.critical.columns if c.startswith("overlap_")]
        if overlaps:
            lines.append(
                "share of critical tokens also picked by: "
                + ", ".join(f"{c.removeprefix('overlap_')} {report.critical[c].mean():.2f}" for c in overlaps)
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the stage report of a probe run."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.stages", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="a probe run folder (python -m analysis.probes)")
    add_arguments(parser, StageConfig)
    args = parser.parse_args(argv)
    config = from_namespace(StageConfig, args)

    def body() -> int:
        sys.stdout.write(format_report(analyse(args.run_dir, config), config) + "\n")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
