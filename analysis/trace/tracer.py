"""Attention tracer: per-layer, per-head attention statistics computed inside the attention call.

The statistics are taken from each layer's queries and keys as the attention function receives them, through the
instrumentation layer (``analysis.hooks``). Inside the pass each layer costs two kernels: the image queries' mass
on each key region as one more fused attention call whose values are the regions' one-hot columns (the model's
dtype, float32 accumulation, as precise as the model's own attention output), and a copy of the last and
instruction queries. After the pass their attention rows are recomputed in float32 from those queries and the
keys the KV cache holds anyway (all sink and image-token statistics come from them), several layers per kernel.
No T x T matrix is ever materialised; the model keeps its own attention (SDPA or eager), its outputs untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from analysis.errors import ConfigError
from analysis.hooks.attention import AttentionCall, AttentionHooks, per_query_head, route_attention
from analysis.layout import REGION_IMAGE, REGION_INSTRUCTION, REGION_NAMES, TokenLayout
from analysis.models import hf
from analysis.models.adapters import FamilyAdapter, ModelInputs

QUERY_GROUPS = ("last", "instruction", "image")
TRACEABLE_ATTENTION = ("sdpa", "eager")
# Width of the one-hot value rows of the region-mass call: the three regions, padded to a width the fused
# (memory-efficient) kernel accepts.
_REGION_VALUE_WIDTH = 8


@dataclass
class _Plan:
    """Batch-constant tensors that turn one layer's attention call into region statistics."""

    region_onehot: torch.Tensor  # (B, T, 3) float32, zero on padding
    query_weights: torch.Tensor  # (B, 3, T) float32: averaging weights of last / instruction / image queries
    image_index: torch.Tensor  # (B, N) long: padded positions of image tokens (0 where absent)
    image_valid: torch.Tensor  # (B, N) bool
    top_k: int
    seq_len: int
    text_start: int  # first padded position holding an instruction or last query in any sample
    # The model's mask of the current pass (kept, so identity means the same pass) and its two conversions.
    converted: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None = None
    region_values: dict[tuple[torch.dtype, int], torch.Tensor] = field(default_factory=dict)

    def call_masks(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text rows' additive float32 mask and the image-mass call's mask (None: causal), made once per pass.

        Every layer of a pass gets the same mask object from the model, so it is converted only once.
        """
        mask = call.attention_mask
        if self.converted is None or self.converted[0] is not mask:
            text_mask = call.row_mask(slice(self.text_start, self.seq_len))
            self.converted = (mask, text_mask, None if mask is None else mask[..., : self.seq_len])
        return self.converted[1], self.converted[2]

    def values(self, dtype: torch.dtype, heads: int) -> torch.Tensor:
        """The regions' one-hot columns as attention values (B, heads, T, width), made once per dtype and width."""
        key = (dtype, heads)
        if key not in self.region_values:
            values = torch.zeros(*self.region_onehot.shape[:2], _REGION_VALUE_WIDTH, device=self.region_onehot.device)
            values[..., : len(REGION_NAMES)] = self.region_onehot
            self.region_values[key] = values[:, None].expand(-1, heads, -1, -1).to(dtype).contiguous()
        return self.region_values[key]


@dataclass
class _Reduced:
    """What one layer's call leaves behind; every statistic is finished after the pass, for many layers at once."""

    text_queries: torch.Tensor  # (B, H, R, d) the last and instruction queries (a copy, in the model's dtype)
    keys: torch.Tensor  # (B, H_kv, K, d) the call's keys: the KV cache's own tensor, so keeping it costs nothing
    values: torch.Tensor  # (B, H_kv, K, d) likewise
    text_mask: torch.Tensor  # (B, 1, R, K) additive float32 mask of the text rows
    scaling: float
    region_mass_per_query: torch.Tensor  # (B, H, T, width) in the model's dtype, first 3 columns: mass per region


@dataclass
class TraceStats:
    """Every layer's statistics of a batch, stacked on a leading layer axis, still on the model's device."""

    region_mass: torch.Tensor  # (L, B, H, 3 queries, 3 regions)
    image_rows: torch.Tensor  # (L, B, H, 2, N): last / instruction attention on each image token
    value_l1: torch.Tensor  # (L, B, N)
    top_values: torch.Tensor  # (L, B, H, 2, k): largest entries of image_rows, descending
    top_indices: torch.Tensor  # (L, B, H, 2, k): their image-token ordinals
    entropy: torch.Tensor  # (L, B, H, 2): entropy (nats) of image_rows renormalised over image tokens


def build_plan(layouts: list[TokenLayout], seq_len: int, top_k: int, device: torch.device) -> _Plan:
    """Precompute the region and query-group weights of a padded batch."""
    batch = len(layouts)
    onehot = torch.zeros(batch, seq_len, len(REGION_NAMES))
    query_weights = torch.zeros(batch, len(QUERY_GROUPS), seq_len)
    n_max = max(layout.n_image_tokens for layout in layouts)
    image_index = torch.zeros(batch, n_max, dtype=torch.long)
    image_valid = torch.zeros(batch, n_max, dtype=torch.bool)
    text_start = seq_len
    for row, layout in enumerate(layouts):
        padded = layout.padded(np.arange(layout.length))
        onehot[row, padded, torch.as_tensor(layout.regions, dtype=torch.long)] = 1.0
        last = int(layout.padded(layout.last))
        query_weights[row, 0, last] = 1.0
        instruction = layout.padded(np.flatnonzero(layout.regions == REGION_INSTRUCTION))
        query_weights[row, 1, instruction] = 1.0 / len(instruction)
        images = layout.padded(np.flatnonzero(layout.regions == REGION_IMAGE))
        query_weights[row, 2, images] = 1.0 / len(images)
        image_index[row, : len(images)] = torch.as_tensor(images)
        image_valid[row, : len(images)] = True
        text_start = min(text_start, last, int(instruction.min()))
    return _Plan(
        onehot.to(device),
        query_weights.to(device),
        image_index.to(device),
        image_valid.to(device),
        top_k,
        seq_len,
        text_start,
    )


# Bytes of float32 work the post-pass statistics may hold at once: a few layers at a time at batch 1 (one kernel per
# step for several layers, where a per-layer kernel would cost a launch each), one at a time for large batches.
_CHUNK_BYTES = 64 * 2**20


def reduce_call(call: AttentionCall, plan: _Plan) -> _Reduced:
    """What one layer's attention call leaves for the statistics (see ``_Reduced``): two kernels in the pass.

    The region mass of every query needs all of them, so it is one fused attention call here, whose values are the
    regions' one-hot columns (the model's dtype, float32 accumulation); the text rows need only their queries, kept
    as a copy, and the keys, which the KV cache keeps anyway.
    """
    text_mask, image_mask = plan.call_masks(call)
    keys = call.key[:, :, : plan.seq_len]
    per_query = torch.nn.functional.scaled_dot_product_attention(
        call.query,
        keys,
        plan.values(call.query.dtype, call.key.shape[1]),
        attn_mask=image_mask,
        is_causal=image_mask is None,
        scale=call.scaling,
        enable_gqa=call.query.shape[1] != call.key.shape[1],
    )
    text_queries = call.query[:, :, plan.text_start : plan.seq_len].clone()
    return _Reduced(text_queries, keys, call.value[:, :, : plan.seq_len], text_mask, call.scaling, per_query)


def _float32_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q k^T (..., R, K) in float32 from queries and keys of any dtype (half-precision inputs stay exact)."""
    if queries.dtype == torch.float32 or queries.device.type != "cuda":
        return torch.matmul(queries.float(), keys.float().transpose(-1, -2))
    # fp16/bf16 products are exact in float32, so a float32-output matmul is float32 arithmetic on the model's own
    # queries and keys (to accumulation order), without float32 copies of the keys.
    shape = queries.shape[:-2]
    scores = torch.bmm(queries.flatten(0, -3), keys.flatten(0, -3).transpose(1, 2), out_dtype=torch.float32)
    return scores.view(*shape, *scores.shape[-2:])


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors stacked on a new leading axis; one alone is a view (a 40 MB key tensor at batch 8 is not copied)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _text_rows(reduced: list[_Reduced], plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's last / instruction attention rows (L, B, H, 2, K) and value L1 (L, B, K), in float32."""
    first = reduced[0]
    batch, heads, rows, _ = first.text_queries.shape
    # Per layer of a chunk: its keys and values stacked (the model's dtype), its scores and weights (float32).
    stacked = 2 * first.keys.numel() * first.keys.element_size()
    per_layer = stacked + 2 * 4 * batch * heads * rows * plan.seq_len
    step = max(1, _CHUNK_BYTES // max(1, per_layer))
    weights_of_rows = plan.query_weights[None, :, None, :2, plan.text_start :]  # (1, B, 1, 2, R)
    query_rows, value_l1 = [], []
    for start in range(0, len(reduced), step):
        chunk = reduced[start : start + step]
        groups = heads // chunk[0].keys.shape[1]
        keys = per_query_head(_stacked([r.keys for r in chunk]).flatten(0, 1), groups)
        keys = keys.unflatten(0, (len(chunk), batch))  # (c, B, H, K, d)
        scores = _float32_scores(_stacked([r.text_queries for r in chunk]), keys)  # (c, B, H, R, K)
        # Every layer of a pass shares one mask: broadcast it instead of stacking copies.
        shared = all(r.text_mask is chunk[0].text_mask for r in chunk)
        masks = chunk[0].text_mask.unsqueeze(0) if shared else torch.stack([r.text_mask for r in chunk])
        weights = torch.softmax(torch.add(masks, scores, alpha=chunk[0].scaling), dim=-1)
        query_rows.append(torch.matmul(weights_of_rows, weights))
        values = _stacked([r.values for r in chunk])
        value_l1.append(torch.linalg.vector_norm(values, ord=1, dim=(2, 4), dtype=torch.float32))
    return torch.cat(query_rows), torch.cat(value_l1)


def layer_stats(reduced: list[_Reduced], plan: _Plan) -> TraceStats:
    """Every layer's statistics, computed after the pass for many layers at once, with their sinks."""
    query_rows, value_l1 = _text_rows(reduced, plan)  # (L, B, H, 2, K), (L, B, K)
    per_query = torch.stack([r.region_mass_per_query for r in reduced])[..., : len(REGION_NAMES)].float()
    image_mass = torch.matmul(plan.query_weights[None, :, None, 2:], per_query)  # (L, B, H, 1, 3)
    region_mass = torch.cat([torch.matmul(query_rows, plan.region_onehot[None, :, None]), image_mass], dim=3)
    layers, batch, heads, groups, _ = query_rows.shape
    index = plan.image_index[None, :, None, None, :].expand(layers, -1, heads, groups, -1)
    image_rows = torch.gather(query_rows, 4, index) * plan.image_valid[None, :, None, None, :]  # (L, B, H, 2, N)
    value_l1 = torch.gather(value_l1, 2, plan.image_index[None].expand(layers, -1, -1)) * plan.image_valid
    flat = image_rows.permute(1, 0, 2, 3, 4).reshape(batch, layers * heads, groups, -1)
    top_values, top_indices, entropy = (
        part.reshape(batch, layers, heads, *part.shape[2:]).transpose(0, 1)
        for part in sink_statistics(flat, plan.image_valid, plan.top_k)
    )
    return TraceStats(region_mass, image_rows, value_l1, top_values, top_indices, entropy)


def sink_statistics(
    image_rows: torch.Tensor, image_valid: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k attended image tokens and the entropy of image-directed attention, per head and query group.

    ``image_rows`` is (B, H, G, N) with zeros where ``image_valid`` (B, N) is False; those padding
    slots are ranked last so a sample's first min(k, n_image) entries are its own tokens.
    """
    ranked = image_rows.masked_fill(~image_valid[:, None, None, :], -1.0)
    top_values, top_indices = ranked.topk(min(top_k, image_rows.shape[-1]), dim=-1)
    mass = image_rows.sum(-1, keepdim=True)
    probabilities = image_rows / torch.where(mass > 0, mass, torch.ones_like(mass))
    entropy = -torch.special.xlogy(probabilities, probabilities).sum(-1)
    return top_values, top_indices, entropy


class TraceStatistics(AttentionHooks):
    """Hooks that record every layer's statistics from the prefill's attention calls; changes nothing."""

    def __init__(self, plan: _Plan, num_layers: int) -> None:
        self.plan = plan
        self.num_layers = num_layers
        self.reduced: dict[int, _Reduced] = {}

    def wants_call(self, layer: int, query_start: int, query_length: int) -> bool:
        """Only the full prompt's pass (a generation's later steps are not traced)."""
        return query_start == 0 and query_length == self.plan.seq_len

    def inspect(self, call: AttentionCall) -> None:
        """Reduce the layer's call as it happens; only the reductions outlive it."""
        self.reduced[call.layer] = reduce_call(call, self.plan)

    def layer_stats(self) -> TraceStats:
        """Every layer's statistics (an error naming the cause if the pass did not run through the route)."""
        if len(self.reduced) != self.num_layers:
            raise ConfigError(
                f"the traced pass reached {len(self.reduced)} of {self.num_layers} attention layers; run the model "
                "on the inputs given to record_trace inside its block"
            )
        return layer_stats([self.reduced[layer] for layer in range(self.num_layers)], self.plan)


@contextmanager
def record_trace(adapter: FamilyAdapter, inputs: ModelInputs, *, top_k: int = 5) -> Iterator[TraceStatistics]:
    """Record the trace tables' statistics of whatever forward pass of ``inputs`` runs inside the block.

    Works under any wrapper that calls the model's own modules, an nnsight trace included; after the block,
    ``layer_stats()`` on the yielded object gives the statistics.
    """
    implementation = hf.attention_implementation(adapter.text_config)
    if implementation not in TRACEABLE_ATTENTION:
        raise ConfigError(
            f"tracing supports {' and '.join(TRACEABLE_ATTENTION)} attention, not {implementation!r}; "
            "load the model with attn_implementation='sdpa'"
        )
    plan = build_plan(inputs.layouts, inputs.input_ids.shape[1], top_k, inputs.input_ids.device)
    statistics = TraceStatistics(plan, adapter.num_layers)
    with route_attention(adapter, statistics, plan.seq_len - 1):
        yield statistics


def trace_batch(
    adapter: FamilyAdapter, inputs: ModelInputs, *, top_k: int = 5, return_logits: bool = False
) -> tuple[TraceStats, torch.Tensor | None]:
    """Run one forward pass of the adapter's model and reduce every layer's attention as it is produced.

    What leaves the pass is O(layers x heads x image tokens) per sample.
    """
    with record_trace(adapter, inputs, top_k=top_k) as statistics, torch.inference_mode():
        output = adapter.model(**inputs.tensors)
    return statistics.layer_stats(), (output.logits if return_logits else None)
