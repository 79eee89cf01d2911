"""Adapter for the ``llava`` family (LLaVA-1.5 and models saved as LlavaForConditionalGeneration)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from analysis.data.samples import IMAGE_PLACEHOLDER, Sample
from analysis.errors import ModelError
from analysis.models.adapters import FamilyAdapter, RenderedPrompt, seeded_tiny_model
from analysis.models.hf import HFModel

# LLaVA-1.5 was trained and evaluated with the Vicuna v1 conversation format, not the hub
# processor's chat template (which drops the system prompt); the paper's stage analysis relies on
# this system prompt being present.
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class LlavaAdapter(FamilyAdapter):
    """LLaVA: CLIP tower -> MLP projector -> Llama decoder; a fixed number of tokens per image, 1-D RoPE."""

    model_type = "llava"
    description = "LLaVA-1.5 style: fixed image-token count per image, Llama RoPE"
    checkpoints = {
        "llava-1.5-7b": ("llava-hf/llava-1.5-7b-hf", "LLaVA-1.5 7B (Vicuna-7B, CLIP ViT-L/14-336)"),
        "llava-1.5-13b": ("llava-hf/llava-1.5-13b-hf", "LLaVA-1.5 13B (Vicuna-13B, CLIP ViT-L/14-336)"),
    }
    tiny_alias = "tiny-llava"

    def decoder_layers(self, root: Any | None = None) -> Sequence[Any]:
        """The Llama decoder layers of ``root`` (default: the wrapped model)."""
        return (root if root is not None else self.model).model.language_model.layers

    def render_prompt(self, processor: Any, sample: Sample) -> RenderedPrompt:
        """Vicuna v1 prompt: system, ``USER:`` content (images where marked, else first), ``ASSISTANT:``."""
        image_token = processor.image_token
        if IMAGE_PLACEHOLDER in sample.prompt:
            content = sample.prompt.replace(IMAGE_PLACEHOLDER, image_token)
        else:
            content = image_token * len(sample.images) + "\n" + sample.prompt
        prefix = f"{VICUNA_V1_SYSTEM} USER: "
        return RenderedPrompt(text=f"{prefix}{content} ASSISTANT:", content_start=len(prefix))

    def image_token_counts(
        self, processor: Any, tensors: dict[str, torch.Tensor], n_images: list[int]
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Every image becomes the same number of tokens: (image_size / patch_size)^2 minus CLS."""
        vision = self.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        totals = (tensors["input_ids"] == self.image_token_id).sum(dim=1).tolist()
        counts: list[list[int]] = []
        grids: list[list[tuple[int, int]]] = []
        for total, n in zip(totals, n_images, strict=True):
            if n == 0 or total % n:
                raise ModelError(
                    f"found {total} image tokens for {n} images; the processor's patch_size or "
                    "vision_feature_select_strategy does not match the model config"
                )
            per_image = total // n
            grid = (side, side) if per_image == side * side else (1, per_image)
            counts.append([per_image] * n)
            grids.append([grid] * n)
        return counts, grids

    @classmethod
    def tiny_model(cls, seed: int = 0, num_layers: int = 4) -> HFModel:
        """A tiny random LLaVA (CLIP 28px/7px patches -> 16 image tokens; Llama with GQA)."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        tokenizer = cls.tiny_processor().tokenizer
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=7,
            projection_dim=32,
        )
        text = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
        return seeded_tiny_model(LlavaForConditionalGeneration, config, seed, tokenizer)

    @classmethod
    def tiny_processor(cls) -> Any:
        """LlavaProcessor over a word-level tokenizer and a 28px CLIP image processor."""
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        from analysis.models.tiny_vocab import tiny_words
        from analysis.models.tokenizer import build_word_tokenizer

        tokenizer = build_word_tokenizer(tiny_words(), ["<image>"], extra_attributes={"image_token": "<image>"})
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_center_crop=True
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=7,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
