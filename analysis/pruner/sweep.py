"""Accuracy vs FLOPs: VisiPruner configs and the baselines (FastV, random, pre-LLM) at matched FLOPs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.bootstrap import bootstrap_ci
from analysis.data.samples import Sample
from analysis.distributed import World, current_world, gathered, share_of
from analysis.errors import ConfigError
from analysis.models.adapters import FamilyAdapter
from analysis.models.registry import LoadedModel
from analysis.pruner.config import LAYER0_RULES, PruningConfig, authors_equivalent, authors_layer0_rule
from analysis.pruner.evaluation import clean_answers, evaluate_pruned, summarize
from analysis.pruner.flops import DecoderShape, LayerTokens, prefill_flops
from analysis.pruner.methods import METHODS, method_for, sweep_baselines
from analysis.pruner.methods.visipruner import VisiPruner

logger = logging.getLogger(__name__)

# The one-shot methods compared with VisiPruner at matched FLOPs (those that declare themselves sweep baselines).
BASELINES = tuple(sweep_baselines())
# The token budgets pruning papers report on LLaVA-1.5 (64, 128 and 192 kept of its 24 x 24 image tokens), as
# shares of the image so that they scale to any model's token count.
CLASSIC_BUDGET_SHARES = (1 / 9, 2 / 9, 1 / 3)
BOOTSTRAP_DRAWS = 2000


def baselines_for(adapter: FamilyAdapter, methods: Sequence[str] = BASELINES) -> list[str]:
    """The ``methods`` that can run on ``adapter``'s model; each one left out is logged with its reason."""
    runnable = []
    for name in methods:
        cls = METHODS.get(name)
        reason = cls(cls.config_type()).unsupported(adapter)
        if reason is None:
            runnable.append(name)
        else:
            logger.info("%s is left out of the sweep on this model: %s", name, reason)
    return runnable


def config_flops_cut(shape: DecoderShape, per_sample: pd.DataFrame, config: PruningConfig) -> float:
    """Exact prefill FLOPs cut (%) over the given samples (``n_tokens``, ``n_image``) of a method whose image tokens per
    layer follow from its parameters.

    A ``weight`` column, where present, counts how many samples each row stands for.
    """
    method = method_for(config)
    if method.image_tokens(0, 1) is None:
        raise ConfigError(f"{config.method}'s token counts depend on the data; it has no budget to match")
    ours = full = 0.0
    weights = per_sample["weight"] if "weight" in per_sample else [1] * len(per_sample)
    for n_tokens, n_image, weight in zip(per_sample["n_tokens"], per_sample["n_image"], weights, strict=True):
        layers = []
        for layer in range(shape.num_layers):
            image = method.image_tokens(layer, int(n_image))
            assert image is not None  # checked above: the count follows from the parameters
            layers.append(LayerTokens(n_tokens - n_image + image, image))
        ours += weight * prefill_flops(shape, layers)["exact"]
        full += weight * prefill_flops(shape, [LayerTokens(n_tokens, n_image)] * shape.num_layers)["exact"]
    return 100 * (1 - ours / full)


def baseline_flops_cut(
    shape: DecoderShape, per_sample: pd.DataFrame, method: str, prune_layer: int, keep: int
) -> float:
    """Exact prefill FLOPs cut (%) of a one-shot baseline keeping ``keep`` image tokens from layer K on."""
    config = PruningConfig(method=method, num_layers=shape.num_layers, prune_layer=prune_layer, keep_tokens=keep)
    return config_flops_cut(shape, per_sample, config)


def with_budget(config: PruningConfig, value: Any) -> PruningConfig:
    """``config`` with its method's budget parameter set (a config field, or one of the method's options)."""
    parameter = method_for(config).budget_parameter
    if parameter in {f.name for f in fields(PruningConfig)}:
        return replace(config, **{parameter: value})
    return replace(config, options={**config.options, parameter: value})


