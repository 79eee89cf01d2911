"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs", NeurIPS 2025, arXiv 2506.10967): before the language model, keep the image tokens that a determinantal point
process conditioned on the instruction rates most diverse, by greedy MAP inference.

The rule follows the authors' code (GitHub ``Theia-4869/CDPruner``, ``llava/model/llava_arch.py``, ``encode_images``,
lines 141-187): the similarity of the projected image features (cosine, lines 150-153), a relevance of each image token
to the instruction (mean cosine over the instruction's tokens, negated and min-max normalised, lines 155-160), the
kernel ``relevance_i * similarity_ij * relevance_j`` (line 167) and the fast greedy MAP of Chen et al. (NeurIPS 2018;
lines 169-183).

The closest faithful variant, because no checkpoint here has the CLIP text tower the code embeds the instruction with:
the relevance compares the projected image features with the language model's input embeddings of the prompt text
after the image (the question and the template's tail), the two sides the language model itself receives, in one space.
The sign and normalisation stay the code's (``negate_relevance``); the min-max runs per sample (the code's runs over
the batch, which makes a sample's tokens depend on its batch-mates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from analysis.pruner.methods.base import HiddenObservation, MethodConfig, PruningMethod, SelectionState

RELEVANCE_EPSILON = 1e-6  # the code's floor, so no token's relevance (and kernel row) is exactly zero
RANK_TOLERANCE = 1e-6  # a gain below this share of the largest diagonal entry adds no volume (rank used up)


@dataclass(frozen=True)
class CDPrunerConfig(MethodConfig):
    """How many image tokens enter the language model, and the relevance's sign (the authors' code negates it)."""

    keep_tokens: int = 64
    negate_relevance: bool = True


def conditional_kernel(image: torch.Tensor, text: torch.Tensor, negate: bool = True) -> torch.Tensor:
    """(N, N) the conditional DPP kernel of one sample's image features (N, D) given its instruction's (M, D)."""
    image_unit = F.normalize(image.float(), dim=-1)
    similarity = image_unit @ image_unit.T
    relevance = (image_unit @ F.normalize(text.float(), dim=-1).T).mean(dim=-1)
    if negate:
        relevance = -relevance
    span = (relevance.max() - relevance.min()).clamp_min(RELEVANCE_EPSILON)
    relevance = (relevance - relevance.min() + RELEVANCE_EPSILON) / span
    return relevance[:, None] * similarity * relevance[None, :]


def greedy_dpp(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """The indices (in selection order) that greedy DPP MAP inference on ``kernel`` picks, ``count`` of them."""
    count = min(count, kernel.shape[0])
    valid = torch.ones(1, kernel.shape[0], dtype=torch.bool, device=kernel.device)
    return greedy_dpp_batch(kernel[None], valid, count)[0]


def greedy_dpp_batch(kernels: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) greedy DPP MAP picks, in selection order, for B kernels (B, N, N) whose items ``valid`` (B, N)
    marks; every row needs at least ``count`` valid items.

    Each step adds the item that most increases the determinant of the selected submatrix, kept as Cholesky
    factors updated by one row per step (Chen et al. 2018), so no determinant is recomputed. Once no item adds
    volume (the kernel's rank is used up), the rest are taken by the kernel's diagonal. The rows run together and
    nothing is read back to the host, so a batch costs ``count`` small kernel launches, not ``count`` syncs per row.
    """
    batch, n, _ = kernels.shape
    rows = torch.arange(batch, device=kernels.device)
    diagonal = torch.diagonal(kernels, dim1=1, dim2=2).masked_fill(~valid, -float("inf"))
    gains = diagonal.clone()  # the squared Cholesky diagonal each candidate would add
    by_diagonal = diagonal.clone()  # the fallback order once the rank is used up
    floor = RANK_TOLERANCE * gains.amax(dim=1).clamp_min(0)
    factors = kernels.new_zeros(batch, count, n)
    exhausted = torch.zeros(batch, dtype=torch.bool, device=kernels.device)
    chosen = torch.empty(batch, count, dtype=torch.long, device=kernels.device)
    for step in range(count):
        best_gain, best = gains.max(dim=1)
        # Duplicate patches make the kernel low-rank: once no item adds volume, dividing by a vanishing gain would
        # only spread rounding noise (the authors' loop turns it into NaN picks), so such a row goes on by the
        # diagonal (relevance squared) and its factors stop changing.
        exhausted |= best_gain <= floor
        pick = torch.where(exhausted, by_diagonal.argmax(dim=1), best)
        chosen[:, step] = pick
        picked_gain = gains[rows, pick].clamp_min(torch.finfo(gains.dtype).tiny)
        projected = torch.einsum("bs,bsn->bn", factors[rows, :step, pick], factors[:, :step])
        row = (kernels[rows, pick] - projected) / picked_gain.sqrt()[:, None]
        row = torch.where(exhausted[:, None], torch.zeros_like(row), row)
        factors[:, step] = row
        gains = gains - row.square()
        gains[rows, pick] = -float("inf")
        by_diagonal[rows, pick] = -float("inf")
    return chosen


class CDPruner(PruningMethod):
    """Greedy conditional-DPP MAP over the image tokens, before layer 0."""

    name = "cdpruner"
    config_type = CDPrunerConfig
    label = "CDPruner"
    description = "CDPruner: keep the image tokens a DPP given the instruction rates most diverse, before the LLM"
    sweep_baseline = True
    params: CDPrunerConfig

    def problems(self, num_layers: int) -> list[str]:
        """A non-negative budget."""
        return [] if self.params.keep_tokens >= 0 else ["keep_tokens must be >= 0"]

    def reads_hidden(self, layer: int) -> bool:
        """The language model's input embeddings."""
        return layer == 0

    def decide_hidden(self, state: SelectionState, observation: HiddenObservation) -> None:
        """Select each sample's tokens from its image features and instruction embeddings."""
        keep = torch.zeros_like(state.image_valid)
        counts = state.image_valid.sum(1).tolist()
        pruned = [row for row, n_image in enumerate(counts) if self.params.keep_tokens < n_image]
        for row, n_image in enumerate(counts):
            if row not in pruned:
                keep[row, :n_image] = True
        if pruned:
            width = max(counts[row] for row in pruned)
            kernels = observation.hidden.new_zeros(len(pruned), width, width, dtype=torch.float32)
            valid = torch.zeros(len(pruned), width, dtype=torch.bool, device=kernels.device)
            for slot, row in enumerate(pruned):
                n_image = counts[row]
                image = observation.hidden[row, observation.image_index[row, :n_image]]
                text = observation.hidden[row, observation.text_after_image[row]]
                kernels[slot, :n_image, :n_image] = conditional_kernel(image, text, self.params.negate_relevance)
                valid[slot, :n_image] = True
            picks = greedy_dpp_batch(kernels, valid, self.params.keep_tokens).to(keep.device)
            keep[torch.tensor(pruned, device=keep.device)[:, None], picks] = True
        state.keep = keep
        state.before_llm = True

    def first_pruned_layer(self) -> int | None:
        """Layer 0."""
        return 0

    def settings(self) -> str:
        """The budget."""
        return f"keep={self.params.keep_tokens}"
