"""What each image token contributed to the last prompt row's attention output, from a last-row observation."""

from __future__ import annotations

import numpy as np
import torch

from analysis.hooks.attention import LastRowObservation
from analysis.layout import TokenLayout
from analysis.transfer import to_device


def image_contributions(
    observation: LastRowObservation,
    image_index: torch.Tensor,
    image_valid: torch.Tensor,
    *,
    authors_formulas: bool = False,
) -> dict[str, torch.Tensor]:
    """Each image token's contribution c_j = concat_h(a_j v_h[j]) to the last row's attention output o.

    Returns float32 tensors: ``output`` o (B, H*d), ``head_output`` (B, H, d), and per image token (B, N)
    ``cosine`` cos(o - c_j, o), ``norm`` ||c_j||_2 and ``attention`` (head-mean a_j); zero on padding slots.
    ``authors_formulas`` computes them as the authors' code does, in the observation's dtype: the norm as
    ||(o - c_j) - o|| and the cosine with torch's default eps (value_aware_token_selection, lines 541-558).
    """
    weights, values = observation.weights, observation.values  # (B, H, K), (B, H, K, d)
    batch, heads, _, dim = values.shape
    output = torch.einsum("bhk,bhkd->bhd", weights, values)
    index = image_index[:, None, :].expand(-1, heads, -1)
    image_weights = torch.gather(weights, 2, index) * image_valid[:, None, :]
    image_values = torch.gather(values, 2, index[..., None].expand(-1, -1, -1, dim))
    contributions = (image_weights[..., None] * image_values).permute(0, 2, 1, 3).reshape(batch, -1, heads * dim)
    flat_output = output.reshape(batch, 1, heads * dim)
    without = flat_output - contributions
    if authors_formulas:
        cosine = torch.nn.functional.cosine_similarity(without, flat_output, dim=-1)
        norm = torch.norm(without - flat_output, p=2, dim=-1)
    else:
        cosine = torch.nn.functional.cosine_similarity(without, flat_output, dim=-1, eps=1e-12)
        norm = contributions.norm(dim=-1)
    return {
        "output": output.reshape(batch, heads * dim),
        "head_output": output,
        "cosine": cosine * image_valid,
        "norm": norm * image_valid,
        "attention": image_weights.mean(1),
    }


def image_index_tensors(layouts: list[TokenLayout], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) padded positions of each sample's image tokens and their validity."""
    n_max = max(layout.n_image_tokens for layout in layouts)
    index = np.zeros((len(layouts), n_max), dtype=np.int64)
    valid = np.zeros((len(layouts), n_max), dtype=bool)
    for row, layout in enumerate(layouts):
        positions = layout.padded(layout.image_positions)
        index[row, : len(positions)] = positions
        valid[row, : len(positions)] = True
    return to_device(torch.from_numpy(index), device), to_device(torch.from_numpy(valid), device)
