"""Token ablation: hide one image token at a time from the text queries in a band of layers; the tokens whose
removal changes the answer are the critical ones (the paper's middle-stage claim)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch

from analysis.hooks.attention import SUBSET_KEY, Knockout, KnockoutHooks
from analysis.probes.base import Probe, ProbeBatch
from analysis.probes.measure import kl_divergence
from analysis.results import table_schema

TOKEN_ABLATION_SCHEMA = table_schema(
    [
        ("sample_id", pa.string()),
        ("image_index", pa.int16()),
        ("token_index", pa.int32()),
        ("ordinal", pa.int32()),
        ("layer_start", pa.int16()),
        ("layer_end", pa.int16()),
        ("delta_logprob", pa.float32()),
        ("kl", pa.float32()),
        ("top1_match", pa.bool_()),
    ],
    "One image token (ordinal = index among all the sample's image tokens) hidden from the text queries "
    "in layers [layer_start, layer_end): change of the reference answer's log-prob, KL of the next-token "
    "distribution and whether its argmax is unchanged. Critical tokens are those whose removal changes the answer.",
)


class TokenAblationProbe(Probe):
    """One pass per image-token ordinal, all samples holding that ordinal at once."""

    name = "token_ablation"
    tables = {"token_ablation": TOKEN_ABLATION_SCHEMA}
    options = ("ablation_layers",)
    description = "hide each image token alone from the text in a layer band"

    def rows(self, batch: ProbeBatch) -> dict[str, pa.Table]:
        """Hide each image token, one at a time, from the text in the ablation band."""
        inputs, clean = batch.inputs, batch.clean
        start, end = batch.config.ablation_band(batch.num_layers)
        layers = frozenset(range(start, end))
        batch_size, seq_len = inputs.input_ids.shape
        device = inputs.input_ids.device
        rows: list[dict[str, Any]] = []
        n_max = max(layout.n_image_tokens for layout in inputs.layouts)
        coordinates = [layout.image_token_coordinates for layout in inputs.layouts]
        for ordinal in range(n_max):
            subset = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=device)
            owners = [row for row, layout in enumerate(inputs.layouts) if ordinal < layout.n_image_tokens]
            for row in owners:
                subset[row, int(inputs.layouts[row].padded(inputs.layouts[row].image_positions[ordinal]))] = True
            masks = batch.masks.with_keys(SUBSET_KEY, subset)
            scores = batch.scorer.score(KnockoutHooks(masks, [Knockout("instruction", SUBSET_KEY, layers)]))
            kl = kl_divergence(clean.next_logprobs, scores.next_logprobs)
            same = clean.next_logprobs.argmax(-1) == scores.next_logprobs.argmax(-1)
            delta = scores.answer_logprob - clean.answer_logprob
            for row in owners:
                image_index, token_index = (int(part[ordinal]) for part in coordinates[row])
                rows.append(
                    {
                        "sample_id": batch.samples[row].sample_id,
                        "image_index": image_index,
                        "token_index": token_index,
                        "ordinal": ordinal,
                        "layer_start": start,
                        "layer_end": end,
                        "delta_logprob": float(delta[row]),
                        "kl": float(kl[row]),
                        "top1_match": bool(same[row]),
                    }
                )
        return {"token_ablation": pa.Table.from_pylist(rows, schema=TOKEN_ABLATION_SCHEMA)}
