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
    prefill_layer_bytes,
    roofline_seconds,
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


def test_prefill_bytes_by_hand() -> None:
    """A layer's fewest bytes: weights once, every matmul's input and output once, attention in and out, the KV."""
    shape = DecoderShape(num_layers=1, hidden=4, intermediate=8, num_heads=2, num_kv_heads=1, head_dim=2)
    weights = 4 * (2 * 4 + 2 * 2) + 3 * 4 * 8
    assert prefill_layer_bytes(shape, 0, bytes_per_value=1) == weights
    per_token = (3 * 4 + 4 + 2 * 2) + (4 + 4) + (4 + 2 * 2) + 4 + (2 * 4 + 2 * 8) + (8 + 4) + 2 * 2
    assert prefill_layer_bytes(shape, 3, bytes_per_value=2) == 2 * (weights + 3 * per_token)


def test_roofline_takes_the_slower_limit_per_layer() -> None:
    """With ample bandwidth a prefill's roofline is its FLOPs over the peak; with ample compute its bytes over the
    bandwidth, the weights read once for the whole batch; the limits are chosen layer by layer."""
    full, pruned = [LayerTokens(651, 576)] * 32, [LayerTokens(651, 576)] * 8 + [LayerTokens(133, 58)] * 24
    flops = prefill_flops(LLAVA_7B, full)["exact"]
    assert roofline_seconds(LLAVA_7B, full, 1e15, 1e30) == pytest.approx(flops / 1e15)
    one = sum(prefill_layer_bytes(LLAVA_7B, 651) for _ in range(32))
    assert roofline_seconds(LLAVA_7B, full, 1e30, 1e12) == pytest.approx(one / 1e12)
    weights = 32 * prefill_layer_bytes(LLAVA_7B, 0)
    assert roofline_seconds(LLAVA_7B, full, 1e30, 1e12, batch=8) == pytest.approx(
        (weights + 8 * (one - weights)) / 1e12
    )
    # An H200-like device (about 800 TFLOP/s fp16, 4 TB/s): 651-token layers are compute-bound, 133-token ones are
    # bound by reading the weights, so the roofline ideal of this cut is below its FLOPs ideal.
    h200 = (8e14, 4e12)
    flops_ideal = flops / prefill_flops(LLAVA_7B, pruned)["exact"]
    roof_ideal = roofline_seconds(LLAVA_7B, full, *h200) / roofline_seconds(LLAVA_7B, pruned, *h200)
    assert 1 < roof_ideal < flops_ideal
    with pytest.raises(ValueError, match="positive"):
        roofline_seconds(LLAVA_7B, full, 0, 1e12)
