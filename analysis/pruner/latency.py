"""Latency mode: the decoder run layer by layer from fixed-size buffers, replayed as CUDA graphs where it can be.

At batch 1 the eager runtime (``analysis.pruner.runtime``) is bound by the host: Python hooks and kernel launches
take longer than the GPU's work, so dropping tokens saves nothing. ``LatencyEngine.generate`` runs the same pruned
model (the same ``PrunedRuntime`` decides, masks and compacts) without transformers' generation loop:

- the vision tower and the embedding merge run as the model does them, then the engine drives the decoder layers
  itself, with a KV store of fixed size (``hf.StaticKV``) instead of a growing cache;
- runs of layers that share one token layout and need nothing from the host are captured once as a CUDA graph
  (keyed by the layers, the batch and the width) and replayed in later calls; layer widths are rounded up to a
  multiple of ``width_bucket`` (pad slots, masked) so near token counts share a graph;
- the layers where the selection rule reads the last row (its decisions are read back to the host), where a
  hidden-state rule looks, and where the authors' zeroed-weight rule rescales rows run eagerly between graphs;
- each decoding step over all layers is one graph (a device-side step counter picks the KV slot and the mask), so a
  generated token costs one replay and one read-back of the new tokens.

Text->image edges that the shallow stage removes are folded into the graph's mask input, so a replay reads nothing
but its own inputs, the weights and the KV store. Off CUDA (and where capture fails) the same static-buffer path
runs uncaptured, with a logged reason; the outputs are the eager runtime's (tested on the CPU for both families).
Greedy decoding only: a generation config with logits processors (repetition penalty, ...) is refused, and the
callers fall back to eager generation with the reason logged.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from analysis.errors import ConfigError, ToolkitError
from analysis.hooks.attention import AttentionCall, _last_row, additive_mask, route_attention
from analysis.models import hf
from analysis.models.adapters import ModelInputs, get_adapter
from analysis.models.hf import HFModel
from analysis.models.registry import LoadedModel
from analysis.pruner.config import PruningConfig
from analysis.pruner.methods import METHODS
from analysis.pruner.methods.base import SelectionState
from analysis.pruner.runtime import ATTENTION_IMPLEMENTATIONS, PrunedRuntime, _Layout
from analysis.pruner.simulate import Decisions
from analysis.transfer import to_device

logger = logging.getLogger(__name__)

WIDTH_BUCKET = 16
MAX_GRAPHS = 512  # captured graphs kept per engine (a batch's live rule picks widths, so their number grows)


class LatencyUnsupported(ToolkitError):
    """The latency mode cannot run this model or config; the caller runs eagerly instead."""


class _LatencyRuntime(PrunedRuntime):
    """The pruned runtime with the shallow stage's edges folded into masks the engine passes (graph inputs), and
    the rule's observation deferred: the routed attention only copies the last row's query out for the engine."""

    folded = False  # while True the routed attention adds no edges: the engine's masks already hold them
    defer = False  # while True the routed attention copies the last prompt row's query into ``query_row``
    query_row: torch.Tensor | None = None  # (B, H, d) in the model's dtype, a buffer of the engine's
    # Each observed layer's score scale, noted when its query is copied: the engine's dict, so that a runtime whose
    # observed layers are replays (which copy without running Python) finds what an earlier runtime's capture noted.
    scalings: dict[int, float]

    def blocked(self, layer: int, query_start: int, query_length: int, key_length: int) -> torch.Tensor | None:
        """The shallow edges, unless the engine folded them into the layer's mask."""
        if self.folded:
            return None
        return super().blocked(layer, query_start, query_length, key_length)

    def wants_last_row(self, layer: int, query_start: int, query_length: int) -> bool:
        """No observation inside the layer while deferred (the engine observes after it)."""
        return not self.defer and super().wants_last_row(layer, query_start, query_length)

    def wants_call(self, layer: int, query_start: int, query_length: int) -> bool:
        """The prefill's calls while deferred, to copy the last row's query."""
        return self.defer and self._prefill

    def inspect(self, call: AttentionCall) -> None:
        """Copy the last prompt row's query (after RoPE) into the engine's buffer."""
        if self.query_row is None:
            raise RuntimeError("a deferred observation without the engine's query buffer")
        row = self.last_row_position(call.layer, 0) - call.query_start
        self.query_row.copy_(call.query[:, :, row])
        self.scalings[call.layer] = call.scaling


