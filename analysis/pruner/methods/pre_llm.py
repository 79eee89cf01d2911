"""Pre-LLM pruning: evenly spaced image tokens kept before the language model (the uniform spatial subsampling that
methods which prune in the projector, e.g. average-pooling resamplers, amount to), dropped from layer 0 on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from analysis.pruner.methods.base import MethodConfig, PruningMethod, SelectionState


@dataclass(frozen=True)
class PreLLMConfig(MethodConfig):
    """How many image tokens enter the language model."""

    keep_tokens: int = 64


class PreLLM(PruningMethod):
    """Evenly spaced image tokens, chosen before layer 0."""

    name = "pre_llm"
    config_type = PreLLMConfig
    label = "before the LLM"
    description = "pre-LLM: keep evenly spaced image tokens before the language model"
    sweep_baseline = True
    params: PreLLMConfig

    def problems(self, num_layers: int) -> list[str]:
        """A non-negative budget."""
        return [] if self.params.keep_tokens >= 0 else ["keep_tokens must be >= 0"]

    def start(self, state: SelectionState) -> None:
        """Keep ``keep_tokens`` evenly spaced tokens of each sample, for every layer."""
        keep = torch.zeros_like(state.image_valid)
        for row, n in enumerate(state.image_valid.sum(1).tolist()):
            spread = np.linspace(0, n - 1, num=min(self.params.keep_tokens, n)).round().astype(int)
            chosen = np.unique(spread) if self.params.keep_tokens else np.zeros(0, dtype=int)
            keep[row, torch.as_tensor(chosen, dtype=torch.long)] = True
        state.keep = keep
        state.before_llm = True

    def first_pruned_layer(self) -> int | None:
        """Layer 0."""
        return 0

    def settings(self) -> str:
        """The budget."""
        return f"keep={self.params.keep_tokens}"
