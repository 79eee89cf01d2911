"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025,
arXiv 2412.04467): before the language model, keep the image tokens the vision tower's CLS token attends to most
(dominant) and merge the rest into a few contextual tokens.

The rule follows the authors' code (GitHub ``dvlab-research/VisionZip``, ``visionzip/clip_encoder.py``,
``CLIPVisionTower_VisionZip.forward``, lines 42-85), at the tower layer whose output LLaVA projects
(``attentions[-2]`` and ``hidden_states[-2]``, lines 43-44):

- dominant: the CLS query's attention summed over heads, top ``dominant - 1`` patches, plus the CLS token's own
  feature (lines 50-57; ``main.py`` line 7 passes ``dominant - 1``, so the CLS counts as one of the dominant tokens);
- contextual: the remaining patches in index order, every ``step``-th a target (``step = remaining // contextual``,
  lines 67-69); every other one joins the target whose key (averaged over heads, ``utils.py`` line 89) is most
  cosine-similar, and a target's token is its own feature plus the mean of those that joined it (lines 71-80).

The papers' budgets 64 / 128 / 192 are 54 + 10, 108 + 20 and 162 + 30 (their README), so ``contextual_fraction`` is
10 / 64 of the budget.

Deviations, both forced by executors that keep every token's input position: the authors' LLaVA sequence is
re-numbered (the kept tokens sit at consecutive positions, the CLS first); here a dominant token keeps its patch's
position, a contextual token its target's, and the CLS feature takes the first patch slot holding neither, so the
mask-based and token-dropping executors agree exactly. A sample's budget is shared among its images in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from analysis.pruner.methods.base import HiddenObservation, MethodConfig, PruningMethod, SelectionState

PAPER_CONTEXTUAL_FRACTION = 10 / 64  # 54 + 10, 108 + 20, 162 + 30 tokens in the authors' README


@dataclass(frozen=True)
class VisionZipConfig(MethodConfig):
    """How many tokens enter the language model per sample, and which share of them are merged contextual ones."""

    keep_tokens: int = 64
    contextual_fraction: float = PAPER_CONTEXTUAL_FRACTION


@dataclass(frozen=True)
class ZippedImage:
    """One image's VisionZip tokens, as patch indices into its P patches (CLS excluded)."""

    dominant: torch.Tensor  # (d,) patches kept with their own features, by descending CLS attention
    targets: torch.Tensor  # (c,) patches whose slots hold the merged contextual tokens
    merged: torch.Tensor  # (c, D_vision) each target's feature plus the mean of the features merged into it
    cls_slot: int  # the patch slot that carries the CLS token's feature (-1: no CLS token kept)


def split_budget(keep: int, fraction: float) -> tuple[int, int]:
    """(dominant including the CLS token, contextual) for a budget of ``keep`` tokens."""
    contextual = round(keep * fraction) if keep > 1 else 0
    return keep - contextual, contextual


