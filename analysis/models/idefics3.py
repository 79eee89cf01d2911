"""Adapter for the ``idefics3`` family (Idefics3, SmolVLM v1): an image split into a grid of tiles plus a global
view, each tile's pixel-shuffled tokens behind its own text tags.

An image becomes, for each tile, ``<fake_token_around_image><row_r_col_c>`` followed by its image tokens (a
newline after each row of tiles), then ``<fake_token_around_image><global-img>`` and the global view's tokens and
a closing ``<fake_token_around_image>``; an image small enough for one tile is its global view alone. So an
image's tokens are several runs with tags between them: the layout reads the tiles from those tags, and the tags
are the image's markers (kept as text).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from analysis.data.samples import Sample
from analysis.errors import ModelError
from analysis.layout import ImagePiece, Span
from analysis.models.adapters import FamilyAdapter, RenderedPrompt, seeded_tiny_model
from analysis.models.hf import HFModel

_TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{%- endfor %}{% endif %}<end_of_utterance>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}Assistant:{% endif %}"
)
TINY_SIDE = 28  # the tiny models' tile side in pixels
_GLOBAL = "<global-img>"
_TILE_TAG = re.compile(r"<row_(\d+)_col_(\d+)>")


class Idefics3Adapter(FamilyAdapter):
    """Idefics3: SigLIP on tiles and a global view, pixel shuffle, a Llama decoder; tiles tagged by row and column."""

    model_type = "idefics3"
    description = "Idefics3 / SmolVLM v1: tiles tagged <row_r_col_c> plus a global view, several runs per image"
    checkpoints: ClassVar[dict[str, tuple[str, str]]] = {
        "idefics3-8b": ("HuggingFaceM4/Idefics3-8B-Llama3", "Idefics3 8B (Llama 3.1, SigLIP-so400m)"),
        "smolvlm-instruct": ("HuggingFaceTB/SmolVLM-Instruct", "SmolVLM 2B Instruct (Idefics3 architecture)"),
    }
    tiny_alias = "tiny-idefics3"
    image_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_attention_mask")

    def language_model(self) -> HFModel:
        """The text decoder (Idefics3 calls it ``text_model``)."""
        return self.model.model.text_model

    def decoder_layers(self, root: Any | None = None) -> Sequence[Any]:
        """The decoder layers of ``root`` (default: the wrapped model)."""
        return (root if root is not None else self.model).model.text_model.layers

    def render_prompt(self, processor: Any, sample: Sample) -> RenderedPrompt:
        """The checkpoint's chat template with images at their marker positions (or first)."""
        return self.render_with_template(processor, sample)

    def image_tags(self, processor: Any) -> dict[int, str]:
        """The tag tokens that open an image's runs: each ``<row_r_col_c>`` as ``tile_<r-1>_<c-1>`` and
        ``<global-img>`` as ``global``, read from the tokenizer's vocabulary."""
        tokenizer = processor.tokenizer
        # Idefics3's processor names the global view's tag global_image_tag, SmolVLM's global_image_token.
        global_tag = getattr(processor, "global_image_tag", None) or processor.global_image_token
        tags = {int(tokenizer.convert_tokens_to_ids(global_tag)): "global"}
        for token, token_id in tokenizer.get_vocab().items():
            match = _TILE_TAG.fullmatch(token)
            if match:
                tags[int(token_id)] = f"tile_{int(match[1]) - 1}_{int(match[2]) - 1}"
        return tags

    def image_marker_ids(self, processor: Any) -> tuple[int, ...]:
        """``<fake_token_around_image>``, ``<global-img>`` and the ``<row_r_col_c>`` tags."""
        fake = int(processor.tokenizer.convert_tokens_to_ids(processor.fake_image_token))
        return (fake, *self.image_tags(processor))

    @property
    def tile_tokens(self) -> int:
        """Image tokens per tile (and per global view) after pixel shuffle."""
        vision = self.config.vision_config
        patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        return patches // int(self.config.scale_factor) ** 2

    def _runs(self, processor: Any, ids: list[int]) -> list[tuple[int, int, str]]:
        """The runs of image tokens of one row: (start, end, the tag before it)."""
        tags = self.image_tags(processor)
        runs: list[tuple[int, int, str]] = []
        position = 0
        while position < len(ids):
            if ids[position] != self.image_token_id:
                position += 1
                continue
            start = position
            while position < len(ids) and ids[position] == self.image_token_id:
                position += 1
            tag = tags.get(ids[start - 1]) if start else None
            if tag is None:
                raise ModelError(f"a run of image tokens at {start} follows no tile or global tag")
            runs.append((start, position, tag))
        return runs

    def _images(self, processor: Any, ids: list[int]) -> list[list[tuple[int, int, str]]]:
        """One row's runs grouped by image: each image ends with its global view."""
        images: list[list[tuple[int, int, str]]] = [[]]
        for run in self._runs(processor, ids):
            images[-1].append(run)
            if run[2] == "global":
                images.append([])
        if images[-1]:
            raise ModelError("a tile of an image has no global view after it; the prompt was not made by the processor")
        return images[:-1]

    def image_token_counts(
        self, processor: Any, tensors: dict[str, torch.Tensor], n_images: list[int]
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Per image: its tiles' and global view's tokens, read from the tags in the prompt."""
        side = math.isqrt(self.tile_tokens)
        counts: list[list[int]] = []
        for row, n in enumerate(n_images):
            images = self._images(processor, tensors["input_ids"][row].tolist())
            if len(images) != n:
                raise ModelError(f"batch row {row} shows {len(images)} images (global views) for {n} images")
            counts.append([sum(end - start for start, end, _ in runs) for runs in images])
        return counts, [[(side, side)] * n for n in n_images]

    def image_pieces(
        self, processor: Any, tensors: dict[str, torch.Tensor], counts: list[list[int]], samples: Sequence[Sample]
    ) -> list[list[list[ImagePiece]]] | None:
        """Every image's tiles (``tile_<row>_<col>``, from their tags) and its global view, one grid each."""
        side = math.isqrt(self.tile_tokens)
        pieces: list[list[list[ImagePiece]]] = []
        for row in range(len(counts)):
            images = self._images(processor, tensors["input_ids"][row].tolist())
            pieces.append(
                [
                    [
                        ImagePiece(tag, Span(start - runs[0][0], end - runs[0][0]), side, side)
                        for start, end, tag in runs
                    ]
                    for runs in images
                ]
            )
        return pieces

    @classmethod
    def tiny_model(cls, seed: int = 0, num_layers: int = 4) -> HFModel:
        """A tiny random model (SigLIP-style 28 px tiles in 7 px patches, 4 tokens per tile; Llama with GQA)."""
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration

        tokenizer = cls.tiny_processor().tokenizer
        config = Idefics3Config(**tiny_idefics3_config(tokenizer, num_layers))
        return seeded_tiny_model(Idefics3ForConditionalGeneration, config, seed, tokenizer)

    @classmethod
    def tiny_processor(cls) -> Any:
        """Idefics3's processor over a word-level tokenizer; images split into up to 3 x 3 tiles of 28 px."""
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        tokenizer = tiny_idefics3_tokenizer(_TINY_CHAT_TEMPLATE)
        image_processor = Idefics3ImageProcessorPil(
            size={"longest_edge": 3 * TINY_SIDE},
            max_image_size={"longest_edge": TINY_SIDE},
            do_image_splitting=True,
        )
        return Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=_TINY_CHAT_TEMPLATE
        )


def tiny_idefics3_config(tokenizer: Any, num_layers: int) -> dict[str, Any]:
    """Keyword arguments of a tiny Idefics3-layout config (Idefics3 and SmolVLM share them)."""
    return {
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": TINY_SIDE,
            "patch_size": 7,
        },
        "text_config": {
            "model_type": "llama",
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
        "image_token_id": tokenizer.convert_tokens_to_ids("<image>"),
        "scale_factor": 2,
    }


def tiny_idefics3_tokenizer(chat_template: str) -> Any:
    """A word-level tokenizer with the Idefics3 layout's special tokens (image, tags, end of utterance)."""
    from analysis.models.tiny_vocab import tiny_words
    from analysis.models.tokenizer import build_word_tokenizer

    tags = [f"<row_{row + 1}_col_{col + 1}>" for row in range(6) for col in range(6)]
    return build_word_tokenizer(
        [*tiny_words(), "User", "Assistant"],
        ["<fake_token_around_image>", "<image>", "<end_of_utterance>", _GLOBAL, *tags],
        chat_template=chat_template,
    )
