"""Attention tracer: per-layer, per-head attention statistics reduced inside the forward pass (nnsight)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analysis.errors import ModelError
from analysis.layout import REGION_IMAGE, REGION_INSTRUCTION, REGION_NAMES, TokenLayout
from analysis.models.adapters import FamilyAdapter, ModelInputs

QUERY_GROUPS = ("last", "instruction", "image")
# Instance attributes nnsight writes into every wrapped module (see nnsight.intervention.source).
_NNSIGHT_SLOTS = ("forward", "__nnsight__", "__nnsight_body_forward__")


@dataclass
class _Plan:
    """Batch-constant tensors that turn one layer's attention into region statistics."""

    region_onehot: torch.Tensor  # (B, T, 3) float32, zero on padding
    query_weights: torch.Tensor  # (B, 3, T) float32: averaging weights of last / instruction / image queries
    image_index: torch.Tensor  # (B, N) long: padded positions of image tokens (0 where absent)
    image_valid: torch.Tensor  # (B, N) bool
    top_k: int


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
    for row, layout in enumerate(layouts):
        padded = layout.padded(np.arange(layout.length))
        onehot[row, padded, torch.as_tensor(layout.regions, dtype=torch.long)] = 1.0
        query_weights[row, 0, layout.padded(layout.last)] = 1.0
        instruction = layout.padded(np.flatnonzero(layout.regions == REGION_INSTRUCTION))
        query_weights[row, 1, instruction] = 1.0 / len(instruction)
        images = layout.padded(np.flatnonzero(layout.regions == REGION_IMAGE))
        query_weights[row, 2, images] = 1.0 / len(images)
        image_index[row, : len(images)] = torch.as_tensor(images)
        image_valid[row, : len(images)] = True
    return _Plan(onehot.to(device), query_weights.to(device), image_index.to(device), image_valid.to(device), top_k)


def reduce_layer(
    attention: torch.Tensor, values: torch.Tensor, plan: _Plan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's attention (B, H, T, T) and value projections (B, T, D) as region mass, image rows and value L1.

    All in float32; the sink statistics of every layer are computed afterwards in one go (``layer_stats``).
    """
    weights = attention.float()
    query_rows = torch.einsum("bgq,bhqk->bhgk", plan.query_weights[:, :2], weights)  # last, instruction rows
    image_query_mass = torch.einsum("bq,bhqk->bhk", plan.query_weights[:, 2], weights)
    rows = torch.cat([query_rows, image_query_mass.unsqueeze(2)], dim=2)  # (B, H, 3, T)
    region_mass = torch.einsum("bhgk,bkr->bhgr", rows, plan.region_onehot)
    gather_index = plan.image_index[:, None, None, :].expand(-1, rows.shape[1], 2, -1)
    image_rows = torch.gather(query_rows, 3, gather_index) * plan.image_valid[:, None, None, :]
    value_l1 = values.float().abs().sum(-1)
    value_l1 = torch.gather(value_l1, 1, plan.image_index) * plan.image_valid
    return region_mass, image_rows, value_l1


def layer_stats(reduced: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], plan: _Plan) -> list[LayerStats]:
    """Every layer's reductions completed with its sink statistics."""
    # One top-k over all layers stacked: per-layer small kernels made the pass launch-bound at batch 1.
    image_rows = torch.stack([rows for _, rows, _ in reduced])  # (L, B, H, 2, N)
    layers, batch, heads, groups, n = image_rows.shape
    flat = image_rows.permute(1, 0, 2, 3, 4).reshape(batch, layers * heads, groups, n)
    top_values, top_indices, entropy = (
        part.reshape(batch, layers, heads, *part.shape[2:]).transpose(0, 1)
        for part in sink_statistics(flat, plan.image_valid, plan.top_k)
    )
    return [
        LayerStats(mass, rows, l1, top_values[i], top_indices[i], entropy[i])
        for i, (mass, rows, l1) in enumerate(reduced)
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


def trace_batch(
    traced_model: Any, adapter: FamilyAdapter, inputs: ModelInputs, *, top_k: int = 5, return_logits: bool = False
) -> tuple[list[LayerStats], torch.Tensor | None]:
    """Run one forward pass of an nnsight-wrapped model and reduce every layer's attention as it is produced.

    Only one layer's attention matrix is alive at a time; what leaves the pass is O(layers x heads x
    image tokens) per sample. The model must use eager attention so its attention modules return weights.
    """
    import nnsight

    seq_len = inputs.input_ids.shape[1]
    plan = build_plan(inputs.layouts, seq_len, top_k, inputs.input_ids.device)
    reduced: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    logits: list[torch.Tensor] = []
    layers = adapter.decoder_layers(traced_model)
    with torch.inference_mode(), traced_model.trace(**inputs.tensors):
        for layer in layers:
            values = adapter.value_projection(layer).output
            attention = adapter.attention_weights(adapter.attention(layer).output)
            reduced.append(nnsight.save(reduce_layer(attention, values, plan)))
        if return_logits:
            logits.append(nnsight.save(traced_model.output.logits))
    if any(layer is None for layer in reduced):
        raise RuntimeError("attention weights were not returned; load the model with attn_implementation='eager'")
    return layer_stats(reduced, plan), (logits[0] if logits else None)


@contextmanager
def traced(model: torch.nn.Module) -> Iterator[Any]:
    """Wrap an HF model with nnsight for the duration of the block, then restore every module as it was.

    nnsight installs a controller in each module's instance ``forward`` and leaves it there; we put
    back whatever was in those slots so the caller's model is untouched after tracing.
    """
    if getattr(model.config, "_attn_implementation", None) != "eager":
        raise ModelError("tracing needs attention weights; load the model with attn_implementation='eager'")
    from nnsight import NNsight

    saved = {
        module: {key: module.__dict__[key] for key in _NNSIGHT_SLOTS if key in module.__dict__}
        for module in model.modules()
    }
    try:
        yield NNsight(model)
    finally:
        for module, slots in saved.items():
            for key in _NNSIGHT_SLOTS:
                module.__dict__.pop(key, None)
            module.__dict__.update(slots)
