"""The model organism's architecture and processor: a small LLaVA-1.5 look-alike over ShapesVQA's vocabulary."""

from __future__ import annotations

from typing import Any

from analysis.data.shapes import ShapesConfig, tokens, vocabulary
from analysis.models.llava import VICUNA_V1_SYSTEM

IMAGE_TOKEN = "<image>"
# The shipped organism's vision tower: 112 px images in 14 px patches, 64 image tokens (a config may choose others).
IMAGE_SIZE = 112
PATCH_SIZE = 14
# LLaVA-1.5 feeds the projector the penultimate CLIP layer, whose features are less tuned to the
# contrastive objective than the last one.
VISION_FEATURE_LAYER = -2
# The instruction of the caption-alignment stage, in the spirit of LLaVA's "describe the image briefly" prompts.
CAPTION_PROMPT = "Describe the image."

# Renders the Vicuna v1 conversation exactly as LlavaAdapter.render_prompt does: the system prompt, then
# " USER: " with the images first and a newline before the text, then " ASSISTANT:"; a finished assistant
# turn ends with "</s>", after which Vicuna v1 starts the next role without a space.
CHAT_TEMPLATE = (
    "{%- set state = namespace(system=" + repr(VICUNA_V1_SYSTEM) + ", sep=' ') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set state.system = message['content'] -%}"
    "{%- else -%}{%- set state.system = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- state.system -}}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{{- state.sep + message['role'] | upper + ': ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list -%}"
    "{%- for image in images -%}{{- '" + IMAGE_TOKEN + "' -}}{%- endfor -%}"
    "{%- if images -%}{{- '\\n' -}}{%- endif -%}"
    "{%- for part in message['content'] | selectattr('type', 'equalto', 'text') -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '</s>' -}}{%- set state.sep = '' -%}"
    "{%- else -%}{%- set state.sep = ' ' -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- state.sep + 'ASSISTANT:' -}}{%- endif -%}"
)


def organism_words(shapes_config: ShapesConfig | None = None) -> list[str]:
    """Every word the organism's tokenizer knows: ShapesVQA's vocabulary plus the Vicuna v1 prompt's words."""
    template = tokens(f"{VICUNA_V1_SYSTEM} USER: ASSISTANT: {CAPTION_PROMPT}")
    return list(dict.fromkeys([*vocabulary(shapes_config), *template]))


def build_processor(
    shapes_config: ShapesConfig | None = None, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE
) -> Any:
    """A LlavaProcessor over a word-level tokenizer and a CLIP image processor at the tower's size, built offline."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from analysis.models.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(
        organism_words(shapes_config), [IMAGE_TOKEN], extra_attributes={"image_token": IMAGE_TOKEN}
    )
    # The PIL backend: torchvision is not a dependency of the toolkit.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, do_center_crop=True
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def image_token_count(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> int:
    """Image tokens per image: one per patch (the CLS token is dropped)."""
    return (image_size // patch_size) ** 2


def organism_config(
    vocab_size: int,
    image_token_id: int,
    *,
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    eos_token_id: int = 3,
    vision_hidden_size: int = 128,
    vision_intermediate_size: int = 512,
    vision_layers: int = 4,
    vision_heads: int = 4,
    text_hidden_size: int = 256,
    text_intermediate_size: int = 688,
    text_layers: int = 12,
    text_heads: int = 8,
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
) -> Any:
    """The organism's LlavaConfig: CLIP tower (square images in square patches) -> GELU MLP projector -> Llama
    decoder."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_intermediate_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
        hidden_act="quick_gelu",
    )
    # Full multi-head attention (as many key/value heads as query heads), RMSNorm, RoPE, SwiGLU: LLaMA/Vicuna.
    text = LlamaConfig(
        hidden_size=text_hidden_size,
        intermediate_size=text_intermediate_size,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        vocab_size=vocab_size,
        # Room for the image and a question; the shipped 64-token organism keeps the 512 it was trained with.
        max_position_embeddings=max(512, image_token_count(image_size, patch_size) + 256),
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
