"""What the toolkit relies on in transformers' call conventions and KV-cache internals, in one place.

transformers renames call arguments between minor releases (5.24 passes the KV cache to the text model as
``cache=`` where 5.23 passed ``past_key_values=``). Everything that depends on such a name or on the cache's
methods goes through this module, so the next rename is one edit here; callers never spell them.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.errors import ToolkitError

# A transformers PreTrainedModel (or config): its submodules and attributes are made at run time, so the type checker
# cannot follow them; code reaching into one says so with this alias.
HFModel = Any

# Names under which a forward call has carried the KV cache, newest first.
CACHE_ARGUMENTS = ("cache", "past_key_values")
_DISTRIBUTION = "visipruner-analysis"


class CompatibilityError(ToolkitError):
    """The installed transformers does something the toolkit was not built for (not the user's mistake)."""


def installed_transformers() -> str:
    """The installed transformers version."""
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "not installed"


@lru_cache(maxsize=1)
def supported_transformers() -> str:
    """The transformers range this toolkit declares (from its package metadata, i.e. pyproject.toml)."""
    try:
        requirements = metadata.requires(_DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return "unknown (the toolkit is not installed; pip install -e .)"
    for requirement in requirements:
        match = re.match(r"^transformers\s*(?:\((?P<paren>[^)]*)\)|(?P<plain>[^;]*))", requirement)
        if match:
            return (match.group("paren") or match.group("plain") or "").strip() or "any"
    return "unknown"


def untested_release() -> str | None:
    """A warning when the installed transformers lies outside the declared range (None when inside it)."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion

    declared, installed = supported_transformers(), installed_transformers()
    try:
        inside = installed in SpecifierSet(declared)
    except (InvalidSpecifier, InvalidVersion):
        return None  # no declared range to compare with (the toolkit is not installed as a package)
    if inside:
        return None
    return (
        f"transformers {installed} is outside the range this toolkit was tested on ({declared}); results may "
        f"differ or commands fail: pip install 'transformers{declared}'"
    )


def compatibility_error(problem: str) -> CompatibilityError:
    """An error for an internal mismatch with transformers, naming the installed version and the supported range."""
    return CompatibilityError(
        f"{problem}. This is a mismatch between the toolkit and transformers {installed_transformers()}, not a "
        f"problem with your input; the toolkit supports transformers {supported_transformers()}: "
        f"pip install 'transformers{supported_transformers()}'"
    )


def _is_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers KV cache object."""
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def call_cache(kwargs: dict[str, Any]) -> Any | None:
    """The KV cache a forward call carries, found by type (so a renamed argument is still found), or None."""
    for name in CACHE_ARGUMENTS:
        if _is_cache(kwargs.get(name)):
            return kwargs[name]
    caches = [value for value in kwargs.values() if _is_cache(value)]
    if len(caches) > 1:
        raise compatibility_error(f"a forward call carries {len(caches)} KV caches ({', '.join(kwargs)})")
    return caches[0] if caches else None


def cache_length(cache: Any | None) -> int:
    """Tokens held by the first layer of a KV cache (0 for none)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length())


def crop_cache(cache: Any, length: int) -> None:
    """Keep only the first ``length`` positions in every layer of a KV cache."""
    for layer in cache.layers:
        extra = int(layer.get_seq_length()) - length
        if extra > 0:
            layer.crop(-extra)


def new_cache() -> Any:
    """An empty cache of plain full-length layers (whatever the model config says), so cropping it is exact."""
    from transformers import DynamicCache

    return DynamicCache()


@lru_cache(maxsize=64)
def _cache_parameter(forward_type: Any) -> str:
    """The name a module class's forward takes its KV cache under."""
    parameters = inspect.signature(forward_type.forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in parameters:
            return name
    raise compatibility_error(
        f"{forward_type.__name__}.forward takes none of the KV-cache arguments {', '.join(CACHE_ARGUMENTS)}"
    )


def cache_kwargs(module: nn.Module, cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to ``module``'s forward under the name its transformers uses."""
    forward_type: Any = type(module)
    return {_cache_parameter(forward_type): cache, "use_cache": True}


@dataclass(frozen=True)
class TextModelCall:
    """What a call of the text model (embeddings, decoder layers, final norm) carries that the toolkit reads."""

    length: int  # tokens in this pass
    device: torch.device
    attention_mask: Any  # the 2-D padding mask, or whatever else the caller passed (None if nothing)
    positions: torch.Tensor | None  # the call's position ids
    cache: Any | None


def text_model_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> TextModelCall:
    """The inputs of a text-model forward call, as seen by a forward pre-hook."""
    source = kwargs.get("inputs_embeds")
    if source is None:
        source = kwargs.get("input_ids")
    if source is None and args:
        source = args[0]
    if not isinstance(source, torch.Tensor):
        raise compatibility_error(f"a text-model call without input ids or embeddings (arguments: {sorted(kwargs)})")
    return TextModelCall(
        int(source.shape[1]),
        source.device,
        kwargs.get("attention_mask"),
        kwargs.get("position_ids"),
        call_cache(kwargs),
    )


def with_position_ids(kwargs: dict[str, Any], position_ids: torch.Tensor) -> dict[str, Any]:
    """A text-model call's keyword arguments with explicit position ids."""
    return {**kwargs, "position_ids": position_ids}


def layer_hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a decoder layer's forward call receives."""
    return args[0] if args else kwargs["hidden_states"]


def with_layer_hidden_states(
    args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A decoder layer's call arguments with new hidden states."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def layer_positions(kwargs: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...] | None, torch.Tensor | None]:
    """A decoder layer call's rotary position embeddings (cos, sin) and its position ids (either may be None)."""
    return kwargs.get("position_embeddings"), kwargs.get("position_ids")


def layer_overrides(
    attention_mask: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, ...] | None = None,
    position_ids: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Keyword arguments that give a decoder layer its own mask and (optionally) positions."""
    overrides: dict[str, Any] = {"attention_mask": attention_mask}
    if position_embeddings is not None:
        overrides["position_embeddings"] = position_embeddings
    if position_ids is not None:
        overrides["position_ids"] = position_ids
    return overrides


def layer_output_hidden(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (alone, or first of a tuple in some releases)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def with_layer_output_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """A decoder layer's output with new hidden states, in the same form."""
    return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])


def text_model_output_hidden(output: Any) -> torch.Tensor:
    """The final hidden states of a text-model output."""
    return output.last_hidden_state


def set_text_model_output_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """A text-model output with its final hidden states replaced."""
    output.last_hidden_state = hidden
    return output


# --- attention implementations ------------------------------------------------------------------------------------
def attention_implementation(config: Any) -> str:
    """The attention implementation a (text) config selects: eager, sdpa, flash_attention_2, ..."""
    return str(getattr(config, "_attn_implementation", None) or "eager")


def set_attention_implementation(config: Any, name: str) -> None:
    """Select an attention implementation in a config (read at every forward call)."""
    config._attn_implementation = name


def attention_function(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """transformers' registered attention function of an implementation name."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from analysis.errors import ConfigError

    if name not in ALL_ATTENTION_FUNCTIONS:
        raise ConfigError(f"attention implementation {name!r} cannot be intervened on; load with sdpa or eager")
    return ALL_ATTENTION_FUNCTIONS[name]


@contextmanager
def attention_routed(config: Any, name: str, function: Callable[..., Any]) -> Iterator[None]:
    """Inside the block ``config`` selects ``function`` (registered as ``name``, masks made as before); undone on exit.

    transformers looks attention and mask builders up by the config's implementation name at every call, so a
    registration of our own plus the name in the config is all it takes; both are removed on exit.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    previous = attention_implementation(config)
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    set_attention_implementation(config, name)
    try:
        yield
    finally:
        set_attention_implementation(config, previous)
        # GeneralInterface has no unregister; its class-wide mapping is where register() put the names.
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


def registered_attention_names() -> set[str]:
    """Every attention implementation name transformers currently knows."""
    from transformers import AttentionInterface

    return set(AttentionInterface._global_mapping)


def attention_weights_kwargs() -> dict[str, Any]:
    """Forward keyword arguments that make an eager model return every layer's attention weights."""
    return {"output_attentions": True}


def returned_attentions(output: Any) -> tuple[torch.Tensor, ...]:
    """The per-layer attention weights (B, H, T, T) of a forward called with ``attention_weights_kwargs``."""
    return tuple(output.attentions)


# --- calls the toolkit makes itself ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeepStack:
    """Qwen3-VL's DeepStack inputs: visual features added to the image positions' hidden states after each of the
    first decoder layers (level i after layer i)."""

    positions: torch.Tensor  # (B, T) bool, True at image positions
    embeds: list[torch.Tensor]  # per level, (image positions, D): rows in the row-major order of ``positions``

    def after(self, split: int) -> DeepStack:
        """The same for the positions from ``split`` on."""
        later = self.positions.clone()
        later[:, :split] = False
        chosen = later[self.positions]
        return DeepStack(self.positions[:, split:], [embeds[chosen] for embeds in self.embeds])


@dataclass(frozen=True)
class LanguageModelInputs:
    """What a multimodal model handed its language model: merged embeddings, padding mask, positions."""

    embeds: torch.Tensor | None
    attention_mask: torch.Tensor | None
    positions: torch.Tensor | None  # position ids; None: derived from the cache length; M-RoPE ids for Qwen2.5-VL
    deepstack: DeepStack | None = None  # Qwen3-VL's visual features for the first layers

    def after(self, split: int) -> LanguageModelInputs:
        """The inputs of the positions from ``split`` on: a 2-D padding mask stays whole (it covers the cached keys
        too); 4-D masks, alone or per attention kind (Gemma 3), keep the rows of those queries."""
        if self.embeds is None:
            raise CompatibilityError("the language model received no input embeddings to continue from")

        def rows(mask: Any) -> Any:
            if isinstance(mask, dict):
                return {kind: rows(value) for kind, value in mask.items()}
            return mask[:, :, split:] if isinstance(mask, torch.Tensor) and mask.dim() == 4 else mask

        return LanguageModelInputs(
            self.embeds[:, split:],
            rows(self.attention_mask),
            None if self.positions is None else self.positions[..., split:],
            None if self.deepstack is None else self.deepstack.after(split),
        )


def deepstack_inputs(kwargs: dict[str, Any]) -> DeepStack | None:
    """The DeepStack inputs of a language model's forward call (None for models without DeepStack)."""
    embeds = kwargs.get("deepstack_visual_embeds")
    if embeds is None:
        return None
    return DeepStack(kwargs["visual_pos_masks"], list(embeds))


def without_deepstack(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A language model's forward keyword arguments with the DeepStack inputs taken out."""
    return {**kwargs, "deepstack_visual_embeds": None, "visual_pos_masks": None}


def language_model_inputs(kwargs: dict[str, Any]) -> LanguageModelInputs:
    """The language model's inputs, read from its forward call's keyword arguments (a forward pre-hook's)."""
    return LanguageModelInputs(
        kwargs.get("inputs_embeds"), kwargs.get("attention_mask"), kwargs.get("position_ids"), deepstack_inputs(kwargs)
    )


def run_language_model(text_model: HFModel, inputs: LanguageModelInputs, cache: Any) -> torch.Tensor:
    """The text model's final hidden states for given embeddings, continuing ``cache``."""
    deepstack = inputs.deepstack
    extra = (
        {}
        if deepstack is None
        else {"visual_pos_masks": deepstack.positions, "deepstack_visual_embeds": deepstack.embeds}
    )
    output = text_model(
        inputs_embeds=inputs.embeds,
        attention_mask=inputs.attention_mask,
        position_ids=inputs.positions,
        **extra,
        **cache_kwargs(text_model, cache),
    )
    return text_model_output_hidden(output)


def last_logits_only() -> dict[str, Any]:
    """Keyword arguments that make a multimodal model's forward compute the last position's logits alone."""
    return {"logits_to_keep": 1}


def embeds_forward(
    model: HFModel, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *, cache: bool = True
) -> Any:
    """A forward of the whole model from input embeddings, computing only the last position's logits."""
    options: dict[str, Any] = last_logits_only()
    if attention_mask is not None:
        options["attention_mask"] = attention_mask
    if not cache:
        options["use_cache"] = False
    return model(inputs_embeds=embeds, **options)


def pixel_values(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The image pixels in a processor's output."""
    return tensors["pixel_values"]


def with_pixel_values(tensors: dict[str, torch.Tensor], pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Processor-style model inputs with image pixels added."""
    return {**tensors, "pixel_values": pixels}


def without_video_processor(processor_class: Any) -> Any:
    """A subclass of an image-and-video processor class that accepts ``video_processor=None`` or a video
    processor built by hand: looking the video processors' classes up needs torchvision, which the toolkit does
    not depend on (tiny test processors)."""

    class ImageOnlyProcessor(processor_class):
        """The processor with its video part left out: ``video_processor`` is None unless a stand-in is set."""

        video_processor: Any = None

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        @classmethod
        def get_attributes(cls) -> list[str]:
            # Saving and loading then skip the video part, so a folder round-trips without torchvision.
            return [name for name in processor_class.get_attributes() if name != "video_processor"]

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_class.__name__
    return ImageOnlyProcessor


def load_processor_without_video(source: str, revision: str | None, video_processor: Any) -> Any:
    """A saved or hub processor of an image-and-video family loaded without its video part (whose class needs
    torchvision), with ``video_processor`` (a stand-in or None) in its place."""
    import json

    import transformers
    from transformers.utils import cached_file

    config_file = cached_file(source, "processor_config.json", revision=revision)
    if config_file is None:
        raise OSError(f"{source} has no processor_config.json")
    name = json.loads(Path(config_file).read_text()).get("processor_class")
    processor_class = getattr(transformers, str(name), None)
    if processor_class is None:
        raise OSError(f"{source}'s processor class {name!r} is not in this transformers")
    processor = without_video_processor(processor_class).from_pretrained(
        source, revision=revision, video_processor=video_processor
    )
    processor.video_processor = video_processor
    return processor


def device_map(model: Any) -> dict[str, str] | None:
    """Where accelerate placed each module of a model loaded with a device map (None: one device)."""
    placement = getattr(model, "hf_device_map", None)
    if not placement:
        return None
    return {str(module): str(device) for module, device in placement.items()}


# --- the latency mode's own decoder loop (analysis.pruner.latency) --------------------------------------------------
class _Captured(Exception):
    """Raised by a pre-hook to stop a forward once the language model's inputs are known."""


def language_model_embeddings(model: HFModel, text_model: nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The merged input embeddings (B, T, D) a multimodal model hands its language model (vision tower included),
    without running the language model."""
    received: list[torch.Tensor] = []

    def stop(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        embeds = kwargs.get("inputs_embeds")
        if isinstance(embeds, torch.Tensor):
            received.append(embeds)
        raise _Captured

    handle = text_model.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(**tensors, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not received:
        raise compatibility_error("the multimodal model called its language model without input embeddings")
    return received[0]


def rotary_embeddings(text_model: HFModel, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rotary (cos, sin) the text model gives its decoder layers for ``positions`` ((B, T), or (3, B, T) M-RoPE)."""
    return tuple(text_model.rotary_emb(hidden, positions))


def decoder_layer_kwargs(
    layer: nn.Module,
    cache: Any,
    attention_mask: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, ...],
) -> dict[str, Any]:
    """Keyword arguments of one decoder layer's call with our mask, positions and KV store."""
    return {
        "attention_mask": attention_mask,
        "position_embeddings": position_embeddings,
        "position_ids": None,
        **cache_kwargs(layer, cache),
    }


def call_decoder_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One decoder layer's output hidden states."""
    return layer_output_hidden(layer(hidden, **kwargs))


class StaticKV:
    """Per-layer key and value buffers of fixed size that decoder layers write into: the KV cache of the latency mode.

    Decoder layers call ``update`` as they would a transformers cache's. In a prefill a layer's keys go to the front
    of its buffers and the pass attends to those keys alone; in a decoding step the new key goes to the slot
    ``prefill width + step`` (``step`` a device tensor, so a CUDA graph can replay it) and the step attends to the
    layer's whole window of ``prefill width + new tokens`` slots, unused ones masked by the caller.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.prefill_width = [0] * num_layers
        self.window = [0] * num_layers
        self.decoding = False
        self.step: torch.Tensor | None = None  # (1,) long: the decoding step (0 for the first generated token)

    def reserve(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
        """Buffers of at least ``shape`` (B, H_kv, slots, d) in every layer; True when new ones were allocated."""
        current = self.keys[0]
        if (
            current is not None
            and current.shape[:2] == shape[:2]
            and current.shape[3] == shape[3]
            and current.shape[2] >= shape[2]
            and current.dtype == dtype
            and current.device == device
        ):
            return False
        for layer in range(len(self.keys)):
            self.keys[layer] = torch.zeros(shape, dtype=dtype, device=device)
            self.values[layer] = torch.zeros(shape, dtype=dtype, device=device)
        return True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys and values; return the keys and values its attention reads."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if keys is None or values is None:
            raise RuntimeError("StaticKV.update before its buffers were reserved")
        if not self.decoding:
            width = key_states.shape[2]
            keys[:, :, :width].copy_(key_states)
            values[:, :, :width].copy_(value_states)
            self.prefill_width[layer_idx] = width
            return key_states, value_states
        if self.step is None:
            raise RuntimeError("StaticKV decoding without a step")
        slot = self.step + self.prefill_width[layer_idx]
        keys.index_copy_(2, slot, key_states)
        values.index_copy_(2, slot, value_states)
        window = self.window[layer_idx]
        return keys[:, :, :window], values[:, :, :window]


# Generation-config settings that change greedy decoding (a logits processor or a stopping rule besides EOS), with
# the value that leaves it off.
_GREEDY_NEUTRAL: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "min_new_tokens": None,
    "stop_strings": None,
}


def greedy_processors(model: HFModel) -> list[str]:
    """The settings of a model's generation config that make its greedy ``generate`` more than an argmax loop."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    found = []
    for name, neutral in _GREEDY_NEUTRAL.items():
        value = getattr(config, name, neutral)
        if value not in (neutral, None, 0, [], {}) and not (name.endswith("penalty") and value == 1.0):
            found.append(f"{name}={value!r}")
    if (getattr(config, "min_length", 0) or 0) > 0:
        found.append(f"min_length={config.min_length!r}")
    return found


def flat_image_features(output: Any) -> torch.Tensor:
    """The projected image features of a ``get_image_features`` call as one (image tokens, D) tensor, in the order
    the model scatters them into its image positions (releases return a tensor, a list per image, or an output
    object holding either)."""
    features = getattr(output, "pooler_output", output)
    if isinstance(features, (list, tuple)):
        features = torch.cat([part.reshape(-1, part.shape[-1]) for part in features])
    if not isinstance(features, torch.Tensor):
        raise compatibility_error(f"get_image_features returned {type(output).__name__}, not image features")
    return features.reshape(-1, features.shape[-1])
