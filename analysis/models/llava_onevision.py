"""Adapter for the ``llava_onevision`` family (LLaVA-OneVision): LLaVA-NeXT's base image plus tiles, with a
SigLIP tower (no CLS token), a Qwen2 decoder and two rules of its own.

- An image in a sample with several images is not tiled: it is its base image and one newline token.
- Tiles whose feature map exceeds ``anyres_max_N`` (N base images' worth of tokens, by more than 10%) are
  bilinearly downscaled, so the token count grows with the image size only up to that cap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

from analysis.data.samples import Sample
from analysis.models import hf
from analysis.models.adapters import seeded_tiny_model
from analysis.models.hf import HFModel
from analysis.models.llava_next import LlavaNextAdapter

_TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{%- endfor %}{% endif %}<|im_end|>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_SPECIALS = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]
_TINY_SIDE = 28
_TINY_PINPOINTS = [[28, 56], [56, 28], [56, 56], [56, 84], [84, 56]]
# Two base images' worth of tile tokens: small enough that the tiny model's larger images are downscaled.
_TINY_ASPECT_RATIO = "anyres_max_2"


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: SigLIP on the base image and any-resolution crops (capped), newline tokens, Qwen2 decoder."""

    model_type = "llava_onevision"
    description = "LLaVA-OneVision: base image plus capped any-resolution tiles; untiled images in multi-image prompts"
    checkpoints = {
        f"llava-onevision-{size}": (
            f"llava-hf/llava-onevision-qwen2-{size}-ov-hf",
            f"LLaVA-OneVision Qwen2 {size.upper()} (SigLIP-so400m/14-384)",
        )
        for size in ("0.5b", "7b", "72b")
    }
    tiny_alias = "tiny-llava-onevision"
    image_input_keys = ("pixel_values", "image_sizes", "batch_num_images")
    model_classes = ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration")
    processor_class = "LlavaOnevisionProcessor"
    image_processor_path = (
        "transformers.models.llava_onevision.image_processing_pil_llava_onevision:LlavaOnevisionImageProcessorPil"
    )
    modeling_module: ClassVar[str] = "transformers.models.llava_onevision.modeling_llava_onevision"

    def processor_images(self, samples: Sequence[Sample]) -> list[Any]:
        """One list of images per sample: the processor tiles only the images of single-image samples."""
        return [list(sample.images) for sample in samples]

    def tiled(self, images_per_sample: Sequence[int]) -> list[bool]:
        """Only the image of a one-image sample is tiled."""
        return [n == 1 for n in images_per_sample for _ in range(n)]

    def tiles_grid(self, image_size: Sequence[int]) -> tuple[int, int]:
        """LLaVA-NeXT's unpadded grid, downscaled as the model does when it holds more than ``anyres_max_N`` base
        images' worth of tokens by a factor over 1.1."""
        rows, cols = super().tiles_grid(image_size)
        cap = int(str(self.config.vision_aspect_ratio).removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (cap * self.base_side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols

    @classmethod
    def tiny_model(cls, seed: int = 0, num_layers: int = 4) -> HFModel:
        """A tiny random model (SigLIP 28 px crops in 7 px patches, up to 2 x 3 crops capped at 2 base images'
        worth; Qwen2 with GQA)."""
        import transformers

        config_class, model_class = (getattr(transformers, name) for name in cls.model_classes)
        tokenizer = cls.tiny_processor().tokenizer
        config = config_class(
            vision_config={
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": _TINY_SIDE,
                "patch_size": 7,
            },
            text_config={
                "model_type": "qwen2",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": num_layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": len(tokenizer),
                "max_position_embeddings": 1024,
                "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
            },
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=_TINY_PINPOINTS,
            vision_aspect_ratio=_TINY_ASPECT_RATIO,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        return seeded_tiny_model(model_class, config, seed, tokenizer)

    @classmethod
    def tiny_processor(cls) -> Any:
        """The family's processor over a word-level tokenizer and a 28 px any-resolution image processor."""
        import importlib

        import transformers

        from analysis.models.tiny_vocab import tiny_words
        from analysis.models.tokenizer import build_word_tokenizer

        tokenizer = build_word_tokenizer(
            tiny_words(),
            _TINY_SPECIALS,
            add_bos=False,
            chat_template=_TINY_CHAT_TEMPLATE,
            extra_attributes={"image_token": "<image>", "video_token": "<video>"},
        )
        module, name = cls.image_processor_path.split(":")
        image_processor = getattr(importlib.import_module(module), name)(
            size={"height": _TINY_SIDE, "width": _TINY_SIDE}, image_grid_pinpoints=_TINY_PINPOINTS
        )
        return hf.without_video_processor(getattr(transformers, cls.processor_class))(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=(_TINY_SIDE // 7) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=_TINY_ASPECT_RATIO,
            chat_template=_TINY_CHAT_TEMPLATE,
        )
