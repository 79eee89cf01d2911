"""Answers, agreement, FLOPs and kept tokens of a model under a pruning config, next to the unpruned model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch

from analysis.data.samples import Sample, batched
from analysis.data.scoring import is_correct
from analysis.errors import ConfigError
from analysis.generation import decode_answers, generate_answers
from analysis.hooks.attention import RegionMasks
from analysis.models.registry import LoadedModel
from analysis.pruner.config import PRUNING_RUNTIMES, PruningConfig
from analysis.pruner.flops import DecoderShape
from analysis.pruner.latency import latency_generate
from analysis.pruner.methods import method_for
from analysis.pruner.runtime import pruned_runtime
from analysis.pruner.simulate import PruningHooks, full_flops, masked_pruning, sample_flops


def evaluate_pruned(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    config: PruningConfig,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    baseline: dict[str, str | None] | None = None,
    runtime: str = "mask",
    on_batch: Callable[[int], object] | None = None,
) -> pd.DataFrame:
    """One row per sample: unpruned and pruned greedy answers, correctness, agreement, decisions and FLOPs.

    ``baseline`` maps sample ids to unpruned answers already computed (they are generated otherwise).
    ``runtime`` "drop" runs the pruned model with tokens really dropped (``runtime.py``), "mask" with attention
    masks (``simulate.py``), "latency" drops them in the latency mode (``latency.py``: static buffers, CUDA graphs;
    the unpruned answers too, eager where the mode cannot run); their outputs are the same (tested), only the
    compute differs. ``on_batch`` is called with each batch's sample count (progress bars).
    """
    if runtime not in PRUNING_RUNTIMES:
        raise ConfigError(f"unknown pruning runtime {runtime!r}; choose {' or '.join(PRUNING_RUNTIMES)}")
    config.validate(loaded.adapter.num_layers)
    prunes = method_for(config).prunes
    shape = DecoderShape.from_config(loaded.adapter.text_config)
    device = loaded.device
    rows = []
    for batch in batched(list(samples), batch_size):
        inputs = loaded.adapter.build_inputs(loaded.processor, batch, device=device)
        if baseline is not None and all(s.sample_id in baseline for s in batch):
            clean = [baseline[s.sample_id] for s in batch]
        else:
            clean = generate_answers(loaded, inputs, max_new_tokens, latency=runtime == "latency")
        prompt_length = inputs.input_ids.shape[1]
        hooks: PruningHooks
        latency = latency_generate(loaded, inputs, max_new_tokens, config) if runtime == "latency" else None
        if latency is not None:
            hooks = latency.runtime
            pruned = decode_answers(loaded.processor.tokenizer, latency.tokens)
        elif runtime in ("drop", "latency"):
            with pruned_runtime(loaded.model, config, inputs.layouts) as hooks:
                pruned = generate_answers(loaded, inputs, max_new_tokens) if prunes else clean
        else:
            masks = RegionMasks.from_layouts(inputs.layouts, prompt_length, device)
            hooks = PruningHooks(config, masks, inputs.layouts, prompt_length)
            if prunes:
                with masked_pruning(loaded.adapter, hooks):
                    pruned = generate_answers(loaded, inputs, max_new_tokens)
            else:
                pruned = clean
        decisions = hooks.decisions(inputs.layouts)
        for row, (sample, layout) in enumerate(zip(batch, inputs.layouts, strict=True)):
            ours = sample_flops(config, decisions, row, layout.length, shape)
            full = full_flops(decisions, row, layout.length, shape)
            rows.append(
                {
                    "sample_id": sample.sample_id,
                    "family": sample.family,
                    "reference": sample.answer,
                    "baseline_answer": clean[row],
                    "pruned_answer": pruned[row],
                    "baseline_correct": is_correct(clean[row] or "", sample) if sample.answer is not None else None,
                    "pruned_correct": is_correct(pruned[row] or "", sample) if sample.answer is not None else None,
                    "agrees": pruned[row] == clean[row],
                    "selection_layer": int(decisions.selection_layer[row]),
                    "exit_layer": int(decisions.exit_layer[row]),
                    "n_tokens": layout.length,
                    "n_image": decisions.n_image[row],
                    "n_kept": decisions.n_kept(row),
                    "flops": ours["exact"],
                    "flops_full": full["exact"],
                    "flops_fastv": ours["fastv"],
                    "flops_fastv_full": full["fastv"],
                    "vision_attention_flops": ours["vision_attention"],
                    "vision_attention_flops_full": full["vision_attention"],
                }
            )
        if on_batch is not None:
            on_batch(len(batch))
    return pd.DataFrame(rows)


def summarize(per_sample: pd.DataFrame) -> dict[str, float]:
    """Accuracy, agreement and FLOPs cut of one evaluated config (percentages)."""
    return {
        "accuracy": 100 * per_sample["pruned_correct"].mean(),
        "baseline_accuracy": 100 * per_sample["baseline_correct"].mean(),
        "agreement": 100 * per_sample["agrees"].mean(),
        "flops_cut": 100 * (1 - per_sample["flops"].sum() / per_sample["flops_full"].sum()),
        "flops_cut_fastv": 100 * (1 - per_sample["flops_fastv"].sum() / per_sample["flops_fastv_full"].sum()),
        "vision_attention_cut": 100
        * (1 - per_sample["vision_attention_flops"].sum() / max(per_sample["vision_attention_flops_full"].sum(), 1.0)),
        "kept_tokens": per_sample["n_kept"].mean(),
        "fired": 100 * (per_sample["selection_layer"] >= 0).mean(),
    }


def clean_answers(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    *,
    batch_size: int,
    max_new_tokens: int,
    on_batch: Callable[[int], object] | None = None,
) -> dict[str, str | None]:
    """Unpruned greedy answers by sample id (to share among several configs); ``on_batch`` as in evaluate_pruned."""
    device = loaded.device
    answers: dict[str, str | None] = {}
    with torch.inference_mode():
        for batch in batched(list(samples), batch_size):
            inputs = loaded.adapter.build_inputs(loaded.processor, batch, device=device)
            generated = generate_answers(loaded, inputs, max_new_tokens)
            answers.update(zip([s.sample_id for s in batch], generated, strict=True))
            if on_batch is not None:
                on_batch(len(batch))
    return answers
