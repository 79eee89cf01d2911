"""Greedy answers of a model and the samples table every run folder holds (shared by trace, probes, evaluate)."""

from __future__ import annotations

from typing import Any

import torch

from analysis.data.samples import Sample
from analysis.layout import TokenLayout
from analysis.models import hf
from analysis.models.adapters import ModelInputs
from analysis.models.registry import LoadedModel


def generate_answers(
    loaded: LoadedModel, inputs: ModelInputs, max_new_tokens: int, *, latency: bool = False
) -> list[str | None]:
    """Greedy answers of the unmodified model for a batch (None when generation is off); ``latency``: in the
    latency mode (``analysis.pruner.latency``), eagerly where it cannot run."""
    if max_new_tokens == 0:
        return [None] * inputs.input_ids.shape[0]
    tokenizer = loaded.processor.tokenizer
    if latency:
        from analysis.pruner.latency import latency_generate

        result = latency_generate(loaded, inputs, max_new_tokens)
        if result is not None:
            return decode_answers(tokenizer, result.tokens)
    with torch.inference_mode():
        # A cache that keeps every key: interventions and the pruned runtime index keys from position 0, which a
        # sliding-window cache (Gemma 3's local layers) breaks.
        generated = loaded.model.generate(
            **inputs.tensors,
            **hf.cache_kwargs(loaded.model, hf.new_cache()),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return decode_answers(tokenizer, generated[:, inputs.input_ids.shape[1] :])


def decode_answers(tokenizer: Any, new_tokens: torch.Tensor) -> list[str | None]:
    """The answer texts of generated token ids (B, N), special tokens (padding, end of sequence) left out."""
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def add_sample_row(
    out: dict[str, list[Any]], sample: Sample, layout: TokenLayout, answer: str | None, correct: bool | None
) -> None:
    """Append one sample's text, answers and layout to the columns of a run's samples table."""
    out["sample_id"].append(sample.sample_id)
    out["dataset"].append(sample.dataset)
    out["family"].append(sample.family)
    out["question"].append(sample.question)
    out["prompt"].append(sample.prompt)
    out["reference"].append(sample.answer)
    out["model_answer"].append(answer)
    out["correct"].append(correct)
    out["n_tokens"].append(layout.length)
    out["system_start"].append(layout.system.start)
    out["system_end"].append(layout.system.end)
    out["image_starts"].append([span.start for span in layout.images])
    out["image_ends"].append([span.end for span in layout.images])
    out["image_rows"].append([grid[0] for grid in layout.image_grids])
    out["image_cols"].append([grid[1] for grid in layout.image_grids])
    pieces = [(index, piece) for index, image in enumerate(layout.image_pieces) for piece in image]
    out["piece_images"].append([index for index, _ in pieces])
    out["piece_kinds"].append([piece.kind for _, piece in pieces])
    out["piece_rows"].append([piece.rows for _, piece in pieces])
    out["piece_cols"].append([piece.cols for _, piece in pieces])
    out["piece_newlines"].append([piece.newline for _, piece in pieces])
    out["marker_images"].append([index for index, markers in enumerate(layout.image_markers) for _ in markers])
    out["marker_positions"].append([position for markers in layout.image_markers for position in markers])
    out["instruction_positions"].append(layout.instruction_positions.tolist())
    out["last_position"].append(layout.last)
