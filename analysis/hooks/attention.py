"""The one instrumentation layer: a model's attention routed, for the duration of a context, through a function
that can block query->key edges per layer, zero edges after the softmax, observe the last prompt row and inspect
every call's queries and keys (the tracer's statistics).

Tracing, probes and pruning all enter it through ``route_attention``. Everything it needs lives in the
``AttentionRoute`` object of that context: the route registers its own attention function with transformers
under a name of its own, selects it in the text config, and on exit restores the model's implementation and
removes the registration, so nothing outlives the block. Queries and keys arrive after RoPE (M-RoPE for
Qwen2.5-VL) and after the KV cache update, so the same code serves prefill, teacher forcing and decoding.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.errors import ConfigError
from analysis.layout import REGION_IMAGE, REGION_INSTRUCTION, REGION_SYSTEM, TokenLayout
from analysis.models import hf
from analysis.models.adapters import FamilyAdapter
from analysis.models.hf import CompatibilityError
from analysis.transfer import to_device

ROUTE_PREFIX = "visipruner_route"
QUERY_REGIONS = ("system", "image", "instruction", "last")
KEY_REGIONS = ("system", "image", "instruction")
SUBSET_KEY = "subset"  # keys given per sample in RegionMasks.extra_keys[SUBSET_KEY] (e.g. some image tokens)
_ROUTE_NUMBERS = itertools.count()


@dataclass(frozen=True)
class Knockout:
    """Block attention from a query region to a key region in a set of layers."""

    query: str
    key: str
    layers: frozenset[int]

    def __post_init__(self) -> None:
        if self.query not in QUERY_REGIONS:
            raise ConfigError(f"unknown query region {self.query!r}; choose one of {', '.join(QUERY_REGIONS)}")
        if self.key not in (*KEY_REGIONS, SUBSET_KEY):
            raise ConfigError(f"unknown key region {self.key!r}; choose one of {', '.join(KEY_REGIONS)}")


@dataclass
class RegionMasks:
    """Per-sample membership of padded prompt positions in each query group and key region.

    Positions after the prompt (teacher-forced or generated answer tokens) count as ``instruction``
    and ``last`` queries and as ``instruction`` keys: they are the answer's own text.
    """

    queries: dict[str, torch.Tensor]  # name -> (B, T) bool
    keys: dict[str, torch.Tensor]  # name -> (B, T) bool
    prompt_length: int
    extra_keys: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, T) bool, e.g. token subsets

    @classmethod
    def from_layouts(cls, layouts: list[TokenLayout], seq_len: int, device: torch.device) -> RegionMasks:
        """Build the masks of a left-padded batch."""
        batch = len(layouts)
        # Built in numpy on the host (a tensor operation per row and region costs more) and copied once each.
        queries = {name: np.zeros((batch, seq_len), dtype=bool) for name in QUERY_REGIONS}
        keys = {name: np.zeros((batch, seq_len), dtype=bool) for name in KEY_REGIONS}
        for row, layout in enumerate(layouts):
            for region, name in (
                (REGION_SYSTEM, "system"),
                (REGION_IMAGE, "image"),
                (REGION_INSTRUCTION, "instruction"),
            ):
                positions = layout.padded(np.flatnonzero(layout.regions == region))
                queries[name][row, positions] = True
                keys[name][row, positions] = True
            queries["last"][row, layout.padded(layout.last)] = True
        return cls(
            {name: to_device(torch.from_numpy(value), device) for name, value in queries.items()},
            {name: to_device(torch.from_numpy(value), device) for name, value in keys.items()},
            seq_len,
        )

    def with_keys(self, name: str, keys: torch.Tensor) -> RegionMasks:
        """These masks plus a named key subset (B, T) (e.g. some image tokens); the original is left as it was."""
        return replace(self, extra_keys={**self.extra_keys, name: keys})

    def query_rows(self, name: str, start: int, length: int) -> torch.Tensor:
        """(B, length) membership of absolute query positions [start, start+length) in a query group."""
        return extend_membership(self.queries[name], start, length, fill=name in ("instruction", "last"))

    def key_columns(self, name: str, length: int) -> torch.Tensor:
        """(B, length) membership of key positions [0, length) in a key region (or a named key subset)."""
        source = self.extra_keys.get(name, self.keys.get(name))
        if source is None:
            raise ConfigError(f"unknown key region {name!r}")
        return extend_membership(source, 0, length, fill=name == "instruction")


def extend_membership(membership: torch.Tensor, start: int, length: int, *, fill: bool) -> torch.Tensor:
    """Positions [start, start+length) of a (B, T) membership mask, those >= T filled with ``fill``."""
    batch, known = membership.shape
    inside = membership[:, start : min(start + length, known)]
    missing = length - inside.shape[1]
    if missing <= 0:
        return inside
    return torch.cat([inside, torch.full((batch, missing), fill, dtype=torch.bool, device=membership.device)], dim=1)


@dataclass
class LastRowObservation:
    """What a layer's attention did at the last prompt position, in float32."""

    layer: int
    query: torch.Tensor  # (B, H, d) after RoPE
    keys: torch.Tensor  # (B, H, K, d) after RoPE and GQA expansion
    values: torch.Tensor  # (B, H, K, d)
    weights: torch.Tensor  # (B, H, K) softmax row incl. the intervention's mask and zeroed edges
    model_dtype: torch.dtype = torch.float32  # the dtype the model computes attention in
    mask: torch.Tensor | None = None  # (B, 1, K) the row's additive mask (the intervention's blocked edges included)
    # (B, N) the key index of each sample's image tokens in this observation (set by a pruning executor: the
    # token-dropping one moves them from layer to layer).
    image_index: torch.Tensor | None = None


