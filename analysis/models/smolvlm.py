"""Adapter for the ``smolvlm`` family (SmolVLM2): Idefics3's image layout under its own ``model_type``.

SmolVLM2 keeps Idefics3's tiles: per tile ``<fake_token_around_image><row_r_col_c>`` and its pixel-shuffled
image tokens, then ``<fake_token_around_image><global-img>``, the global view's tokens and a closing
``<fake_token_around_image>``. Only the classes differ (``SmolVLMForConditionalGeneration``, a processor that
also takes videos and needs ``num2words``), so the layout code is Idefics3's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from analysis.data.samples import Sample
from analysis.models import hf
from analysis.models.adapters import RenderedPrompt, seeded_tiny_model
from analysis.models.hf import HFModel
from analysis.models.idefics3 import TINY_SIDE, Idefics3Adapter, tiny_idefics3_config, tiny_idefics3_tokenizer

# SmolVLM2's own template: no space after the role when the message opens with an image.
_TINY_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM2: SigLIP on tiles and a global view, pixel shuffle, a SmolLM2 (Llama) decoder."""

    model_type = "smolvlm"
    description = "SmolVLM2: Idefics3's tiles (<row_r_col_c> tags) plus a global view, several runs per image"
    checkpoints: ClassVar[dict[str, tuple[str, str]]] = {
        "smolvlm2-2.2b": ("HuggingFaceTB/SmolVLM2-2.2B-Instruct", "SmolVLM2 2.2B Instruct"),
        "smolvlm2-500m": ("HuggingFaceTB/SmolVLM2-500M-Video-Instruct", "SmolVLM2 500M Video Instruct"),
        "smolvlm2-256m": ("HuggingFaceTB/SmolVLM2-256M-Video-Instruct", "SmolVLM2 256M Video Instruct"),
    }
    tiny_alias = "tiny-smolvlm"

    def processor_images(self, samples: Sequence[Sample]) -> list[Any]:
        """One list of images per sample: SmolVLM's processor matches images to prompts sample by sample."""
        return [list(sample.images) for sample in samples]

    def render_prompt(self, processor: Any, sample: Sample) -> RenderedPrompt:
        """The checkpoint's chat template, whose user preamble differs when the message opens with an image."""
        return self.render_with_template(processor, sample, preamble_depends_on_first_part=True)

    @classmethod
    def tiny_model(cls, seed: int = 0, num_layers: int = 4) -> HFModel:
        """A tiny random model (SigLIP-style 28 px tiles in 7 px patches, 4 tokens per tile; Llama with GQA)."""
        from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

        tokenizer = cls.tiny_processor().tokenizer
        config = SmolVLMConfig(**tiny_idefics3_config(tokenizer, num_layers))
        return seeded_tiny_model(SmolVLMForConditionalGeneration, config, seed, tokenizer)

    @classmethod
    def tiny_processor(cls) -> Any:
        """SmolVLM's processor over a word-level tokenizer, without its video part; up to 3 x 3 tiles of 28 px."""
        from transformers import SmolVLMProcessor
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        tokenizer = tiny_idefics3_tokenizer(_TINY_CHAT_TEMPLATE)
        image_processor = SmolVLMImageProcessorPil(
            size={"longest_edge": 3 * TINY_SIDE}, max_image_size={"longest_edge": TINY_SIDE}, do_image_splitting=True
        )
        processor = hf.without_video_processor(SmolVLMProcessor)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            image_seq_len=4,
            chat_template=_TINY_CHAT_TEMPLATE,
        )
        processor.video_processor = cls.video_processor_standin()
        return processor

    @classmethod
    def video_processor_standin(cls) -> Any:
        """SmolVLM's own video processor with its defaults: it builds without torchvision (only processing videos
        needs it), and the chat template reads its frame settings."""
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        return SmolVLMVideoProcessor()
