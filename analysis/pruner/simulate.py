"""Pruning applied as attention masks: exact in outputs, not in speed.

Dropping a token from the sequence from layer L on changes the remaining tokens' computation exactly as
hiding it as a key from every query in layers >= L does (RoPE positions are kept either way), so these
hooks give the pruned model's answers, the per-sample decisions and the token counts that FLOPs are
computed from. Selections are decided once per sample during the prefill and persist while decoding,
as each layer's KV cache keeps what that layer had at prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from analysis.hooks.attention import (
    AttentionHooks,
    LastRowObservation,
    RegionMasks,
    ZeroedEdges,
    extend_membership,
)
from analysis.hooks.contributions import image_contributions, image_index_tensors
from analysis.layout import TokenLayout
from analysis.pruner.config import PruningConfig
from analysis.pruner.flops import DecoderShape, LayerTokens, prefill_flops


@dataclass
class Decisions:
    """Per-sample pruning decisions made during the prefill."""

    selection_layer: np.ndarray  # (B,) layer whose rule fired (-1: never)
    exit_layer: np.ndarray  # (B,) layer after which all image tokens go (-1: never)
    kept: list[list[int]]  # kept image-token ordinals per sample (after selection)
    n_image: list[int]

    def tokens_per_layer(self, row: int, prompt_length: int, num_layers: int) -> list[LayerTokens]:
        """Tokens each layer processes for one sample in the prefill."""
        n_image, n_kept = self.n_image[row], len(self.kept[row])
        counts = []
        for layer in range(num_layers):
            image = n_image
            if 0 <= self.selection_layer[row] < layer:
                image = n_kept
            if 0 <= self.exit_layer[row] < layer:
                image = 0
            counts.append(LayerTokens(prompt_length - n_image + image, image))
        return counts


@dataclass(frozen=True)
class ShallowRegions:
    """Text and image queries (B, Q) and image keys (B, K) of one layer's attention call, for the shallow stage."""

    text_rows: torch.Tensor
    image_rows: torch.Tensor
    image_keys: torch.Tensor
    first_half_keys: torch.Tensor  # the first half of each sample's image tokens (the authors' 13B layer-0 rule)


def authors_row_weights(observation: LastRowObservation) -> torch.Tensor:
    """The last row's attention weights as the authors' code computes them: scores in the model's dtype (q k^T /
    sqrt(d)), the mask added, a float32 softmax cast back (custom_modeling_llama.py lines 669-685)."""
    dtype = observation.model_dtype
    query, keys = observation.query.to(dtype), observation.keys.to(dtype)
    scores = torch.einsum("bhd,bhkd->bhk", query, keys) / math.sqrt(query.shape[-1])
    if observation.mask is not None:
        scores = scores + observation.mask.to(dtype)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


