"""Per-sample token layout (system prompt, images, instruction, last position) derived from the data."""

from __future__ import annotations

from collections.abc import Collection, Sequence
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
class ImagePiece:
    """One part of an image's tokens: a ``rows`` x ``cols`` grid in raster order, each row followed by one
    newline token when ``newline`` (LLaVA-NeXT's tiles), e.g. kind "base" (the whole image at the tower's size),
    "tiles" (the any-resolution crops stitched together) or "newline" (a lone newline token)."""

    kind: str
    span: Span
    rows: int
    cols: int
    newline: bool = False

    def __post_init__(self) -> None:
        if len(self.span) != self.rows * (self.cols + int(self.newline)):
            raise DataError(
                f"image piece {self.kind!r} spans {len(self.span)} tokens, not {self.rows} rows of {self.cols} "
                f"tokens{' plus a newline' if self.newline else ''}; the family adapter's piece sizes are wrong"
            )

    def shifted(self, offset: int) -> ImagePiece:
        """The same piece ``offset`` positions later."""
        return ImagePiece(
            self.kind, Span(self.span.start + offset, self.span.end + offset), self.rows, self.cols, self.newline
        )


@dataclass(frozen=True)
class TokenLayout:
    """Where each part of one prompt sits; positions count from the sample's first real token."""

    pad_offset: int
    length: int
    system: Span
    images: tuple[Span, ...]
    image_grids: tuple[tuple[int, int], ...]
    regions: np.ndarray  # int8 per real token: REGION_SYSTEM / REGION_IMAGE / REGION_INSTRUCTION
    # Per image, its parts in sequence order; an image of one plain grid is one piece of kind "grid".
    image_pieces: tuple[tuple[ImagePiece, ...], ...] = ()
    # Per image, the positions of the family's marker text tokens around it (InternVL's <img> and </img>); they
    # stay instruction tokens, so knockouts and pruning treat them as text.
    image_markers: tuple[tuple[int, ...], ...] = ()

    @property
    def last(self) -> int:
        """The last prompt position (the one whose next-token prediction is the answer)."""
        return self.length - 1

    def image_token_positions(self, image: int) -> np.ndarray:
        """Unpadded positions of one image's tokens (its span may hold marker text between them: Idefics3)."""
        span = self.images[image]
        return span.start + np.flatnonzero(self.regions[span.start : span.end] == REGION_IMAGE)

    @property
    def image_positions(self) -> np.ndarray:
        """Unpadded positions of all image tokens, image by image."""
        return np.concatenate([self.image_token_positions(index) for index in range(len(self.images))])

    @property
    def image_token_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """For each image token (in ``image_positions`` order): which image it belongs to and its index there."""
        counts = [len(self.image_token_positions(index)) for index in range(len(self.images))]
        image_index = np.concatenate([np.full(count, i) for i, count in enumerate(counts)])
        token_index = np.concatenate([np.arange(count) for count in counts])
        return image_index, token_index

    @property
    def image_token_cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each image token (in ``image_positions`` order): its piece within its image, and its row and column
        in that piece's grid (a row's newline token has column ``cols``)."""
        pieces, rows, cols = [], [], []
        for image in self.image_pieces:
            for index, piece in enumerate(image):
                width = piece.cols + int(piece.newline)
                offsets = np.arange(len(piece.span))
                pieces.append(np.full(len(piece.span), index))
                rows.append(offsets // width)
                cols.append(offsets % width)
        return np.concatenate(pieces), np.concatenate(rows), np.concatenate(cols)

    @property
    def instruction_positions(self) -> np.ndarray:
        """Unpadded positions of text tokens after the system prompt, the last position included."""
        return np.flatnonzero(self.regions == REGION_INSTRUCTION)

    @property
    def n_image_tokens(self) -> int:
        """Total number of image tokens over all images of the sample."""
        return int((self.regions == REGION_IMAGE).sum())

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
    image_pieces: Sequence[Sequence[Sequence[ImagePiece]]] | None = None,
    marker_ids: Collection[int] = (),
) -> list[TokenLayout]:
    """Lay out every row of a padded batch.

    ``system_token_ids[b]`` is the tokenisation of the text before the user's content; the system
    span is the part of it the full prompt really starts with, cut at the first image token.
    ``image_token_counts[b]`` splits runs of image tokens into images (adjacent images form one run).
    ``image_pieces[b][i]``, spans counted from the image's first token, must cover image ``i``'s tokens exactly; without
    them an image is one piece, its grid. ``marker_ids``: the family's image marker tokens; each image's markers are
    the unbroken runs of them just before and just after it, and those between its tokens (the only tokens that may
    interrupt an image).
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
        is_marker = np.isin(tokens, list(marker_ids)) if marker_ids else np.zeros(tokens.size, dtype=bool)
        for count in counts:
            positions = image_positions[cursor : cursor + count]
            # Only the family's marker tokens may interrupt an image (Idefics3's tiles: row/column tags).
            inside = np.arange(positions[0], positions[-1] + 1)
            if not (is_image[inside] | is_marker[inside]).all():
                raise DataError(f"batch row {row}: image {len(images)} is not a contiguous run of image tokens")
            images.append(Span(int(positions[0]), int(positions[-1]) + 1))
            cursor += count
        grids = [(int(g[0]), int(g[1])) for g in image_grids[row]]
        pieces = tuple(
            _image_pieces(span, grid, None if image_pieces is None else image_pieces[row][index], is_image, row, index)
            for index, (span, grid) in enumerate(zip(images, grids, strict=True))
        )
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
                image_grids=tuple(grids),
                regions=regions,
                image_pieces=pieces,
                image_markers=tuple(_markers(is_marker, span) for span in images),
            )
        )
    return layouts


def _markers(is_marker: np.ndarray, span: Span) -> tuple[int, ...]:
    """Positions of the marker tokens of an image: the unbroken runs just before and after it, and any inside."""
    before = span.start
    while before > 0 and is_marker[before - 1]:
        before -= 1
    after = span.end
    while after < is_marker.size and is_marker[after]:
        after += 1
    inside = span.start + np.flatnonzero(is_marker[span.start : span.end])
    return (*range(before, span.start), *(int(p) for p in inside), *range(span.end, after))


def _image_pieces(
    span: Span,
    grid: tuple[int, int],
    pieces: Sequence[ImagePiece] | None,
    is_image: np.ndarray,
    row: int,
    image: int,
) -> tuple[ImagePiece, ...]:
    """An image's pieces at its positions: the adapter's, checked to cover its image tokens exactly and in order
    (markers may sit between them), else its grid."""
    if pieces is None:
        rows, cols = grid if grid[0] * grid[1] == len(span) else (1, len(span))
        return (ImagePiece("grid", span, rows, cols),)
    placed = tuple(piece.shifted(span.start) for piece in pieces)
    covered = np.concatenate([np.arange(piece.span.start, piece.span.end) for piece in placed])
    tokens = span.start + np.flatnonzero(is_image[span.start : span.end])
    if not np.array_equal(covered, tokens):
        raise DataError(
            f"batch row {row}: the pieces of image {image} ({[p.kind for p in placed]}) do not cover its "
            f"{tokens.size} image tokens; the family adapter's piece sizes disagree with the processor"
        )
    return placed
