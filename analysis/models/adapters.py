"""Family adapters: where each model family keeps its parts and how it lays out image tokens.

An adapter is chosen by the HF ``model_type`` of the loaded model's config, never by its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from analysis.data.samples import IMAGE_PLACEHOLDER, Sample
from analysis.errors import DataError, ModelError
from analysis.layout import ImagePiece, TokenLayout, compute_layouts
from analysis.models.hf import HFModel
from analysis.registry import Registry

# A private-use character never produced by a tokenizer; rendering a chat template around it
# tells us where user content begins without knowing the template.
_CONTENT_SENTINEL = "\ue000"


@dataclass(frozen=True)
class VisionAttention:
    """One vision-tower pass seen at the layer the language model reads its features from, every image of the
    batch in order, in float32 (the inputs of VisionZip-style selection)."""

    cls_attention: torch.Tensor  # (I, P) the CLS query's attention on each patch, summed over heads
    keys: torch.Tensor  # (I, P + 1, head_dim) the layer's keys averaged over heads, CLS first
    features: torch.Tensor  # (I, P + 1, D_vision) the layer's output, CLS first: what the projector reads
    project: Callable[[torch.Tensor], torch.Tensor]  # (..., D_vision) -> the language model's input embeddings


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt string and the character offset where the user's content starts."""

    text: str
    content_start: int


