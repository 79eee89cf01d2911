"""Adapter for the ``qwen2_5_vl`` family (Qwen2.5-VL: dynamic image-token count, M-RoPE)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from analysis.data.samples import Sample
from analysis.errors import ModelError
from analysis.models import hf
from analysis.models.adapters import FamilyAdapter, ModelInputs, RenderedPrompt, seeded_tiny_model
from analysis.models.hf import HFModel

# Written for the tiny test processor only; real checkpoints ship their own template.
_TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{%- endfor %}{% endif %}<|im_end|>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


class Qwen25VLAdapter(FamilyAdapter):
    """Qwen2.5-VL: native-resolution ViT with 2x2 patch merging; image-token count depends on image size."""

    model_type = "qwen2_5_vl"
    description = "Qwen2.5-VL: dynamic image-token count from image size, multimodal RoPE"
    image_input_keys = ("pixel_values", "image_grid_thw")
    static_vision_tower = False  # its tower plans attention windows and positions from image_grid_thw on the host
    checkpoints = {
        f"qwen2.5-vl-{size}": (f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct", f"Qwen2.5-VL {size.upper()} Instruct")
        for size in ("3b", "7b", "32b", "72b")
    }
    tiny_alias = "tiny-qwen2.5-vl"
    # The family's transformers classes (its tiny processor is one over a word-level tokenizer) and its tiny
    # model's vision tower; the tiny text decoder is shared by the Qwen VL families.
    processor_class: ClassVar[str] = "Qwen2_5_VLProcessor"
    model_classes: ClassVar[tuple[str, str]] = ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")
    tiny_vision_config: ClassVar[dict[str, Any]] = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    # What the family's tiny text decoder and image processor add to the shared ones (Qwen3-VL: head_dim, 16 px).
    tiny_text_overrides: ClassVar[dict[str, Any]] = {}
    tiny_patch_size: ClassVar[int] = 14

    def decoder_layers(self, root: Any | None = None) -> Sequence[Any]:
        """The Qwen2 decoder layers of ``root`` (default: the wrapped model)."""
        return (root if root is not None else self.model).model.language_model.layers

    def explicit_positions(self, inputs: ModelInputs) -> torch.Tensor | None:
        """M-RoPE position ids (3, B, T), which the model otherwise derives from the 2-D padding mask."""
        tensors = inputs.tensors
        positions, _ = self.model.model.get_rope_index(
            inputs.input_ids,
            tensors["mm_token_type_ids"],
            tensors["image_grid_thw"],
            attention_mask=inputs.attention_mask,
        )
        return positions

    def render_prompt(self, processor: Any, sample: Sample) -> RenderedPrompt:
        """The processor's chat template with images at their marker positions (or first)."""
        return self.render_with_template(processor, sample)

    def image_token_counts(
        self, processor: Any, tensors: dict[str, torch.Tensor], n_images: list[int]
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Each image's (t, h, w) patch grid shrinks by the spatial merge factor in h and w."""
        merge = int(self.config.vision_config.spatial_merge_size)
        grid_thw = tensors["image_grid_thw"].tolist()
        if len(grid_thw) != sum(n_images):
            raise ModelError(f"processor returned {len(grid_thw)} image grids for {sum(n_images)} images")
        counts: list[list[int]] = []
        grids: list[list[tuple[int, int]]] = []
        cursor = 0
        for n in n_images:
            sample_grids = grid_thw[cursor : cursor + n]
            cursor += n
            counts.append([t * h * w // (merge * merge) for t, h, w in sample_grids])
            grids.append([(t * h // merge, w // merge) for t, h, w in sample_grids])
        return counts, grids

    @classmethod
    def tiny_model(cls, seed: int = 0, num_layers: int = 4) -> HFModel:
        """A tiny random model of the family with M-RoPE and GQA; 4-16 image tokens depending on image size."""
        import transformers

        config_class, model_class = (getattr(transformers, name) for name in cls.model_classes)
        tokenizer = cls.tiny_processor().tokenizer
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _TINY_SPECIALS}
        config = config_class(
            vision_config=dict(cls.tiny_vision_config),
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
                **cls.tiny_text_overrides,
            },
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        return seeded_tiny_model(model_class, config, seed, tokenizer)

    @classmethod
    def tiny_processor(cls) -> Any:
        """The family's processor over a word-level tokenizer; images resized to 4-8 patches per side."""
        import transformers
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from analysis.models.tiny_vocab import tiny_words
        from analysis.models.tokenizer import build_word_tokenizer

        tokenizer = build_word_tokenizer(
            tiny_words(),
            _TINY_SPECIALS,
            add_bos=False,
            chat_template=_TINY_CHAT_TEMPLATE,
            extra_attributes={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        )
        # 4-16 merged patches per image (4 x 4 to 8 x 8 patches of tiny_patch_size before the 2 x 2 merge).
        side = 4 * cls.tiny_patch_size
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=side * side,
            max_pixels=4 * side * side,
            patch_size=cls.tiny_patch_size,
            merge_size=2,
            temporal_patch_size=2,
        )

        return hf.without_video_processor(getattr(transformers, cls.processor_class))(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=_TINY_CHAT_TEMPLATE,
        )
