"""Adapter for the ``gemma3`` family (Gemma 3 4B-27B): a fixed number of pooled SigLIP tokens per image between
``<start_of_image>`` and ``<end_of_image>`` markers, image tokens attending to each other bidirectionally, and
sliding-window attention in most layers (five local layers per global one).

The model builds both masks itself; the tracer and the probes work inside them (they take the mask each attention
call receives). The token-dropping runtime, which builds the masks of its compacted sequences itself, asks the
adapter for each layer's rule (``attention_rule``): its window and whether an image's tokens see each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from analysis.data.samples import Sample
from analysis.errors import ModelError
from analysis.models.adapters import AttentionRule, FamilyAdapter, RenderedPrompt, seeded_tiny_model
from analysis.models.hf import HFModel

_TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}<start_of_image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{%- endfor %}{% endif %}<end_of_turn>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_TINY_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
_TINY_SIDE = 28
_TINY_IMAGE_TOKENS = 16  # one per 7 px patch of the 28 px image (real checkpoints pool 64 x 64 to 16 x 16)
# Small enough that the tiny prompts outgrow it, so the window matters in the tests.
_TINY_WINDOW = 8


class Gemma3Adapter(FamilyAdapter):
    """Gemma 3: SigLIP tower, pooled to a fixed token grid per image; bidirectional image blocks; local layers."""

    model_type = "gemma3"
    description = "Gemma 3: fixed pooled tokens per image, bidirectional image attention, sliding-window layers"
    checkpoints = {
        f"gemma-3-{size}": (f"google/gemma-3-{size}-it", f"Gemma 3 {size.upper()} instruction-tuned")
        for size in ("4b", "12b", "27b")
    }
    tiny_alias = "tiny-gemma3"

    def decoder_layers(self, root: Any | None = None) -> Sequence[Any]:
        """The Gemma 3 decoder layers of ``root`` (default: the wrapped model)."""
        return (root if root is not None else self.model).model.language_model.layers

    def render_prompt(self, processor: Any, sample: Sample) -> RenderedPrompt:
        """The checkpoint's chat template with images at their marker positions (or first)."""
        return self.render_with_template(processor, sample)

    def processor_images(self, samples: Sequence[Sample]) -> list[Any]:
        """One list of images per sample, as Gemma 3's processor checks them against each prompt's markers."""
        return [list(sample.images) for sample in samples]

    def image_marker_ids(self, processor: Any) -> tuple[int, ...]:
        """``<start_of_image>`` and ``<end_of_image>``."""
        return (int(self.config.boi_token_id), int(self.config.eoi_token_id))

    def expanded_image_token(self, processor: Any) -> str:
        """``<image_soft_token>``: the processor's ``image_token`` is the ``<start_of_image>`` placeholder it
        expands into the marker, the soft tokens and the end marker."""
        return str(processor.tokenizer.image_token)

    def attention_rule(self, layer: int) -> AttentionRule:
        """Local layers see a window of earlier positions; an image's tokens see each other in every layer."""
        kind = self.text_config.layer_types[layer]
        window = int(self.text_config.sliding_window) if kind == "sliding_attention" else None
        return AttentionRule(kind, window, bidirectional_images=True)

    def image_token_counts(
        self, processor: Any, tensors: dict[str, torch.Tensor], n_images: list[int]
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Every image is ``mm_tokens_per_image`` tokens, a square grid of pooled patches."""
        per_image = int(self.config.mm_tokens_per_image)
        side = int(round(per_image**0.5))
        totals = (tensors["input_ids"] == self.image_token_id).sum(dim=1).tolist()
        for row, (total, n) in enumerate(zip(totals, n_images, strict=True)):
            if total != n * per_image:
                raise ModelError(
                    f"batch row {row} has {total} image tokens for {n} images of {per_image}; the processor's "
                    "image_seq_length differs from the model's mm_tokens_per_image"
                )
        return [[per_image] * n for n in n_images], [[(side, side)] * n for n in n_images]

    @classmethod
    def tiny_model(cls, seed: int = 0, num_layers: int = 4) -> HFModel:
        """A tiny random model (SigLIP 28 px in 7 px patches, one token per patch; local layers with an 8-token
        window alternating with global ones)."""
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        tokenizer = cls.tiny_processor().tokenizer
        config = Gemma3Config(
            text_config={
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": num_layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "vocab_size": len(tokenizer),
                "max_position_embeddings": 1024,
                "sliding_window": _TINY_WINDOW,
                # Local and global layers alternate (Gemma 3 has five local per global): selection rules that read
                # the last row's attention need a global layer early, where it sees the image at any distance.
                "layer_types": ["sliding_attention", "full_attention"] * (num_layers // 2)
                + ["sliding_attention"] * (num_layers % 2),
                "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
            },
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": _TINY_SIDE,
                "patch_size": 7,
            },
            mm_tokens_per_image=_TINY_IMAGE_TOKENS,
            boi_token_index=tokenizer.boi_token_id,
            eoi_token_index=tokenizer.eoi_token_id,
            image_token_index=tokenizer.image_token_id,
        )
        model = seeded_tiny_model(Gemma3ForConditionalGeneration, config, seed, tokenizer)
        # Gemma 3 initialises its image projection to zeros, which would make every image the same to a random
        # model (and every image intervention a no-op); the tiny model gets random projection weights.
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            projection.normal_(std=projection.shape[0] ** -0.5)
        return model

    @classmethod
    def tiny_processor(cls) -> Any:
        """Gemma 3's processor over a word-level tokenizer and a 28 px image processor."""
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        from analysis.models.tiny_vocab import tiny_words
        from analysis.models.tokenizer import build_word_tokenizer

        tokenizer = build_word_tokenizer(
            [*tiny_words(), "model"],
            ["<start_of_turn>", "<end_of_turn>", *_TINY_TOKENS.values()],
            add_bos=False,
            chat_template=_TINY_CHAT_TEMPLATE,
            named_tokens=_TINY_TOKENS,
        )
        return Gemma3Processor(
            image_processor=Gemma3ImageProcessorPil(size={"height": _TINY_SIDE, "width": _TINY_SIDE}),
            tokenizer=tokenizer,
            image_seq_length=_TINY_IMAGE_TOKENS,
            chat_template=_TINY_CHAT_TEMPLATE,
        )