class PruningHooks(AttentionHooks):
    """VisiPruner's three stages, or a one-shot baseline (FastV, random, pre-LLM), as attention masks."""

    def __init__(
        self, config: PruningConfig, masks: RegionMasks, layouts: list[TokenLayout], prompt_length: int
    ) -> None:
        self.config = config
        self.masks = masks
        self.prompt_length = prompt_length
        batch = len(layouts)
        self.image_index, self.image_valid = image_index_tensors(layouts, masks.keys["image"].device)
        self.keep = self.image_valid.clone()
        self.selection_layer = torch.full((batch,), -1, dtype=torch.long)
        self.exit_layer = torch.full((batch,), -1, dtype=torch.long)
        self.negligible = torch.zeros(batch, dtype=torch.long)
        # (B, prompt length) the first half of each sample's image tokens (the authors' 13B layer-0 rule), made once.
        self.first_half_keys = torch.zeros(batch, prompt_length, dtype=torch.bool, device=self.image_valid.device)
        for row, count in enumerate(self.image_valid.sum(1).tolist()):
            self.first_half_keys[row, self.image_index[row, : count // 2]] = True
        if config.method == "pre_llm":
            self._keep_spread(config.keep_tokens)
            self.selection_layer[:] = -2  # pruned before layer 0: applies everywhere

    # -- decisions ------------------------------------------------------------------------------
    def wants_last_row(self, layer: int, query_start: int, query_length: int) -> bool:
        """Observe only in the prefill pass, in layers where a decision can still be made."""
        if not query_start <= self.prompt_length - 1 < query_start + query_length:
            return False
        method = self.config.method
        if method in ("fastv", "random"):
            return layer == self.config.prune_layer - 1
        if method != "visipruner" or "middle" not in self.config.stages:
            return False
        return layer > self.config.shallow_mid_layer and bool((self.exit_layer < 0).any())

    def observe(self, observation: LastRowObservation) -> None:
        """Apply the selection rule (or the baseline's) to one layer's last-row attention."""
        if self.config.method in ("fastv", "random"):
            self._one_shot(observation)
            return
        authors = self.config.rule == "authors"
        if self.config.rule_precision == "model":
            dtype = observation.model_dtype
            weights = authors_row_weights(observation) if authors else observation.weights.to(dtype)
            observation = replace(
                observation,
                query=observation.query.to(dtype),
                keys=observation.keys.to(dtype),
                values=observation.values.to(dtype),
                weights=weights,
            )
        recorded = image_contributions(observation, self.image_index, self.image_valid, authors_formulas=authors)
        cosine, norm = recorded["cosine"], recorded["norm"]
        layer = observation.layer
        valid = self.image_valid
        # Every row's tests at once, read back in one transfer: a read-back per row and test stalled the GPU's queue
        # twice per sample in every observed layer.
        fires = ((cosine < self.config.layer_threshold) & valid).any(1)
        # A selection keeping no token counts as negligible, as an empty set's "all" does.
        negligible = ((cosine >= self.config.deep_cosine) | ~self.keep).all(1)
        keeps_all = (self.keep | ~valid).all(1)
        fires, negligible, keeps_all = torch.stack([fires, negligible, keeps_all]).cpu()
        undecided = self.selection_layer < 0
        selected = undecided & fires
        if selected.any():
            self.keep = torch.where(
                selected.to(valid.device)[:, None], (norm > self.config.tokens_threshold) & valid, self.keep
            )
            self.selection_layer[selected] = layer
        if authors:
            # A selection that kept every image token never shortens their sequence, so their exit (which looks for
            # the shortened length) is never reached: those samples keep the image to the end.
            negligible &= ~keeps_all
        if "deep" in self.config.stages:
            quiet = ~undecided & (self.exit_layer < 0) & (layer > self.selection_layer) & negligible
            self.negligible[quiet] += 1
            self.exit_layer[quiet & (self.negligible >= self.config.deep_patience)] = layer

    def _one_shot(self, observation: LastRowObservation) -> None:
        """FastV (top last-token attention) or random, keeping ``keep_tokens`` from ``prune_layer`` on."""
        weights = torch.gather(observation.weights.mean(1), 1, self.image_index)
        weights = weights.masked_fill(~self.image_valid, -1.0)
        self.keep = torch.zeros_like(self.image_valid)
        generator = torch.Generator().manual_seed(self.config.seed)
        for row in range(weights.shape[0]):
            n = int(self.image_valid[row].sum())
            k = min(self.config.keep_tokens, n)
            if self.config.method == "fastv":
                chosen = weights[row].topk(k).indices
            else:
                chosen = torch.randperm(n, generator=generator)[:k].to(weights.device)
            self.keep[row, chosen] = True
        self.selection_layer[:] = observation.layer

    def _keep_spread(self, keep_tokens: int) -> None:
        """Pre-LLM pruning: keep evenly spaced image tokens of each sample."""
        self.keep = torch.zeros_like(self.image_valid)
        for row in range(self.keep.shape[0]):
            n = int(self.image_valid[row].sum())
            spread = np.linspace(0, n - 1, num=min(keep_tokens, n)).round().astype(int)
            chosen = np.unique(spread) if keep_tokens else np.zeros(0, dtype=int)
            self.keep[row, torch.as_tensor(chosen, dtype=torch.long)] = True

    def dropped_image_tokens(self, layer: int) -> torch.Tensor:
        """(B, N) bool: the image tokens (by ordinal) that ``layer`` no longer sees, pruned or exited."""
        active = (self.selection_layer == -2) | ((self.selection_layer >= 0) & (self.selection_layer < layer))
        exited = (self.exit_layer >= 0) & (self.exit_layer < layer)
        device = self.keep.device
        return self.image_valid & (exited.to(device)[:, None] | (active.to(device)[:, None] & ~self.keep))

    # -- masks ----------------------------------------------------------------------------------
    def decoding(self, query_start: int) -> bool:
        """Whether a pass whose first query sits at ``query_start`` continues the prompt (a decoding step)."""
        return query_start >= self.prompt_length

    def shallow_active(self, layer: int, query_start: int) -> bool:
        """Whether the shallow stage acts in this layer and pass."""
        config = self.config
        return (
            config.method == "visipruner"
            and "shallow" in config.stages
            and layer < config.shallow_mid_layer
            and (config.shallow_in_decode or not self.decoding(query_start))
        )

    def shallow_regions(self, layer: int, query_start: int, query_length: int, key_length: int) -> ShallowRegions:
        """Which queries and keys of this layer's attention are text and image."""
        return ShallowRegions(
            text_rows=self.masks.query_rows("instruction", query_start, query_length),
            image_rows=self.masks.query_rows("image", query_start, query_length),
            image_keys=self.masks.key_columns("image", key_length),
            first_half_keys=extend_membership(self.first_half_keys, 0, key_length, fill=False),
        )

    def shallow_edges(self, layer: int, query_start: int, query_length: int, key_length: int) -> torch.Tensor | None:
        """(B, Q, K) text->image edges the shallow stage removes in this layer, or None where it is not active."""
        if not self.shallow_active(layer, query_start):
            return None
        regions = self.shallow_regions(layer, query_start, query_length, key_length)
        return regions.text_rows[:, :, None] & regions.image_keys[:, None, :]

    def first_image_key(self, layer: int) -> torch.Tensor:
        """(B,) key index of each sample's first image token in ``layer``."""
        return self.image_index[:, 0]

    def zeroed(self, layer: int, query_start: int, query_length: int, key_length: int) -> ZeroedEdges | None:
        """The shallow stage under the authors' rule: weights zeroed after the softmax (text->image, or in layer 0
        their 7B or 13B rule)."""
        if self.config.shallow_rule != "zero" or not self.shallow_active(layer, query_start):
            return None
        regions = self.shallow_regions(layer, query_start, query_length, key_length)
        text, image, keys = regions.text_rows[:, :, None], regions.image_rows[:, :, None], regions.image_keys[:, None]
        rule = self.config.layer0_rule if layer == 0 else "none"
        if rule == "authors_7b":  # rows from the first image token on, against every image key; text rows' mass moves
            return ZeroedEdges((text | image) & keys, self.first_image_key(layer), regions.text_rows)
        if rule == "authors_13b":  # image->image, and text->the first half of the image tokens; nothing moves
            return ZeroedEdges((image & keys) | (text & regions.first_half_keys[:, None]))
        return ZeroedEdges(text & keys)

    def blocked(self, layer: int, query_start: int, query_length: int, key_length: int) -> torch.Tensor | None:
        """Edges hidden in this layer: shallow text->image (our rule), and image tokens pruned or exited."""
        block = None
        if self.config.shallow_rule == "mask":
            block = self.shallow_edges(layer, query_start, query_length, key_length)
        batch = self.keep.shape[0]
        dropped = torch.zeros(batch, key_length, dtype=torch.bool, device=self.keep.device)
        rows, ordinals = self.dropped_image_tokens(layer).nonzero(as_tuple=True)
        positions = self.image_index[rows, ordinals]
        inside = positions < key_length
        dropped[rows[inside], positions[inside]] = True
        if dropped.any():
            edges = dropped[:, None, :].expand(batch, query_length, key_length)
            block = edges if block is None else block | edges
        return block

    def decisions(self, layouts: list[TokenLayout]) -> Decisions:
        """The per-sample decisions, as ordinals of kept image tokens."""
        kept = [
            torch.nonzero(self.keep[row][: layout.n_image_tokens]).flatten().tolist()
            for row, layout in enumerate(layouts)
        ]
        selection = self.selection_layer.numpy().copy()
        if self.config.method == "pre_llm":
            selection[:] = -1
        return Decisions(selection, self.exit_layer.numpy().copy(), kept, [layout.n_image_tokens for layout in layouts])


def sample_flops(
    config: PruningConfig,
    decisions: Decisions,
    row: int,
    prompt_length: int,
    shape: DecoderShape,
    pre_llm: bool = False,
) -> dict[str, float]:
    """Exact and FastV-convention prefill FLOPs of one sample under its decisions."""
    layers = decisions.tokens_per_layer(row, prompt_length, shape.num_layers)
    if config.method == "pre_llm":
        n_kept = len(decisions.kept[row])
        layers = [LayerTokens(prompt_length - decisions.n_image[row] + n_kept, n_kept)] * shape.num_layers
    blind = config.shallow_mid_layer if config.method == "visipruner" and "shallow" in config.stages else 0
    return prefill_flops(shape, layers, text_blind_layers=blind)


def full_flops(decisions: Decisions, row: int, prompt_length: int, shape: DecoderShape) -> dict[str, Any]:
    """Prefill FLOPs of the unpruned model for one sample."""
    return prefill_flops(shape, [LayerTokens(prompt_length, decisions.n_image[row])] * shape.num_layers)
