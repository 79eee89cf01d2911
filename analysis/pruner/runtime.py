"""Pruning that really drops image tokens: later layers compute, and cache, only the tokens they keep.

``with pruned_runtime(model, config, layouts) as state:`` makes ``model(...)`` and ``model.generate(...)`` run
VisiPruner (or FastV / random / pre-LLM pruning) with each sample's pruned image tokens removed from the hidden
states, the attention mask, the rotary position embeddings and the KV cache of every layer after the one where its
decision was made. Decisions are those of the mask-based model (``analysis.pruner.simulate``), made once per sample
in the prefill from the last prompt row in float32, and its outputs agree with it: dropping a token from layer L on
is hiding it as a key from layer L on, positions kept.

Mechanism, hooks only (nothing of the model is replaced; all of it is removed when the block exits):

- a forward pre-hook on the text model tells a prefill (no or an empty cache) from a continuation of the prompt
  this block ran (a cache holding what the runtime put there; ``analysis.models.hf`` finds it) and checks the padding;
- a forward pre-hook on each decoder layer, where a sample's token set shrinks, gathers the kept slots of the hidden
  states, and gives the layer its own mask and the kept tokens' slice of the model's position embeddings;
- the probe attention of ``analysis.hooks.attention`` observes the last prompt row for the selection rule and
  removes shallow text->image edges (hidden before the softmax, or zeroed after it under the authors' rule);
- a forward hook on the text model scatters the final hidden states back to the input positions, so outputs keep
  the input's shape (rows of dropped tokens are zero).

Batches: samples keep different numbers of tokens, so each layer's tokens are re-gathered into a dense left-padded
batch as wide as the row that keeps most; pad slots are masked out as keys (a pad query sees only itself, so no
attention row is empty). The last prompt position stays the last slot of every row and generated tokens append
after it. A dense padded batch, rather than packed variable-length sequences, because SDPA and eager attention and
HF's ``DynamicCache`` (one (B, H, T, d) tensor per layer) all take dense batches; the cost is the padding.

Positions: the model computes RoPE (1-D, or M-RoPE for Qwen2.5-VL) for the full input and each layer gathers the
rows of its kept tokens, so nothing is renumbered. Each layer's cache holds its own length, so nothing may read
positions from the cache length: ``generate`` passes position ids made from the 2-D attention mask, and a continuation
without position ids gets them from the number of tokens seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.errors import ConfigError, DataError
from analysis.hooks.attention import LastRowObservation, RegionMasks, extend_membership, route_attention
from analysis.layout import TokenLayout
from analysis.models import hf
from analysis.models.adapters import AttentionRule, FamilyAdapter, get_adapter
from analysis.models.hf import HFModel
from analysis.pruner.config import PruningConfig
from analysis.pruner.simulate import Decisions, PruningHooks, ShallowRegions
from analysis.transfer import to_device

logger = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")

PreHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]] | None]


@dataclass(frozen=True)
class _Layout:
    """The tokens one layer processes: for each slot of each left-padded row, the input position it holds."""

    positions: torch.Tensor  # (B, S) long
    valid: torch.Tensor  # (B, S) bool, False on pad slots
    identity: bool  # the model's own sequence: its own mask and position embeddings apply
    padded: bool  # some slot is padding (known when the layout is made, so masks need no device sync)

    @property
    def length(self) -> int:
        """Slots per row."""
        return int(self.positions.shape[1])


class PrunedRuntime(PruningHooks):
    """One batch's pruned run: the decisions (as in the mask-based model) and the tokens each layer keeps."""

    def __init__(
        self,
        adapter: FamilyAdapter,
        config: PruningConfig,
        layouts: Sequence[TokenLayout],
        attn_implementation: str,
        decisions: Decisions | None = None,
    ) -> None:
        ends = {layout.pad_offset + layout.length for layout in layouts}
        if len(ends) != 1:
            raise DataError(
                "the pruned runtime needs a left-padded batch (every prompt ending at the same index); "
                "build inputs with the adapter's build_inputs"
            )
        prompt_length = ends.pop()
        device = next(adapter.model.parameters()).device
        super().__init__(
            config, RegionMasks.from_layouts(list(layouts), prompt_length, device), list(layouts), prompt_length
        )
        self.layouts = list(layouts)
        self.num_layers = adapter.num_layers
        self.eager = attn_implementation == "eager"
        # Made on the host and copied once each: a copy from pageable memory, or a write per row, would wait for the
        # device's queued work (a vision tower's replay) or launch a kernel per sample.
        prompt_valid = np.zeros((len(layouts), prompt_length), dtype=bool)
        for row, layout in enumerate(layouts):
            prompt_valid[row, layout.pad_offset :] = True
        self.prompt_valid = to_device(torch.from_numpy(prompt_valid), device)
        self.prompt_padded = any(layout.pad_offset for layout in layouts)
        self.frozen = False  # decisions are made in the first prefill and reused by every later pass
        self.width_bucket = 1  # layer widths are rounded up to a multiple of this (the latency mode's graphs)
        self._frozen_cuts: set[int] | None = None  # with decisions frozen: the layers before which a row shrinks
        # Made while the rule runs, from the decisions as they stand; dropped whenever the rule may have changed them
        # (``_decisions_changed``), so the executors' per-layer questions cost no tensor work in between.
        self._live_cuts: set[int] | None = None
        self._observes: dict[int, bool] = {}  # per layer: whether the rule reads its last row, as decisions stand
        if decisions is not None:
            self._pin(decisions)
        self._prefill = True
        self._input_length = prompt_length
        self._query_length = 0
        self._generated = 0
        self._layout_or_none: _Layout | None = None
        self._layer_layouts: list[_Layout] = []
        self._prepared: dict[tuple[int, str], dict[str, Any]] = {}
        self._compacted: dict[tuple[int, int], tuple[_Layout, torch.Tensor]] = {}
        self._deepstack: hf.DeepStack | None = None
        self.adds_deepstack = adapter.deepstack
        self._model_mask: torch.Tensor | None = None
        self.rules = [adapter.attention_rule(layer) for layer in range(self.num_layers)]
        self._final_norm = adapter.final_norm()
        # (B, prompt length) the image each position belongs to (-1: text), for bidirectional image attention.
        image_blocks = np.full((len(layouts), prompt_length), -1, dtype=np.int64)
        for row, layout in enumerate(layouts):
            image_of_token, _ = layout.image_token_coordinates
            image_blocks[row, layout.padded(layout.image_positions)] = image_of_token
        self.image_blocks = to_device(torch.from_numpy(image_blocks), device)

    # -- decisions ------------------------------------------------------------------------------
    def _pin(self, decisions: Decisions) -> None:
        """Use given decisions instead of the rule (benchmarks with random weights; recomputation checks)."""
        batch = self.keep.shape[0]
        selection = torch.as_tensor(np.asarray(decisions.selection_layer), dtype=torch.long)
        exit_layer = torch.as_tensor(np.asarray(decisions.exit_layer), dtype=torch.long)
        if selection.shape != (batch,) or exit_layer.shape != (batch,) or len(decisions.kept) != batch:
            raise ConfigError(f"pinned decisions are for {len(decisions.kept)} samples but the batch has {batch}")
        for name, values in (("selection_layer", selection), ("exit_layer", exit_layer)):
            if ((values < -1) | (values >= self.num_layers)).any():
                raise ConfigError(f"pinned {name} {values.tolist()} outside -1..{self.num_layers - 1} (-1: never)")
        keep = torch.zeros_like(self.image_valid)
        for row, kept in enumerate(decisions.kept):
            n_image = int(self.image_valid[row].sum())
            if any(not 0 <= ordinal < n_image for ordinal in kept):
                raise ConfigError(f"pinned kept ordinals of sample {row} outside 0..{n_image - 1}")
            keep[row, torch.as_tensor(list(kept), dtype=torch.long)] = True
        self.keep = keep
        if decisions.stage_drops is not None:
            for row, drops in enumerate(decisions.stage_drops):
                if len(drops) != int(self.image_valid[row].sum()) or any(not -1 <= d < self.num_layers for d in drops):
                    raise ConfigError(
                        f"pinned stage drops of sample {row} need one layer in -1..{self.num_layers - 1} "
                        "per image token"
                    )
                self.stage_drops[row, : len(drops)] = torch.as_tensor(drops, dtype=torch.long)
        self.selection_layer = selection
        self.before_llm = decisions.before_llm
        self.exit_layer = exit_layer
        self.frozen = True

    @property
    def _layout(self) -> _Layout:
        """The current pass's slot layout (set when a pass starts)."""
        if self._layout_or_none is None:
            raise RuntimeError("the pruned runtime read its layout before a pass started")
        return self._layout_or_none

    def wants_last_row(self, layer: int, query_start: int, query_length: int) -> bool:
        """Observe only in the first prefill, where the rule can still decide something."""
        if not self._prefill or self.frozen:
            return False
        if layer not in self._observes:
            self._observes[layer] = super().wants_last_row(layer, 0, self.prompt_length)
        return self._observes[layer]

    def _decisions_changed(self) -> None:
        """Forget what was derived from the decisions: the rule has just had a chance to change them."""
        self._live_cuts = None
        self._observes = {}

    def apply_measured(self, layer: int, measured: dict[str, torch.Tensor]) -> None:
        """The rule's host update from ``layer``'s measured tests (a split decision: the latency mode)."""
        self.method.apply(self, layer, measured)
        self._decisions_changed()

    def last_row_position(self, layer: int, default: int) -> int:
        """The last prompt position's slot: the prompt ends where the continuation (if any) begins."""
        if self._prefill and self._layout_or_none is not None:
            return self._layout.length - 1 - (self._input_length - self.prompt_length)
        return default

    def observe(self, observation: LastRowObservation) -> None:
        """Apply the rule with image tokens addressed by their slots in this layer."""
        super().observe(replace(observation, image_index=self._image_slots(self._layout)))
        self._decisions_changed()

    def blocked(self, layer: int, query_start: int, query_length: int, key_length: int) -> torch.Tensor | None:
        """Shallow stage only (under our rule); pruned tokens are gone, not masked."""
        if self.shallow_rule(layer, query_start) != "mask":
            return None
        return self.shallow_edges(layer, query_start, query_length, key_length)

    def decoding(self, query_start: int) -> bool:
        """Told by the pass, not by positions: a pruned layer's cache holds fewer keys than the prompt had."""
        return not self._prefill

    def shallow_regions(self, layer: int, query_start: int, query_length: int, key_length: int) -> ShallowRegions:
        """Text and image queries and image keys in this layer's slots (generated tokens are text, never image)."""
        layout = self._layer_layout(layer)
        length = self._input_length
        batch = layout.positions.shape[0]
        extra = key_length - layout.length

        def keys(columns: torch.Tensor) -> torch.Tensor:
            slots = columns.gather(1, layout.positions) & layout.valid
            return torch.cat([slots, slots.new_zeros(batch, extra)], dim=1)

        def rows(region: str, generated: bool) -> torch.Tensor:
            slots = self.masks.query_rows(region, 0, length).gather(1, layout.positions) & layout.valid
            tail = slots.new_full((batch, extra), generated)
            return torch.cat([slots, tail], dim=1)[:, query_start : query_start + query_length]

        first_half = extend_membership(self.first_half_keys, 0, length, fill=False)
        return ShallowRegions(
            text_rows=rows("instruction", True),
            image_rows=rows("image", False),
            image_keys=keys(self.masks.key_columns("image", length)),
            first_half_keys=keys(first_half),
        )

    def first_image_key(self, layer: int) -> torch.Tensor:
        """(B,) slot of each sample's first image token in this layer."""
        return self._image_slots(self._layer_layout(layer))[:, 0]

    def _layer_layout(self, layer: int) -> _Layout:
        """The slots ``layer`` holds: the current prefill layout, or the layout its cache was filled with."""
        return self._layout if self._prefill else self._layer_layouts[layer]

    # -- layouts --------------------------------------------------------------------------------
    def _cuts_before(self, layer: int) -> bool:
        """Whether some sample's token set shrinks between ``layer - 1`` and ``layer``.

        With decisions frozen the answer is read back once for every layer, so later prefills (CUDA-graph capture
        among them) ask the device nothing.
        """
        if layer == 0:
            return self.before_llm
        if self.frozen:
            if self._frozen_cuts is None:
                self._frozen_cuts = self._decided_cuts(staged=True)
            return layer in self._frozen_cuts
        if self._live_cuts is None:
            # The staged drops live on the device: reading them is a sync, only worth it for a staged rule.
            self._live_cuts = self._decided_cuts(staged=self.method.drops_in_stages)
        return layer in self._live_cuts

    def _decided_cuts(self, *, staged: bool) -> set[int]:
        """The layers before which some sample's token set shrinks under the decisions made so far (its selection
        or exit layer plus one; with ``staged``, its staged drops' too)."""
        layers = [self.selection_layer, self.exit_layer, *([self.stage_drops] if staged else [])]
        decided = torch.cat([values.flatten().cpu() for values in layers])
        return {int(value) + 1 for value in decided[decided >= 0].unique().tolist()}

    def _kept_positions(self, layer: int) -> torch.Tensor:
        """(B, input length) bool: the input positions ``layer`` processes."""
        kept = self._input_valid()
        batch, length = kept.shape
        # Scattered rather than indexed by the dropped tokens' coordinates, which would be read back from the device;
        # pad ordinals (no image token) go to a spare column, so every real position is written once.
        target = torch.where(self.image_valid, self.image_index, length)
        dropped = torch.zeros(batch, length + 1, dtype=torch.bool, device=kept.device)
        dropped.scatter_(1, target, self.dropped_image_tokens(layer))
        return kept & ~dropped[:, :length]

    def _input_valid(self) -> torch.Tensor:
        """(B, input length) bool: real tokens of the current input (prompt and continuation)."""
        extra = self._input_length - self.prompt_length
        return torch.cat([self.prompt_valid, self.prompt_valid.new_ones(self.prompt_valid.shape[0], extra)], dim=1)

    def _compact(self, layout: _Layout, layer: int) -> tuple[_Layout, torch.Tensor]:
        """The layout of ``layer`` and, per new slot, the slot of ``layout`` it comes from."""
        selected = layout.valid & self._kept_positions(layer).gather(1, layout.positions)
        counts = selected.sum(1)
        width, narrowest = (int(value) for value in torch.stack([counts.max(), counts.min()]).tolist())
        # Rounded up to a multiple of ``width_bucket`` (pad slots, masked): the latency mode replays one CUDA graph
        # per width, so near widths share one.
        width = min(layout.length, -(-width // self.width_bucket) * self.width_bucket)
        # A stable sort puts dropped and pad slots first and kept ones last, in order: left padding for free.
        order = torch.argsort(selected.to(torch.int32), dim=1, stable=True)
        slots = order[:, layout.length - width :]
        valid = torch.arange(width, device=counts.device)[None, :] >= (width - counts)[:, None]
        return _Layout(layout.positions.gather(1, slots), valid, identity=False, padded=narrowest < width), slots

    def _compact_once(self, layout: _Layout, layer: int) -> tuple[_Layout, torch.Tensor]:
        """``_compact``, computed once per layer and input length when decisions are frozen.

        Compacting reads token counts back from the device; with decisions frozen the result only depends on the
        input length, so later prefills of that length (repeated passes, CUDA-graph capture) run without a sync.
        """
        if not self.frozen:
            return self._compact(layout, layer)
        key = (layer, self._input_length)
        if key not in self._compacted:
            self._compacted[key] = self._compact(layout, layer)
        return self._compacted[key]

    def _image_slots(self, layout: _Layout) -> torch.Tensor:
        """(B, N) slot of each image token in ``layout`` (0 for tokens no longer there)."""
        if layout.identity:
            return self.image_index
        batch, length = layout.positions.shape
        slot_of = torch.zeros(batch, self._input_length + 1, dtype=torch.long, device=layout.positions.device)
        target = torch.where(layout.valid, layout.positions, self._input_length)  # pads go to a spare column
        slot_of.scatter_(1, target, torch.arange(length, device=target.device).expand(batch, -1))
        return slot_of[:, : self._input_length].gather(1, self.image_index)

    def _mask(
        self,
        layout_positions: torch.Tensor,
        key_valid: torch.Tensor,
        padded: bool,
        query_length: int,
        dtype: torch.dtype,
        rule: AttentionRule,
        explicit: bool = False,
    ) -> torch.Tensor | None:
        """The attention mask of queries that are the last ``query_length`` keys (``layout_positions``: each key's
        input position): causal, pad keys hidden, and the layer's own rule (a window, bidirectional images).
        ``explicit``: a boolean mask even where SDPA's own causal path would do (edges are added to it)."""
        batch, key_length = key_valid.shape
        plain = rule.window is None and not rule.bidirectional_images
        if plain and not self.eager and not padded and query_length in (1, key_length) and not explicit:
            return None  # SDPA's own causal path (or full attention for one query) is exact and fastest
        keys = torch.arange(key_length, device=key_valid.device)
        queries = keys[key_length - query_length :]
        causal = keys[None, :] <= queries[:, None]
        allowed = causal[None] & key_valid[:, None, :]
        if not plain:
            # Input positions, not slots: a window counts the tokens of the input, dropped ones included, as the
            # mask-based model (which only hides them) does.
            key_pos = layout_positions
            query_pos = key_pos[:, key_length - query_length :]
            if rule.bidirectional_images:
                blocks = self._image_blocks(key_pos)
                query_blocks = blocks[:, key_length - query_length :]
                same = (query_blocks[:, :, None] == blocks[:, None, :]) & (query_blocks[:, :, None] >= 0)
                allowed = allowed | (same & key_valid[:, None, :])
            if rule.window is not None:
                allowed = allowed & ((query_pos[:, :, None] - key_pos[:, None, :]) < rule.window)
        allowed |= (keys[None, :] == queries[:, None])[None]  # a pad query sees itself: no empty softmax row
        allowed = allowed[:, None]
        if not self.eager or explicit:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def _image_blocks(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, S) the image each input position belongs to, -1 for text and generated tokens."""
        # Every position the current pass can hold: the input, the tokens generated since and this pass's.
        width = self._input_length + self._generated + self._query_length
        table = torch.full((positions.shape[0], width), -1, dtype=torch.long, device=positions.device)
        table[:, : self.image_blocks.shape[1]] = self.image_blocks
        return table.gather(1, positions)

    def _prefill_kwargs(
        self, layout: _Layout, kwargs: dict[str, Any], dtype: torch.dtype, rule: AttentionRule
    ) -> dict[str, Any]:
        """Mask, position embeddings and position ids of a prefill layer under ``layout`` (shared by its layers of
        one attention kind)."""
        cached = self._prepared.get((id(layout), rule.kind))
        if cached is not None:
            return cached
        batch = layout.positions.shape[0]

        def take(values: torch.Tensor) -> torch.Tensor:
            values = values.expand(batch, *values.shape[1:])
            index = layout.positions.view(batch, -1, *([1] * (values.dim() - 2)))
            return values.gather(1, index.expand(-1, -1, *values.shape[2:]))

        embeddings, position_ids = hf.layer_positions(kwargs)
        prepared = hf.layer_overrides(
            self._mask(layout.positions, layout.valid, layout.padded, layout.length, dtype, rule),
            None if embeddings is None else tuple(take(part) for part in embeddings),
            take(position_ids) if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 else None,
        )
        self._prepared[(id(layout), rule.kind)] = prepared
        return prepared

    def _decode_kwargs(self, layout: _Layout, dtype: torch.dtype, rule: AttentionRule) -> dict[str, Any]:
        """The mask of a continuation in a layer whose cache holds ``layout`` then the tokens generated since."""
        cached = self._prepared.get((id(layout), rule.kind))
        if cached is None:
            batch = layout.valid.shape[0]
            fresh = layout.valid.new_ones(batch, self._generated + self._query_length)
            keys = torch.cat([layout.valid, fresh], dim=1)
            seen = self._input_length + torch.arange(fresh.shape[1], device=fresh.device)
            positions = torch.cat([layout.positions, seen[None].expand(batch, -1)], dim=1)
            cached = hf.layer_overrides(self._mask(positions, keys, layout.padded, self._query_length, dtype, rule))
            self._prepared[(id(layout), rule.kind)] = cached
        return cached

    # -- hooks ----------------------------------------------------------------------------------
    def start_pass(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Text-model pre-hook: prefill or continuation, and a padding check."""
        call = hf.text_model_call(args, kwargs)
        length = call.length
        self._prefill = self._is_prefill(call, sorted(kwargs))
        self._query_length = length
        self._prepared = {}
        mask = call.attention_mask
        if isinstance(mask, dict):
            # Masks per attention kind, built by the model before its text model (Gemma 3): the padding check reads
            # the 2-D mask the model itself was given instead; the runtime builds its own masks from the layouts.
            mask = self._model_mask
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise DataError(
                "the pruned runtime needs a 2-D attention mask (or none); use a DynamicCache, "
                "not a static or compiled cache"
            )
        if self._prefill:
            if length < self.prompt_length:
                raise DataError(
                    f"input of {length} tokens is shorter than the {self.prompt_length}-token prompts "
                    "the runtime was built for; build the runtime from this batch's layouts"
                )
            self._check_mask(mask, length)
            self.begin_prefill(length)
            # DeepStack (Qwen3-VL) adds visual features to the image positions after the first layers; the model
            # would add them to its full sequence, so the runtime adds them to the tokens each layer kept instead.
            self._deepstack = hf.deepstack_inputs(kwargs) if self.adds_deepstack else None
            if self._deepstack is not None:
                return args, hf.without_deepstack(kwargs)
            return None
        self._check_mask(mask, self._input_length + self._generated + length)
        if call.positions is None and not self._layer_layouts[0].identity:
            # The model would count positions from layer 0's cache, which holds only the kept tokens.
            seen = self._input_length + self._generated
            return args, hf.with_position_ids(kwargs, torch.arange(seen, seen + length, device=call.device)[None])
        return None

    def begin_prefill(self, length: int) -> None:
        """Start a prefill of ``length`` tokens (the prompt, or the prompt and a continuation): every layer's layout
        is made anew."""
        self._prefill = True
        self._query_length = length
        self._prepared = {}
        self._input_length, self._generated = length, 0
        batch = self.prompt_valid.shape[0]
        positions = torch.arange(length, device=self.prompt_valid.device).expand(batch, -1)
        self._layout_or_none = _Layout(positions, self._input_valid(), identity=True, padded=self.prompt_padded)
        self._layer_layouts = []
        self._decisions_changed()

    def _is_prefill(self, call: hf.TextModelCall, arguments: list[str]) -> bool:
        """Whether a text-model call starts a new prompt (empty or no cache) or continues the one this block ran.

        The cache is found by type, not by argument name, and a continuation must find in it exactly the tokens the
        runtime itself put in layer 0; anything else means transformers passes its cache in a way the runtime was
        not built for, which is reported as that, not as a problem with the user's input.
        """
        held = hf.cache_length(call.cache)
        if held == 0:
            if call.cache is None and self._layer_layouts and call.length < self.prompt_length:
                raise hf.compatibility_error(
                    f"the pruned runtime got a {call.length}-token pass after its prefill but no KV cache in the "
                    f"text model's call (arguments: {', '.join(arguments)})"
                )
            return True
        if not self._layer_layouts:
            raise DataError(
                "a pass with a filled cache came before any prefill in this pruned_runtime block; "
                "run the prompt (or generate) inside the block"
            )
        expected = self._layer_layouts[0].length + self._generated
        if held != expected:
            raise hf.compatibility_error(
                f"layer 0's KV cache holds {held} tokens where the pruned runtime put {expected}"
            )
        return False

    def _check_mask(self, mask: torch.Tensor | None, length: int) -> None:
        """The 2-D mask must be the prompts' left padding followed by real tokens only."""
        expected = self.prompt_valid
        if mask is None:
            if self.prompt_padded:  # known from the layouts, so a pass without a mask needs no device sync
                raise DataError("this batch is padded: pass its attention_mask")
            return
        if mask.shape != (expected.shape[0], length):
            raise DataError(f"attention mask of shape {tuple(mask.shape)}; expected ({expected.shape[0]}, {length})")
        mask = mask.bool()
        if not (torch.equal(mask[:, : self.prompt_length], expected) and bool(mask[:, self.prompt_length :].all())):
            raise DataError(
                "the attention mask is not the prompts' left padding followed by real tokens; the "
                "runtime supports left-padded prompts and their continuations (right padding: use "
                "the mask-based analysis.pruner.simulate)"
            )

    def layer_hook(self, layer: int) -> PreHook:
        """Decoder-layer pre-hook: shrink the sequence where a decision takes effect, and adapt the layer's inputs."""

        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            hidden = hf.layer_hidden_states(args, kwargs)
            if self._prefill:
                if not self.frozen and self.method.reads_hidden(layer):
                    self._observe_hidden(layer, hidden)
                # Replacement embeddings (merged tokens) are content, kept from the first prefill for later ones.
                rewrites = layer == 0 and self.rewritten is not None  # slots are looked up only for a rewrite
                written = self.rewrite_embeddings(hidden, self._image_slots(self._layout)) if rewrites else None
                if written is not None:
                    hidden = written
                    args, kwargs = hf.with_layer_hidden_states(args, kwargs, hidden)
                if self._cuts_before(layer):
                    self._layout_or_none, slots = self._compact_once(self._layout, layer)
                    hidden = hidden.gather(1, slots[..., None].expand(-1, -1, hidden.shape[-1]))
                    args, kwargs = hf.with_layer_hidden_states(args, kwargs, hidden)
                layout = self._layout
                self._layer_layouts.append(layout)
                if layout.identity:
                    return (args, kwargs) if written is not None else None
                kwargs.update(self._prefill_kwargs(layout, kwargs, hidden.dtype, self.rules[layer]))
                return args, kwargs
            layout = self._layer_layouts[layer]
            if layout.identity:
                return None
            kwargs.update(self._decode_kwargs(layout, hidden.dtype, self.rules[layer]))
            return args, kwargs

        return hook

    def _observe_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """Give the rule the hidden states entering ``layer``, image tokens and text addressed by their slots."""
        layout = self._layout
        text = extend_membership(self.text_after_image, 0, self._input_length, fill=False)
        text = text.gather(1, layout.positions) & layout.valid
        self.observe_hidden(layer, hidden, self._image_slots(layout), text, self._final_norm)
        self._decisions_changed()

    def model_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Model pre-hook: keep the 2-D padding mask the model was given, for families whose text model gets masks
        per attention kind instead."""
        self._model_mask = hf.text_model_call(args, kwargs).attention_mask

    def deepstack_hook(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
        """Decoder-layer hook: add the layer's DeepStack level to the image tokens it kept (prefill only)."""

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            deepstack = self._deepstack
            if not self._prefill or deepstack is None or layer >= len(deepstack.embeds):
                return None
            hidden = hf.layer_output_hidden(output)
            layout = self._layer_layouts[layer]
            # The level's rows follow the image positions in row-major order, as the image ordinals do.
            row_offsets = torch.cumsum(self.image_valid.sum(1), 0) - self.image_valid.sum(1)
            rank = row_offsets[:, None] + torch.arange(self.image_valid.shape[1], device=hidden.device)[None, :]
            present = self.image_valid & ~self.dropped_image_tokens(layer)
            rows, ordinals = present.nonzero(as_tuple=True)
            slots = self._image_slots(layout)[rows, ordinals]
            added = hidden.clone()
            added[rows, slots] = hidden[rows, slots] + deepstack.embeds[layer][rank[rows, ordinals]].to(hidden.dtype)
            return hf.with_layer_output_hidden(output, added)

        return hook

    def end_pass(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Text-model hook: final hidden states back at their input positions; decisions frozen after a prefill."""
        if not self._prefill:
            self._generated += self._query_length
            return output
        self.frozen = True
        layout = self._layout
        logger.debug("prefill slots per layer: %s", self.prefill_lengths)
        if layout.identity:
            return output
        hidden = hf.text_model_output_hidden(output)
        batch, _, width = hidden.shape
        full = hidden.new_zeros(batch, self._input_length + 1, width)
        target = torch.where(layout.valid, layout.positions, self._input_length)  # pads go to a spare column
        full.scatter_(1, target[..., None].expand(-1, -1, width), hidden)
        return hf.set_text_model_output_hidden(output, full[:, : self._input_length])

    # -- results --------------------------------------------------------------------------------
    @property
    def prefill_lengths(self) -> list[int]:
        """Slots (kept tokens of the widest row, padding included) each layer processed in the last prefill."""
        return [layout.length for layout in self._layer_layouts]

    def layer_token_counts(self) -> torch.Tensor:
        """(layers, B) real tokens each layer processed per sample in the last prefill."""
        return torch.stack([layout.valid.sum(1) for layout in self._layer_layouts]).cpu()


@contextmanager
def pruned_runtime(
    model: HFModel, config: PruningConfig, layouts: Sequence[TokenLayout], *, decisions: Decisions | None = None
) -> Iterator[PrunedRuntime]:
    """Inside the block, ``model`` runs with pruned image tokens dropped for this batch; unchanged after it.

    ``layouts`` are the batch's (from ``build_inputs``); ``decisions`` pins selections instead of applying the rule.
    """
    adapter = get_adapter(model)
    config.validate(adapter.num_layers)
    implementation = hf.attention_implementation(adapter.text_config)
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(
            f"the pruned runtime supports {' and '.join(ATTENTION_IMPLEMENTATIONS)} attention, not "
            f"{implementation!r}; load the model with attn_implementation='sdpa'"
        )
    runtime = PrunedRuntime(adapter, config, layouts, implementation, decisions)
    if not runtime.method.prunes:
        yield runtime
        return
    text_model = adapter.language_model()
    handles = [
        model.register_forward_pre_hook(runtime.model_call, with_kwargs=True),
        text_model.register_forward_pre_hook(runtime.start_pass, with_kwargs=True),
        text_model.register_forward_hook(runtime.end_pass, with_kwargs=True),
    ]
    try:
        handles += [
            layer.register_forward_pre_hook(runtime.layer_hook(index), with_kwargs=True)
            for index, layer in enumerate(adapter.decoder_layers())
        ]
        handles += [
            layer.register_forward_hook(runtime.deepstack_hook(index))
            for index, layer in enumerate(adapter.decoder_layers())
            if adapter.deepstack
        ]
        vision = adapter.vision_attention() if runtime.method.reads_vision else nullcontext(runtime.vision_passes)
        with vision as passes, route_attention(adapter, runtime, runtime.prompt_length - 1):
            runtime.vision_passes = passes
            yield runtime
    finally:
        for handle in handles:
            handle.remove()
