"""Adapter for the ``qwen2_vl`` family (Qwen2-VL): Qwen2.5-VL's layout (dynamic image-token count, 2x2 patch
merging, M-RoPE) with the earlier vision tower; only the checkpoints, the classes and the tiny tower differ."""

from __future__ import annotations

from analysis.models.qwen2_5_vl import Qwen25VLAdapter


class Qwen2VLAdapter(Qwen25VLAdapter):
    """Qwen2-VL: native-resolution ViT (full attention) with 2x2 patch merging; multimodal RoPE."""

    model_type = "qwen2_vl"
    description = "Qwen2-VL: dynamic image-token count from image size, multimodal RoPE"
    checkpoints = {
        f"qwen2-vl-{size}": (f"Qwen/Qwen2-VL-{size.upper()}-Instruct", f"Qwen2-VL {size.upper()} Instruct")
        for size in ("2b", "7b", "72b")
    }
    tiny_alias = "tiny-qwen2-vl"
    processor_class = "Qwen2VLProcessor"
    model_classes = ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration")
    tiny_vision_config = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "mlp_ratio": 2,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
