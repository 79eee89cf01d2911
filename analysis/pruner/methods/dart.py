"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
arXiv 2502.11494): before layer K, keep a few pivot tokens and, for each pivot, the image tokens least similar to it,
so the kept set holds little duplication. No attention weights are read, so it runs on SDPA.

The rule follows the authors' code (GitHub ``xqy1111111/DART``, ``llava/model/language_model/modeling_llama_self.py``):
lines 336-355 select at layer K from the previous layer's output after the final norm and that layer's keys (after
RoPE); ``get_retained_image_token`` (lines 397-440) takes the image and text pivots with the largest key L1 norm (the
text pivots among the tokens after the image), then for each pivot the ``TOKEN_TOPK`` remaining image tokens of lowest
cosine similarity to it, and keeps the image pivots and those tokens. Defaults are theirs (K = 2, 4 + 4 pivots).

Deviations, so that budgets are exact and decisions do not depend on the batch:

- ``keep_tokens`` counts every kept image token, the image pivots included; the code keeps the pivots on top of its
  budget (``max_num_trunction`` 128 keeps 4 + 8 x 16 = 132). The budget left after the image pivots is shared
  evenly among the pivots, the first ones taking one more where it does not divide (the code drops the remainder).
- Pivots are served in sequence order; the code iterates a Python set, which for small integers is usually that.
- Each sample selects from its own tokens (the code reads row 0 of the batch).

RoPE keeps a key's L2 norm but not its L1 norm, so the pivots depend on absolute positions: a left-padded batch gives
each sample its single-run tokens when positions count from the sample's first token, as generation numbers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from analysis.hooks.attention import LastRowObservation
from analysis.pruner.methods.base import HiddenObservation, MethodConfig, PruningMethod, SelectionState
from analysis.pruner.methods.fastv import image_keys, keep_chosen, one_shot_problems


@dataclass(frozen=True)
class DARTConfig(MethodConfig):
    """DART's K (the first layer without the pruned tokens), its budget and its pivot counts."""

    prune_layer: int = 2
    keep_tokens: int = 128
    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4


def dart_selection(
    image_key_norms: torch.Tensor,
    text_key_norms: torch.Tensor,
    image_states: torch.Tensor,
    text_states: torch.Tensor,
    keep: int,
    pivot_image: int,
    pivot_text: int,
) -> torch.Tensor:
    """The ordinals (sorted) of the image tokens DART keeps for one sample.

    ``image_key_norms`` (N,) and ``text_key_norms`` (M,) are the key L1 norms of its image tokens and of the text
    after them; ``image_states`` (N, D) and ``text_states`` (M, D) their normed hidden states.
    """
    n_image = image_key_norms.shape[0]
    if keep >= n_image:
        return torch.arange(n_image, device=image_key_norms.device)
    if keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=image_key_norms.device)
    image_pivots = image_key_norms.topk(min(pivot_image, keep)).indices.sort().values
    text_pivots = text_key_norms.topk(min(pivot_text, text_key_norms.shape[0])).indices.sort().values
    pivot_states = torch.cat([image_states[image_pivots], text_states[text_pivots]])
    remaining = torch.ones(n_image, dtype=torch.bool, device=image_key_norms.device)
    remaining[image_pivots] = False
    budget = keep - len(image_pivots)
    quota, extra = divmod(budget, len(pivot_states))
    chosen = [image_pivots]
    for index, pivot in enumerate(pivot_states):
        take = min(quota + (1 if index < extra else 0), int(remaining.sum()))
        if take == 0:
            continue
        similarity = F.cosine_similarity(pivot[None, :], image_states, dim=-1).masked_fill(~remaining, float("inf"))
        least_similar = (-similarity).topk(take).indices
        chosen.append(least_similar)
        remaining[least_similar] = False
    return torch.cat(chosen).sort().values


class DART(PruningMethod):
    """Pivots by key norm, then per pivot the least similar image tokens, once before layer K."""

    name = "dart"
    config_type = DARTConfig
    label = "DART"
    description = "DART: keep pivot tokens and the image tokens least duplicating them, from layer K on"
    sweep_baseline = True
    params: DARTConfig

    def __init__(self, params: MethodConfig) -> None:
        super().__init__(params)
        self._key_norms: torch.Tensor | None = None  # (B, T) key L1 norms of layer K-1, until layer K decides

    def problems(self, num_layers: int) -> list[str]:
        """K inside the model, a non-negative budget, at least one pivot."""
        problems = one_shot_problems(self.params.prune_layer, self.params.keep_tokens, num_layers)
        if self.params.pivot_image_tokens < 0 or self.params.pivot_text_tokens < 0:
            problems.append("pivot counts must be >= 0")
        elif self.params.pivot_image_tokens + self.params.pivot_text_tokens == 0:
            problems.append("DART needs at least one pivot token")
        return problems

    def observes(self, layer: int, state: SelectionState) -> bool:
        """Layer K-1, whose keys rank the pivots."""
        return layer == self.params.prune_layer - 1

    def decide(self, state: SelectionState, observation: LastRowObservation) -> None:
        """Keep the key L1 norms (over every head) of layer K-1 for the selection before layer K."""
        image_keys(observation)  # an executor must address the image tokens
        self._key_norms = observation.keys.abs().sum(dim=(1, 3))

    def reads_hidden(self, layer: int) -> bool:
        """The states entering layer K (layer K-1's output)."""
        return layer == self.params.prune_layer

    def decide_hidden(self, state: SelectionState, observation: HiddenObservation) -> None:
        """Select each sample's image tokens from its pivots."""
        if self._key_norms is None:
            raise RuntimeError("DART reached layer K without layer K-1's keys; the executor skipped an observation")
        norms = self._key_norms
        normed = observation.final_norm(observation.hidden)
        chosen = []
        for row, n_image in enumerate(state.image_valid.sum(1).tolist()):
            image = observation.image_index[row, :n_image]
            text = observation.text_after_image[row].nonzero().flatten()
            ordinals = dart_selection(
                norms[row, image],
                norms[row, text],
                normed[row, image],
                normed[row, text],
                self.params.keep_tokens,
                self.params.pivot_image_tokens,
                self.params.pivot_text_tokens,
            )
            chosen.append(ordinals.to(state.image_valid.device))
        keep_chosen(state, observation.layer - 1, chosen)
        self._key_norms = None

    def first_pruned_layer(self) -> int | None:
        """K."""
        return self.params.prune_layer

    def settings(self) -> str:
        """K, the budget and the pivots."""
        p = self.params
        return f"K={p.prune_layer} keep={p.keep_tokens} pivots={p.pivot_image_tokens}+{p.pivot_text_tokens}"