class _StateView:
    """The runtime's selection state with some tensors swapped for a graph's input buffers."""

    def __init__(self, state: PrunedRuntime, **tensors: torch.Tensor) -> None:
        self._state = state
        self.__dict__.update(tensors)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


@dataclass
class _Graph:
    """One captured CUDA graph, its input buffers (copied into before every replay) and its output."""

    graph: Any
    inputs: list[torch.Tensor]
    output: Any  # a tensor, or a dict of tensors: buffers the replay refills

    def replay(self, values: list[torch.Tensor]) -> Any:
        """Copy ``values`` into the first input buffers (the rest keep theirs), replay, return the output buffer."""
        for buffer, value in zip(self.inputs, values, strict=False):
            buffer.copy_(value)
        self.graph.replay()
        return self.output


@dataclass
class _Tower:
    """The vision tower's features for a batch, queued on the device, and the image positions they go to."""

    key: tuple[Any, ...]  # the tower graph's key (input shapes)
    features: torch.Tensor  # (image tokens, D): a graph's output buffer where the tower was replayed
    rows: torch.Tensor  # (image tokens,) batch row of each feature
    columns: torch.Tensor  # (image tokens,) its padded input position


@dataclass
class LatencyResult:
    """Greedy tokens of a batch and the runtime that pruned it (its decisions and per-layer widths)."""

    tokens: torch.Tensor  # (B, new tokens), pad after a row's end of sequence
    runtime: PrunedRuntime
    logits: torch.Tensor | None = None  # (new tokens, B, V) float32 of each step, with ``return_logits``

    def decisions(self, inputs: ModelInputs) -> Decisions:
        """The per-sample pruning decisions."""
        return self.runtime.decisions(inputs.layouts)


