"""Per-sample token layout (system prompt, images, instruction, last position) derived from the data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analysis.errors import DataError

REGION_SYSTEM, REGION_IMAGE, REGION_INSTRUCTION = 0, 1, 2
REGION_NAMES = ("system", "image", "instruction")


@dataclass(frozen=True)
class Span:
    """Half-open token range ``[start, end)`` in unpadded positions."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class TokenLayout:
    """Where each part of one prompt sits; positions count from the sample's first real token."""

    pad_offset: int
    length: int
    system: Span
    images: tuple[Span, ...]
    image_grids: tuple[tuple[int, int], ...]
    regions: np.ndarray  # int8 per real token: REGION_SYSTEM / REGION_IMAGE / REGION_INSTRUCTION

    @property
    def last(self) -> int:
        """The last prompt position (the one whose next-token prediction is the answer)."""
        return self.length - 1

    @property
    def image_positions(self) -> np.ndarray:
        """Unpadded positions of all image tokens, image by image."""
        return np.concatenate([np.arange(span.start, span.end) for span in self.images])

    @property
    def image_token_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """For each image token (in ``image_positions`` order): which image it belongs to and its index there."""
        image_index = np.concatenate([np.full(len(span), i) for i, span in enumerate(self.images)])
        token_index = np.concatenate([np.arange(len(span)) for span in self.images])
        return image_index, token_index

    @property
    def instruction_positions(self) -> np.ndarray:
        """Unpadded positions of text tokens after the system prompt, the last position included."""
        return np.flatnonzero(self.regions == REGION_INSTRUCTION)

    @property
    def n_image_tokens(self) -> int:
        """Total number of image tokens over all images of the sample."""
        return int(sum(len(span) for span in self.images))

    def padded(self, position: int | np.ndarray) -> Any:
        """Translate unpadded positions into indices of the padded batch row."""
        return position + self.pad_offset


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading elements two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compute_layouts(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_token_id: int,
    system_token_ids: Sequence[Sequence[int]],
    image_token_counts: Sequence[Sequence[int]],
    image_grids: Sequence[Sequence[tuple[int, int]]],
) -> list[TokenLayout]:
    """Lay out every row of a padded batch.

    ``system_token_ids[b]`` is the tokenisation of the text before the user's content; the system
    span is the part of it the full prompt really starts with, cut at the first image token.
    ``image_token_counts[b]`` splits runs of image tokens into images (adjacent images form one run).
    """
    layouts = []
    ids_rows = input_ids.detach().cpu().numpy()
    mask_rows = attention_mask.detach().cpu().numpy().astype(bool)
    for row, (ids, mask) in enumerate(zip(ids_rows, mask_rows, strict=True)):
        real = np.flatnonzero(mask)
        if real.size == 0:
            raise DataError(f"batch row {row} is all padding; every sample needs a prompt")
        if real[-1] - real[0] + 1 != real.size:
            raise DataError(f"batch row {row} has padding inside the prompt; pad on one side only")
        pad_offset = int(real[0])
        tokens = ids[real]
        is_image = tokens == image_token_id
        image_positions = np.flatnonzero(is_image)
        counts = list(image_token_counts[row])
        if image_positions.size == 0:
            raise DataError(f"batch row {row} has no image tokens; each sample needs at least one image")
        if image_positions.size != sum(counts):
            raise DataError(
                f"batch row {row} has {image_positions.size} image tokens but its images need {sum(counts)}; "
                "the processor and model disagree on image size"
            )
        images: list[Span] = []
        cursor = 0
        for count in counts:
            positions = image_positions[cursor : cursor + count]
            if positions[-1] - positions[0] + 1 != count:
                raise DataError(f"batch row {row}: image {len(images)} is not a contiguous run of image tokens")
            images.append(Span(int(positions[0]), int(positions[-1]) + 1))
            cursor += count
        system_end = min(common_prefix_length(system_token_ids[row], tokens.tolist()), images[0].start)
        regions = np.full(tokens.size, REGION_INSTRUCTION, dtype=np.int8)
        regions[:system_end] = REGION_SYSTEM
        regions[is_image] = REGION_IMAGE
        if regions[-1] == REGION_IMAGE:
            raise DataError(f"batch row {row} ends with an image token; the prompt needs text after the last image")
        layouts.append(
            TokenLayout(
                pad_offset=pad_offset,
                length=int(tokens.size),
                system=Span(0, system_end),
                images=tuple(images),
                image_grids=tuple((int(g[0]), int(g[1])) for g in image_grids[row]),
                regions=regions,
            )
        )
    return layouts
