"""Adapter for the ``qwen3_vl`` family (Qwen3-VL, dense): Qwen2.5-VL's layout (dynamic image-token count, 2x2
patch merging, M-RoPE, here interleaved) with 16 px patches and DeepStack.

DeepStack: the vision tower's features from a few intermediate layers are added to the hidden states of the image
positions after the first decoder layers (one layer per DeepStack level). Image information then enters the
language model without attention, but only at the image positions: the text still reads it through attention,
so knockouts of text->image attention remove it as in the other families. What a knockout cannot remove is the
DeepStack addition to the image tokens themselves, and the pruned runtime adds it to the tokens each row keeps.
"""

from __future__ import annotations

from typing import Any, ClassVar

from analysis.models.qwen2_5_vl import Qwen25VLAdapter


class Qwen3VLAdapter(Qwen25VLAdapter):
    """Qwen3-VL: SigLIP-2-style ViT (16 px patches) with 2x2 merging and DeepStack; interleaved M-RoPE."""

    model_type = "qwen3_vl"
    description = "Qwen3-VL: dynamic image-token count, interleaved multimodal RoPE, DeepStack visual features"
    checkpoints = {
        f"qwen3-vl-{size}": (f"Qwen/Qwen3-VL-{size.upper()}-Instruct", f"Qwen3-VL {size.upper()} Instruct")
        for size in ("2b", "4b", "8b", "32b")
    }
    tiny_alias = "tiny-qwen3-vl"
    deepstack = True
    processor_class = "Qwen3VLProcessor"
    model_classes = ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration")
    tiny_vision_config: ClassVar[dict[str, Any]] = {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1],
    }
    tiny_text_overrides: ClassVar[dict[str, Any]] = {
        "head_dim": 16,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    }
    tiny_patch_size = 16
