"""Derive a VisiPruner config from a calibration probe run so that a target is met at the fewest FLOPs.

``python -m analysis.pruner export RUN_DIR -o config.json`` reads the run's stage boundaries (S = the
first layer where image access matters: text is blinded to images before it) and its recorded
contribution norms (the scale of ``tokens_threshold``), then searches layer_threshold x
tokens_threshold on the run's own samples with the pruned model, keeping the cheapest config whose
answers agree with the unpruned model's on at least ``target`` of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.config import option
from analysis.errors import ConfigError
from analysis.models.registry import LoadedModel, load_model, resolve
from analysis.pruner.config import PruningConfig, authors_equivalent
from analysis.pruner.evaluation import clean_answers, evaluate_pruned, summarize
from analysis.results import atomic_write_json, read_manifest, read_table
from analysis.stages import StageConfig, analyse

logger = logging.getLogger(__name__)

LAYER_THRESHOLDS = (0.9, 0.95, 0.98, 0.99, 0.995, 0.997, 0.999)
NORM_QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995)


@dataclass
class ExportConfig:
    """How a pruning config is chosen from a calibration run."""

    target: float = option(0.99, "required share of calibration samples whose pruned answer equals the unpruned one")
    limit: int | None = option(None, "calibrate on the first N samples of the run; default all")
    batch_size: int = option(32, "samples per generate call")
    max_new_tokens: int = option(4, "greedy answer length compared for agreement")
    device: str | None = option(None, "torch device; default cuda if available")

    def validate(self) -> None:
        """Reject an impossible target."""
        if not 0 < self.target <= 1:
            raise ConfigError(f"--target must be in (0, 1], got {self.target}")


@dataclass
class ExportResult:
    """The chosen config, whether it meets the target, and the whole search."""

    config: PruningConfig
    met: bool
    search: pd.DataFrame
    context: dict[str, Any]  # what ``choose`` needs to pick again for another target


def derive(
    run_dir: str | Path, export: ExportConfig, *, loaded: LoadedModel | None = None, progress: bool = True
) -> ExportResult:
    """Search thresholds on the run's samples and pick the cheapest config meeting the target."""
    from analysis.data.loaders import load_samples

    export.validate()
    manifest = read_manifest(run_dir, made_by="analysis.probes")
    report = analyse(run_dir, StageConfig(n_bootstrap=0))
    shallow_end = report.overall.shallow_end
    if shallow_end is None:
        raise ConfigError(f"{run_dir}: no layer where image access matters was found, so no stage to prune from")
    try:
        contributions = read_table(run_dir, "contributions").to_pandas()
    except ConfigError:
        from analysis.probes.run import extend_command

        raise ConfigError(
            f"{run_dir} lacks the contribution probe needed to scale tokens_threshold; add it to the run with: "
            f"{extend_command(run_dir, ['contribution'])}"
        ) from None
    model_name = manifest["config"]["model"]
    dataset, split = manifest["dataset"]["name"], manifest["dataset"]["split"]
    if loaded is None:
        from analysis.models.registry import default_device

        loaded = load_model(model_name, device=export.device or default_device())
    ids = read_table(run_dir, "samples").column("sample_id").to_pylist()
    samples = [
        s
        for s in load_samples(
            dataset,
            None if split == "all" else split,
            len(ids) if export.limit is None else min(export.limit, len(ids)),
        )
    ]
    from tqdm.auto import tqdm

    num_layers = loaded.adapter.num_layers
    band = contributions[contributions["layer"] > shallow_end]["norm"]
    norm_grid = sorted({float(round(q, 6)) for q in np.quantile(band, NORM_QUANTILES)}) if len(band) else [0.0]
    rows = []
    passes = 1 + len(LAYER_THRESHOLDS) * len(norm_grid)
    with tqdm(total=passes * len(samples), desc="threshold search", unit="sample", disable=not progress) as bar:
        baseline = clean_answers(
            loaded, samples, batch_size=export.batch_size, max_new_tokens=export.max_new_tokens, on_batch=bar.update
        )
        for layer_threshold in LAYER_THRESHOLDS:
            for tokens_threshold in norm_grid:
                config = PruningConfig(
                    num_layers=num_layers,
                    shallow_mid_layer=shallow_end,
                    layer_threshold=layer_threshold,
                    tokens_threshold=tokens_threshold,
                )
                scores = summarize(
                    evaluate_pruned(
                        loaded,
                        samples,
                        config,
                        batch_size=export.batch_size,
                        max_new_tokens=export.max_new_tokens,
                        baseline=baseline,
                        on_batch=bar.update,
                    )
                )
                rows.append({"layer_threshold": layer_threshold, "tokens_threshold": tokens_threshold, **scores})
                logger.debug(
                    "tL=%.3f tT=%.4g: agreement %.1f%%, FLOPs cut %.1f%%",
                    layer_threshold,
                    tokens_threshold,
                    scores["agreement"],
                    scores["flops_cut"],
                )
    search = pd.DataFrame(rows)
    # Portable provenance: the run relative to the working directory, the model as the registry names it (an
    # alias's hub id or package path, not this machine's absolute path) and the fingerprint of its weights.
    context = {
        "run": _portable(Path(run_dir)),
        "model": model_name,
        "model_source": resolve(model_name).source,
        "weights": manifest.get("identity", {}).get("weights"),
        "dataset": dataset,
        "split": split,
        "calibration_samples": len(samples),
        "num_layers": num_layers,
        "shallow_mid_layer": shallow_end,
        "norm_grid": norm_grid,
    }
    return choose(search, export.target, context)


