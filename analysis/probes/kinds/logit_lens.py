"""Logit lens at the last prompt position: each layer's residual stream, and each head's attention output through its
slice of the output projection, read through the final norm and LM head; ranks of the answer and of task words."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch

from analysis.probes.base import Probe, ProbeBatch
from analysis.probes.measure import head_projections, lens_logprobs
from analysis.results import table_schema

LOGIT_LENS_SCHEMA = table_schema(
    [
        ("sample_id", pa.string()),
        ("layer", pa.int16()),
        ("source", pa.string()),
        ("head", pa.int16()),
        ("target", pa.string()),
        ("token_id", pa.int32()),
        ("rank", pa.int32()),
        ("prob", pa.float32()),
        ("top_tokens", pa.list_(pa.string())),
        ("top_probs", pa.list_(pa.float32())),
    ],
    "Logit lens at the last prompt position: source 'residual' = layer output through final norm and LM "
    "head (head = -1); source 'head' = that head's attention output through its o_proj slice, final norm "
    "and LM head. target 'answer' = first token of the reference answer, other targets are task words; "
    "rank 0 = most likely. top_tokens/top_probs are filled on the 'answer' rows.",
)


class LogitLensProbe(Probe):
    """Residual and per-head logit lens, every layer."""

    name = "logit_lens"
    tables = {"logit_lens": LOGIT_LENS_SCHEMA}
    options = ("task_words", "lens_top_k")
    needs_residuals = True
    description = "where the answer becomes decodable: residual stream and heads through the LM head"

    def rows(self, batch: ProbeBatch) -> dict[str, pa.Table]:
        """Logit-lens rows for residual streams and per-head outputs at the last prompt position."""
        config, forced, observer = batch.config, batch.forced, batch.observer
        adapter, tokenizer = batch.loaded.adapter, batch.loaded.processor.tokenizer
        targets = [("answer", forced.answer_ids[:, 0])]
        for word in [w.strip() for w in config.task_words.split(",") if w.strip()]:
            word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if word_ids:
                targets.append((word, torch.full_like(forced.answer_ids[:, 0], word_ids[0])))
        rows: list[dict[str, Any]] = []
        for layer in range(adapter.num_layers):
            sources = [("residual", -1, lens_logprobs(adapter, batch.residuals[layer]))]
            heads = head_projections(adapter, layer, observer.records[layer]["head_output"])  # (B, H, D)
            for head in range(heads.shape[1]):
                sources.append(("head", head, lens_logprobs(adapter, heads[:, head])))
            for source, head, logprobs in sources:
                top = logprobs.topk(config.lens_top_k, dim=-1)
                for target, token_ids in targets:
                    target_logprob = logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
                    rank = (logprobs > target_logprob[:, None]).sum(-1)
                    for row, sample in enumerate(batch.samples):
                        is_answer = target == "answer"
                        rows.append(
                            {
                                "sample_id": sample.sample_id,
                                "layer": layer,
                                "source": source,
                                "head": head,
                                "target": target,
                                "token_id": int(token_ids[row]),
                                "rank": int(rank[row]),
                                "prob": float(target_logprob[row].exp()),
                                "top_tokens": tokenizer.convert_ids_to_tokens(top.indices[row].tolist())
                                if is_answer
                                else None,
                                "top_probs": top.values[row].exp().tolist() if is_answer else None,
                            }
                        )
        return {"logit_lens": pa.Table.from_pylist(rows, schema=LOGIT_LENS_SCHEMA)}