@dataclass
class ModelInputs:
    """Processor output for a batch plus what the layout needs from it."""

    tensors: dict[str, torch.Tensor]
    prompts: list[RenderedPrompt]
    layouts: list[TokenLayout]

    @property
    def input_ids(self) -> torch.Tensor:
        """The padded token ids, shape (batch, seq)."""
        return self.tensors["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        """The padding mask, shape (batch, seq)."""
        return self.tensors["attention_mask"]


@dataclass(frozen=True)
class AttentionRule:
    """Which keys a layer's queries may see besides causality and padding: ``kind`` names the layer's attention
    (layers of one kind share masks and position embeddings), ``window`` limits it to the last ``window``
    positions (sliding-window layers), ``bidirectional_images`` lets an image's tokens see each other."""

    kind: str = "full_attention"
    window: int | None = None
    bidirectional_images: bool = False


class FamilyAdapter(ABC):
    """Maps the canonical parts of a vision-language model family onto HF module paths."""

    model_type: ClassVar[str]
    description: ClassVar[str]
    # Short names for the family's common hub checkpoints: alias -> (hub id, description).
    checkpoints: ClassVar[dict[str, tuple[str, str]]] = {}
    tiny_alias: ClassVar[str]  # the tiny random model of tests and smoke runs, built in memory

    def __init__(self, model: HFModel) -> None:
        self.model: HFModel = model
        self.config: HFModel = model.config
        self.text_config = self.config.get_text_config()
        if getattr(self.config, "image_token_id", None) is None:
            raise ModelError(
                f"model of type {self.model_type!r} has no image_token_id in its config; "
                "set config.image_token_id to the id of the image placeholder token"
            )

    # --- structure -------------------------------------------------------------------------
    @abstractmethod
    def decoder_layers(self, root: Any | None = None) -> Sequence[Any]:
        """The language model's decoder layers in execution order (of ``root``, default the model)."""

    def attention(self, layer: Any) -> Any:
        """The attention module of a decoder layer (a module, or its nnsight envoy inside a trace)."""
        return layer.self_attn

    def value_projection(self, layer: Any) -> Any:
        """The value projection of a decoder layer's attention, whose output holds every KV head's values."""
        return self.attention(layer).v_proj

    def output_projection(self, layer: Any) -> Any:
        """The projection after a decoder layer's attention that mixes the concatenated heads."""
        return self.attention(layer).o_proj

    @staticmethod
    def attention_weights(output: Any) -> Any:
        """The attention weights (B, H, Q, K) in an attention module's output (None unless eager computed them)."""
        return output[1]

    def language_model(self) -> HFModel:
        """The text model that runs the decoder layers (embeddings, layers, final norm; no vision, no LM head)."""
        return self.model.model.language_model

    def final_norm(self) -> nn.Module:
        """The norm applied after the last decoder layer."""
        return self.language_model().norm

    def lm_head(self) -> nn.Module:
        """The output projection to vocabulary logits."""
        return self.model.lm_head

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The language model's input embeddings of text token ids (B, T) -> (B, T, D)."""
        return self.language_model().get_input_embeddings()(ids)

    # Whether the language model adds visual features to the image positions' hidden states after its first
    # layers (Qwen3-VL's DeepStack), which the token-dropping runtime then adds to the tokens each row keeps.
    deepstack: ClassVar[bool] = False
    # Whether the vision tower's work is fixed by its input shapes (a CUDA graph can replay it); a tower that plans
    # its work from the inputs' values on the host (Qwen2.5-VL's windows from the image grid) is not.
    static_vision_tower: ClassVar[bool] = True
    # Processor outputs the vision tower reads (the rest are sequence-aligned: ids, mask).
    image_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    # Processor outputs laid out along the sequence besides ids and mask, and what extends them on the right.
    sequence_fill: ClassVar[dict[str, int]] = {"mm_token_type_ids": 0, "token_type_ids": 0}

    def append_tokens(
        self, tensors: dict[str, torch.Tensor], ids: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Model inputs with tokens ``ids`` (B, A) appended after the prompt, ``valid`` (B, A) marking real ones."""
        extended = dict(tensors)
        prompt = tensors["input_ids"]
        extended["input_ids"] = torch.cat([prompt, ids.to(prompt.dtype)], dim=1)
        extended["attention_mask"] = torch.cat(
            [tensors["attention_mask"], valid.to(tensors["attention_mask"].dtype)], dim=1
        )
        for name, fill in self.sequence_fill.items():
            value = tensors.get(name)
            if value is not None and value.dim() == 2 and value.shape[1] == prompt.shape[1]:
                extended[name] = torch.cat([value, torch.full_like(ids, fill, dtype=value.dtype)], dim=1)
        return extended

    def expanded_image_token(self, processor: Any) -> str:
        """The token the processor repeats for each image embedding (usually its ``image_token``)."""
        return str(processor.image_token)

    def attention_rule(self, layer: int) -> AttentionRule:
        """The attention rule of ``layer`` (default: causal, every earlier position)."""
        return AttentionRule()

    def image_features(self, tensors: dict[str, torch.Tensor]) -> Any:
        """The vision tower and projector alone on a batch's images: what the language model receives for them."""
        return self.model.model.get_image_features(**{key: tensors[key] for key in self.image_input_keys})

    def vision_attention(self) -> AbstractContextManager[list[VisionAttention]]:
        """Inside the block every vision-tower pass appends its ``VisionAttention``; a family whose tower has no
        CLS token to rank patches by raises ModelError."""
        raise ModelError(
            f"the {self.model_type} vision tower has no CLS token whose attention ranks the patches, which "
            "VisionZip-style selection needs; use a llava-family model, or a method that reads the language model"
        )

    def explicit_positions(self, inputs: ModelInputs) -> torch.Tensor | None:
        """Position ids a batch needs when its padding is given as a 4-D attention mask (None: plain 1-D RoPE)."""
        return None

    def rope_positions(self, inputs: ModelInputs) -> torch.Tensor:
        """The rotary position ids of a left-padded batch's prompts as ``generate`` gives them: (B, T) counting real
        tokens from 0 (pads at 0), or the family's own (Qwen2.5-VL's M-RoPE (3, B, T))."""
        explicit = self.explicit_positions(inputs)
        if explicit is not None:
            return explicit
        mask = inputs.attention_mask.long()
        return (mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return int(self.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        """Number of query heads per layer."""
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        """Number of key/value heads per layer (fewer than query heads under GQA)."""
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        """Per-head width of queries, keys and values."""
        explicit = getattr(self.text_config, "head_dim", None)
        return int(explicit or self.text_config.hidden_size // self.num_heads)

    @property
    def image_token_id(self) -> int:
        """Id of the token that stands for one image embedding in ``input_ids``."""
        return int(self.config.image_token_id)

    # --- inputs ----------------------------------------------------------------------------
    @abstractmethod
    def render_prompt(self, processor: Any, sample: Sample) -> RenderedPrompt:
        """The full prompt text for a sample, with one image token string per image."""

    @abstractmethod
    def image_token_counts(
        self, processor: Any, tensors: dict[str, torch.Tensor], n_images: list[int]
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Per sample and image: how many image tokens it became and their (rows, cols) grid."""

    def image_pieces(
        self, processor: Any, tensors: dict[str, torch.Tensor], counts: list[list[int]], samples: Sequence[Sample]
    ) -> list[list[list[ImagePiece]]] | None:
        """Per sample and image, its parts (spans from the image's first token) when an image is more than one
        grid of tokens; None: every image is its grid."""
        return None

    def image_marker_ids(self, processor: Any) -> tuple[int, ...]:
        """Ids of the text tokens the family puts around each image (none by default)."""
        return ()

    def processor_images(self, samples: Sequence[Sample]) -> list[Any]:
        """The batch's images as the processor takes them: one flat list (families that treat a sample's several
        images differently take one list per sample)."""
        return [image for sample in samples for image in sample.images]

    @classmethod
    def video_processor_standin(cls) -> Any | None:
        """A video processor the family's processor can hold when it is loaded without torchvision (its chat
        template may read the video settings); None: the video part is left out."""
        return None

    def processor_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments the family's processor needs."""
        return {}

    def build_inputs(
        self, processor: Any, samples: Sequence[Sample], device: torch.device | str = "cpu"
    ) -> ModelInputs:
        """Tokenise a batch with left padding and return tensors plus per-image token counts."""
        for sample in samples:
            if not sample.images:
                raise DataError(
                    f"sample {sample.sample_id!r} has no image; the toolkit traces image-text samples only, "
                    "drop text-only samples from the dataset"
                )
        prompts = [self.render_prompt(processor, sample) for sample in samples]
        images = self.processor_images(samples)
        tokenizer = processor.tokenizer
        previous_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            encoded = processor(
                text=[prompt.text for prompt in prompts],
                images=images,
                padding=True,
                return_tensors="pt",
                **self.processor_kwargs(),
            )
        finally:
            tokenizer.padding_side = previous_side
        tensors = {key: value.to(device) if hasattr(value, "to") else value for key, value in encoded.items()}
        counts, grids = self.image_token_counts(processor, tensors, [len(s.images) for s in samples])
        system_ids = [tokenizer(prompt.text[: prompt.content_start])["input_ids"] for prompt in prompts]
        layouts = compute_layouts(
            tensors["input_ids"],
            tensors["attention_mask"],
            self.image_token_id,
            system_ids,
            counts,
            grids,
            self.image_pieces(processor, tensors, counts, samples),
            self.image_marker_ids(processor),
        )
        return ModelInputs(tensors=tensors, prompts=prompts, layouts=layouts)

    def render_with_template(
        self, processor: Any, sample: Sample, *, preamble_depends_on_first_part: bool = False
    ) -> RenderedPrompt:
        """Render the processor's chat template, keeping images where the prompt's markers put them.

        ``preamble_depends_on_first_part``: the template writes the user's preamble differently when the message
        opens with an image (SmolVLM: ``User:`` then the image, ``User: `` before text), so the content's start
        is found with a probe that opens the same way, at the processor's image string.
        """
        content = _content_parts(sample)
        messages = [{"role": "user", "content": content}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        sentinel = {"type": "text", "text": _CONTENT_SENTINEL}
        if preamble_depends_on_first_part and content[0]["type"] == "image":
            probe_content, opening = [{"type": "image"}, sentinel], str(processor.image_token)
        else:
            probe_content, opening = [sentinel], _CONTENT_SENTINEL
        probe = [{"role": "user", "content": probe_content}]
        rendered_probe = processor.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        prefix = rendered_probe[: rendered_probe.index(opening)]
        if not text.startswith(prefix):
            raise ModelError("the chat template renders a different preamble per message; set a fixed template")
        return RenderedPrompt(text=text, content_start=len(prefix))

    def followup_texts(self, processor: Any, turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Per (prompt, answer): what the chat template appends for an assistant reply ``answer`` (with its end of
        turn) and then for a later, text-only user turn ``prompt`` up to the next reply: the pieces of a
        multi-turn conversation."""
        first = {"role": "user", "content": [{"type": "text", "text": _CONTENT_SENTINEL}]}

        def reply(text: str) -> dict[str, Any]:
            return {"role": "assistant", "content": [{"type": "text", "text": text}]}

        def render(messages: list[dict[str, Any]], generation: bool) -> str:
            return str(processor.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False))

        asked = render([first], True)
        # The reply's rendering involves only the answer, so each distinct answer is rendered once (training data
        # holds far fewer answers than (prompt, answer) pairs, and rendering dominates building it).
        answered_by_answer = {
            answer: render([first, reply(answer)], False) for answer in dict.fromkeys(a for _, a in turns)
        }
        pieces = []
        for prompt, answer in turns:
            answered = answered_by_answer[answer]
            user = {"role": "user", "content": [{"type": "text", "text": prompt}]}
            followed = render([first, reply(answer), user], True)
            if not (answered.startswith(asked) and followed.startswith(answered)):
                raise ModelError(
                    "the chat template rewrites earlier turns when a turn is added; multi-turn training needs "
                    "a template that only appends"
                )
            pieces.append((answered[len(asked) :], followed[len(answered) :]))
        return pieces

    # --- tests -----------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def tiny_model(cls, seed: int = 0, num_layers: int = 4) -> HFModel:
        """A tiny randomly initialised model of this family for tests (eager attention)."""

    @classmethod
    @abstractmethod
    def tiny_processor(cls) -> Any:
        """A processor matching ``tiny_model``, built offline."""


def seeded_tiny_model(model_class: Any, config: Any, seed: int, tokenizer: Any) -> HFModel:
    """A family's tiny test model from its config: random weights from ``seed``, eager attention, eval mode, and
    the tokenizer's padding id for generation."""
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _content_parts(sample: Sample) -> list[dict[str, str]]:
    """Chat-message content items in prompt order; images first when the prompt has no markers."""
    if IMAGE_PLACEHOLDER not in sample.prompt:
        return [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": sample.prompt}]
    parts: list[dict[str, str]] = []
    pieces = sample.prompt.split(IMAGE_PLACEHOLDER)
    for index, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if index < len(pieces) - 1:
            parts.append({"type": "image"})
    return parts


# One registration entry per built-in family (model_type -> its adapter class), imported on first use.
FAMILIES: Registry[type[FamilyAdapter]] = Registry(
    "adapter for model_type",
    {
        "llava": "analysis.models.llava:LlavaAdapter",
        "qwen2_5_vl": "analysis.models.qwen2_5_vl:Qwen25VLAdapter",
        "qwen2_vl": "analysis.models.qwen2_vl:Qwen2VLAdapter",
        "qwen3_vl": "analysis.models.qwen3_vl:Qwen3VLAdapter",
        "llava_next": "analysis.models.llava_next:LlavaNextAdapter",
        "llava_onevision": "analysis.models.llava_onevision:LlavaOnevisionAdapter",
        "internvl": "analysis.models.internvl:InternVLAdapter",
        "gemma3": "analysis.models.gemma3:Gemma3Adapter",
        "idefics3": "analysis.models.idefics3:Idefics3Adapter",
        "smolvlm": "analysis.models.smolvlm:SmolVLMAdapter",
    },
    hint="Write a FamilyAdapter subclass and add it to FAMILIES in analysis/models/adapters.py, or call "
    "register_adapter(YourAdapter) before loading the model",
    error=ModelError,
)


def register_adapter(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Add a family adapter under its ``model_type`` (an error if that model_type already has one)."""
    return FAMILIES.register(cls.model_type, cls)


def adapter_class(model_type: str) -> type[FamilyAdapter]:
    """The adapter class for an HF ``model_type``, or a ModelError naming the supported ones."""
    return FAMILIES.get(model_type)


def get_adapter(model: HFModel) -> FamilyAdapter:
    """Instantiate the adapter that understands ``model`` (chosen by its config's ``model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise ModelError(f"{type(model).__name__} has no config.model_type; pass a Hugging Face model")
    return adapter_class(model_type)(model)


def supported_model_types() -> list[str]:
    """The ``model_type`` values an adapter exists for."""
    return FAMILIES.names()
