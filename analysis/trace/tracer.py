"""Attention tracer: per-layer, per-head attention statistics computed inside the attention call.

The statistics are taken from each layer's queries and keys as the attention function receives them, through the
instrumentation layer (``analysis.hooks``): the last and instruction query rows are recomputed in float32 (all
sink and image-token statistics come from them), and the image queries' mass on each key region is one more fused
attention call whose values are the regions' one-hot columns (the model's dtype, float32 accumulation, as precise
as the model's own attention output), so no T x T matrix is ever materialised. The model keeps its own attention
(SDPA or eager) and its outputs are untouched.
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
    masks: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    region_values: dict[tuple[torch.dtype, int], torch.Tensor] = field(default_factory=dict)

    def call_masks(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text rows' additive float32 mask and the image-mass call's mask (None: causal), made once per pass.

        Every layer of a pass gets the same mask object from the model, so it is converted only once.
        """
        mask = call.attention_mask
        if not self.masks or self.masks[0][0] is not mask:
            text_mask = call.row_mask(slice(self.text_start, self.seq_len))
            self.masks[:] = [(mask, text_mask, None if mask is None else mask[..., : self.seq_len])]
        return self.masks[0][1], self.masks[0][2]

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
    """What one layer's call leaves behind, reduced only as far as one kernel each; finished for all layers at once."""

    query_rows: torch.Tensor  # (B, H, 2, K) float32: last and instruction-mean attention rows
    region_mass_per_query: torch.Tensor  # (B, H, T, width) in the model's dtype, first 3 columns: mass per region
    value_l1: torch.Tensor  # (B, K) float32


@dataclass
class LayerStats:
    """One layer's reductions, still on the model's device."""

    region_mass: torch.Tensor  # (B, H, 3 queries, 3 regions)
    image_rows: torch.Tensor  # (B, H, 2, N): last / instruction attention on each image token
    value_l1: torch.Tensor  # (B, N)
    top_values: torch.Tensor  # (B, H, 2, k): largest entries of image_rows, descending
    top_indices: torch.Tensor  # (B, H, 2, k): their image-token ordinals
    entropy: torch.Tensor  # (B, H, 2): entropy (nats) of image_rows renormalised over image tokens


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


def reduce_call(call: AttentionCall, plan: _Plan) -> _Reduced:
    """One layer's attention call reduced to its query rows, per-query region mass and value L1 (see ``_Reduced``).

    Few kernels per layer on purpose: at batch 1 the forward pass is bound by the host launching them.
    """
    groups = call.query.shape[1] // call.key.shape[1]
    text_mask, image_mask = plan.call_masks(call)
    # The last and instruction rows, recomputed in float32 from their queries only.
    keys = per_query_head(call.key[:, :, : plan.seq_len].float(), groups)  # (B, H, K, d)
    text = slice(plan.text_start, plan.seq_len)
    scores = torch.matmul(call.query[:, :, text].float(), keys.transpose(2, 3))
    weights = torch.softmax(torch.add(text_mask, scores, alpha=call.scaling), dim=-1)  # (B, H, R, K)
    query_rows = torch.matmul(plan.query_weights[:, None, :2, text], weights)  # (B, H, 2, K)
    # Every query's mass per key region: attention whose values are the regions' one-hot columns, in the model's
    # fused kernel (float32 accumulation); only the image queries' rows are kept, in layer_stats.
    per_query = torch.nn.functional.scaled_dot_product_attention(
        call.query,
        call.key[:, :, : plan.seq_len],
        plan.values(call.query.dtype, call.key.shape[1]),
        attn_mask=image_mask,
        is_causal=image_mask is None,
        scale=call.scaling,
        enable_gqa=groups > 1,
    )
    value_l1 = torch.linalg.vector_norm(call.value[:, :, : plan.seq_len], ord=1, dim=(1, 3), dtype=torch.float32)
    return _Reduced(query_rows, per_query, value_l1)


def layer_stats(reduced: list[_Reduced], plan: _Plan) -> list[LayerStats]:
    """Every layer's reductions completed, all layers at once, with their sink statistics."""
    # Stacked over layers: per-layer small kernels made the pass launch-bound at batch 1.
    query_rows = torch.stack([r.query_rows for r in reduced])  # (L, B, H, 2, K)
    per_query = torch.stack([r.region_mass_per_query for r in reduced])[..., : len(REGION_NAMES)].float()
    image_mass = torch.matmul(plan.query_weights[None, :, None, 2:], per_query)  # (L, B, H, 1, 3)
    region_mass = torch.cat([torch.matmul(query_rows, plan.region_onehot[None, :, None]), image_mass], dim=3)
    layers, batch, heads, groups, _ = query_rows.shape
    index = plan.image_index[None, :, None, None, :].expand(layers, -1, heads, groups, -1)
    image_rows = torch.gather(query_rows, 4, index) * plan.image_valid[None, :, None, None, :]  # (L, B, H, 2, N)
    value_l1 = torch.stack([r.value_l1 for r in reduced])  # (L, B, K)
    value_l1 = torch.gather(value_l1, 2, plan.image_index[None].expand(layers, -1, -1)) * plan.image_valid
    flat = image_rows.permute(1, 0, 2, 3, 4).reshape(batch, layers * heads, groups, -1)
    top_values, top_indices, entropy = (
        part.reshape(batch, layers, heads, *part.shape[2:]).transpose(0, 1)
        for part in sink_statistics(flat, plan.image_valid, plan.top_k)
    )
    return [
        LayerStats(region_mass[i], image_rows[i], value_l1[i], top_values[i], top_indices[i], entropy[i])
        for i in range(layers)
    ]


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

    def layer_stats(self) -> list[LayerStats]:
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
) -> tuple[list[LayerStats], torch.Tensor | None]:
    """Run one forward pass of the adapter's model and reduce every layer's attention as it is produced.

    What leaves the pass is O(layers x heads x image tokens) per sample.
    """
    with record_trace(adapter, inputs, top_k=top_k) as statistics, torch.inference_mode():
        output = adapter.model(**inputs.tensors)
    return statistics.layer_stats(), (output.logits if return_logits else None)
