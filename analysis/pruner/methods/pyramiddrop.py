"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025, arXiv 2410.17247): the decoder in stages, each keeping a fixed share of the image
tokens the previous one had, ranked by the last instruction token's attention.

The rule follows the authors' code (GitHub ``Cooperx521/PyramidDrop``, ``llava/model/modeling_llama_pdrop.py``): after
each layer of ``layer_list`` (lines 1220-1240) ``pdrop_rank_drop`` ranks the image tokens by the last prompt position's
attention, averaged over heads (lines 1391-1402), and keeps ``int(N * ratio)`` of the original N, the ratios being
lambda, lambda^2, ... (lines 1306-1307, 1405); their LLaVA-1.5 scripts use layers 8, 16, 24 of 32 and lambda 0.5
(``scripts/v1_5/pdrop_eval/gqa.sh``), the defaults here, with the stage layers at the same fractions of any other depth.

Deviation: their ranking recomputes the attention of the first layer of the next stage from its input (its q and k
projections, lines 1321-1342) before that layer runs; ours reads the attention of the stage's last layer, as the model
computes it (FastV's convention), so nothing outside the model re-runs a layer's projections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from analysis.hooks.attention import LastRowObservation
from analysis.pruner.methods.base import MethodConfig, PruningMethod, SelectionState
from analysis.pruner.methods.fastv import image_keys

# Their stage boundaries for LLaVA-1.5's 32 layers (8, 16, 24), as fractions of the depth.
DEFAULT_STAGE_FRACTIONS = (1 / 4, 2 / 4, 3 / 4)


@dataclass(frozen=True)
class PyramidDropConfig(MethodConfig):
    """The layers that start a new stage (empty: a quarter, half and three quarters of the depth), and lambda."""

    num_layers: int = 32
    stage_layers: tuple[int, ...] = field(default_factory=tuple)
    ratio: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_layers", tuple(int(layer) for layer in self.stage_layers))

    def boundaries(self) -> tuple[int, ...]:
        """The first layer of each new stage."""
        if self.stage_layers:
            return self.stage_layers
        return tuple(round(fraction * self.num_layers) for fraction in DEFAULT_STAGE_FRACTIONS)


class PyramidDrop(PruningMethod):
    """Stage by stage, keep lambda of the image tokens by the last row's head-mean attention."""

    drops_in_stages = True

    name = "pyramiddrop"
    config_type = PyramidDropConfig
    label = "PyramidDrop"
    description = "PyramidDrop: in stages, keep a share lambda of the image tokens by the last position's attention"
    sweep_baseline = True
    budget_parameter = "ratio"
    params: PyramidDropConfig

    def problems(self, num_layers: int) -> list[str]:
        """Increasing stage layers inside the model, lambda in (0, 1]."""
        problems = []
        layers = self.params.boundaries()
        if list(layers) != sorted(set(layers)) or (num_layers and not all(1 <= s < num_layers for s in layers)):
            problems.append(f"stage_layers {list(layers)} must increase within 1..{max(num_layers - 1, 1)}")
        if not 0 < self.params.ratio <= 1:
            problems.append(f"ratio {self.params.ratio} outside (0, 1]")
        return problems

    def observes(self, layer: int, state: SelectionState) -> bool:
        """The last layer of each stage."""
        return layer + 1 in self.params.boundaries()

    def decide(self, state: SelectionState, observation: LastRowObservation) -> None:
        """Keep the stage's share of each sample's original image tokens, the most attended among those left."""
        stage = self.params.boundaries().index(observation.layer + 1)
        weights = torch.gather(observation.weights.mean(1), 1, image_keys(observation))
        present = state.image_valid & (state.stage_drops < 0)
        weights = weights.masked_fill(~present.to(weights.device), -1.0)
        for row, n_image in enumerate(state.image_valid.sum(1).tolist()):
            keep = self.kept_count(stage, n_image)
            ranked = weights[row].argsort(descending=True, stable=True).to(state.stage_drops.device)
            dropped = ranked[keep : int(present[row].sum())]
            state.stage_drops[row, dropped] = observation.layer

    def kept_count(self, stage: int, n_image: int) -> int:
        """Image tokens left after stage boundary ``stage`` (0-based) for a sample of ``n_image``: int(N lambda^s)."""
        return int(n_image * self.params.ratio ** (stage + 1) + 1e-9)

    def budget_values(self, n_image: int) -> list[float]:
        """Lambdas from keeping one token per stage to keeping all, in steps fine enough for any token count."""
        return [step / 200 for step in range(1, 201)]

    def image_tokens(self, layer: int, n_image: int) -> int | None:
        """The original count until the first boundary, then int(N lambda^s) in stage s."""
        passed = sum(layer >= boundary for boundary in self.params.boundaries())
        return n_image if passed == 0 else self.kept_count(passed - 1, n_image)

    def settings(self) -> str:
        """The stage layers and lambda."""
        return f"stages={list(self.params.boundaries())} lambda={self.params.ratio:g}"