@dataclass
class ZeroedEdges:
    """Query->key edges whose attention weights are zeroed after the softmax, without renormalising the row.

    With ``target`` (B,) key indices, the zeroed mass of each query row moves onto that key instead of vanishing;
    ``moved_rows`` (B, Q) limits that to some rows (the others lose their zeroed mass).
    """

    edges: torch.Tensor  # (B, Q, K) bool
    target: torch.Tensor | None = None
    moved_rows: torch.Tensor | None = None

    def moved_share(self, rows: slice | torch.Tensor) -> torch.Tensor | None:
        """(B, Q') 1.0 where a query row's (of ``rows``) zeroed mass moves to the target, else 0; None: all rows."""
        if self.target is None or self.moved_rows is None:
            return None
        return self.moved_rows[:, rows].float()


class AttentionHooks:
    """What an intervention does in each layer: extra blocked edges, and/or an observer of the last row."""

    def blocked(self, layer: int, query_start: int, query_length: int, key_length: int) -> torch.Tensor | None:
        """(B, Q, K) bool of edges to block in ``layer`` for the given absolute query range, or None."""
        return None

    def zeroed(self, layer: int, query_start: int, query_length: int, key_length: int) -> ZeroedEdges | None:
        """Edges whose weights are zeroed after the softmax in ``layer`` (no renormalisation), or None."""
        return None

    def observe(self, observation: LastRowObservation) -> None:
        """Receive a layer's last-row attention (called only when ``wants_last_row`` says so)."""

    def wants_last_row(self, layer: int, query_start: int, query_length: int) -> bool:
        """Whether ``observe`` should be called for this layer and query range."""
        return False

    def last_row_position(self, layer: int, default: int) -> int:
        """Key index of the last prompt position in ``layer`` (``default``: the index given to the route)."""
        # Hooks that physically drop tokens (analysis.pruner.runtime) move it from layer to layer.
        return default

    def wants_call(self, layer: int, query_start: int, query_length: int) -> bool:
        """Whether ``inspect`` should see this layer's attention call."""
        return False

    def inspect(self, call: AttentionCall) -> None:
        """Receive one attention call's inputs, unchanged (called only when ``wants_call`` says so)."""


