"""Attention knockout (the paper's Fig. 2): block a query region's attention to a key region in a band of layers and
measure the reference answer's log-prob, the next-token KL and whether the top token survives."""

from __future__ import annotations

import pyarrow as pa

from analysis.hooks.attention import KnockoutHooks
from analysis.probes.base import EFFECTS_SCHEMA, Probe, ProbeBatch, effect_rows


class KnockoutProbe(Probe):
    """Every knockout of the config (query regions x modes x layer ranges)."""

    name = "knockout"
    tables = {"effects": EFFECTS_SCHEMA}
    options = ("knockout_queries", "knockout_key", "knockout_modes", "window")
    description = "block query->key attention in layer bands; effect on the answer"

    def rows(self, batch: ProbeBatch) -> dict[str, pa.Table]:
        """One effects row per sample and knockout."""
        rows = []
        for variant, start, end, knockouts in batch.config.knockouts(batch.num_layers):
            scores = batch.scorer.score(KnockoutHooks(batch.masks, knockouts))
            rows += effect_rows(batch.ids, self.name, variant, start, end, -1, batch.clean, scores)
        return {"effects": pa.Table.from_pylist(rows, schema=EFFECTS_SCHEMA)}