def _tensor_leaves(kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors a decoder layer call reads besides its hidden states: mask and rotary parts."""
    leaves = []
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        leaves.append(mask)
    leaves += [part for part in kwargs.get("position_embeddings") or () if isinstance(part, torch.Tensor)]
    return leaves


def _with_leaves(kwargs: dict[str, Any], leaves: list[torch.Tensor]) -> dict[str, Any]:
    """``kwargs`` with its tensor leaves (as ``_tensor_leaves`` lists them) replaced."""
    out, rest = dict(kwargs), list(leaves)
    if isinstance(kwargs.get("attention_mask"), torch.Tensor):
        out["attention_mask"] = rest.pop(0)
    parts = kwargs.get("position_embeddings")
    if parts is not None:
        out["position_embeddings"] = tuple(rest.pop(0) if isinstance(part, torch.Tensor) else part for part in parts)
    return out


def _signature(tensors: list[torch.Tensor]) -> tuple[Any, ...]:
    """Shapes and dtypes: what a graph captured for these inputs needs of later ones."""
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


class LatencyEngine:
    """The decoder of one model run from fixed-size buffers, its graphs kept across calls."""

    def __init__(self, model: HFModel, *, graphs: bool | None = None, width_bucket: int = WIDTH_BUCKET) -> None:
        self.model = model
        self.adapter = get_adapter(model)
        self.device = next(model.parameters()).device
        if width_bucket < 1:
            raise ConfigError(f"width_bucket must be >= 1, not {width_bucket}")
        self.width_bucket = width_bucket
        wanted = self.device.type == "cuda" if graphs is None else graphs
        if wanted and self.device.type != "cuda":
            logger.warning(
                "CUDA graphs need a CUDA device; the latency mode runs its static-buffer path uncaptured on %s",
                self.device.type,
            )
            wanted = False
        self.graphs = wanted
        self.kv = hf.StaticKV(self.adapter.num_layers)
        self._graphs: dict[tuple[Any, ...], _Graph | None] = {}  # None: capture failed, run eagerly
        self._pool: Any = None  # the memory pool the graphs share, made at the first capture
        self._reported: set[str] = set()
        self._masks: dict[tuple[int, str], torch.Tensor | None] = {}  # the identity layout's mask per attention kind
        self._query_row: torch.Tensor | None = None  # the observed layer's last-row query, copied out in the layer
        self._pending: torch.Tensor | None = None  # (B,) deferred layers' tests, summed on the device
        self._deferred = 0  # observed layers whose tests ``_pending`` holds, unread by the host
        self._scalings: dict[int, float] = {}  # per observed layer, its attention's score scale
        self._tower_matches: dict[tuple[Any, ...], bool] = {}  # per input shape: the tower path merges as the model

    # -- support -----------------------------------------------------------------------------------
    def unsupported(self, config: PruningConfig) -> str | None:
        """Why the latency mode cannot run ``config`` on this model (None: it can)."""
        if self.adapter.deepstack:
            return f"{self.adapter.model_type} adds DeepStack features inside its decoder, which the engine does not"
        implementation = hf.attention_implementation(self.adapter.text_config)
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            return f"attention implementation {implementation!r} (load with attn_implementation='sdpa')"
        placement = hf.device_map(self.model)
        if placement is not None and len(set(placement.values())) > 1:
            return "the model is split over several devices by a device map; the engine keeps one device's buffers"
        processors = hf.greedy_processors(self.model)
        if processors:
            return f"the generation config sets {', '.join(processors)}, which greedy decoding here does not apply"
        return None

    def report(self, reason: str, level: int = logging.INFO) -> None:
        """Log a reason for running some or all of the work eagerly, once per engine."""
        if reason not in self._reported:
            self._reported.add(reason)
            logger.log(level, "latency mode: %s", reason)

    # -- generation --------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        inputs: ModelInputs,
        max_new_tokens: int,
        config: PruningConfig | None = None,
        *,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        return_logits: bool = False,
        embeds: torch.Tensor | None = None,
        decisions: Decisions | None = None,
    ) -> LatencyResult:
        """Greedy tokens for a left-padded batch, pruned by ``config`` (None: unpruned); ``return_logits`` keeps
        every step's logits too; ``embeds``: the language model's input embeddings already made (benchmarks time
        the decoder alone with it; a rule that reads the vision tower needs the tower's pass); ``decisions``: pinned
        instead of the rule's (benchmarks time the same schedule without its rule)."""
        adapter = self.adapter
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
        config = config or PruningConfig(method="none", num_layers=adapter.num_layers)
        config.validate(adapter.num_layers)
        reason = self.unsupported(config)
        if reason is not None:
            raise LatencyUnsupported(reason)
        implementation = hf.attention_implementation(adapter.text_config)
        text_model = adapter.language_model()
        reads_vision = METHODS.get(config.method).reads_vision
        # The tower first: the runtime's host work below overlaps its replay.
        tower = self._queue_tower(inputs) if embeds is None and not reads_vision else None
        runtime = _LatencyRuntime(adapter, config, inputs.layouts, implementation, decisions)
        runtime.width_bucket = self.width_bucket
        runtime.scalings = self._scalings
        positions = to_device(adapter.rope_positions(inputs), self.device)
        if embeds is None or reads_vision:
            embeds = self._embeddings(runtime, text_model, inputs, tower)
        batch, length = embeds.shape[:2]
        slots = -(-(length + max_new_tokens) // self.width_bucket) * self.width_bucket
        shape = (batch, adapter.num_kv_heads, slots, adapter.head_dim)
        if self.kv.reserve(shape, embeds.dtype, self.device):
            self._drop_graphs()  # captured graphs write into the buffers they were captured with
        with route_attention(adapter, runtime, runtime.prompt_length - 1, static_cache=True):
            hidden = self._prefill(runtime, text_model, embeds, positions)
            logits = [self._logits(hidden[:, -1:])]
            runtime.frozen = True
            tokens = self._decode(
                runtime, text_model, logits, positions, max_new_tokens, eos_token_id, pad_token_id, return_logits
            )
        return LatencyResult(tokens, runtime, torch.stack(logits) if return_logits else None)

    def _queue_tower(self, inputs: ModelInputs) -> _Tower | None:
        """The vision tower and projector queued on the device (a graph where they can be), with the image
        positions their features go to; None where the model's own pass makes the embeddings instead."""
        adapter, tensors = self.adapter, inputs.tensors
        names = [name for name in adapter.image_input_keys if isinstance(tensors.get(name), torch.Tensor)]
        image_inputs = [tensors[name] for name in names]
        key = ("tower", _signature([inputs.input_ids, *image_inputs]))
        if self._tower_matches.get(key) is False:
            return None
        rows = torch.cat(
            [torch.full((layout.n_image_tokens,), row, dtype=torch.long) for row, layout in enumerate(inputs.layouts)]
        )
        columns = torch.cat(
            [torch.as_tensor(layout.padded(layout.image_positions), dtype=torch.long) for layout in inputs.layouts]
        )

        def tower(values: list[torch.Tensor]) -> torch.Tensor:
            return hf.flat_image_features(adapter.image_features({**tensors, **dict(zip(names, values, strict=True))}))

        if self.graphs and adapter.static_vision_tower:
            features = self._replay_or_capture(key, tower, image_inputs)
        else:
            if self.graphs:
                self.report(f"the {adapter.model_type} vision tower plans its work on the host: it runs eagerly")
            features = tower(image_inputs)
        return _Tower(key, features, to_device(rows, self.device), to_device(columns, self.device))

    def _embeddings(
        self, runtime: _LatencyRuntime, text_model: nn.Module, inputs: ModelInputs, tower: _Tower | None
    ) -> torch.Tensor:
        """The language model's input embeddings: text embeddings with the queued tower's features at the image
        positions, checked once per input shape against the model's own merge (the model's pass without a tower)."""
        adapter, tensors = self.adapter, inputs.tensors
        if runtime.method.reads_vision:
            # The rule reads the tower's attention as it runs: the model's own pass, with the tower observed.
            with adapter.vision_attention() as passes:
                runtime.vision_passes = passes
                return hf.language_model_embeddings(self.model, text_model, tensors)
        if tower is None:
            return hf.language_model_embeddings(self.model, text_model, tensors)
        merged = adapter.embed_tokens(inputs.input_ids).clone()
        if tower.features.shape[0] != tower.rows.shape[0]:
            self._tower_matches[tower.key] = False
            self.report(f"the tower gives {tower.features.shape[0]} features for {tower.rows.shape[0]} image tokens")
            return hf.language_model_embeddings(self.model, text_model, tensors)
        merged[tower.rows, tower.columns] = tower.features.to(merged.dtype)
        if tower.key not in self._tower_matches:
            # Once per shape: the merge must be the model's own, or the model's pass is used from then on.
            reference = hf.language_model_embeddings(self.model, text_model, tensors)
            self._tower_matches[tower.key] = bool(torch.allclose(merged, reference, rtol=1e-3, atol=1e-3))
            if not self._tower_matches[tower.key]:
                self.report("the tower's features merged here differ from the model's merge; using the model's pass")
                return reference
        return merged

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, V) float32 next-token logits from the last position's hidden states (B, 1, D)."""
        return self.adapter.lm_head()(self.adapter.final_norm()(hidden))[:, -1].float()

    # -- prefill -----------------------------------------------------------------------------------
    @staticmethod
    def _observed(runtime: _LatencyRuntime, layer: int) -> bool:
        """Whether the rule reads ``layer``'s last row in this prefill."""
        return not runtime.method.reads_hidden(layer) and runtime.wants_last_row(layer, 0, runtime.prompt_length)

    def _eager_reason(self, runtime: _LatencyRuntime, layer: int) -> str | None:
        """Why ``layer`` must run eagerly in this prefill (None: it can be captured, alone when observed)."""
        method = runtime.method
        if method.reads_hidden(layer) and not runtime.frozen:
            return f"{method.name} reads the hidden states entering layer {layer} on the host"
        if layer == 0 and runtime.rewritten is not None:
            return "merged image embeddings are written into layer 0's input"
        if runtime.shallow_rule(layer, 0) == "zero":
            return "the zeroed-weight shallow rule finds its rows on the host"
        if not method.splits_decision and runtime.wants_last_row(layer, 0, runtime.prompt_length):
            return f"{method.name}'s rule reads layer {layer}'s last row on the host"
        return None

    def _prefill(
        self, runtime: _LatencyRuntime, text_model: nn.Module, embeds: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Run the prompt through every decoder layer; returns the last layer's hidden states (slots of its layout)."""
        adapter = self.adapter
        layers = list(adapter.decoder_layers())
        length = embeds.shape[1]
        runtime.begin_prefill(length)
        self._masks = {}
        if self._pending is not None:
            self._pending.zero_()  # tests deferred past the last observed layer of the previous call
        self._deferred = 0
        rotary = hf.rotary_embeddings(text_model, embeds, positions)
        hidden = embeds
        layer = 0
        while layer < len(layers):
            reason = self._eager_reason(runtime, layer)
            if reason is not None:
                if self.graphs:
                    self.report(f"{reason}: that layer runs eagerly")
                args, kwargs = self._layer_inputs(runtime, layers[layer], layer, hidden, rotary, fold=False)
                hidden = hf.call_decoder_layer(layers[layer], args[0], kwargs)
                layer += 1
                continue
            if self._observed(runtime, layer):
                args, kwargs = self._layer_inputs(runtime, layers[layer], layer, hidden, rotary, fold=True)
                ahead = runtime.method.deferrable(runtime, layer, self._deferred)
                if ahead > 0:
                    # Layers whose tests cannot change a decision: one graph, no read-back until a later layer's.
                    end = self._same_layout_end(runtime, layer, min(layer + ahead, len(layers)), observed=True)
                    for later in range(layer + 1, end):
                        self._layer_inputs(runtime, layers[later], later, hidden, rotary, fold=False)
                    hidden = self._run_deferred(runtime, layer, layers[layer:end], args[0], kwargs)
                    layer = end
                    continue
                # The layer alone (copying out its last query row), then the rule's arithmetic as a graph of its
                # own, then one read-back of its tests.
                hidden = self._run_observed(runtime, layer, layers[layer], args[0], kwargs)
                layer += 1
                continue
            # A run of layers with one layout, none needing the host: one graph.
            end = self._same_layout_end(runtime, layer, len(layers), observed=False)
            args, kwargs = self._layer_inputs(runtime, layers[layer], layer, hidden, rotary, fold=True)
            hidden = args[0]
            for later in range(layer + 1, end):
                # The same layout: these hooks only record it (the first layer's folded inputs serve the run).
                self._layer_inputs(runtime, layers[later], later, hidden, rotary, fold=False)
            hidden = self._run_graphed(("prefill", layer, end), layers[layer:end], hidden, kwargs, runtime)
            layer = end
        return hidden

    def _same_layout_end(self, runtime: _LatencyRuntime, layer: int, limit: int, *, observed: bool) -> int:
        """The end (before ``limit``) of the run of layers from ``layer`` that share its layout, attention rule and
        shallow rule, need no eager step and are all observed (``observed``) or all not."""
        end = layer + 1
        while (
            end < limit
            and self._eager_reason(runtime, end) is None
            and self._observed(runtime, end) == observed
            and not runtime._cuts_before(end)
            and runtime.rules[end] == runtime.rules[layer]
            and runtime.shallow_rule(end, 0) == runtime.shallow_rule(layer, 0)
        ):
            end += 1
        return end

    def _layer_inputs(
        self,
        runtime: _LatencyRuntime,
        module: nn.Module,
        layer: int,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, ...],
        *,
        fold: bool,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The runtime's layer hook applied to a call of ``layer``; with ``fold`` the shallow edges are in the mask."""
        layout, rule = runtime._layout, runtime.rules[layer]
        mask = None
        if layout.identity:
            # The model's own sequence; a compacted layout (now or made by the hook) gets its mask from the hook.
            cached = (id(layout), rule.kind)
            if cached not in self._masks:
                self._masks[cached] = runtime._mask(
                    layout.positions, layout.valid, layout.padded, layout.length, hidden.dtype, rule
                )
            mask = self._masks[cached]
        kwargs = hf.decoder_layer_kwargs(module, self.kv, mask, rotary)
        result = runtime.layer_hook(layer)(module, (hidden,), kwargs)
        args, kwargs = result if result is not None else ((hidden,), kwargs)
        if fold:
            edges = runtime.shallow_edges(layer, 0, runtime._layout.length, runtime._layout.length)
            if edges is not None:
                kwargs = dict(kwargs)
                kwargs["attention_mask"] = self._fold(runtime, layer, kwargs.get("attention_mask"), edges)
        return args, kwargs

    def _fold(
        self, runtime: _LatencyRuntime, layer: int, mask: torch.Tensor | None, edges: torch.Tensor
    ) -> torch.Tensor:
        """A layer's mask (B, 1, Q, K) with ``edges`` (B, Q, K) removed, as the routed attention would remove them."""
        if mask is None:
            layout = runtime._layout
            mask = runtime._mask(
                layout.positions, layout.valid, layout.padded, layout.length, torch.bool, runtime.rules[layer], True
            )
            assert mask is not None
        if mask.dtype == torch.bool:
            return mask & ~edges[:, None]
        return mask.masked_fill(edges[:, None], torch.finfo(mask.dtype).min)

    def _run_graphed(
        self,
        name: tuple[Any, ...],
        modules: list[nn.Module],
        hidden: torch.Tensor,
        kwargs: dict[str, Any],
        runtime: _LatencyRuntime,
    ) -> torch.Tensor:
        """Run ``modules`` in order on ``hidden``: a replay of their graph, captured on first use."""
        leaves = _tensor_leaves(kwargs)
        key = (*name, _signature([hidden, *leaves]))

        def run(values: list[torch.Tensor]) -> torch.Tensor:
            state, call = values[0], _with_leaves(kwargs, values[1:])
            for module in modules:
                state = hf.call_decoder_layer(module, state, call)
            return state

        runtime.folded = True
        try:
            if not self.graphs:
                return run([hidden, *leaves])
            return self._replay_or_capture(key, run, [hidden, *leaves])
        finally:
            runtime.folded = False

    def _observer_buffers(self, hidden: torch.Tensor) -> None:
        """The observed layers' buffers for this batch: the last-row query and the deferred tests' counter."""
        heads, dim = self.adapter.num_heads, self.adapter.head_dim
        shape = (hidden.shape[0], heads, dim)
        if self._query_row is None or tuple(self._query_row.shape) != shape or self._query_row.dtype != hidden.dtype:
            self._query_row = torch.zeros(shape, dtype=hidden.dtype, device=self.device)
            self._pending = torch.zeros(hidden.shape[0], dtype=torch.long, device=self.device)
            self._drop_graphs()  # graphs that copy into the old buffers

    def _rule_inputs(
        self, runtime: _LatencyRuntime, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> list[torch.Tensor]:
        """What the rule's device arithmetic reads besides the engine's buffers: the last row's additive float32 mask
        (B, 1, K), each row's image slots, which are valid and which are kept."""
        layout = runtime._layout
        width = layout.length
        # From the layer's boolean, additive or absent (causal) mask; the hidden states (B, 1, S, D) stand for the
        # layer's queries, of which only the count and device are read.
        last = slice(width - 1, width)
        row_mask = additive_mask(kwargs.get("attention_mask"), hidden[:, None], width, 0, last, torch.float32)[:, :, 0]
        return [row_mask, runtime._image_slots(layout), runtime.image_valid, runtime.keep]

    def _measure(
        self, runtime: _LatencyRuntime, layer: int, width: int, tensors: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The rule's device arithmetic on ``layer``'s last row of ``width`` keys (the query copied out by the layer
        just run)."""
        row, slots, valid, keep = tensors
        keys, values, query = self.kv.keys[layer], self.kv.values[layer], self._query_row
        assert keys is not None and values is not None and query is not None
        observation = _last_row(
            layer,
            query[:, :, None],
            keys[:, :, :width],
            values[:, :, :width],
            row[:, :, None],
            runtime.scalings[layer],
            0,
        )
        observation.image_index = slots
        view = cast(SelectionState, _StateView(runtime, image_valid=valid, keep=keep))
        return runtime.method.measure(view, observation)

    def _run_observed(
        self, runtime: _LatencyRuntime, layer: int, module: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """Run an observed layer, then the rule from its last row: the layer and the rule's device arithmetic as
        graphs, the rule's host update after one read-back (of the deferred layers' tests too)."""
        self._observer_buffers(hidden)
        runtime.query_row = self._query_row
        runtime.defer = True
        try:
            hidden = self._run_graphed(("observed", layer, layer + 1), [module], hidden, kwargs, runtime)
        finally:
            runtime.defer = False
        inputs = self._rule_inputs(runtime, hidden, kwargs)
        width = runtime._layout.length  # fixed at capture, as a graph fixes it

        def measure(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            return self._measure(runtime, layer, width, tensors)

        if self.graphs:
            # The rule's code and constants are baked into its graph: one graph per config, not per shape alone.
            key = ("rule", layer, _signature(inputs), repr(runtime.config))
            measured = self._replay_or_capture(key, measure, inputs)
        else:
            measured = measure(inputs)
        if self._deferred:
            measured = {**measured, "pending": self._pending}
            self._deferred = 0
        runtime.apply_measured(layer, measured)
        return hidden

    def _run_deferred(
        self,
        runtime: _LatencyRuntime,
        start: int,
        modules: list[nn.Module],
        hidden: torch.Tensor,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Observed layers whose tests cannot change a decision yet, as one graph: each layer, then the rule's
        arithmetic, its tests folded into the engine's counter on the device for the next read-back."""
        self._observer_buffers(hidden)
        runtime.query_row = self._query_row
        method, pending = runtime.method, self._pending
        assert pending is not None
        leaves = _tensor_leaves(kwargs)
        rule_inputs = self._rule_inputs(runtime, hidden, kwargs)
        width = runtime._layout.length

        def run(values: list[torch.Tensor]) -> torch.Tensor:
            state, call = values[0], _with_leaves(kwargs, values[1 : 1 + len(leaves)])
            for offset, module in enumerate(modules):
                state = hf.call_decoder_layer(module, state, call)
                method.defer(self._measure(runtime, start + offset, width, values[1 + len(leaves) :]), pending)
            return state

        values = [hidden, *leaves, *rule_inputs]
        runtime.folded = runtime.defer = True
        try:
            if self.graphs:
                key = ("deferred", start, start + len(modules), _signature(values), repr(runtime.config))
                hidden = self._replay_or_capture(key, run, values)
            else:
                hidden = run(values)
        finally:
            runtime.folded = runtime.defer = False
        self._deferred += len(modules)
        return hidden

    def _drop_graphs(self) -> None:
        """Forget every captured graph and capture later ones into a new memory pool."""
        self._graphs.clear()
        # Outputs of the dropped graphs may still be alive (the tower's features, a layer's hidden states): their
        # pool then outlives its graphs, and the allocator refuses to capture into a pool no graph holds.
        self._pool = None

    def _replay_or_capture(
        self,
        key: tuple[Any, ...],
        run: Callable[[list[torch.Tensor]], Any],
        values: list[torch.Tensor],
        changed: int | None = None,
    ) -> Any:
        """``run(values)`` as a replay of its graph (captured on first use), or eagerly where capture failed;
        ``changed``: only the first that many values differ from the previous replay's."""
        if key not in self._graphs:
            if len(self._graphs) >= MAX_GRAPHS:
                # Oldest first: each graph holds its output buffer, and widths vary from batch to batch.
                del self._graphs[next(iter(self._graphs))]
            self._graphs[key] = self._capture(key, run, values)
            changed = None
        graph = self._graphs[key]
        if graph is None:
            return run(values)
        return graph.replay(values if changed is None else values[:changed])

    def _capture(
        self, key: tuple[Any, ...], run: Callable[[list[torch.Tensor]], Any], values: list[torch.Tensor]
    ) -> _Graph | None:
        """Capture ``run`` on copies of ``values`` (after warm-up on a side stream); None where capture fails."""
        inputs = [value.clone() for value in values]
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    run(inputs)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                output = run(inputs)
        except RuntimeError as error:
            torch.cuda.synchronize(self.device)
            self.report(f"could not capture {key[:3]} ({str(error).splitlines()[0]}); it runs eagerly")
            return None
        return _Graph(graph, inputs, output)

    # -- decoding ----------------------------------------------------------------------------------
    def _decode(
        self,
        runtime: _LatencyRuntime,
        text_model: nn.Module,
        logits: list[torch.Tensor],
        positions: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None,
        pad_token_id: int | None,
        return_logits: bool,
    ) -> torch.Tensor:
        """Greedy decoding after the prefill's logits (``logits[0]``, to which each step's are appended when
        ``return_logits``); returns the tokens (B, max_new_tokens)."""
        first = logits[0].argmax(-1)
        adapter, kv = self.adapter, self.kv
        layers = list(adapter.decoder_layers())
        batch = first.shape[0]
        out = torch.full((batch, max_new_tokens), pad_token_id or 0, dtype=torch.long, device=self.device)
        out[:, 0] = first
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        if eos_token_id is not None:
            finished |= first == eos_token_id
        if max_new_tokens == 1 or bool(finished.all()):
            return out
        runtime._prefill = False
        runtime._query_length = 1
        runtime._prepared = {}
        capturable = self.graphs
        prefixes = []
        for layer, layout in enumerate(runtime._layer_layouts):
            kv.window[layer] = layout.length + max_new_tokens
            prefixes.append(self._decode_prefix(runtime, layer, layout, max_new_tokens))
            if runtime.shallow_rule(layer, runtime.prompt_length) == "zero":
                capturable = False
                self.report("the zeroed-weight shallow rule in decoding steps runs eagerly")
        last_position = positions[..., -1:]
        additive = self.adapter.embed_tokens(first[:1, None]).dtype if runtime.eager else None
        widths = torch.tensor([layout.length for layout in runtime._layer_layouts], device=self.device)

        # Everything a step reads is one of its values (a graph replays kernels on the addresses it was captured
        # with): the new token and the counter change every step, the rest once per call.
        def step(values: list[torch.Tensor]) -> torch.Tensor:
            token, counter, last, width = values[:4]
            kv.step = counter
            hidden = adapter.embed_tokens(token[:, None])
            rotary = hf.rotary_embeddings(text_model, hidden, last + 1 + counter)
            for layer, module in enumerate(layers):
                window = torch.arange(kv.window[layer], device=self.device)
                allowed = values[4 + layer] & (window <= width[layer] + counter)[None, :]
                mask = self._decode_mask(allowed, additive)
                hidden = hf.call_decoder_layer(module, hidden, hf.decoder_layer_kwargs(module, kv, mask, rotary))
            return self._logits(hidden)

        key = ("decode", batch, tuple(kv.window), _signature(prefixes))
        token = first
        kv.decoding = True
        runtime.folded = True
        try:
            for index in range(1, max_new_tokens):
                counter = torch.full((1,), index - 1, dtype=torch.long, device=self.device)
                values = [token, counter, last_position, widths, *prefixes]
                # The per-layer key sets stay in the graph's buffers after the first step: later ones copy two values.
                scores = (
                    self._replay_or_capture(key, step, values, 2 if index > 1 else None) if capturable else step(values)
                )
                if return_logits:
                    logits.append(scores.clone())
                token = scores.argmax(-1)
                if eos_token_id is not None:
                    token = torch.where(finished, torch.full_like(token, pad_token_id or 0), token)
                out[:, index] = token
                if eos_token_id is not None:
                    finished |= token == eos_token_id
                    if bool(finished.all()):
                        break
        finally:
            kv.decoding = False
            kv.step = None
            runtime.folded = False
        return out

    def _decode_prefix(
        self, runtime: _LatencyRuntime, layer: int, layout: _Layout, max_new_tokens: int
    ) -> torch.Tensor:
        """(B, window) keys a decoding query may see in ``layer``: the prefill's real slots, minus the shallow edges
        of a generated (text) query, then every new-token slot (the step counter limits those to the past)."""
        batch = layout.valid.shape[0]
        allowed = torch.cat([layout.valid, layout.valid.new_ones(batch, max_new_tokens)], dim=1)
        window = allowed.shape[1]
        edges = runtime.shallow_edges(layer, window - 1, 1, window)
        if edges is not None:
            allowed = allowed & ~edges[:, 0]
        return allowed

    @staticmethod
    def _decode_mask(allowed: torch.Tensor, additive: torch.dtype | None) -> torch.Tensor:
        """The (B, 1, 1, window) mask of one decoding query: boolean (SDPA), or additive in ``additive`` (eager)."""
        mask = allowed[:, None, None, :]
        if additive is None:
            return mask
        return torch.zeros(mask.shape, dtype=additive, device=mask.device).masked_fill(~mask, torch.finfo(additive).min)


_ENGINES: weakref.WeakKeyDictionary[Any, LatencyEngine] = weakref.WeakKeyDictionary()


def engine_for(model: HFModel) -> LatencyEngine:
    """The model's latency engine (made on first use; its graphs and buffers live as long as the model)."""
    engine = _ENGINES.get(model)
    if engine is None:
        engine = _ENGINES[model] = LatencyEngine(model)
    return engine


def latency_generate(
    loaded: LoadedModel, inputs: ModelInputs, max_new_tokens: int, config: PruningConfig | None = None
) -> LatencyResult | None:
    """Greedy tokens of a batch in the latency mode, pruned by ``config`` (None: unpruned); None where the mode
    cannot run this model or config (the reason logged once), so the caller generates eagerly."""
    tokenizer = loaded.processor.tokenizer
    engine = engine_for(loaded.model)
    try:
        return engine.generate(
            inputs,
            max_new_tokens,
            config,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    except LatencyUnsupported as error:
        engine.report(f"the latency mode cannot run here ({error}); generating eagerly", logging.WARNING)
        return None
