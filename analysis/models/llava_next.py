"""Adapter for the ``llava_next`` family (LLaVA-NeXT / LLaVA-1.6): any-resolution tiles plus the base image.

Each image becomes, in this order, the base image (the whole image at the tower's size, ``side`` x ``side``
tokens) and the crops of its best-fitting grid stitched into one feature map, unpadded back to the image's
aspect ratio, each of its rows followed by the learned ``image_newline`` token. Every one of these positions holds
the image token id, so an image is one contiguous run; how many tokens it has depends on its size.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch

from analysis.data.samples import Sample
from analysis.errors import ModelError
from analysis.layout import ImagePiece, Span
from analysis.models.adapters import RenderedPrompt, VisionAttention, seeded_tiny_model
from analysis.models.hf import HFModel
from analysis.models.llava import LlavaAdapter

# Written for the tiny test processor only (Vicuna-style turns); real checkpoints ship their own template.
_TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- ' ' if not loop.first else '' }}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{%- endfor %}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %} ASSISTANT:{% endif %}"
)
# The tiny tower: 28 px crops in 7 px patches (a 4 x 4 base image), and grids of up to 2 x 2 crops.
_TINY_SIDE = 28
_TINY_PINPOINTS = [[28, 56], [56, 28], [56, 56], [56, 84], [84, 56]]


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: CLIP tower on the base image and on any-resolution crops, newline token per row, 1-D RoPE."""

    model_type = "llava_next"
    description = "LLaVA-NeXT (1.6): base image plus any-resolution tiles with a newline token per row"
    checkpoints = {
        "llava-v1.6-mistral-7b": ("llava-hf/llava-v1.6-mistral-7b-hf", "LLaVA-NeXT Mistral 7B (CLIP ViT-L/14-336)"),
        "llava-v1.6-vicuna-7b": ("llava-hf/llava-v1.6-vicuna-7b-hf", "LLaVA-NeXT Vicuna 7B (CLIP ViT-L/14-336)"),
        "llava-v1.6-vicuna-13b": ("llava-hf/llava-v1.6-vicuna-13b-hf", "LLaVA-NeXT Vicuna 13B (CLIP ViT-L/14-336)"),
        "llava-v1.6-34b": ("llava-hf/llava-v1.6-34b-hf", "LLaVA-NeXT 34B (Nous-Hermes-2-Yi-34B, CLIP ViT-L/14-336)"),
    }
    tiny_alias = "tiny-llava-next"
    image_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes")
    # The family's transformers classes and tiny processor's pieces (LLaVA-OneVision overrides them).
    model_classes: ClassVar[tuple[str, str]] = ("LlavaNextConfig", "LlavaNextForConditionalGeneration")
    processor_class: ClassVar[str] = "LlavaNextProcessor"
    image_processor_path: ClassVar[str] = (
        "transformers.models.llava_next.image_processing_pil_llava_next:LlavaNextImageProcessorPil"
    )

    def vision_attention(self) -> AbstractContextManager[list[VisionAttention]]:
        """Not offered: any-resolution images (crops, unpadded grids, row-end tokens) do not map one tower pass per
        image onto its tokens the way VisionZip-style selection needs."""
        raise ModelError(
            "VisionZip-style selection on llava_next would need its any-resolution crops, unpadding and row-end "
            "tokens mapped to the tower's passes, which is not built; use a llava (LLaVA-1.5) model"
        )

    def render_prompt(self, processor: Any, sample: Sample) -> RenderedPrompt:
        """The checkpoint's chat template with images at their marker positions (or first)."""
        return self.render_with_template(processor, sample)

    @property
    def base_side(self) -> int:
        """Tokens per side of the base image (and of each crop): the tower's image size over its patch size."""
        vision = self.config.vision_config
        return int(vision.image_size) // int(vision.patch_size)

    # Where the family's grid and unpadding functions live (LLaVA-OneVision has its own copies).
    modeling_module: ClassVar[str] = "transformers.models.llava_next.modeling_llava_next"

    def tiles_grid(self, image_size: Sequence[int]) -> tuple[int, int]:
        """Rows and columns of the stitched crops' feature map of an image of ``(height, width)`` after
        unpadding, as the model's own grid and unpadding functions compute them."""
        import importlib

        modeling = importlib.import_module(self.modeling_module)
        vision = self.config.vision_config
        crops_high, crops_wide = modeling.get_anyres_image_grid_shape(
            list(image_size), self.config.image_grid_pinpoints, int(vision.image_size)
        )
        side = self.base_side
        # Only the shape matters, so the feature map lives on the meta device.
        stitched = torch.empty(1, crops_high * side, crops_wide * side, device="meta")
        unpadded = modeling.unpad_image(stitched, torch.as_tensor(list(image_size)))
        return int(unpadded.shape[1]), int(unpadded.shape[2])

    def tiled(self, images_per_sample: Sequence[int]) -> list[bool]:
        """Per image of the batch: whether it is split into tiles (every image, in LLaVA-NeXT)."""
        return [True] * sum(images_per_sample)

    def _image_parts(
        self, tensors: dict[str, torch.Tensor], images_per_sample: Sequence[int]
    ) -> list[list[ImagePiece]]:
        """Each image's pieces (spans from its first token): the base image, then its tiles or a lone newline."""
        sizes = tensors["image_sizes"].tolist()
        if len(sizes) != sum(images_per_sample):
            raise ModelError(f"processor returned {len(sizes)} image sizes for {sum(images_per_sample)} images")
        side = self.base_side
        parts = []
        for size, tiled in zip(sizes, self.tiled(images_per_sample), strict=True):
            base = ImagePiece("base", Span(0, side * side), side, side)
            rows, cols = self.tiles_grid(size) if tiled else (1, 0)
            after = ImagePiece(
                "tiles" if tiled else "newline", Span(side * side, side * side + rows * (cols + 1)), rows, cols, True
            )
            parts.append([base, after])
        return parts

    def image_token_counts(
        self, processor: Any, tensors: dict[str, torch.Tensor], n_images: list[int]
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Per image: base + tiles tokens (newlines included), checked against the image tokens in the prompt; the
        grid is the base image's."""
        parts = self._image_parts(tensors, n_images)
        totals = (tensors["input_ids"] == self.image_token_id).sum(dim=1).tolist()
        counts: list[list[int]] = []
        cursor = 0
        for row, (total, n) in enumerate(zip(totals, n_images, strict=True)):
            sample_counts = [image[-1].span.end for image in parts[cursor : cursor + n]]
            cursor += n
            if sum(sample_counts) != total:
                raise ModelError(
                    f"batch row {row} has {total} image tokens but its images' base and tiles need "
                    f"{sum(sample_counts)}; the processor's patch size or grid pinpoints differ from the model's"
                )
            counts.append(sample_counts)
        side = self.base_side
        return counts, [[(side, side)] * n for n in n_images]

    def image_pieces(
        self, processor: Any, tensors: dict[str, torch.Tensor], counts: list[list[int]], samples: Sequence[Sample]
    ) -> list[list[list[ImagePiece]]] | None:
        """Base image and tiles (or newline) of every image, sample by sample."""
        images_per_sample = [len(sample_counts) for sample_counts in counts]
        parts = self._image_parts(tensors, images_per_sample)
        pieces: list[list[list[ImagePiece]]] = []
        cursor = 0
        for n in images_per_sample:
            pieces.append(parts[cursor : cursor + n])
            cursor += n
        return pieces

    @classmethod
    def tiny_model(cls, seed: int = 0, num_layers: int = 4) -> HFModel:
        """A tiny random model (CLIP 28 px crops in 7 px patches, up to 2 x 2 crops; Llama with GQA)."""
        import transformers
        from transformers import CLIPVisionConfig, LlamaConfig

        config_class, model_class = (getattr(transformers, name) for name in cls.model_classes)
        tokenizer = cls.tiny_processor().tokenizer
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=_TINY_SIDE,
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
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config = config_class(
            vision_config=vision,
            text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=_TINY_PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
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
            tiny_words(), ["<image>"], chat_template=_TINY_CHAT_TEMPLATE, extra_attributes={"image_token": "<image>"}
        )
        module, name = cls.image_processor_path.split(":")
        image_processor = getattr(importlib.import_module(module), name)(
            size={"shortest_edge": _TINY_SIDE},
            crop_size={"height": _TINY_SIDE, "width": _TINY_SIDE},
            image_grid_pinpoints=_TINY_PINPOINTS,
        )
        return getattr(transformers, cls.processor_class)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=7,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=_TINY_CHAT_TEMPLATE,
        )
