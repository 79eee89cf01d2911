"""FLOPs accounting against hand counts and the paper's convention."""

from __future__ import annotations

import pytest

from analysis.pruner.flops import (
    DecoderShape,
    LayerTokens,
    decode_flops,
    exact_layer_flops,
    fastv_layer_flops,
    kv_cache_bytes,
    prefill_flops,
)

LLAVA_7B = DecoderShape(num_layers=32, hidden=4096, intermediate=11008, num_heads=32, num_kv_heads=32, head_dim=128)


def test_exact_layer_by_hand() -> None:
    """A 3-token layer of a toy shape, counted by hand."""
    shape = DecoderShape(num_layers=1, hidden=4, intermediate=8, num_heads=2, num_kv_heads=1, head_dim=2)
    counts = exact_layer_flops(shape, LayerTokens(total=3, image=2))
    assert counts["projections"] == 2 * 3 * 4 * (2 * 4 + 2 * 2)
    assert counts["attention"] == 4 * 4 * 6  # 6 causal pairs, 4 FLOPs per pair per width unit
    assert counts["vision_attention"] == 4 * 4 * (3 + 2)  # image-image pairs and the text token's two image keys
    assert counts["mlp"] == 2 * 3 * 4 * 8 * 3
    blind = exact_layer_flops(shape, LayerTokens(total=3, image=2), text_sees_image=False)
    assert blind["attention"] == 4 * 4 * 4


def test_fastv_convention_matches_paper_scale() -> None:
    """Keeping ~15 image tokens from layer 10 of a 651-token LLaVA-1.5-7B prompt cuts FastV FLOPs by ~60%."""
    full = [LayerTokens(651, 576)] * 32
    pruned = [LayerTokens(651, 576)] * 10 + [LayerTokens(651 - 576 + 15, 15)] * 22
    cut = 1 - prefill_flops(LLAVA_7B, pruned)["fastv"] / prefill_flops(LLAVA_7B, full)["fastv"]
    assert 0.55 < cut < 0.70  # the paper reports 62.8% for selection near layer 9
    assert fastv_layer_flops(LLAVA_7B, 1) == 4 * 4096**2 + 2 * 4096 + 2 * 4096 * 11008


def test_decode_and_cache() -> None:
    """Decode cost grows with cache length; cache bytes count keys and values of every layer."""
    assert decode_flops(LLAVA_7B, [700] * 32) > decode_flops(LLAVA_7B, [100] * 32)
    assert kv_cache_bytes(LLAVA_7B, [10] * 32) == 2 * 10 * 4096 * 2 * 32
    with pytest.raises(ValueError, match="32 layers"):
        prefill_flops(LLAVA_7B, [LayerTokens(5, 0)])
