"""What the toolkit relies on in transformers' call conventions and KV-cache internals, in one place.

transformers renames call arguments between minor releases (5.24 passes the KV cache to the text model as
``cache=`` where 5.23 passed ``past_key_values=``). Everything that depends on such a name or on the cache's
methods goes through this module, so the next rename is one edit here; callers never spell them.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any

import torch
from torch import nn

from analysis.errors import ToolkitError

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
    return (f"transformers {installed} is outside the range this toolkit was tested on ({declared}); results may "
            f"differ or commands fail: pip install 'transformers{declared}'")


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
def _cache_parameter(forward_type: type) -> str:
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
    return {_cache_parameter(type(module)): cache, "use_cache": True}


@dataclass(frozen=True)
class TextModelCall:
    """What a call of the text model (embeddings, decoder layers, final norm) carries that the toolkit reads."""

    length: int  # tokens in this pass
    device: torch.device
    attention_mask: Any  # the 2-D padding mask, or whatever else the caller passed (None if nothing)
    position_ids: torch.Tensor | None
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
    return TextModelCall(int(source.shape[1]), source.device, kwargs.get("attention_mask"),
                         kwargs.get("position_ids"), call_cache(kwargs))


def with_position_ids(kwargs: dict[str, Any], position_ids: torch.Tensor) -> dict[str, Any]:
    """A text-model call's keyword arguments with explicit position ids."""
    return {**kwargs, "position_ids": position_ids}


def layer_hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a decoder layer's forward call receives."""
    return args[0] if args else kwargs["hidden_states"]


def with_layer_hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[
    tuple[Any, ...], dict[str, Any]
]:
    """A decoder layer's call arguments with new hidden states."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def layer_positions(kwargs: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...] | None, torch.Tensor | None]:
    """A decoder layer call's rotary position embeddings (cos, sin) and its position ids (either may be None)."""
    return kwargs.get("position_embeddings"), kwargs.get("position_ids")


def layer_overrides(attention_mask: torch.Tensor | None, position_embeddings: tuple[torch.Tensor, ...] | None = None,
                    position_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Keyword arguments that give a decoder layer its own mask and (optionally) positions."""
    overrides: dict[str, Any] = {"attention_mask": attention_mask}
    if position_embeddings is not None:
        overrides["position_embeddings"] = position_embeddings
    if position_ids is not None:
        overrides["position_ids"] = position_ids
    return overrides


def text_model_output_hidden(output: Any) -> torch.Tensor:
    """The final hidden states of a text-model output."""
    return output.last_hidden_state


def set_text_model_output_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """A text-model output with its final hidden states replaced."""
    output.last_hidden_state = hidden
    return output
