"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024): after layer K-1, keep the R image
tokens the last prompt position attends to most (mean over heads), drop the rest for layers K and on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.hooks.attention import LastRowObservation
from analysis.pruner.methods.base import MethodConfig, PruningMethod, SelectionState


@dataclass(frozen=True)
class FastVConfig(MethodConfig):
    """FastV's K (the first layer without the pruned tokens) and the number of image tokens kept."""

    prune_layer: int = 2
    keep_tokens: int = 64


def one_shot_problems(prune_layer: int, keep_tokens: int, num_layers: int) -> list[str]:
    """The limits of a selection made once after layer ``prune_layer - 1``."""
    problems = []
    if num_layers and not 1 <= prune_layer < num_layers:
        problems.append(f"prune_layer {prune_layer} outside 1..{num_layers - 1}")
    if keep_tokens < 0:
        problems.append("keep_tokens must be >= 0")
    return problems


def image_keys(observation: LastRowObservation) -> torch.Tensor:
    """(B, N) which of the observation's keys are each sample's image tokens (an executor always sets them)."""
    if observation.image_index is None:
        raise RuntimeError("a pruning executor must say where the image tokens are (LastRowObservation.image_index)")
    return observation.image_index


def keep_chosen(state: SelectionState, layer: int, chosen: list[torch.Tensor]) -> None:
    """Keep each sample's ``chosen`` image-token ordinals, selected at ``layer``."""
    keep = torch.zeros_like(state.image_valid)
    for row, ordinals in enumerate(chosen):
        keep[row, ordinals] = True
    state.keep = keep
    state.selection_layer[:] = layer


class FastV(PruningMethod):
    """Top-R image tokens by the last row's head-mean attention, once."""

    name = "fastv"
    config_type = FastVConfig
    label = "FastV"
    description = "FastV: keep the image tokens the last position attends to most, from layer K on"
    sweep_baseline = True
    params: FastVConfig

    def problems(self, num_layers: int) -> list[str]:
        """K inside the model, a non-negative budget."""
        return one_shot_problems(self.params.prune_layer, self.params.keep_tokens, num_layers)

    def observes(self, layer: int, state: SelectionState) -> bool:
        """Layer K-1, whose attention ranks the tokens."""
        return layer == self.params.prune_layer - 1

    splits_decision = True

    def decide(self, state: SelectionState, observation: LastRowObservation) -> None:
        """Keep the most attended image tokens of each sample."""
        self.apply(state, observation.layer, self.measure(state, observation))

    def measure(self, state: SelectionState, observation: LastRowObservation) -> dict[str, torch.Tensor]:
        """Each image token's head-mean attention from the last row (-1 on padding)."""
        weights = torch.gather(observation.weights.mean(1), 1, image_keys(observation))
        return {"weights": weights.masked_fill(~state.image_valid, -1.0)}

    def apply(self, state: SelectionState, layer: int, measured: dict[str, torch.Tensor]) -> None:
        """Keep each sample's most attended tokens."""
        weights = measured["weights"]
        # One top-k for the batch, nothing read back: padding weighs -1 below every real token, so a row with fewer
        # tokens than the budget picks all of them and some padding, which the valid mask drops.
        top = weights.topk(min(self.params.keep_tokens, weights.shape[1]), dim=1).indices
        keep = torch.zeros_like(state.image_valid).scatter_(1, top, True)
        state.keep = keep & state.image_valid
        state.selection_layer[:] = layer

    def first_pruned_layer(self) -> int | None:
        """K."""
        return self.params.prune_layer

    def settings(self) -> str:
        """K and the budget."""
        return f"K={self.params.prune_layer} keep={self.params.keep_tokens}"
