"""The dataset-independent sample record every loader yields."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from PIL import Image

T = TypeVar("T")

IMAGE_PLACEHOLDER = "<image>"
"""Marks where an image goes inside ``Sample.prompt``; without a marker the images precede the text."""


@dataclass
class Sample:
    """One visual question: images, the instruction shown to the model and the reference answer."""

    sample_id: str
    images: list[Image.Image]
    prompt: str
    question: str
    answer: str | None = None
    dataset: str = ""
    family: str = ""
    choices: list[str] = field(default_factory=list)
    answer_type: str = "open"

    def __post_init__(self) -> None:
        n_markers = self.prompt.count(IMAGE_PLACEHOLDER)
        if n_markers and n_markers != len(self.images):
            from analysis.errors import DataError

            raise DataError(
                f"sample {self.sample_id!r}: prompt has {n_markers} {IMAGE_PLACEHOLDER} markers but "
                f"{len(self.images)} images; give one marker per image or none"
            )


def batched(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Consecutive slices of ``items`` holding at most ``size`` elements each."""
    return [items[start : start + size] for start in range(0, len(items), size)]
