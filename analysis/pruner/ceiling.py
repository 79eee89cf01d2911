"""How far image-token pruning can cut a model's FLOPs, read from a probe run before any pruned model is evaluated.

``python -m analysis.pruner ceiling RUN_DIR [--target-cut 50] [--tolerance 0.01]`` prints, for each layer k:

- ``exit_cut``: the exact prefill FLOPs cut (%) of dropping every image token from layer k on, over the run's
  samples and their own token counts. No pruning that leaves the image whole in the layers before k cuts more.
- ``changed``: the share of answers that change when the instruction loses access to the image from layer k on
  (the run's ``from`` knockout). Dropping every image token from layer k on hides them the same way, so this is
  what exiting vision at k costs.
- ``keep_for_target``: the most image tokens per sample that may stay in every layer from k on (all of them
  before) for the cut to still reach ``target_cut``; -1 when even dropping them all from k on cuts less.

and then the largest cut whose exit changes at most ``tolerance`` of the answers. With the image a small share of
the prompt, or with image information still entering late, a FLOPs target can be out of reach of every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.config import option
from analysis.errors import ConfigError
from analysis.pruner.flops import DecoderShape
from analysis.pruner.sweep import baseline_flops_cut
from analysis.results import RunFolder, read_table
from analysis.stages import StageConfig, load_curves


@dataclass
class CeilingConfig:
    """What the ceiling is measured against."""

    target_cut: float = option(50.0, "FLOPs cut (%) whose token budget per exit layer is reported")
    tolerance: float = option(0.01, "largest share of changed answers an exit may cost")
    query: str = option("instruction", "query region of the run's knockouts")

    def validate(self) -> None:
        """Reject values outside their ranges."""
        errors = []
        if not 0 < self.target_cut < 100:
            errors.append(f"--target-cut must be in (0, 100), got {self.target_cut}")
        if not 0 <= self.tolerance < 1:
            errors.append(f"--tolerance must be in [0, 1), got {self.tolerance}")
        if errors:
            raise ConfigError("; ".join(errors))


def token_counts(run_dir: str | Path) -> pd.DataFrame:
    """Each sample's prompt length and image-token count, from the run's samples table."""
    samples = read_table(run_dir, "samples").to_pandas()
    n_image = [
        sum(int(end) - int(start) for start, end in zip(starts, ends, strict=True))
        for starts, ends in zip(samples["image_starts"], samples["image_ends"], strict=True)
    ]
    return pd.DataFrame(
        {"n_tokens": samples["n_tokens"].astype(int).to_numpy(), "n_image": n_image}, index=samples["sample_id"]
    )


def ceiling(run_dir: str | Path, shape: DecoderShape, config: CeilingConfig) -> pd.DataFrame:
    """Per layer: FLOPs cut of exiting vision there, the answers that exit changes, the token budget of the target."""
    config.validate()
    curves, _ = load_curves(run_dir, StageConfig(query=config.query))
    changed = curves.from_.mean()
    if len(changed) != shape.num_layers:
        raise ConfigError(
            f"{run_dir} has 'from' knockouts for {len(changed)} layers but the model has "
            f"{shape.num_layers}; the run and the model do not match"
        )
    counts = token_counts(run_dir)
    # Samples of the same length and image size cost the same: count each shape once, weighted.
    weighted = counts.value_counts().rename("weight").reset_index()
    most_image = int(weighted["n_image"].max())
    rows = []
    for layer in range(shape.num_layers):
        exit_cut = baseline_flops_cut(shape, weighted, "fastv", layer, 0)
        keep = -1
        if exit_cut >= config.target_cut:
            # The cut falls as the budget grows: the largest budget still reaching the target.
            keep = max(
                k
                for k in range(most_image + 1)
                if k == 0 or baseline_flops_cut(shape, weighted, "fastv", layer, k) >= config.target_cut
            )
        rows.append(
            {"layer": layer, "exit_cut": exit_cut, "changed": float(changed.loc[layer]), "keep_for_target": keep}
        )
    return pd.DataFrame(rows)


def describe(table: pd.DataFrame, config: CeilingConfig) -> str:
    """The table and what it says about the target, in words."""
    lines = [table.to_string(index=False, float_format=lambda v: f"{v:.3f}")]
    quiet = table[table["changed"] <= config.tolerance]
    if len(quiet):
        best = quiet.loc[quiet["exit_cut"].idxmax()]
        lines.append(
            f"largest cut of an exit that changes at most {config.tolerance:.1%} of answers: "
            f"{best['exit_cut']:.1f}% (vision exits at layer {int(best['layer'])})"
        )
    else:
        lines.append(f"every exit changes more than {config.tolerance:.1%} of answers")
    reach = table[table["keep_for_target"] >= 0]
    if len(reach):
        last = reach.iloc[-1]
        lines.append(
            f"a {config.target_cut:g}% cut that leaves the image whole until it drops tokens must drop them at layer "
            f"{int(last['layer'])} or earlier, keeping at most {int(last['keep_for_target'])} per sample; hiding the "
            f"image from layer {int(last['layer'])} on changes {last['changed']:.1%} of answers"
        )
    else:
        lines.append(f"no exit reaches a {config.target_cut:g}% cut: the image is too small a share of the prompt")
    return "\n".join(lines)


def model_of(run_dir: str | Path) -> str:
    """The model a run was made with, as its manifest names it."""
    folder = RunFolder(Path(run_dir), {})
    manifest = folder.read_manifest()
    if manifest is None:
        raise ConfigError(f"{run_dir} is not a finished run (no manifest.json); run `python -m analysis.probes` first")
    model = manifest.get("config", {}).get("model")
    if not model:
        raise ConfigError(
            f"{folder.manifest_path} names no model (config.model); ceiling needs a run of `python -m analysis.probes`"
        )
    return model
