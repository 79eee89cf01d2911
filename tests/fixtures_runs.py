"""Synthetic run folders and datasets shared by the stage, plot and notebook tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from analysis.probes.run import PROBE_SCHEMAS
from analysis.results import SAMPLES_TABLE, TRACE_SCHEMAS, RunFolder

N_LAYERS = 12
SHALLOW_END, DEEP_START = 4, 8


def write_synthetic_run(
    root: Path,
    n_samples: int,
    *,
    noise: float = 0.0,
    effect: float = 1.0,
    seed: int = 0,
    families: tuple[str, ...] = ("a", "b"),
    model: str | None = None,
    image_span: tuple[int, int, int] | None = None,
) -> Path:
    """A probe run whose knockouts change answers exactly when image access in layers [S, D) is cut.

    Each sample's answer flips with probability ``effect`` when its fusion band is cut and with
    probability ``noise`` otherwise. ``model`` is recorded in the manifest; ``image_span`` = (prompt length, first
    image position, end of the image) fills every sample's token layout.
    """
    rng = np.random.default_rng(seed)
    effects, kv, samples = [], [], []
    for index in range(n_samples):
        sample_id = f"s{index:04d}"
        samples.append(sample_id)
        for layer in range(N_LAYERS):
            for mode, start, end in (("upto", 0, layer + 1), ("from", layer, N_LAYERS)):
                cuts_fusion = start < DEEP_START and end > SHALLOW_END
                flip = rng.random() < (effect if cuts_fusion else noise)
                effects.append(
                    {
                        "sample_id": sample_id,
                        "probe": "knockout",
                        "variant": f"instruction->image:{mode}",
                        "layer_start": start,
                        "layer_end": end,
                        "seed": -1,
                        "answer_logprob": -1.0,
                        "delta_logprob": -float(flip),
                        "answer_prob": 0.3,
                        "delta_prob": 0.0,
                        "kl": float(flip),
                        "top1_match": not flip,
                    }
                )
            kv_flip = rng.random() < (effect if layer < DEEP_START else noise)
            kv.append(
                {"sample_id": sample_id, "layer_start": layer, "answer": "x", "agrees": not kv_flip, "correct": True}
            )
    schemas = {
        "effects": PROBE_SCHEMAS["effects"],
        "kv_removal": PROBE_SCHEMAS["kv_removal"],
        SAMPLES_TABLE: TRACE_SCHEMAS[SAMPLES_TABLE],
    }
    folder = RunFolder(root, schemas)
    folder.start({"command": "synthetic", "config": {"model": model}}, {"synthetic": True})
    sample_rows = {name: [None] * n_samples for name in TRACE_SCHEMAS[SAMPLES_TABLE].names}
    sample_rows["sample_id"] = samples
    if image_span is not None:
        length, start, end = image_span
        sample_rows["n_tokens"] = [length] * n_samples
        sample_rows["image_starts"] = [[start]] * n_samples
        sample_rows["image_ends"] = [[end]] * n_samples
    sample_rows["family"] = [families[i % len(families)] for i in range(n_samples)]
    folder.write_part(
        {
            "effects": pa.Table.from_pylist(effects, schema=schemas["effects"]),
            "kv_removal": pa.Table.from_pylist(kv, schema=schemas["kv_removal"]),
            SAMPLES_TABLE: pa.table(sample_rows, schema=schemas[SAMPLES_TABLE]),
        }
    )
    folder.finish({})
    return root


def variable_grid_dataset(root: Path) -> Path:
    """A local dataset whose images give Qwen2.5-VL non-square grids of different shapes, one sample with two images."""
    root.mkdir(parents=True, exist_ok=True)
    for index, (height, width) in enumerate([(40, 90), (80, 60), (56, 56), (120, 40)]):
        pixels = np.random.default_rng(index).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"image{index}.png")
    records = [
        {
            "id": "wide",
            "image": "image0.png",
            "question": "What color is the circle?",
            "answer": "red",
            "family": "color",
        },
        {
            "id": "tall",
            "image": "image1.png",
            "question": "How many squares are there?",
            "answer": "2",
            "family": "count",
        },
        {
            "id": "pair",
            "images": ["image2.png", "image3.png"],
            "prompt": "<image> and <image>: which is red?",
            "question": "Which is red?",
            "answer": "first",
            "family": "compare",
        },
        {
            "id": "thin",
            "image": "image3.png",
            "question": "Is there a blue square?",
            "answer": "yes",
            "family": "exist",
        },
    ]
    (root / "samples.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return root
