"""Accuracy vs FLOPs: VisiPruner configs and the baselines (FastV, random, pre-LLM) at matched FLOPs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from analysis.data.samples import Sample
from analysis.errors import ConfigError
from analysis.models.registry import LoadedModel
from analysis.pruner.config import LAYER0_RULES, PruningConfig, authors_equivalent, authors_layer0_rule
from analysis.pruner.evaluation import clean_answers, evaluate_pruned, summarize
from analysis.pruner.flops import DecoderShape, LayerTokens, prefill_flops
from analysis.pruner.methods import method_for, sweep_baselines
from analysis.pruner.methods.visipruner import VisiPruner

logger = logging.getLogger(__name__)

# The one-shot methods compared with VisiPruner at matched FLOPs (those that declare themselves sweep baselines).
BASELINES = tuple(sweep_baselines())


def baseline_flops_cut(
    shape: DecoderShape, per_sample: pd.DataFrame, method: str, prune_layer: int, keep: int
) -> float:
    """Exact prefill FLOPs cut (%) of a one-shot baseline keeping ``keep`` image tokens, over the given samples.

    A ``weight`` column, where present, counts how many samples each row stands for.
    """
    ours = full = 0.0
    weights = per_sample["weight"] if "weight" in per_sample else [1] * len(per_sample)
    for n_tokens, n_image, weight in zip(per_sample["n_tokens"], per_sample["n_image"], weights, strict=True):
        kept = min(keep, n_image)
        pruned = LayerTokens(n_tokens - n_image + kept, kept)
        start = _first_pruned_layer(method, prune_layer)
        layers = [LayerTokens(n_tokens, n_image)] * start + [pruned] * (shape.num_layers - start)
        ours += weight * prefill_flops(shape, layers)["exact"]
        full += weight * prefill_flops(shape, [LayerTokens(n_tokens, n_image)] * shape.num_layers)["exact"]
    return 100 * (1 - ours / full)


def _first_pruned_layer(method: str, prune_layer: int) -> int:
    """The first layer a one-shot baseline runs without its pruned tokens, for FastV-style K = ``prune_layer``."""
    first = method_for(SimpleNamespace(method=method, prune_layer=prune_layer)).first_pruned_layer()
    if first is None:
        raise ConfigError(f"{method} is not a one-shot method; it has no token budget to match")
    return first


def matched_keep(
    shape: DecoderShape, per_sample: pd.DataFrame, method: str, prune_layer: int, target_cut: float
) -> int:
    """The token budget whose FLOPs cut is closest to ``target_cut`` for a baseline."""
    budgets = np.arange(0, int(per_sample["n_image"].max()) + 1)
    cuts = np.array([baseline_flops_cut(shape, per_sample, method, prune_layer, int(k)) for k in budgets])
    return int(budgets[np.argmin(np.abs(cuts - target_cut))])


AUTHORS_RULE_METHOD = "visipruner_authors"


def sweep(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    configs: Sequence[PruningConfig],
    *,
    prune_layer: int = 2,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    authors_rule: bool = False,
    progress: bool = True,
    authors_layer0: str | None = None,
) -> pd.DataFrame:
    """One row per evaluated config: VisiPruner configs, then each baseline at the FLOPs cut each of them reached.

    With ``authors_rule`` each VisiPruner config is also run under the authors' rule (row method
    ``visipruner_authors``), as the closest config their format expresses (``authors_equivalent``), so the two rules
    compare on the same samples. Its layer-0 rule is ``authors_layer0``, or theirs for a LLaVA-1.5 architecture.
    """
    layer0 = authors_layer0 or authors_layer0_rule(loaded.adapter.model_type, loaded.adapter.text_config)
    # Their versions of the configs are made before anything runs; a config their format cannot hold gets no row.
    authors_versions = {}
    for index, config in enumerate(configs):
        if not (authors_rule and isinstance(method_for(config), VisiPruner)):
            continue
        config_layer0 = _authors_layer0(config, layer0)  # a missing choice stops the sweep here, before any work
        try:
            authors_versions[index] = authors_equivalent(config, config_layer0)[0]
        except ConfigError as error:
            logger.warning("config %d has no authors'-rule row: %s", index, error)
    from tqdm.auto import tqdm

    shape = DecoderShape.from_config(loaded.adapter.text_config)
    passes = 1 + len(authors_versions) + len(configs) * (1 + len(BASELINES))
    rows = []
    with tqdm(total=passes * len(samples), desc="sweep", unit="sample", disable=not progress) as bar:
        baseline = clean_answers(
            loaded, samples, batch_size=batch_size, max_new_tokens=max_new_tokens, on_batch=bar.update
        )

        def evaluated(config: PruningConfig) -> pd.DataFrame:
            return evaluate_pruned(
                loaded,
                samples,
                config,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                baseline=baseline,
                on_batch=bar.update,
            )

        for index, config in enumerate(configs):
            per_sample = evaluated(config)
            scores = summarize(per_sample)
            rows.append({"method": config.method, "point": index, "settings": _settings(config), **scores})
            theirs = authors_versions.get(index)
            if theirs is not None:
                rows.append(
                    {
                        "method": AUTHORS_RULE_METHOD,
                        "point": index,
                        "settings": _settings(theirs),
                        **summarize(evaluated(theirs)),
                    }
                )
            for method in BASELINES:
                keep = matched_keep(shape, per_sample, method, prune_layer, scores["flops_cut"])
                matched = replace(config, method=method, prune_layer=prune_layer, keep_tokens=keep, provenance={})
                rows.append(
                    {"method": method, "point": index, "settings": _settings(matched), **summarize(evaluated(matched))}
                )
    return pd.DataFrame(rows)


def _authors_layer0(config: PruningConfig, layer0: str | None) -> str:
    """The layer-0 rule the authors' mode of ``config`` runs; a ConfigError where it needs one nobody chose."""
    if layer0 is not None:
        return layer0
    if "shallow" in config.stages and config.shallow_mid_layer > 0:
        raise ConfigError(
            "the authors' rule runs one of their layer-0 rules, chosen from a LLaVA-1.5-7B or -13B "
            f"architecture; for this model choose --authors-layer0 ({', '.join(LAYER0_RULES)})"
        )
    return "none"


