"""Per-layer summaries of a trace run, for the CLI report and the README."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.results import read_table


def layer_summary(run_dir: str | Path) -> pd.DataFrame:
    """Per layer, means over samples and heads: where the last token and instruction look, sinks, value norms."""
    attention = read_table(run_dir, "attention").to_pandas()
    sinks = read_table(run_dir, "sinks").to_pandas()
    tokens = read_table(run_dir, "image_tokens").to_pandas()
    mass = attention.pivot_table(index="layer", columns=["query", "key_region"], values="mass", aggfunc="mean")
    summary = pd.DataFrame(
        {
            "last->system": mass[("last", "system")],
            "last->image": mass[("last", "image")],
            "last->instr": mass[("last", "instruction")],
            "instr->image": mass[("instruction", "image")],
            "image->image": mass[("image", "image")],
        }
    )
    last_sinks = sinks[sinks["query"] == "last"].groupby("layer")
    summary["top-k share"] = last_sinks["top_k_share"].mean()
    summary["norm. entropy"] = last_sinks["normalized_entropy"].mean()
    summary["value L1 (median)"] = tokens.groupby("layer")["value_l1"].median()
    summary.index.name = "layer"
    return summary


def format_summary(summary: pd.DataFrame) -> str:
    """A fixed-width text rendering of a layer summary."""
    return summary.to_string(float_format=lambda value: f"{value:.3f}")
