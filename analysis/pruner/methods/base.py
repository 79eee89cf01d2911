"""The pruning-method interface both executors run: which layers a rule observes, what it decides, its FLOPs profile.

A method is one file: a typed config (a ``MethodConfig`` dataclass of its parameters, read by name from a pruning
config) and a ``PruningMethod`` subclass. The executors (``simulate.PruningHooks`` with attention masks,
``runtime.PrunedRuntime`` dropping tokens) own the per-sample state and call the method; they never ask which
method they run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from analysis.errors import ConfigError, ModelError
from analysis.hooks.attention import LastRowObservation
from analysis.models.adapters import FamilyAdapter, VisionAttention


@dataclass(frozen=True)
class MethodConfig:
    """A method's parameters; subclasses declare them as fields with the papers' defaults."""

    @classmethod
    def from_values(cls, source: Any) -> MethodConfig:
        """The parameters read by name from a pruning config: its ``options`` first, then its own fields."""
        options = getattr(source, "options", None) or {}
        values = {}
        for field in dataclasses.fields(cls):
            if field.name in options:
                values[field.name] = options[field.name]
            elif hasattr(source, field.name):
                values[field.name] = getattr(source, field.name)
        return cls(**values)

    @classmethod
    def parameter_names(cls) -> list[str]:
        """The names of the method's parameters."""
        return [field.name for field in dataclasses.fields(cls)]


@dataclass(frozen=True)
class HiddenObservation:
    """The hidden states entering a decoder layer in the prefill, in float32, addressed as the executor holds them."""

    layer: int
    hidden: torch.Tensor  # (B, T, D) the layer's input: the embeddings for layer 0, else the previous layer's output
    image_index: torch.Tensor  # (B, N) index along T of each sample's image tokens (0 where absent)
    text_after_image: torch.Tensor  # (B, T) bool: prompt text after the sample's last image token
    final_norm: Callable[[torch.Tensor], torch.Tensor]  # the model's norm after its last layer (float32 in and out)
    vision: VisionAttention | None = None  # the vision tower's pass over the batch's images (``reads_vision``)


class SelectionState(Protocol):
    """The per-sample decisions an executor holds and a method updates (tensors of the batch)."""

    image_index: torch.Tensor  # (B, N) padded input positions of each sample's image tokens (0 where absent)
    image_valid: torch.Tensor  # (B, N) bool
    keep: torch.Tensor  # (B, N) bool: image tokens kept once a selection applies
    stage_drops: torch.Tensor  # (B, N) long: layer after which a staged rule (PyramidDrop) dropped a token; -1 never
    selection_layer: torch.Tensor  # (B,) layer whose attention the rule read (tokens go from the next); -1: never
    exit_layer: torch.Tensor  # (B,) layer after which every image token goes; -1: never
    negligible: torch.Tensor  # (B,) observed layers so far in which the kept tokens changed nothing
    before_llm: bool  # the selection applies from layer 0 on (made before the language model)
    # Replacement input embeddings of kept image tokens (merged tokens, VisionZip), written into layer 0's input.
    image_embeddings: torch.Tensor | None  # (B, N, D) float32, or None: no token's embedding changes
    rewritten: torch.Tensor | None  # (B, N) bool: which image tokens take their row of ``image_embeddings``


