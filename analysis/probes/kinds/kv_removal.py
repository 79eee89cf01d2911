"""KV removal (the paper's deep-stage test): greedy generation with the image tokens removed from the KV cache of
every layer from L on, for the last prompt position and every generated token.

The removal leaves every earlier prompt position as in the clean pass, so their keys and values are computed once
per batch and each depth generates from them (``PrefixGenerator``); a model whose language-model inputs cannot be
continued that way generates each depth from scratch."""

from __future__ import annotations

import pyarrow as pa

from analysis.data.scoring import is_correct
from analysis.generation import generate_answers
from analysis.hooks.attention import Knockout, KnockoutHooks, route_attention
from analysis.probes.base import Probe, ProbeBatch
from analysis.probes.measure import PrefixGenerator
from analysis.results import table_schema

KV_REMOVAL_SCHEMA = table_schema(
    [
        ("sample_id", pa.string()),
        ("layer_start", pa.int16()),
        ("answer", pa.string()),
        ("agrees", pa.bool_()),
        ("correct", pa.bool_()),
    ],
    "Greedy generation with image tokens removed from the KV cache of every layer >= layer_start for the "
    "last prompt position and every generated token; agrees = same text as the unmodified generation.",
)


class KVRemovalProbe(Probe):
    """One generation per depth L with the image hidden from the last position and the answer in layers >= L."""

    name = "kv_removal"
    tables = {"kv_removal": KV_REMOVAL_SCHEMA}
    options = ("kv_layers",)
    description = "generate with the image removed from the KV cache from layer L on"

    def rows(self, batch: ProbeBatch) -> dict[str, pa.Table]:
        """One row per sample and depth."""
        loaded, rows = batch.loaded, []
        num_layers, new_tokens = batch.num_layers, batch.config.max_new_tokens
        generator = PrefixGenerator.capture(loaded.model, loaded.adapter, batch.inputs)
        for depth in batch.config.kv_depths(num_layers):
            hooks = KnockoutHooks(batch.masks, [Knockout("last", "image", frozenset(range(depth, num_layers)))])
            if generator is not None:
                removed: list[str | None] = list(generator.generate(hooks, new_tokens, loaded.processor.tokenizer))
            else:
                with route_attention(loaded.adapter, hooks, batch.forced.prompt_length - 1):
                    removed = generate_answers(loaded, batch.inputs, new_tokens)
            for sample, baseline, answer in zip(batch.samples, batch.answers, removed, strict=True):
                rows.append(
                    {
                        "sample_id": sample.sample_id,
                        "layer_start": depth,
                        "answer": answer,
                        "agrees": answer == baseline,
                        "correct": bool(is_correct(answer or "", sample)),
                    }
                )
        return {"kv_removal": pa.Table.from_pylist(rows, schema=KV_REMOVAL_SCHEMA)}
