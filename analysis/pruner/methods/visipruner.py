"""VisiPruner (Fan et al., EMNLP 2025): three stages from where the model uses vision.

- shallow: text queries skip the image keys below ``shallow_mid_layer`` (the image is an attention sink there);
- middle: from the first layer where removing some image token turns the last row's attention output away
  (cosine below ``layer_threshold``), keep only the tokens whose contribution norm exceeds ``tokens_threshold``;
- deep: once the kept tokens have changed nothing (cosine >= ``deep_cosine``) in ``deep_patience`` observed layers,
  not necessarily consecutive (as the authors count them), every image token goes.

``rule`` "authors" follows the authors' code instead of the paper where they differ (README: the differences).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from analysis.hooks.attention import LastRowObservation
from analysis.hooks.contributions import image_contributions
from analysis.pruner.methods.base import MethodConfig, PruningMethod, SelectionState
from analysis.pruner.methods.fastv import image_keys

STAGES = ("shallow", "middle", "deep")
# How the shallow stage removes text->image attention. "mask": hidden before the softmax, so the text's attention
# renormalises over the remaining keys (ours). "zero": weights zeroed after the softmax without renormalising, as
# the authors' code does; the removed mass is lost (in layer 0 their rules below decide).
SHALLOW_RULES = ("mask", "zero")
# Layer 0 of the shallow stage. "none": a shallow layer like the others. The authors' code has one rule per
# checkpoint size (custom_modeling_llama.py, VisiPrunerLlamaAttention.forward, lines 687-699): "authors_7b" zeroes
# every query row from the first image token on (image and text) against the image keys and puts each text row's
# removed mass on the first image token (image rows lose theirs); "authors_13b" zeroes image->image and text->the
# first half of the image tokens, moving nothing.
LAYER0_RULES = ("none", "authors_7b", "authors_13b")
# Which implementation of VisiPruner a config follows: ours, or the authors' code (their arithmetic, limits and the
# keep-everything behaviour; the README lists every difference).
RULES = ("ours", "authors")
# The authors' deep stage (value_aware_token_selection given the kept tokens, lines 560-568; the exit in
# LlamaModel.forward, lines 1398-1403): the image leaves once, in two layers after the selection, no kept token
# moved the last row's output below a cosine of 0.999.
AUTHORS_DEEP_COSINE = 0.999
AUTHORS_DEEP_PATIENCE = 2
# Precision of the selection rule's contributions and cosines: float32 (ours), or the model's dtype as in the
# authors' code, where 0.999 is 2 ulp from 1 in fp16.
RULE_PRECISIONS = ("float32", "model")


@dataclass(frozen=True)
class VisiPrunerConfig(MethodConfig):
    """VisiPruner's stages, thresholds and which implementation's details to follow."""

    stages: list[str] = field(default_factory=lambda: list(STAGES))
    shallow_mid_layer: int = 6
    layer_threshold: float = 0.995
    tokens_threshold: float = 0.2
    deep_cosine: float = 0.999
    deep_patience: int = 2
    shallow_in_decode: bool = True
    shallow_rule: str = "mask"
    layer0_rule: str = "none"
    rule_precision: str = "float32"
    rule: str = "ours"


def authors_row_weights(observation: LastRowObservation) -> torch.Tensor:
    """The last row's attention weights as the authors' code computes them: scores in the model's dtype (q k^T /
    sqrt(d)), the mask added, a float32 softmax cast back (custom_modeling_llama.py lines 669-685)."""
    dtype = observation.model_dtype
    query, keys = observation.query.to(dtype), observation.keys.to(dtype)
    scores = torch.einsum("bhd,bhkd->bhk", query, keys) / math.sqrt(query.shape[-1])
    if observation.mask is not None:
        scores = scores + observation.mask.to(dtype)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)


class VisiPruner(PruningMethod):
    """The three-stage rule, ours or the authors'."""

    name = "visipruner"
    config_type = VisiPrunerConfig
    label = "VisiPruner"
    description = "VisiPruner: shallow text->image cut, middle-stage selection by contribution, deep exit"
    params: VisiPrunerConfig

    def problems(self, num_layers: int) -> list[str]:
        """Stages, layers and thresholds in range, known rules; under the authors' rule, their limits too."""
        p, problems = self.params, []
        unknown_stages = [s for s in p.stages if s not in STAGES]
        if unknown_stages:
            problems.append(f"unknown mode(s) {unknown_stages} (choose from {', '.join(STAGES)})")
        if num_layers and not 0 <= p.shallow_mid_layer < num_layers:
            problems.append(f"shallow_mid_layer {p.shallow_mid_layer} outside 0..{num_layers - 1}")
        if not 0 < p.layer_threshold <= 1:
            problems.append(f"layer_threshold {p.layer_threshold} outside (0, 1]")
        if not 0 < p.deep_cosine <= 1:
            problems.append(f"deep_cosine {p.deep_cosine} outside (0, 1]")
        for name, value, allowed in (
            ("shallow_rule", p.shallow_rule, SHALLOW_RULES),
            ("layer0_rule", p.layer0_rule, LAYER0_RULES),
            ("rule_precision", p.rule_precision, RULE_PRECISIONS),
        ):
            if value not in allowed:
                problems.append(f"unknown {name} {value!r} (choose from {', '.join(allowed)})")
        if p.layer0_rule != "none" and p.shallow_rule != "zero":
            problems.append(f"layer0_rule {p.layer0_rule!r} zeroes attention weights, so it needs shallow_rule 'zero'")
        if p.layer0_rule == "first_image":
            problems.append(
                "layer0_rule 'first_image' left image->image attention alone, unlike the authors' code; "
                "use 'authors_7b'"
            )
        if p.rule not in RULES:
            problems.append(f"unknown rule {p.rule!r} (choose from {', '.join(RULES)})")
        elif p.rule == "authors":
            problems += self._authors_problems(num_layers)
        if p.tokens_threshold < 0:
            problems.append(f"tokens_threshold {p.tokens_threshold} must be >= 0 (an absolute norm)")
        if p.deep_patience < 1:
            problems.append("deep_patience must be >= 1")
        return problems

    def _authors_problems(self, depth: int) -> list[str]:
        """What the authors' mode does not allow: their validation (validate_pruning_config, lines 103-126) and
        their fixed choices."""
        p, problems = self.params, []
        stages = set(p.stages)
        if stages & {"shallow", "middle"} and (p.shallow_mid_layer < 1 or (depth and p.shallow_mid_layer >= depth)):
            problems.append(
                f"their shallow_mid_layer must lie in [1, {depth - 1 if depth else 'num_layers - 1'}], "
                f"not {p.shallow_mid_layer}"
            )
        if stages & {"middle", "deep"}:
            for name in ("layer_threshold", "tokens_threshold"):
                if not 0 < getattr(p, name) < 1:
                    problems.append(f"their {name} must lie strictly inside (0, 1), not {getattr(p, name)}")
        if "deep" in stages and "middle" not in stages:
            problems.append(
                "their deep stage without the middle one needs mid_deep_layer, which their code never "
                "reads (it cannot exit without a selection)"
            )
        fixed = {
            "shallow_rule": "zero",
            "shallow_in_decode": False,
            "rule_precision": "model",
            "deep_cosine": AUTHORS_DEEP_COSINE,
            "deep_patience": AUTHORS_DEEP_PATIENCE,
        }
        problems += [
            f"their {name} is {value!r}, not {getattr(p, name)!r}"
            for name, value in fixed.items()
            if getattr(p, name) != value
        ]
        return problems

    # -- the rule --------------------------------------------------------------------------------
    def observes(self, layer: int, state: SelectionState) -> bool:
        """After the shallow stage, while some sample still holds its image."""
        if "middle" not in self.params.stages:
            return False
        return layer > self.params.shallow_mid_layer and bool((state.exit_layer < 0).any())

    splits_decision = True

    def decide(self, state: SelectionState, observation: LastRowObservation) -> None:
        """Select where a token's removal turns the output; exit where the kept tokens stop mattering."""
        self.apply(state, observation.layer, self.measure(state, observation))

    def measure(self, state: SelectionState, observation: LastRowObservation) -> dict[str, torch.Tensor]:
        """Every row's tests of this layer on the device: whether the selection fires, whether the kept tokens are
        negligible, whether the selection keeps every token, and the tokens a selection here would keep."""
        p = self.params
        authors = p.rule == "authors"
        if p.rule_precision == "model":
            dtype = observation.model_dtype
            weights = authors_row_weights(observation) if authors else observation.weights.to(dtype)
            observation = replace(
                observation,
                query=observation.query.to(dtype),
                keys=observation.keys.to(dtype),
                values=observation.values.to(dtype),
                weights=weights,
            )
        recorded = image_contributions(
            observation, image_keys(observation), state.image_valid, authors_formulas=authors
        )
        cosine, norm = recorded["cosine"], recorded["norm"]
        valid = state.image_valid
        fires = ((cosine < p.layer_threshold) & valid).any(1)
        # A selection keeping no token counts as negligible, as an empty set's "all" does.
        negligible = ((cosine >= p.deep_cosine) | ~state.keep).all(1)
        keeps_all = (state.keep | ~valid).all(1)
        return {"tests": torch.stack([fires, negligible, keeps_all]), "candidates": (norm > p.tokens_threshold) & valid}

    def apply(self, state: SelectionState, layer: int, measured: dict[str, torch.Tensor]) -> None:
        """Select the rows whose test fired; count the quiet layers of selected rows and exit them after enough."""
        p = self.params
        authors = p.rule == "authors"
        # Every row's tests at once, read back in one transfer: a read-back per row and test stalled the GPU's queue
        # twice per sample in every observed layer.
        tests, pending = measured["tests"], measured.get("pending")
        if pending is None:
            fires, negligible, keeps_all = tests.cpu()
        else:
            # The deferred layers' counts come back in the same transfer. They were all after every row's selection
            # and before any exit (``deferrable``), so each counted for every row still running.
            read = torch.cat([tests.long(), pending[None]]).cpu()
            fires, negligible, keeps_all = read[:3].bool()
            running = state.exit_layer < 0
            state.negligible[running] += read[3][running]
            pending.zero_()
        undecided = state.selection_layer < 0
        selected = undecided & fires
        if selected.any():
            candidates = measured["candidates"]
            state.keep = torch.where(selected.to(candidates.device)[:, None], candidates, state.keep)
            state.selection_layer[selected] = layer
        if authors:
            # A selection that kept every image token never shortens their sequence, so their exit (which looks for
            # the shortened length) is never reached: those samples keep the image to the end.
            negligible &= ~keeps_all
        if "deep" in p.stages:
            quiet = ~undecided & (state.exit_layer < 0) & (layer > state.selection_layer) & negligible
            state.negligible[quiet] += 1
            state.exit_layer[quiet & (state.negligible >= p.deep_patience)] = layer

    def deferrable(self, state: SelectionState, layer: int, deferred: int) -> int:
        """Once every row has selected, the layers in which no running row can reach the deep stage's patience (each
        observed layer adds at most one to a row's count)."""
        p = self.params
        running = state.exit_layer < 0
        if "deep" not in p.stages or not running.any() or (state.selection_layer < 0).any():
            return 0
        if (state.selection_layer >= layer).any():
            return 0
        return max(int((p.deep_patience - 1 - deferred - state.negligible[running]).min()), 0)

    def defer(self, measured: dict[str, torch.Tensor], pending: torch.Tensor) -> None:
        """Count this layer's negligible rows into ``pending`` (as ``apply`` would count them)."""
        _, negligible, keeps_all = measured["tests"]
        if self.params.rule == "authors":
            negligible = negligible & ~keeps_all
        pending += negligible

    # -- the shallow stage ---------------------------------------------------------------------------
    def shallow_rule(self, layer: int, decoding: bool) -> str | None:
        """Below ``shallow_mid_layer``, in decoding steps too unless ``shallow_in_decode`` is off."""
        p = self.params
        active = "shallow" in p.stages and layer < p.shallow_mid_layer and (p.shallow_in_decode or not decoding)
        return p.shallow_rule if active else None

    def layer0_rule(self) -> str:
        """The configured layer-0 rule (the authors' per-checkpoint rules, or none)."""
        return self.params.layer0_rule

    def text_blind_layers(self) -> int:
        """The shallow stage's layers."""
        return self.params.shallow_mid_layer if "shallow" in self.params.stages else 0

    def settings(self) -> str:
        """Stage boundary, thresholds, stages and which implementation's details."""
        p = self.params
        rule = (
            f" rule={p.rule} shallow={p.shallow_rule} layer0={p.layer0_rule}"
            f" precision={p.rule_precision} in_decode={p.shallow_in_decode}"
        )
        return (
            f"S={p.shallow_mid_layer} tL={p.layer_threshold} tT={p.tokens_threshold:.4g} "
            f"stages={'+'.join(p.stages)}{rule}"
        )
