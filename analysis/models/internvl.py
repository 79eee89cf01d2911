"""Adapter for the ``internvl`` family (InternVL 3 / 3.5 in transformers' format): dynamic tiles with markers.

An image is cut into the crops of its best-fitting grid (between ``min_patches`` and ``max_patches`` of them),
plus a thumbnail of the whole image when there is more than one crop. Each crop's ViT patches are
pixel-shuffled into ``image_seq_length`` context tokens, tile after tile, and the image's tokens are wrapped in
the ``<img>`` and ``</img>`` marker tokens. How many crops an image has is read from the prompt's tokens; which
grid they form is recomputed from the image size with the image processor's own function and checked against
that count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from analysis.data.samples import Sample
from analysis.errors import ModelError
from analysis.layout import ImagePiece, Span
from analysis.models import hf
from analysis.models.adapters import FamilyAdapter, RenderedPrompt, seeded_tiny_model
from analysis.models.hf import HFModel

_TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}<IMG_CONTEXT>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{%- endfor %}{% endif %}<|im_end|>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
_TINY_SIDE = 28
_TINY_MAX_PATCHES = 6


class InternVLAdapter(FamilyAdapter):
    """InternVL: InternViT on dynamic crops plus a thumbnail, pixel shuffle to context tokens, Qwen2 decoder."""

    model_type = "internvl"
    description = "InternVL 3: crops of a best-fitting grid plus a thumbnail, wrapped in <img> </img> markers"
    checkpoints = {
        f"internvl3-{size}": (f"OpenGVLab/InternVL3-{size.upper()}-hf", f"InternVL3 {size.upper()}")
        for size in ("1b", "2b", "8b", "14b", "38b", "78b")
    }
    tiny_alias = "tiny-internvl"

    def decoder_layers(self, root: Any | None = None) -> Sequence[Any]:
        """The decoder layers of ``root`` (default: the wrapped model)."""
        return (root if root is not None else self.model).model.language_model.layers

    def render_prompt(self, processor: Any, sample: Sample) -> RenderedPrompt:
        """The checkpoint's chat template with images at their marker positions (or first)."""
        return self.render_with_template(processor, sample)

    def image_marker_ids(self, processor: Any) -> tuple[int, ...]:
        """The ``<img>`` and ``</img>`` tokens around each image."""
        return (int(processor.start_image_token_id), int(processor.end_image_token_id))

    @property
    def tile_tokens(self) -> int:
        """Context tokens per crop: the crop's ViT patches after pixel shuffle."""
        return int(self.config.image_seq_length)

    def image_token_counts(
        self, processor: Any, tensors: dict[str, torch.Tensor], n_images: list[int]
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Each image is one run of context tokens between its markers, a whole number of crops long."""
        side = math.isqrt(self.tile_tokens)
        ids = tensors["input_ids"]
        is_image = (ids == self.image_token_id).int()
        counts: list[list[int]] = []
        for row, n in enumerate(n_images):
            # Markers separate the images, so each run of image tokens is one image.
            runs = _run_lengths(is_image[row].tolist())
            if len(runs) != n:
                raise ModelError(f"batch row {row} has {len(runs)} runs of image tokens for {n} images")
            if any(length % self.tile_tokens for length in runs):
                raise ModelError(
                    f"batch row {row}: image runs of {runs} tokens are not whole crops of {self.tile_tokens}; "
                    "the processor's image_seq_length differs from the model's"
                )
            counts.append(runs)
        return counts, [[(side, side)] * n for n in n_images]

    def image_pieces(
        self, processor: Any, tensors: dict[str, torch.Tensor], counts: list[list[int]], samples: Sequence[Sample]
    ) -> list[list[list[ImagePiece]]] | None:
        """Every image's crops (kind ``tile_<row>_<col>`` of the crop grid, row-major) and its thumbnail."""
        side = math.isqrt(self.tile_tokens)
        pieces: list[list[list[ImagePiece]]] = []
        for sample, sample_counts in zip(samples, counts, strict=True):
            sample_pieces = []
            for image, count in zip(sample.images, sample_counts, strict=True):
                n_tiles = count // self.tile_tokens
                rows, cols = self.crop_grid(processor, image.height, image.width) if n_tiles > 1 else (1, 1)
                if n_tiles > 1 and rows * cols + 1 != n_tiles:
                    raise ModelError(
                        f"an image of {image.height}x{image.width} px has {n_tiles} tiles in the prompt but a "
                        f"{rows}x{cols} crop grid plus a thumbnail; the processor's patch limits differ"
                    )
                kinds = [f"tile_{r}_{c}" for r in range(rows) for c in range(cols)] if n_tiles > 1 else ["image"]
                kinds += ["thumbnail"] if n_tiles > 1 else []
                sample_pieces.append(
                    [
                        ImagePiece(kind, Span(index * self.tile_tokens, (index + 1) * self.tile_tokens), side, side)
                        for index, kind in enumerate(kinds)
                    ]
                )
            pieces.append(sample_pieces)
        return pieces

    @staticmethod
    def crop_grid(processor: Any, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of crops the image processor cuts an image of ``height`` x ``width`` into."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        image_processor = processor.image_processor
        size = image_processor.size
        tile = (int(size["height"]), int(size["width"]))
        cols, rows = get_optimal_tiled_canvas(
            (height, width), tile, int(image_processor.min_patches), int(image_processor.max_patches)
        )
        return int(rows), int(cols)

    @classmethod
    def tiny_model(cls, seed: int = 0, num_layers: int = 4) -> HFModel:
        """A tiny random model (InternViT on 28 px crops in 7 px patches, 4 context tokens per crop; Qwen2)."""
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        tokenizer = cls.tiny_processor().tokenizer
        config = InternVLConfig(
            vision_config={
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "image_size": [_TINY_SIDE, _TINY_SIDE],
                "patch_size": [7, 7],
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
            image_token_id=tokenizer.context_image_token_id,
            image_seq_length=((_TINY_SIDE // 7) // 2) ** 2,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        return seeded_tiny_model(InternVLForConditionalGeneration, config, seed, tokenizer)

    @classmethod
    def tiny_processor(cls) -> Any:
        """InternVL's processor over a word-level tokenizer and a 28 px cropping image processor (1-6 crops)."""
        from transformers import InternVLProcessor
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        from analysis.models.tiny_vocab import tiny_words
        from analysis.models.tokenizer import build_word_tokenizer

        tokenizer = build_word_tokenizer(
            tiny_words(),
            ["<|im_start|>", "<|im_end|>", *_TINY_TOKENS.values()],
            add_bos=False,
            chat_template=_TINY_CHAT_TEMPLATE,
            named_tokens=_TINY_TOKENS,
        )
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": _TINY_SIDE, "width": _TINY_SIDE},
            crop_to_patches=True,
            min_patches=1,
            max_patches=_TINY_MAX_PATCHES,
        )
        return hf.without_video_processor(InternVLProcessor)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            image_seq_length=((_TINY_SIDE // 7) // 2) ** 2,
            chat_template=_TINY_CHAT_TEMPLATE,
        )


def _run_lengths(flags: list[int]) -> list[int]:
    """Lengths of the runs of ones in a 0/1 sequence, in order."""
    runs: list[int] = []
    previous = 0
    for flag in flags:
        if flag and not previous:
            runs.append(0)
        if flag:
            runs[-1] += 1
        previous = flag
    return runs
