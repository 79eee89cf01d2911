"""Pruning applied as attention masks: exact in outputs, not in speed.

Dropping a token from the sequence from layer L on changes the remaining tokens' computation exactly as
hiding it as a key from every query in layers >= L does (RoPE positions are kept either way), so these
hooks give the pruned model's answers, the per-sample decisions and the token counts that FLOPs are
computed from. Selections are decided once per sample during the prefill and persist while decoding,
as each layer's KV cache keeps what that layer had at prefill.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.hooks.attention import (
    AttentionHooks,
    LastRowObservation,
    RegionMasks,
    ZeroedEdges,
    extend_membership,
    route_attention,
)
from analysis.hooks.contributions import image_index_tensors
from analysis.layout import TokenLayout
from analysis.models import hf
from analysis.models.adapters import FamilyAdapter, VisionAttention
from analysis.pruner.config import PruningConfig
from analysis.pruner.flops import DecoderShape, LayerTokens, prefill_flops
from analysis.pruner.methods import HiddenObservation, method_for
from analysis.transfer import to_device


@dataclass
class Decisions:
    """Per-sample pruning decisions made during the prefill."""

    selection_layer: np.ndarray  # (B,) layer whose rule fired (-1: never)
    exit_layer: np.ndarray  # (B,) layer after which all image tokens go (-1: never)
    kept: list[list[int]]  # kept image-token ordinals per sample (after selection)
    n_image: list[int]
    before_llm: bool = False  # the kept tokens were chosen before the language model (every layer sees only them)
    # Per sample and image-token ordinal, the layer after which a staged rule dropped it (-1: never); None: no
    # staged rule ran.
    stage_drops: list[list[int]] | None = None

    def n_kept(self, row: int) -> int:
        """Image tokens left to one sample after its selection and every staged drop (before any exit)."""
        selected = self.before_llm or self.selection_layer[row] >= 0
        kept = len(self.kept[row]) if selected else self.n_image[row]
        return kept - (sum(d >= 0 for d in self.stage_drops[row]) if self.stage_drops else 0)

    def tokens_per_layer(self, row: int, prompt_length: int, num_layers: int) -> list[LayerTokens]:
        """Tokens each layer processes for one sample in the prefill."""
        n_image, n_kept = self.n_image[row], len(self.kept[row])
        drops = self.stage_drops[row] if self.stage_drops else []
        counts = []
        for layer in range(num_layers):
            image = n_image
            if self.before_llm or 0 <= self.selection_layer[row] < layer:
                image = n_kept
            image -= sum(0 <= d < layer for d in drops)
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
        self.stage_drops = torch.full_like(self.image_index, -1)
        self.selection_layer = torch.full((batch,), -1, dtype=torch.long)
        self.exit_layer = torch.full((batch,), -1, dtype=torch.long)
        self.negligible = torch.zeros(batch, dtype=torch.long)
        self.before_llm = False
        self.method = method_for(config)
        self.text_after_image = text_after_image(layouts, prompt_length, self.image_valid.device)
        self.hidden_observed: set[int] = set()  # layers whose input hidden states the rule has read
        self.image_embeddings: torch.Tensor | None = None
        self.rewritten: torch.Tensor | None = None
        self.vision_passes: list[VisionAttention] = []  # filled by the executor while a vision-reading rule runs
        # (B, prompt length) the first half of each sample's image tokens (the authors' 13B layer-0 rule), made once.
        # From the layouts on the host: counting the image tokens on the device would wait for its queued work.
        first_half = np.zeros((batch, prompt_length), dtype=bool)
        for row, layout in enumerate(layouts):
            positions = layout.padded(layout.image_positions)
            first_half[row, positions[: len(positions) // 2]] = True
        self.first_half_keys = to_device(torch.from_numpy(first_half), self.image_valid.device)
        self.method.start(self)

    # -- decisions ------------------------------------------------------------------------------
    def wants_last_row(self, layer: int, query_start: int, query_length: int) -> bool:
        """Observe only in the prefill pass, in the layers the method reads."""
        if not query_start <= self.prompt_length - 1 < query_start + query_length:
            return False
        if self.method.reads_hidden(layer) and layer not in self.hidden_observed:
            raise RuntimeError(
                f"{self.method.name} reads the hidden states entering layer {layer}, which nothing gave it; run the "
                "mask-based pruned model through analysis.pruner.simulate.masked_pruning"
            )
        return self.method.observes(layer, self)

    def observe_hidden(
        self, layer: int, hidden: torch.Tensor, image_index: torch.Tensor, text: torch.Tensor, final_norm: nn.Module
    ) -> None:
        """Let the method decide from the hidden states entering ``layer`` (once per layer, in the prefill)."""
        if layer in self.hidden_observed:
            return
        self.hidden_observed.add(layer)

        def normed(states: torch.Tensor) -> torch.Tensor:
            return final_norm(states).float()

        vision = self.vision_passes[-1] if self.vision_passes else None
        self.method.decide_hidden(self, HiddenObservation(layer, hidden.float(), image_index, text, normed, vision))

    def rewrite_embeddings(self, hidden: torch.Tensor, image_slots: torch.Tensor) -> torch.Tensor | None:
        """Layer 0's input with the rule's replacement image embeddings (``image_slots``: each image token's index
        in ``hidden``), or None where the rule replaces none."""
        if self.rewritten is None or self.image_embeddings is None:
            return None
        rows, ordinals = self.rewritten.nonzero(as_tuple=True)
        written = hidden.clone()
        written[rows, image_slots[rows, ordinals]] = self.image_embeddings[rows, ordinals].to(hidden.dtype)
        return written

    def observe(self, observation: LastRowObservation) -> None:
        """Let the method decide from one layer's last-row attention (image tokens at their input positions)."""
        if observation.image_index is None:
            observation = replace(observation, image_index=self.image_index)
        self.method.decide(self, observation)

    def dropped_image_tokens(self, layer: int) -> torch.Tensor:
        """(B, N) bool: the image tokens (by ordinal) that ``layer`` no longer sees, pruned or exited."""
        active = ((self.selection_layer >= 0) & (self.selection_layer < layer)) | self.before_llm
        exited = (self.exit_layer >= 0) & (self.exit_layer < layer)
        device = self.keep.device
        staged = (self.stage_drops >= 0) & (self.stage_drops < layer)
        rows = to_device(torch.stack([exited, active]), device)
        return self.image_valid & (rows[0][:, None] | (rows[1][:, None] & ~self.keep) | staged)

    # -- masks ----------------------------------------------------------------------------------
    def decoding(self, query_start: int) -> bool:
        """Whether a pass whose first query sits at ``query_start`` continues the prompt (a decoding step)."""
        return query_start >= self.prompt_length

    def shallow_rule(self, layer: int, query_start: int) -> str | None:
        """How the shallow stage removes text->image attention in this layer and pass ("mask", "zero"; None: not)."""
        return self.method.shallow_rule(layer, self.decoding(query_start))

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
        if self.shallow_rule(layer, query_start) is None:
            return None
        regions = self.shallow_regions(layer, query_start, query_length, key_length)
        return regions.text_rows[:, :, None] & regions.image_keys[:, None, :]

    def first_image_key(self, layer: int) -> torch.Tensor:
        """(B,) key index of each sample's first image token in ``layer``."""
        return self.image_index[:, 0]

    def zeroed(self, layer: int, query_start: int, query_length: int, key_length: int) -> ZeroedEdges | None:
        """The shallow stage under the authors' rule: weights zeroed after the softmax (text->image, or in layer 0
        their 7B or 13B rule)."""
        if self.shallow_rule(layer, query_start) != "zero":
            return None
        regions = self.shallow_regions(layer, query_start, query_length, key_length)
        text, image, keys = regions.text_rows[:, :, None], regions.image_rows[:, :, None], regions.image_keys[:, None]
        rule = self.method.layer0_rule() if layer == 0 else "none"
        if rule == "authors_7b":  # rows from the first image token on, against every image key; text rows' mass moves
            return ZeroedEdges((text | image) & keys, self.first_image_key(layer), regions.text_rows)
        if rule == "authors_13b":  # image->image, and text->the first half of the image tokens; nothing moves
            return ZeroedEdges((image & keys) | (text & regions.first_half_keys[:, None]))
        return ZeroedEdges(text & keys)

    def blocked(self, layer: int, query_start: int, query_length: int, key_length: int) -> torch.Tensor | None:
        """Edges hidden in this layer: shallow text->image (our rule), and image tokens pruned or exited."""
        block = None
        if self.shallow_rule(layer, query_start) == "mask":
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
        staged = None
        if bool((self.stage_drops >= 0).any()):
            staged = [self.stage_drops[row, : layout.n_image_tokens].tolist() for row, layout in enumerate(layouts)]
        return Decisions(
            self.selection_layer.numpy().copy(),
            self.exit_layer.numpy().copy(),
            kept,
            [layout.n_image_tokens for layout in layouts],
            self.before_llm,
            staged,
        )