class PruningMethod:
    """One pruning method's rule. The defaults describe a method that never observes and never prunes."""

    name: ClassVar[str]
    config_type: ClassVar[type[MethodConfig]] = MethodConfig
    description: ClassVar[str] = ""
    label: ClassVar[str] = ""  # how figures name it (default: its name)
    prunes: ClassVar[bool] = True  # False: the model runs unchanged (the unpruned reference)
    sweep_baseline: ClassVar[bool] = False  # compared with VisiPruner at matched FLOPs by ``pruner sweep``
    # True: the rule reads the vision tower (``HiddenObservation.vision`` at layer 0), which the family must offer.
    reads_vision: ClassVar[bool] = False

    def __init__(self, params: MethodConfig) -> None:
        if not isinstance(params, self.config_type):
            raise ConfigError(f"{self.name} takes a {self.config_type.__name__}, not a {type(params).__name__}")
        self.params = params

    def problems(self, num_layers: int) -> list[str]:
        """What is wrong with the parameters for a model of ``num_layers`` layers (0: depth unknown)."""
        return []

    def unsupported(self, adapter: FamilyAdapter) -> str | None:
        """Why the method cannot run on ``adapter``'s model (None: it can): a vision-reading rule needs the tower
        view the family offers."""
        if not self.reads_vision:
            return None
        try:
            with adapter.vision_attention():
                return None
        except ModelError as error:
            return str(error)

    # -- the rule --------------------------------------------------------------------------------
    def start(self, state: SelectionState) -> None:
        """Decisions made before the language model runs (the pre-LLM baseline chooses its tokens here)."""

    def observes(self, layer: int, state: SelectionState) -> bool:
        """Whether the rule reads ``layer``'s last-row attention during the prefill."""
        return False

    def decide(self, state: SelectionState, observation: LastRowObservation) -> None:
        """Update the decisions from one observed layer's last-row attention (its ``image_index`` says which of its
        keys are each sample's image tokens)."""

    # A method may split ``decide`` into ``measure``, device work that reads nothing back (so the latency mode can
    # replay it as a CUDA graph), and ``apply``, the host's update from what was measured.
    splits_decision: ClassVar[bool] = False
    # Whether the rule drops tokens in stages (``stage_drops``); executors skip looking there otherwise.
    drops_in_stages: ClassVar[bool] = False

    def measure(self, state: SelectionState, observation: LastRowObservation) -> dict[str, torch.Tensor]:
        """The device-side part of ``decide`` (methods with ``splits_decision``)."""
        raise NotImplementedError(f"{self.name} does not split its decision")

    def apply(self, state: SelectionState, layer: int, measured: dict[str, torch.Tensor]) -> None:
        """The host-side part of ``decide``, from ``measure``'s tensors (methods with ``splits_decision``)."""
        raise NotImplementedError(f"{self.name} does not split its decision")

    def deferrable(self, state: SelectionState, layer: int, deferred: int) -> int:
        """How many observed layers from ``layer`` on can leave their host update to a later layer's ``apply``, with
        ``deferred`` layers already left since the last: their tests cannot change a decision before then (0: apply
        at this layer)."""
        return 0

    def defer(self, measured: dict[str, torch.Tensor], pending: torch.Tensor) -> None:
        """Fold a deferred layer's measured tests into ``pending`` (B,) on the device; the next ``apply`` receives it
        as ``measured["pending"]`` (methods whose ``deferrable`` can be positive)."""
        raise NotImplementedError(f"{self.name} does not defer its decision")

    def reads_hidden(self, layer: int) -> bool:
        """Whether the rule reads the hidden states entering ``layer`` in the prefill (before the layer runs, so a
        selection made there applies from ``layer`` on: set ``selection_layer`` to ``layer - 1``)."""
        return False

    def decide_hidden(self, state: SelectionState, observation: HiddenObservation) -> None:
        """Update the decisions from the hidden states entering one layer."""

    # -- the shallow stage (text->image attention removed in early layers) -------------------------------
    def shallow_rule(self, layer: int, decoding: bool) -> str | None:
        """How ``layer`` removes text->image attention: "mask" (before the softmax), "zero" (after), or None."""
        return None

    def layer0_rule(self) -> str:
        """The zeroing rule of layer 0 under the "zero" shallow rule (see ``pruner.config.LAYER0_RULES``)."""
        return "none"

    # -- cost ----------------------------------------------------------------------------------
    def text_blind_layers(self) -> int:
        """Leading layers whose text queries skip the image keys (their attention FLOPs are saved)."""
        return 0

    def first_pruned_layer(self) -> int | None:
        """For a one-shot method: the first layer that runs without the pruned tokens (None: not one-shot)."""
        return None

    # The parameter ``pruner sweep`` varies to match a FLOPs cut (a PruningConfig field, or one of the method's
    # options), and the image tokens each layer then processes for a sample of ``n_image`` (None: the count depends
    # on the data, as VisiPruner's does).
    budget_parameter: ClassVar[str] = "keep_tokens"

    def budget_values(self, n_image: int) -> list[Any]:
        """The values of ``budget_parameter`` a FLOPs match searches, for samples of up to ``n_image`` image tokens."""
        return list(range(n_image + 1))

    def image_tokens(self, layer: int, n_image: int) -> int | None:
        """Image tokens ``layer`` processes in the prefill of a sample with ``n_image`` (None: data-dependent).

        The default serves one-shot methods: all of them before ``first_pruned_layer``, then ``keep_tokens``."""
        first, keep = self.first_pruned_layer(), getattr(self.params, "keep_tokens", None)
        if first is None or keep is None:
            return None
        return n_image if layer < first else min(int(keep), n_image)

    def settings(self) -> str:
        """A short description of the parameters (sweep tables)."""
        return " ".join(f"{name}={value}" for name, value in dataclasses.asdict(self.params).items())