def zip_image(
    cls_attention: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, dominant: int, contextual: int
) -> ZippedImage:
    """VisionZip's tokens of one image from its CLS attention (P,), mean keys (P + 1, d) and features (P + 1, D),
    ``dominant`` counting the CLS token; needs ``dominant + contextual <= P``."""
    patches = cls_attention.shape[0]
    top = cls_attention.topk(max(0, dominant - 1)).indices
    rest = torch.ones(patches, dtype=torch.bool, device=cls_attention.device)
    rest[top] = False
    remaining = rest.nonzero().flatten()  # in index order, as the authors' masked_select keeps them
    targets = remaining[:0]
    merged = features.new_zeros(0, features.shape[1])
    if contextual and len(remaining):
        step = max(1, len(remaining) // contextual)
        chosen = torch.arange(0, len(remaining), step, device=remaining.device)[:contextual]
        is_target = torch.zeros(len(remaining), dtype=torch.bool, device=remaining.device)
        is_target[chosen] = True
        targets = remaining[chosen]
        unit = F.normalize(keys[1:][remaining], dim=-1)
        joining = (unit[~is_target] @ unit[is_target].T).argmax(dim=1)
        assignment = F.one_hot(joining, len(targets)).to(features.dtype)  # (merged away, targets)
        counts = assignment.sum(dim=0).clamp(min=1)[:, None]
        merged = features[1:][targets] + assignment.T @ features[1:][remaining[~is_target]] / counts
    used = torch.zeros(patches, dtype=torch.bool, device=cls_attention.device)
    used[top] = True
    used[targets] = True
    free = (~used).nonzero().flatten()
    cls_slot = int(free[0]) if dominant >= 1 and len(free) else -1
    return ZippedImage(top, targets, merged, cls_slot)


class VisionZip(PruningMethod):
    """CLS-attention dominant tokens and key-similarity merged contextual tokens, before layer 0."""

    name = "visionzip"
    config_type = VisionZipConfig
    label = "VisionZip"
    description = "VisionZip: keep the patches the vision tower's CLS attends to, merge the rest, before the LLM"
    sweep_baseline = True
    reads_vision = True
    params: VisionZipConfig

    def problems(self, num_layers: int) -> list[str]:
        """A non-negative budget and a contextual share in [0, 1)."""
        found = [] if self.params.keep_tokens >= 0 else ["keep_tokens must be >= 0"]
        if not 0 <= self.params.contextual_fraction < 1:
            found.append("contextual_fraction must be in [0, 1)")
        return found

    def reads_hidden(self, layer: int) -> bool:
        """The language model's input embeddings (where the zipped tokens are written)."""
        return layer == 0

    def decide_hidden(self, state: SelectionState, observation: HiddenObservation) -> None:
        """Zip each image from the vision tower's pass; merged and CLS features replace their slots' embeddings."""
        vision = observation.vision
        if vision is None:
            raise RuntimeError("VisionZip needs the vision tower's pass; run it through a pruning executor")
        patches = vision.cls_attention.shape[1]
        device = state.image_valid.device
        keep = torch.zeros_like(state.image_valid)
        width = vision.features.shape[-1]
        replaced: list[tuple[int, int, torch.Tensor]] = []  # (row, image-token ordinal, vision feature)
        image = 0
        for row, n_tokens in enumerate(state.image_valid.sum(1).tolist()):
            n_images = n_tokens // patches
            if n_images * patches != n_tokens:
                raise RuntimeError(f"a sample has {n_tokens} image tokens, not a multiple of the tower's {patches}")
            for ordinal in range(n_images):
                share = self.params.keep_tokens // n_images + (ordinal < self.params.keep_tokens % n_images)
                offset = ordinal * patches
                if share >= patches:
                    keep[row, offset : offset + patches] = True
                else:
                    dominant, contextual = split_budget(share, self.params.contextual_fraction)
                    zipped = zip_image(
                        vision.cls_attention[image], vision.keys[image], vision.features[image], dominant, contextual
                    )
                    keep[row, offset + zipped.dominant.to(device)] = True
                    keep[row, offset + zipped.targets.to(device)] = True
                    replaced += [
                        (row, offset + int(t), f) for t, f in zip(zipped.targets.tolist(), zipped.merged, strict=True)
                    ]
                    if zipped.cls_slot >= 0:
                        keep[row, offset + zipped.cls_slot] = True
                        replaced.append((row, offset + zipped.cls_slot, vision.features[image, 0]))
                image += 1
        state.keep = keep
        state.before_llm = True
        if replaced:
            rows = torch.tensor([r for r, _, _ in replaced], device=device)
            ordinals = torch.tensor([o for _, o, _ in replaced], device=device)
            projected = vision.project(torch.stack([f for _, _, f in replaced]).reshape(1, -1, width))[0].float()
            embeddings = observation.hidden.new_zeros(*state.image_valid.shape, projected.shape[-1])
            embeddings[rows, ordinals] = projected.to(embeddings.device)
            rewritten = torch.zeros_like(state.image_valid)
            rewritten[rows, ordinals] = True
            state.image_embeddings, state.rewritten = embeddings, rewritten

    def first_pruned_layer(self) -> int | None:
        """Layer 0."""
        return 0

    def settings(self) -> str:
        """The budget and its split."""
        dominant, contextual = split_budget(self.params.keep_tokens, self.params.contextual_fraction)
        return f"keep={self.params.keep_tokens} ({dominant}+{contextual})"
