"""FLOPs and KV-cache accounting for a decoder whose token count changes from layer to layer.

Two conventions: ``exact`` counts the multiply-adds actually needed (2 FLOPs each) for the real
shapes: q/k/v/o projections with grouped KV heads, causal attention pairs only, a gated (SwiGLU) MLP;
``fastv`` is FastV's per-layer 4nd^2 + 2n^2d + 2ndm, used by the VisiPruner paper, for comparability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DecoderShape:
    """The dimensions that set a decoder's cost."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, text_config: Any) -> DecoderShape:
        """Read the dimensions from an HF text config."""
        heads = int(text_config.num_attention_heads)
        hidden = int(text_config.hidden_size)
        return cls(
            num_layers=int(text_config.num_hidden_layers),
            hidden=hidden,
            intermediate=int(text_config.intermediate_size),
            num_heads=heads,
            num_kv_heads=int(getattr(text_config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(text_config, "head_dim", None) or hidden // heads),
        )


@dataclass(frozen=True)
class LayerTokens:
    """Tokens a layer processes in prefill: how many, and how many of them are image tokens."""

    total: int
    image: int


def exact_layer_flops(shape: DecoderShape, tokens: LayerTokens, *, text_sees_image: bool = True) -> dict[str, float]:
    """Exact prefill FLOPs of one layer, split into projections, attention (vision-related part) and MLP."""
    n, d = tokens.total, shape.hidden
    attn_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    projections = 2 * n * d * (2 * attn_width + 2 * kv_width)
    # Causal pairs (query i sees keys 0..i). Image tokens are assumed to sit before the text that reads them.
    pairs = n * (n + 1) / 2
    text = n - tokens.image
    image_pairs = tokens.image * (tokens.image + 1) / 2 + (text * tokens.image if text_sees_image else 0)
    if not text_sees_image:
        pairs -= text * tokens.image
    per_pair = 4 * attn_width  # q.k and a.v, 2 FLOPs per multiply-add each
    mlp = 2 * n * d * shape.intermediate * 3
    return {
        "projections": projections,
        "attention": per_pair * pairs,
        "vision_attention": per_pair * image_pairs,
        "mlp": mlp,
        "total": projections + per_pair * pairs + mlp,
    }


def fastv_layer_flops(shape: DecoderShape, n: int) -> float:
    """FastV's per-layer cost 4nd^2 + 2n^2d + 2ndm."""
    d, m = shape.hidden, shape.intermediate
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def prefill_flops(shape: DecoderShape, layers: Sequence[LayerTokens], text_blind_layers: int = 0) -> dict[str, float]:
    """Exact and FastV-convention prefill FLOPs over all layers; the first ``text_blind_layers`` skip text->image."""
    if len(layers) != shape.num_layers:
        raise ValueError(f"need token counts for {shape.num_layers} layers, got {len(layers)}")
    totals = {"exact": 0.0, "fastv": 0.0, "vision_attention": 0.0}
    for index, tokens in enumerate(layers):
        exact = exact_layer_flops(shape, tokens, text_sees_image=index >= text_blind_layers)
        totals["exact"] += exact["total"]
        totals["vision_attention"] += exact["vision_attention"]
        totals["fastv"] += fastv_layer_flops(shape, tokens.total)
    return totals


def decode_flops(shape: DecoderShape, kv_lengths: Sequence[int]) -> float:
    """Exact FLOPs of generating one token given each layer's KV-cache length."""
    d = shape.hidden
    attn_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    per_layer = [
        2 * d * (2 * attn_width + 2 * kv_width) + 4 * attn_width * (k + 1) + 6 * d * shape.intermediate
        for k in kv_lengths
    ]
    return float(sum(per_layer))


def kv_cache_bytes(shape: DecoderShape, kv_lengths: Sequence[int], bytes_per_value: int = 2) -> int:
    """Bytes held by a KV cache whose layers store the given numbers of positions."""
    return int(sum(2 * length * shape.num_kv_heads * shape.head_dim * bytes_per_value for length in kv_lengths))


def prefill_layer_bytes(shape: DecoderShape, tokens: int, bytes_per_value: int = 2) -> float:
    """The fewest bytes one prefill layer of ``tokens`` tokens moves: its weights once, each matmul's input and
    output once, attention read and written once (a fused kernel: no score matrix in memory) and its KV written."""
    n, d, m = tokens, shape.hidden, shape.intermediate
    attn_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    weights = d * (2 * attn_width + 2 * kv_width) + 3 * d * m
    projections = n * (3 * d + attn_width + 2 * kv_width) + n * (attn_width + d)  # q/k/v read x, write; o in, out
    attention = n * (attn_width + 2 * kv_width) + n * attn_width  # read q, k, v; write the output
    mlp = n * (2 * d + 2 * m) + n * (m + d)  # gate and up read x and write m each; down reads m, writes d
    kv_cache = n * 2 * kv_width
    return float(bytes_per_value * (weights + projections + attention + mlp + kv_cache))


def roofline_seconds(
    shape: DecoderShape,
    layers: Sequence[LayerTokens],
    peak_flops: float,
    bandwidth: float,
    *,
    batch: int = 1,
    bytes_per_value: int = 2,
    text_blind_layers: int = 0,
) -> float:
    """The roofline time of a prefill: per layer, the larger of its exact FLOPs over ``peak_flops`` (FLOP/s) and its
    bytes over ``bandwidth`` (B/s), for ``batch`` sequences that share the weights."""
    if len(layers) != shape.num_layers:
        raise ValueError(f"need token counts for {shape.num_layers} layers, got {len(layers)}")
    if peak_flops <= 0 or bandwidth <= 0 or batch < 1:
        raise ValueError("peak_flops and bandwidth must be positive and batch >= 1")
    weight_bytes = prefill_layer_bytes(shape, 0, bytes_per_value)
    total = 0.0
    for index, tokens in enumerate(layers):
        flops = batch * exact_layer_flops(shape, tokens, text_sees_image=index >= text_blind_layers)["total"]
        moved = weight_bytes + batch * (prefill_layer_bytes(shape, tokens.total, bytes_per_value) - weight_bytes)
        total += max(flops / peak_flops, moved / bandwidth)
    return total
