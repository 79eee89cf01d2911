"""Accuracy vs FLOPs: VisiPruner configs and the baselines (FastV, random, pre-LLM) at matched FLOPs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from analysis.data.samples import Sample
from analysis.models.registry import LoadedModel
from analysis.pruner.config import PruningConfig
from analysis.pruner.evaluation import clean_answers, evaluate_pruned, summarize
from analysis.pruner.flops import DecoderShape, LayerTokens, prefill_flops

BASELINES = ("fastv", "random", "pre_llm")


def baseline_flops_cut(shape: DecoderShape, per_sample: pd.DataFrame, method: str, prune_layer: int, keep: int) -> float:
    """Exact prefill FLOPs cut (%) of a one-shot baseline keeping ``keep`` image tokens, over the given samples."""
    ours = full = 0.0
    for n_tokens, n_image in zip(per_sample["n_tokens"], per_sample["n_image"]):
        kept = min(keep, n_image)
        pruned = LayerTokens(n_tokens - n_image + kept, kept)
        start = 0 if method == "pre_llm" else prune_layer
        layers = [LayerTokens(n_tokens, n_image)] * start + [pruned] * (shape.num_layers - start)
        ours += prefill_flops(shape, layers)["exact"]
        full += prefill_flops(shape, [LayerTokens(n_tokens, n_image)] * shape.num_layers)["exact"]
    return 100 * (1 - ours / full)


def matched_keep(shape: DecoderShape, per_sample: pd.DataFrame, method: str, prune_layer: int, target_cut: float) -> int:
    """The token budget whose FLOPs cut is closest to ``target_cut`` for a baseline."""
    budgets = np.arange(0, int(per_sample["n_image"].max()) + 1)
    cuts = np.array([baseline_flops_cut(shape, per_sample, method, prune_layer, int(k)) for k in budgets])
    return int(budgets[np.argmin(np.abs(cuts - target_cut))])


def sweep(
    loaded: LoadedModel, samples: Sequence[Sample], configs: Sequence[PruningConfig], *, prune_layer: int = 2,
    batch_size: int = 16, max_new_tokens: int = 8,
) -> pd.DataFrame:
    """One row per evaluated config: VisiPruner configs, then each baseline at the FLOPs cut each of them reached."""
    shape = DecoderShape.from_config(loaded.adapter.text_config)
    baseline = clean_answers(loaded, samples, batch_size=batch_size, max_new_tokens=max_new_tokens)
    rows = []
    for index, config in enumerate(configs):
        per_sample = evaluate_pruned(loaded, samples, config, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     baseline=baseline)
        scores = summarize(per_sample)
        rows.append({"method": config.method, "point": index, "settings": _settings(config), **scores})
        for method in BASELINES:
            keep = matched_keep(shape, per_sample, method, prune_layer, scores["flops_cut"])
            matched = replace(config, method=method, prune_layer=prune_layer, keep_tokens=keep, provenance={})
            matched_scores = summarize(evaluate_pruned(loaded, samples, matched, batch_size=batch_size,
                                                       max_new_tokens=max_new_tokens, baseline=baseline))
            rows.append({"method": method, "point": index, "settings": _settings(matched), **matched_scores})
    return pd.DataFrame(rows)


def _settings(config: PruningConfig) -> str:
    """A short description of the parameters that matter for a method."""
    if config.method == "visipruner":
        return (f"S={config.shallow_mid_layer} tL={config.layer_threshold} tT={config.tokens_threshold:.4g} "
                f"stages={'+'.join(config.stages)}")
    if config.method == "pre_llm":
        return f"keep={config.keep_tokens}"
    return f"K={config.prune_layer} keep={config.keep_tokens}"
