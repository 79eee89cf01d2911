"""Shared fixtures: tiny random models of each family and small synthetic images."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.data.samples import Sample
from analysis.models.registry import LoadedModel, load_model

# Every family's tiny model: the parametrisation of every per-family test (a new family adds its line here).
FAMILIES = {
    "llava": "tiny-llava",
    "qwen2_5_vl": "tiny-qwen2.5-vl",
    "qwen2_vl": "tiny-qwen2-vl",
    "llava_next": "tiny-llava-next",
    "llava_onevision": "tiny-llava-onevision",
    "internvl": "tiny-internvl",
    "qwen3_vl": "tiny-qwen3-vl",
    "gemma3": "tiny-gemma3",
    "idefics3": "tiny-idefics3",
    "smolvlm": "tiny-smolvlm",
}
# Per family, a VisiPruner token threshold at which its random tiny model keeps some, and different numbers of,
# image tokens, and a layer threshold at which every sample selects at the first possible layer (the
# pruned-runtime tests need partial selections; LLaVA-NeXT's many tile tokens each move the output less).
TOKENS_THRESHOLDS = {
    "llava": 0.02,
    "qwen2_5_vl": 0.04,
    "qwen2_vl": 0.04,
    "llava_next": 0.01,
    "llava_onevision": 0.02,
    "internvl": 0.03,
    "qwen3_vl": 0.04,
    "gemma3": 0.03,
    "idefics3": 0.015,
    "smolvlm": 0.015,
}
LAYER_THRESHOLDS = {family: 0.9999 for family in FAMILIES} | {"llava_next": 0.99999}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run the tiny models on one CPU thread for the module using it, then restore the previous count."""
    # Their matrices are too small to gain from more threads; on a busy two-core machine extra threads only
    # contend, and the runs take ten times longer.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def noise_image(seed: int, height: int = 40, width: int = 50) -> Image.Image:
    """A deterministic random RGB image."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_samples() -> list[Sample]:
    """Four samples with different prompt lengths, image sizes, image counts and image positions."""
    return [
        Sample("s0", [noise_image(0)], prompt="what is the colour of the circle ?", question="colour?", answer="red"),
        Sample("s1", [noise_image(1, 80, 60)], prompt="how many", question="how many", answer="2"),
        Sample(
            "s2",
            [noise_image(2), noise_image(3, 60, 90)],
            prompt="compare <image> and <image> which is red ?",
            question="which is red?",
            answer="first",
        ),
        Sample(
            "s3",
            [noise_image(4, 56, 56)],
            prompt="is there a blue square left of the red circle in this image ?",
            question="blue square left of red circle?",
            answer="yes",
            answer_type="yes_no",
        ),
    ]


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def tiny_eager(request: pytest.FixtureRequest) -> LoadedModel:
    """A tiny random model of each family with eager attention, in float32 on the CPU."""
    return load_model(FAMILIES[request.param], attn_implementation="eager")


@pytest.fixture()
def samples() -> list[Sample]:
    """Fresh copies of the standard test samples."""
    return make_samples()
