"""Redundancy-paradox masking: hide the p% most attended image tokens (or the rest, random subsets, or all) from the
text queries in the first L layers and measure the answer's change."""

from __future__ import annotations

import pyarrow as pa
import torch

from analysis.hooks.attention import SUBSET_KEY, Knockout, KnockoutHooks
from analysis.models.adapters import ModelInputs
from analysis.probes.base import EFFECTS_SCHEMA, Probe, ProbeBatch, effect_rows
from analysis.probes.measure import ObserveAll


class MaskingProbe(Probe):
    """Top / bottom / random / all image-token subsets hidden from the instruction below each depth."""

    name = "masking"
    tables = {"effects": EFFECTS_SCHEMA}
    options = ("mask_percent", "mask_layers", "mask_seeds")
    description = "hide the most (least, random) attended image tokens from the text below depth L"

    def rows(self, batch: ProbeBatch) -> dict[str, pa.Table]:
        """One effects row per sample, depth and subset."""
        config, rows = batch.config, []
        for depth in config.mask_depths(batch.num_layers):
            subsets = mask_subsets(batch.observer, batch.inputs, depth, config.mask_percent, config.mask_seeds)
            for variant, seed, subset in subsets:
                masks = batch.masks.with_keys(SUBSET_KEY, subset)
                hooks = KnockoutHooks(masks, [Knockout("instruction", SUBSET_KEY, frozenset(range(depth)))])
                scores = batch.scorer.score(hooks)
                rows += effect_rows(batch.ids, self.name, variant, 0, depth, seed, batch.clean, scores)
        return {"effects": pa.Table.from_pylist(rows, schema=EFFECTS_SCHEMA)}


def mask_subsets(
    observer: ObserveAll, inputs: ModelInputs, depth: int, percent: float, seeds: int
) -> list[tuple[str, int, torch.Tensor]]:
    """(variant, seed, (B, T) key subset) for the redundancy-paradox masking at one depth.

    "Most attended" ranks image tokens by the last position's head-mean attention averaged over the
    masked layers of the clean pass.
    """
    attention = torch.stack([observer.records[layer]["attention"] for layer in range(depth)]).mean(0)  # (B, N)
    batch, seq_len = inputs.input_ids.shape
    device = attention.device
    subsets: dict[tuple[str, int], torch.Tensor] = {}
    for row, layout in enumerate(inputs.layouts):
        positions = torch.as_tensor(layout.padded(layout.image_positions), device=device)
        n = len(positions)
        n_top = max(1, int(round(n * percent / 100)))
        order = torch.argsort(attention[row, :n], descending=True, stable=True)
        chosen = {("top", -1): order[:n_top], ("bottom", -1): order[n_top:], ("all", -1): order}
        for seed in range(seeds):
            generator = torch.Generator().manual_seed(seed)
            chosen[("random", seed)] = torch.randperm(n, generator=generator)[:n_top].to(device)
        for key, picked in chosen.items():
            subset = subsets.setdefault(key, torch.zeros(batch, seq_len, dtype=torch.bool, device=device))
            subset[row, positions[picked]] = True
    return [(variant, seed, subset) for (variant, seed), subset in subsets.items()]