def _portable(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it, else absolute."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd()))
    except ValueError:
        return str(resolved)


def choose(search: pd.DataFrame, target: float, context: dict[str, Any]) -> ExportResult:
    """The cheapest searched config whose agreement meets ``target`` (else the closest), with its provenance."""
    feasible = search[search["agreement"] >= 100 * target]
    met = not feasible.empty
    best = (
        feasible.sort_values(["flops_cut", "agreement"], ascending=False).iloc[0]
        if met
        else search.sort_values(["agreement", "flops_cut"], ascending=False).iloc[0]
    )
    provenance = {
        key: context.get(key)
        for key in ("run", "model", "model_source", "weights", "dataset", "split", "calibration_samples")
    }
    chosen = PruningConfig(
        num_layers=context["num_layers"],
        shallow_mid_layer=context["shallow_mid_layer"],
        layer_threshold=float(best["layer_threshold"]),
        tokens_threshold=float(best["tokens_threshold"]),
        provenance={
            **provenance,
            "target_agreement": target,
            "target_met": met,
            "calibration": {
                key: float(best[key])
                for key in (
                    "agreement",
                    "accuracy",
                    "baseline_accuracy",
                    "flops_cut",
                    "flops_cut_fastv",
                    "kept_tokens",
                    "fired",
                )
            },
            "how": "shallow_mid_layer = first layer where image access matters (stage analysis); "
            "layer_threshold x tokens_threshold (quantiles of recorded contribution norms after S) searched; "
            "the largest FLOPs cut whose agreement meets the target",
            "grid": {"layer_threshold": list(LAYER_THRESHOLDS), "tokens_threshold": context["norm_grid"]},
        },
    )
    return ExportResult(chosen, met, search, context)


@dataclass
class Written:
    """What ``write`` wrote: our config, and the authors' JSON with what differs from ours (or why there is none)."""

    ours: Path
    authors: Path | None
    differences: list[str]
    refused: str | None = None

    def describe(self) -> str:
        """Where the files went and how the authors' JSON differs from our config."""
        if self.authors is None:
            return f"wrote {self.ours}; no authors' JSON: {self.refused}"
        lines = [f"wrote {self.ours} and {self.authors} (accepted by the authors' validation)"]
        lines += [f"  the authors' JSON differs: {difference}" for difference in self.differences]
        return "\n".join(lines)


def write(result: ExportResult, out: str | Path) -> Written:
    """Write our config and beside it the closest authors' JSON their validation accepts (or none, with why).

    What differs between the two is printed by ``Written.describe`` and recorded in our config's provenance.
    """
    path = Path(out)
    authors = path.with_name(path.stem + ".authors.json")
    config = result.config
    try:
        theirs, differences = authors_equivalent(config)
    except ConfigError as error:
        config.provenance = {**config.provenance, "authors_json": f"not written: {error}"}
        atomic_write_json(path, config.to_json())
        authors.unlink(missing_ok=True)  # never leave an older export's JSON beside a config it does not match
        return Written(path, None, [], str(error))
    config.provenance = {**config.provenance, "authors_json": {"path": authors.name, "differences": differences}}
    atomic_write_json(path, config.to_json())
    atomic_write_json(authors, theirs.authors_json())
    return Written(path, authors, differences)


def describe(result: ExportResult) -> str:
    """One paragraph on what was chosen and whether the target was met."""
    c = result.config
    calibration: dict[str, Any] = c.provenance["calibration"]
    verdict = "meets" if result.met else "CANNOT meet"
    return (
        f"config {verdict} the target ({c.provenance['target_agreement']:.1%} agreement): shallow_mid_layer "
        f"{c.shallow_mid_layer}, layer_threshold {c.layer_threshold}, tokens_threshold {c.tokens_threshold:.4g}; "
        f"calibration agreement {calibration['agreement']:.1f}%, accuracy {calibration['accuracy']:.1f}% "
        f"(unpruned {calibration['baseline_accuracy']:.1f}%), exact FLOPs cut {calibration['flops_cut']:.1f}% "
        f"(FastV convention {calibration['flops_cut_fastv']:.1f}%), kept image tokens {calibration['kept_tokens']:.1f}"
        + ("" if result.met else "; this is the closest config found")
    )