def matched_budget(
    shape: DecoderShape, per_sample: pd.DataFrame, config: PruningConfig, target_cut: float
) -> PruningConfig:
    """``config`` at the budget whose FLOPs cut over the samples is closest to ``target_cut``."""
    values = method_for(config).budget_values(int(per_sample["n_image"].max()))
    cuts = np.array([config_flops_cut(shape, per_sample, with_budget(config, value)) for value in values])
    return with_budget(config, values[int(np.argmin(np.abs(cuts - target_cut)))])


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
    baselines = baselines_for(loaded.adapter)
    passes = 1 + len(authors_versions) + len(configs) * (1 + len(baselines))
    world = current_world()
    mine = share_of(world, samples)  # under torchrun each rank evaluates its share; every rank sees every row
    rows = []
    with tqdm(total=passes * len(mine), desc="sweep", unit="sample", disable=not progress) as bar:
        baseline = _all_clean_answers(
            world, loaded, mine, batch_size=batch_size, max_new_tokens=max_new_tokens, on_batch=bar.update
        )

        def evaluated(config: PruningConfig) -> pd.DataFrame:
            return _all_evaluated(
                world,
                loaded,
                mine,
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
            for method in baselines:
                template = replace(config, method=method, prune_layer=prune_layer, options={}, provenance={})
                matched = matched_budget(shape, per_sample, template, scores["flops_cut"])
                rows.append(
                    {"method": method, "point": index, "settings": _settings(matched), **summarize(evaluated(matched))}
                )
    return pd.DataFrame(rows)


def _all_clean_answers(world: World, loaded: LoadedModel, mine: Sequence[Sample], **options: Any) -> dict[str, Any]:
    """Unpruned answers of every rank's samples, this rank computing those of ``mine``."""
    merged: dict[str, Any] = {}
    for part in gathered(world, clean_answers(loaded, mine, **options)):
        merged.update(part)
    return merged


def _all_evaluated(
    world: World, loaded: LoadedModel, mine: Sequence[Sample], config: PruningConfig, **options: Any
) -> pd.DataFrame:
    """``evaluate_pruned`` rows of every rank's samples in dataset order, this rank computing those of ``mine``."""
    return pd.concat(gathered(world, evaluate_pruned(loaded, mine, config, **options)), ignore_index=True)


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
        "baselines": list(BASELINES),
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


def bootstrap_interval(
    values: np.ndarray, draws: int = BOOTSTRAP_DRAWS, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval (in %) of the mean of per-sample 0/1 values."""
    low, high = bootstrap_ci(np.asarray(values, dtype=float), draws, confidence, seed=0)
    return 100 * float(low[0]), 100 * float(high[0])


def family_scores(per_sample: pd.DataFrame) -> dict[str, float]:
    """Accuracy and agreement (%) per question family, as ``accuracy_<family>`` and ``agreement_<family>``."""
    scores: dict[str, float] = {}
    for family, rows in per_sample.groupby("family", sort=True):
        if not family:  # a dataset without families
            continue
        scores[f"accuracy_{family}"] = 100 * rows["pruned_correct"].astype(float).mean()
        scores[f"agreement_{family}"] = 100 * rows["agrees"].astype(float).mean()
    return scores


def prompt_sizes(loaded: LoadedModel, samples: Sequence[Sample], batch_size: int) -> pd.DataFrame:
    """Each sample's prompt and image token counts (``n_tokens``, ``n_image``), from its inputs; no model runs."""
    from analysis.data.samples import batched

    rows = []
    for batch in batched(list(samples), batch_size):
        inputs = loaded.adapter.build_inputs(loaded.processor, batch)
        rows += [{"n_tokens": layout.length, "n_image": layout.n_image_tokens} for layout in inputs.layouts]
    return pd.DataFrame(rows)


def budget_sweep(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    *,
    shares: Sequence[float] = CLASSIC_BUDGET_SHARES,
    methods: Sequence[str] | None = None,
    prune_layer: int = 2,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    runtime: str = "mask",
    progress: bool = True,
) -> pd.DataFrame:
    """One row per method and token budget: every method at the same share of the image tokens.

    A share becomes a token count from the samples' median image size (576 tokens of LLaVA-1.5 at 1/9 keep 64). A
    one-shot method keeps that many; a staged one (PyramidDrop) gets the budget whose exact prefill FLOPs match a
    one-shot method keeping them from layer ``prune_layer``. ``methods`` defaults to every sweep baseline the model can
    run; one it cannot is an error. Rows hold accuracy with its bootstrap interval, agreement
    with the unpruned answers, the exact prefill FLOPs cut and both scores per question family. ``runtime`` as in
    ``evaluate_pruned`` (the answers are the same; "drop" computes less).
    """
    from tqdm.auto import tqdm

    bad = [share for share in shares if not 0 < share <= 1]
    if bad:
        raise ConfigError(f"token budgets are shares of the image in (0, 1], got {bad}")
    num_layers = loaded.adapter.num_layers
    if methods is None:
        methods = baselines_for(loaded.adapter)
    for method in methods:
        reason = method_for(PruningConfig(method=method, num_layers=num_layers)).unsupported(loaded.adapter)
        if reason is not None:
            raise ConfigError(f"{method} cannot run on this model: {reason}")
        if method_for(PruningConfig(method=method, num_layers=num_layers)).image_tokens(0, 1) is None:
            raise ConfigError(f"{method}'s token counts depend on the data; it has no token budget")
    shape = DecoderShape.from_config(loaded.adapter.text_config)
    sizes = prompt_sizes(loaded, samples, batch_size)
    image_tokens = int(np.median(sizes["n_image"]))
    passes = 1 + len(shares) * len(methods)
    world = current_world()
    mine = share_of(world, samples)
    rows = []
    with tqdm(total=passes * len(mine), desc="budgets", unit="sample", disable=not progress) as bar:
        baseline = _all_clean_answers(
            world, loaded, mine, batch_size=batch_size, max_new_tokens=max_new_tokens, on_batch=bar.update
        )
        for share in shares:
            keep = max(1, round(share * image_tokens))
            for method in methods:
                config = PruningConfig(method=method, num_layers=num_layers, prune_layer=prune_layer, keep_tokens=keep)
                if method_for(config).budget_parameter != "keep_tokens":
                    target = baseline_flops_cut(shape, sizes, "fastv", prune_layer, keep)
                    config = matched_budget(shape, sizes, config, target)
                per_sample = _all_evaluated(
                    world,
                    loaded,
                    mine,
                    config,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    baseline=baseline,
                    runtime=runtime,
                    on_batch=bar.update,
                )
                low, high = bootstrap_interval(per_sample["pruned_correct"].astype(float).to_numpy())
                rows.append(
                    {
                        "method": method,
                        "budget_share": share,
                        "settings": _settings(config),
                        **summarize(per_sample),
                        "accuracy_low": low,
                        "accuracy_high": high,
                        **family_scores(per_sample),
                    }
                )
    return pd.DataFrame(rows)