def _settings(config: PruningConfig) -> str:
    """A short description of the parameters that matter for a method."""
    return method_for(config).settings()


def pruning_study(
    calibration_run: str | Path,
    out: str | Path,
    *,
    targets: Sequence[float],
    split: str | None,
    limit: int | None,
    prune_layer: int = 2,
    batch_size: int = 16,
    calibration_limit: int | None = None,
    authors_rule: bool = True,
    authors_layer0: str | None = None,
    loaded: LoadedModel | None = None,
) -> pd.DataFrame:
    """Export one config per agreement target from a calibration run, then sweep them (under our rule and, with
    ``authors_rule``, the authors') and the baselines.

    The configs go to ``out/config-<target>.json`` (plus the authors' JSON) and the table to ``out/sweep.csv``
    with ``out/study.json`` naming what made it; a later call with the same inputs reads the table back.
    """
    import json

    from analysis.data.loaders import load_samples
    from analysis.models.registry import default_device, load_model
    from analysis.pruner.export import ExportConfig, choose, derive, write
    from analysis.results import atomic_write_bytes, atomic_write_json, read_manifest

    folder = Path(out)
    manifest = read_manifest(calibration_run, made_by="analysis.probes")
    study = {
        "calibration_run": str(Path(calibration_run).resolve()),
        "calibration_identity": manifest.get("identity"),
        "targets": [float(t) for t in targets],
        "split": split,
        "limit": limit,
        "prune_layer": prune_layer,
        "calibration_limit": calibration_limit,
        "authors_rule": authors_rule,
        "authors_layer0": authors_layer0,
    }
    table_path, study_path = folder / "sweep.csv", folder / "study.json"
    if table_path.is_file() and study_path.is_file() and json.loads(study_path.read_text()) == study:
        return pd.read_csv(table_path)
    model_name = manifest["config"]["model"]
    loaded = loaded or load_model(model_name, device=default_device())
    if authors_rule and authors_layer0 is None:
        # Refused before the threshold search, not after it: their rule on a shallow stage needs a layer-0 rule.
        from analysis.stages import StageConfig, analyse

        shallow_end = analyse(calibration_run, StageConfig(n_bootstrap=0)).overall.shallow_end or 0
        layer0 = authors_layer0_rule(loaded.adapter.model_type, loaded.adapter.text_config)
        _authors_layer0(PruningConfig(num_layers=loaded.adapter.num_layers, shallow_mid_layer=shallow_end), layer0)
    configs = []
    # One threshold search serves every target.
    searched = derive(calibration_run, ExportConfig(target=float(targets[0]), limit=calibration_limit), loaded=loaded)
    for target in targets:
        result = choose(searched.search, float(target), searched.context)
        write(result, folder / f"config-{target:g}.json")
        configs.append(result.config)
    samples = load_samples(manifest["dataset"]["name"], split, limit)
    table = sweep(
        loaded,
        samples,
        configs,
        prune_layer=prune_layer,
        batch_size=batch_size,
        authors_rule=authors_rule,
        authors_layer0=authors_layer0,
    )
    table.insert(1, "target", [float(targets[point]) for point in table["point"]])
    atomic_write_bytes(table_path, table.to_csv(index=False).encode())
    atomic_write_json(study_path, study)
    return table
