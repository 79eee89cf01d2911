"""Adapter for the ``qwen2_vl`` family (Qwen2-VL): Qwen2.5-VL's layout (dynamic image-token count, 2x2 patch
merging, M-RoPE) with the earlier vision tower; only the checkpoints and the tiny model differ."""

from __future__ import annotations

import torch

from analysis.models.hf import HFModel
from analysis.models.qwen2_5_vl import Qwen25VLAdapter, tiny_special_ids


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

    @classmethod
    def tiny_model(cls, seed: int = 0, num_layers: int = 4) -> HFModel:
        """A tiny random Qwen2-VL with M-RoPE and GQA; 4-16 image tokens depending on image size."""
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        tokenizer = cls.tiny_processor().tokenizer
        ids = tiny_special_ids(tokenizer)
        config = Qwen2VLConfig(
            vision_config={
                "depth": 2,
                "embed_dim": 32,
                "hidden_size": 64,
                "mlp_ratio": 2,
                "num_heads": 2,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            text_config={
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": num_layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": len(tokenizer),
                "max_position_embeddings": 1024,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
            },
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model