def text_after_image(layouts: list[TokenLayout], prompt_length: int, device: torch.device) -> torch.Tensor:
    """(B, prompt length) bool: each sample's prompt tokens after its last image token (the question and the
    template's tail)."""
    text = np.zeros((len(layouts), prompt_length), dtype=bool)
    for row, layout in enumerate(layouts):
        first = int(layout.image_positions[-1]) + 1 if layout.n_image_tokens else layout.length
        text[row, layout.padded(np.arange(first, layout.length))] = True
    return to_device(torch.from_numpy(text), device)


@contextmanager
def masked_pruning(adapter: FamilyAdapter, hooks: PruningHooks) -> Iterator[PruningHooks]:
    """Inside the block the model runs pruned by attention masks: the routed attention, and the decoder-layer hooks
    that give hidden-state rules (DART, CDPruner) the states entering the layers they read."""
    norm = adapter.final_norm()
    # Made first: a family without the tower view the rule needs fails here, before any hook is in place.
    vision = adapter.vision_attention() if hooks.method.reads_vision else nullcontext(hooks.vision_passes)

    def hidden_hook(layer: int) -> Any:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            hidden = hf.layer_hidden_states(args, kwargs)
            if hidden.shape[1] < hooks.prompt_length:  # a decoding step (the prefill carries the prompt)
                return None
            text = extend_membership(hooks.text_after_image, 0, hidden.shape[1], fill=False)
            hooks.observe_hidden(layer, hidden, hooks.image_index, text, norm)
            written = hooks.rewrite_embeddings(hidden, hooks.image_index) if layer == 0 else None
            return None if written is None else hf.with_layer_hidden_states(args, kwargs, written)

        return hook

    handles = [
        layer.register_forward_pre_hook(hidden_hook(index), with_kwargs=True)
        for index, layer in enumerate(adapter.decoder_layers())
        if hooks.method.reads_hidden(index)
    ]
    try:
        with vision as passes, route_attention(adapter, hooks, hooks.prompt_length - 1):
            hooks.vision_passes = passes
            yield hooks
    finally:
        for handle in handles:
            handle.remove()


def sample_flops(
    config: PruningConfig,
    decisions: Decisions,
    row: int,
    prompt_length: int,
    shape: DecoderShape,
) -> dict[str, float]:
    """Exact and FastV-convention prefill FLOPs of one sample under its decisions."""
    layers = decisions.tokens_per_layer(row, prompt_length, shape.num_layers)
    return prefill_flops(shape, layers, text_blind_layers=method_for(config).text_blind_layers())


def full_flops(decisions: Decisions, row: int, prompt_length: int, shape: DecoderShape) -> dict[str, Any]:
    """Prefill FLOPs of the unpruned model for one sample."""
    return prefill_flops(shape, [LayerTokens(prompt_length, decisions.n_image[row])] * shape.num_layers)
