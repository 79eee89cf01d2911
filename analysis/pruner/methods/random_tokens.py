"""Random pruning: FastV's schedule with the kept image tokens drawn uniformly at random (seeded), the control that
UniPruneBench (arXiv 2511.02650) finds strong at high pruning ratios."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.hooks.attention import LastRowObservation
from analysis.pruner.methods.base import MethodConfig, PruningMethod, SelectionState
from analysis.pruner.methods.fastv import keep_chosen, one_shot_problems


@dataclass(frozen=True)
class RandomConfig(MethodConfig):
    """The first layer without the pruned tokens, the number kept and the seed of the draw."""

    prune_layer: int = 2
    keep_tokens: int = 64
    seed: int = 0


class RandomTokens(PruningMethod):
    """A seeded uniform draw of image tokens, once, after layer K-1."""

    name = "random"
    config_type = RandomConfig
    label = "random"
    description = "random: keep a seeded random subset of the image tokens from layer K on"
    sweep_baseline = True
    params: RandomConfig

    def problems(self, num_layers: int) -> list[str]:
        """K inside the model, a non-negative budget."""
        return one_shot_problems(self.params.prune_layer, self.params.keep_tokens, num_layers)

    def observes(self, layer: int, state: SelectionState) -> bool:
        """Layer K-1 (the draw needs no attention, but the tokens go at the same place as FastV's)."""
        return layer == self.params.prune_layer - 1

    def decide(self, state: SelectionState, observation: LastRowObservation) -> None:
        """Draw each sample's kept tokens, samples in batch order from one seeded generator."""
        generator = torch.Generator().manual_seed(self.params.seed)
        device = state.image_valid.device
        chosen = [
            torch.randperm(n, generator=generator)[: min(self.params.keep_tokens, n)].to(device)
            for n in state.image_valid.sum(1).tolist()
        ]
        keep_chosen(state, observation.layer, chosen)

    def first_pruned_layer(self) -> int | None:
        """K."""
        return self.params.prune_layer

    def settings(self) -> str:
        """K and the budget."""
        return f"K={self.params.prune_layer} keep={self.params.keep_tokens}"
