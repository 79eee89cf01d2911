"""Adapter for the ``llava`` family (LLaVA-1.5 and models saved as LlavaForConditionalGeneration)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from analysis.data.samples import IMAGE_PLACEHOLDER, Sample
from analysis.errors import ModelError
from analysis.models.adapters import FamilyAdapter, RenderedPrompt, VisionAttention, seeded_tiny_model
from analysis.models.hf import HFModel

# LLaVA-1.5 was trained and evaluated with the Vicuna v1 conversation format, not the hub
# processor's chat template (which drops the system prompt); the paper's stage analysis relies on
# this system prompt being present.
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def _linear32(module: Any, inputs: torch.Tensor) -> torch.Tensor:
    """``module``'s affine map in float32, whatever the model's dtype (the weights themselves stay as they are)."""
    bias = None if module.bias is None else module.bias.float()
    return torch.nn.functional.linear(inputs, module.weight.float(), bias)


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

    def vision_attention(self) -> AbstractContextManager[list[VisionAttention]]:
        """Inside the block every CLIP pass appends the CLS attention, mean keys and output of the layer whose output
        the projector reads (``vision_feature_layer``), recomputed in float32 from the layer's normed input."""
        return self._clip_attention()

    @contextmanager
    def _clip_attention(self) -> Iterator[list[VisionAttention]]:
        config = self.model.config
        if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
            raise ModelError(
                "VisionZip-style selection needs one vision_feature_layer and the 'default' strategy (CLS dropped), "
                f"as LLaVA-1.5 has; this model has {config.vision_feature_layer!r} / "
                f"{config.vision_feature_select_strategy!r}"
            )
        tower = self.model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # a CLIPVisionModel wrapper or the transformer itself
        if getattr(tower.embeddings, "class_embedding", None) is None:
            raise ModelError(
                f"this LLaVA's {type(tower).__name__} tower has no CLS token whose attention ranks the patches, "
                "which VisionZip-style selection needs (a CLIP tower has one)"
            )
        layers = tower.encoder.layers
        # hidden_states[k] is the output of layer k - 1 (k = 0: the embeddings, which no attention made).
        index = config.vision_feature_layer % (len(layers) + 1) - 1
        if index < 0:
            raise ModelError("vision_feature_layer 0 reads the tower's embeddings, which no attention layer made")
        layer = layers[index]
        attention = layer.self_attn
        projector = self.model.model.multi_modal_projector
        records: list[VisionAttention] = []
        pending: dict[str, torch.Tensor] = {}

        def before_attention(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            normed = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).float()
            images, length, _ = normed.shape
            heads, head_dim = attention.num_heads, attention.head_dim
            query = _linear32(attention.q_proj, normed[:, :1]).view(images, 1, heads, head_dim).transpose(1, 2)
            keys = _linear32(attention.k_proj, normed).view(images, length, heads, head_dim).transpose(1, 2)
            weights = torch.softmax((query @ keys.transpose(-1, -2)) * attention.scale, dim=-1)  # (I, H, 1, P + 1)
            pending["cls"] = weights[:, :, 0, 1:].sum(dim=1)
            pending["keys"] = keys.mean(dim=1)

        def after_layer(module: Any, args: tuple[Any, ...], output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            records.append(VisionAttention(pending.pop("cls"), pending.pop("keys"), hidden.float(), project))

        def project(features: torch.Tensor) -> torch.Tensor:
            parameter = next(projector.parameters())
            return projector(features.to(parameter.dtype))

        handles = [
            attention.register_forward_pre_hook(before_attention, with_kwargs=True),
            layer.register_forward_hook(after_layer),
        ]
        try:
            yield records
        finally:
            for handle in handles:
                handle.remove()

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