class KnockoutHooks(AttentionHooks):
    """Blocks the edges of a list of knockouts (an empty list changes nothing)."""

    def __init__(self, masks: RegionMasks, knockouts: list[Knockout]) -> None:
        self.masks = masks
        self.knockouts = knockouts

    def blocked(self, layer: int, query_start: int, query_length: int, key_length: int) -> torch.Tensor | None:
        """Union of the active knockouts' query x key blocks."""
        block = None
        for knockout in self.knockouts:
            if layer not in knockout.layers:
                continue
            rows = self.masks.query_rows(knockout.query, query_start, query_length)
            cols = self.masks.key_columns(knockout.key, key_length)
            edges = rows[:, :, None] & cols[:, None, :]
            block = edges if block is None else block | edges
        return block


@dataclass
class AttentionCall:
    """One attention call as the model made it: queries and keys after RoPE, the model's own mask."""

    layer: int
    query: torch.Tensor  # (B, H, Q, d)
    key: torch.Tensor  # (B, H_kv, K, d)
    value: torch.Tensor  # (B, H_kv, K, d)
    attention_mask: torch.Tensor | None  # as the model's mask builder made it: additive float, bool, or None (causal)
    scaling: float
    query_start: int  # absolute position of the first query (cache-aware)

    def row_mask(self, rows: slice) -> torch.Tensor:
        """The additive float32 mask (B, 1, R, K) of some query rows (a slice of this call's queries)."""
        return additive_mask(
            self.attention_mask, self.query, self.key.shape[2], self.query_start, rows, dtype=torch.float32
        )


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention with grouped KV heads; returns (output (B, Q, H, d), weights (B, H, Q, K))."""
    groups = query.shape[1] // key.shape[1]
    key = per_query_head(key, groups)
    value = per_query_head(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class AttentionRoute:
    """The attention function of one ``route_attention`` context: the hooks, each module's layer, the base."""

    def __init__(
        self,
        adapter: FamilyAdapter,
        hooks: AttentionHooks,
        last_position: int,
        base: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
        static_cache: bool = False,
    ) -> None:
        self.hooks = hooks
        # A cache of fixed size (the latency mode's) hands every decoding step the same number of keys, the unused
        # ones masked: there is no growing key count to check.
        self.static_cache = static_cache
        self.last_position = last_position
        self.base = base
        self.layers = {adapter.attention(layer): index for index, layer in enumerate(adapter.decoder_layers())}
        # Keys each layer has been given so far in this pass: hooks index keys by position from 0, which a
        # sliding-window cache (Gemma 3's local layers) breaks by dropping the oldest.
        self.seen: dict[int, int] = {}
        # Hooks that only inspect take a short path: at batch 1 every Python call per layer shows in the time.
        cls = type(hooks)
        self.inspect_only = all(
            getattr(cls, name) is getattr(AttentionHooks, name) for name in ("blocked", "zeroed", "wants_last_row")
        )

    def __call__(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the module's hooks, then the base implementation."""
        layer = self.layers.get(module)
        if layer is None:
            raise RuntimeError("the routed attention was called by a module outside the routed model")
        hooks = self.hooks
        query_length, key_length = query.shape[2], key.shape[2]
        query_start = key_length - query_length  # absolute position of the first query (cache-aware)
        # A continuation of a pass this route saw must bring every earlier key back (a first call may continue a
        # cache filled elsewhere, as the probes' partial passes do).
        expected = self.seen.get(layer, 0) + query_length
        if query_start and layer in self.seen and key_length != expected and not self.static_cache:
            raise CompatibilityError(
                f"layer {layer} received {key_length} keys where {expected} were seen: a sliding-window KV cache "
                "dropped the oldest, which interventions index from position 0; generate with a cache that keeps "
                "every key (analysis.models.hf.new_cache())"
            )
        self.seen[layer] = key_length
        if hooks.wants_call(layer, query_start, query_length):
            hooks.inspect(AttentionCall(layer, query, key, value, attention_mask, scaling, query_start))
        if self.inspect_only:
            return self.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        blocked = hooks.blocked(layer, query_start, query_length, key_length)
        zeroed = hooks.zeroed(layer, query_start, query_length, key_length)
        observe = hooks.wants_last_row(layer, query_start, query_length)
        if blocked is None and zeroed is None and not observe:
            # Untouched layers see exactly the mask the model made, so a no-op intervention is bit-identical.
            return self.base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        mask = additive_mask(attention_mask, query, key_length, query_start)
        minimum = torch.finfo(mask.dtype).min
        if blocked is not None:
            mask = mask.masked_fill(blocked[:, None], minimum)
        if observe:
            row = hooks.last_row_position(layer, self.last_position) - query_start
            hooks.observe(_last_row(layer, query, key, value, mask, scaling, row, zeroed))
        if zeroed is None:
            return self.base(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
        # The base computes the output renormalised over the keys that survive; the rows with zeroed edges are
        # then rescaled by the share of attention those edges would have had (and that share added on the
        # target's value).
        output, weights = self.base(
            module,
            query,
            key,
            value,
            mask.masked_fill(zeroed.edges[:, None], minimum),
            scaling=scaling,
            dropout=dropout,
            **kwargs,
        )
        return _rescale_zeroed(output, weights, query, key, value, mask, scaling, zeroed)


def additive_mask(
    attention_mask: torch.Tensor | None,
    query: torch.Tensor,
    key_length: int,
    query_start: int,
    rows: slice = slice(None),
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The additive mask (B, 1, R, K) of some query rows, from a model's float, bool or absent (causal) mask.

    ``dtype`` None: a float mask exactly as the model made it, the others in the query's dtype (what the model's
    own attention would add); a dtype converts the float mask too, its minimum clamped to that dtype's.
    """
    batch = query.shape[0]
    n_rows = len(range(*rows.indices(query.shape[2])))
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        selected = attention_mask[..., :key_length]
        if rows != slice(None):
            selected = selected[:, :, rows]
        selected = selected.expand(batch, 1, n_rows, key_length)
        return selected if dtype is None else selected.to(dtype).clamp(min=torch.finfo(dtype).min)
    target = dtype or query.dtype
    if attention_mask is not None:
        allowed = attention_mask[:, :, rows, :key_length].expand(batch, 1, n_rows, key_length)
    else:
        positions = torch.arange(query.shape[2], device=query.device)[rows] + query_start
        allowed = torch.arange(key_length, device=query.device)[None, :] <= positions[:, None]
        allowed = allowed[None, None].expand(batch, 1, n_rows, key_length)
    zero = torch.zeros((), dtype=target, device=query.device)
    return torch.where(allowed, zero, torch.full((), torch.finfo(target).min, dtype=target, device=query.device))


def _zero_weights(
    weights: torch.Tensor, edges: torch.Tensor, target: torch.Tensor | None, moved: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax rows (B, H, Q, K) with ``edges`` (B, Q, K) zeroed, and the zeroed mass (B, H, Q), moved to ``target``
    (in the rows where ``moved`` (B, Q) is 1, or all rows without it)."""
    edges = edges[:, None].expand_as(weights)
    mass = (weights * edges).sum(-1)
    return _add_on_target(weights.masked_fill(edges, 0.0), _moved_mass(mass, moved), target), mass


def _moved_mass(mass: torch.Tensor, moved: torch.Tensor | None) -> torch.Tensor:
    """The part (B, H, Q) of the zeroed mass that moves to the target: all of it, or the rows ``moved`` (B, Q) marks."""
    return mass if moved is None else mass * moved[:, None].to(mass.dtype)


def _add_on_target(weights: torch.Tensor, mass: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Weights (B, H, Q, K) with ``mass`` (B, H, Q) added on each sample's ``target`` key (nothing if None)."""
    if target is None:
        return weights
    index = target.view(-1, 1, 1, 1).expand(-1, weights.shape[1], weights.shape[2], 1)
    return weights.scatter_add(3, index, mass[..., None])


def _rescale_zeroed(
    output: torch.Tensor,
    weights: torch.Tensor | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    zeroed: ZeroedEdges,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn an output renormalised over the surviving keys into one with ``zeroed`` edges' weights set to zero.

    o_zeroed = (1 - m) o_renormalised (+ m v_target), m being the softmax mass on the zeroed edges; m is computed in
    float32 from the affected query rows only (text queries of a prompt), never the full attention matrix.
    """
    rows = zeroed.edges.any(dim=2).any(dim=0).nonzero().flatten()  # (Q',) query rows with any zeroed edge
    if rows.numel() == 0:
        return output, weights
    groups = query.shape[1] // key.shape[1]
    k = per_query_head(key.float(), groups)
    scores = torch.einsum("bhqd,bhkd->bhqk", query[:, :, rows].float(), k) * scaling + mask[:, :, rows].float()
    mass = (torch.softmax(scores, dim=-1) * zeroed.edges[:, None, rows]).sum(-1)  # (B, H, Q')
    share = mass.transpose(1, 2)[..., None]  # (B, Q', H, 1)
    corrected = output[:, rows].float() * (1 - share)
    moved = zeroed.moved_share(rows)
    if zeroed.target is not None:
        v = per_query_head(value.float(), groups)  # (B, H, K, d)
        target = v[torch.arange(v.shape[0], device=v.device), :, zeroed.target]  # (B, H, d)
        moved_share = share if moved is None else share * moved[:, :, None, None]
        corrected = corrected + moved_share * target[:, None]
    output = output.clone()
    output[:, rows] = corrected.to(output.dtype)
    if weights is not None:
        # Eager attention also returns the weights: give the zeroed ones, as the authors' code would see them.
        rescaled = _add_on_target(
            weights[:, :, rows].float() * (1 - mass[..., None]), _moved_mass(mass, moved), zeroed.target
        )
        weights = weights.clone()
        weights[:, :, rows] = rescaled.to(weights.dtype)
    return output, weights


def per_query_head(states: torch.Tensor, groups: int) -> torch.Tensor:
    """Key or value heads (B, H_kv, K, d) repeated for the query heads that share them."""
    # Without grouped-query attention there is nothing to repeat, and repeat_interleave would still copy.
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def _last_row(
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    row: int,
    zeroed: ZeroedEdges | None = None,
) -> LastRowObservation:
    """The last prompt position's attention recomputed in float32 from its query row only."""
    groups = query.shape[1] // key.shape[1]
    q = query[:, :, row].float()
    k = per_query_head(key.float(), groups)
    v = per_query_head(value.float(), groups)
    scores = torch.einsum("bhd,bhkd->bhk", q, k) * scaling + mask[:, :, row].float()  # (B, 1, K) row per sample
    weights = torch.softmax(scores, dim=-1)
    if zeroed is not None:
        zeroed_weights, _ = _zero_weights(
            weights[:, :, None], zeroed.edges[:, row : row + 1], zeroed.target, zeroed.moved_share(slice(row, row + 1))
        )
        weights = zeroed_weights[:, :, 0]
    return LastRowObservation(layer, q, k, v, weights, query.dtype, mask[:, :, row].float())


@contextmanager
def route_attention(
    adapter: FamilyAdapter, hooks: AttentionHooks, last_position: int, *, static_cache: bool = False
) -> Iterator[AttentionRoute]:
    """Route the language model's attention through ``hooks`` inside the block; restore it on exit.

    ``last_position`` is the padded index of the last prompt position (the same for every row of a
    left-padded batch). Routes do not nest: one set of hooks decides a model's attention at a time.
    ``static_cache``: decoding steps read a fixed-size KV buffer (analysis.pruner.latency), unused keys masked.
    """
    previous = hf.attention_implementation(adapter.text_config)
    if previous.startswith(ROUTE_PREFIX):
        raise ConfigError("interventions cannot be nested; apply one intervention at a time")
    base = eager_attention if previous == "eager" else hf.attention_function(previous)
    route = AttentionRoute(adapter, hooks, last_position, base, static_cache)
    with hf.attention_routed(adapter.text_config, f"{ROUTE_PREFIX}_{next(_ROUTE_NUMBERS)}", route):
        yield route
