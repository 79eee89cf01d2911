"""Tracing cost vs a plain SDPA forward on a model with LLaVA-1.5-7B's architecture and random weights.

``python -m analysis.benchmarks.trace_overhead [--preset llava-1.5-7b|tiny] [--batch-sizes 1 8]``
prints, per batch size and in one run: a plain SDPA forward (the baseline), HF's own
eager forward returning every layer's attention weights plus the same reductions done on the returned
matrices (what a user would write), the toolkit's tracer, and the tracer plus building the parquet tables; each as a
ratio to the baseline, with peak accelerator memory above the baseline's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from analysis.data.samples import Sample
from analysis.layout import compute_layouts
from analysis.models import hf
from analysis.models.adapters import ModelInputs, RenderedPrompt, get_adapter
from analysis.models.hf import HFModel
from analysis.trace.run import batch_tables
from analysis.trace.tracer import build_plan, trace_batch

# The shape of llava-hf/llava-1.5-7b-hf's config.json (CLIP ViT-L/14-336 + Vicuna-7B).
LLAVA_15_7B: dict[str, Any] = {
    "vision": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
    "text": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=32001,
    ),
    "image_token_id": 32000,
    "system_tokens": 35,
    "instruction_tokens": 40,
}
TINY: dict[str, Any] = {
    "vision": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=7,
        projection_dim=32,
    ),
    "text": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=512,
        pad_token_id=1,
    ),
    "image_token_id": 100,
    "system_tokens": 8,
    "instruction_tokens": 10,
}
# LLaVA-1.5-7B's depth, heads and token layout (576 image tokens among 651) with narrow layers: the host's work per
# call is the 7B model's, the arithmetic is not (the latency mode's host-work count on a CPU).
LLAVA_15_7B_NARROW = {
    # The tiny tower on the 7B's patch grid (576 image tokens).
    "vision": {**TINY["vision"], **{key: LLAVA_15_7B["vision"][key] for key in ("image_size", "patch_size")}},
    "text": {
        **{key: LLAVA_15_7B["text"][key] for key in ("num_hidden_layers", "num_attention_heads")},
        "num_key_value_heads": LLAVA_15_7B["text"]["num_key_value_heads"],
        "hidden_size": 256,  # 8 dimensions per head
        "intermediate_size": 256,
        "vocab_size": 1000,
        "max_position_embeddings": LLAVA_15_7B["text"]["max_position_embeddings"],
        "pad_token_id": 901,
    },
    "image_token_id": 900,
    **{key: LLAVA_15_7B[key] for key in ("system_tokens", "instruction_tokens")},
}
PRESETS = {"llava-1.5-7b": LLAVA_15_7B, "llava-1.5-7b-narrow": LLAVA_15_7B_NARROW, "tiny": TINY}


@dataclass
class Measurement:
    """Median seconds per batch, peak memory above the model footprint, and median host seconds per batch."""

    seconds: float
    extra_bytes: int
    # Until the call returns, before waiting for the device: when it is close to ``seconds`` the work is bound by
    # the host launching kernels, not by the device, and fewer FLOPs cannot make it faster.
    host_seconds: float = 0.0
    spread: float = 0.0  # interquartile range over the median, where measured


def build_model(preset: dict, device: torch.device, dtype: torch.dtype) -> HFModel:
    """A LlavaForConditionalGeneration of the preset's shape with HF's random initialisation, SDPA attention."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**preset["vision"]),
        text_config=LlamaConfig(**preset["text"]),
        image_token_index=preset["image_token_id"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    hf.set_attention_implementation(config, "sdpa")
    # Built directly on the target device in the target dtype: no 28 GB float32 copy on the host.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def benchmark_model(preset: dict, device: torch.device, dtype: torch.dtype) -> tuple[HFModel, int, str]:
    """The preset's random model on ``device``, the bytes its weights take there, and the device's name."""
    model = build_model(preset, device, dtype)
    synchronize(device)
    model_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return model, model_bytes, name


def build_inputs(model: HFModel, preset: dict, batch_size: int, device: torch.device) -> ModelInputs:
    """A batch of LLaVA-1.5-shaped prompts (system, 576 image tokens, instruction) of equal length."""
    adapter = get_adapter(model)
    vision = preset["vision"]
    n_image = (vision["image_size"] // vision["patch_size"]) ** 2
    generator = torch.Generator().manual_seed(1)
    vocab = preset["image_token_id"]  # ordinary text ids lie below the image token id
    rows = []
    for _ in range(batch_size):
        system = torch.randint(3, vocab, (preset["system_tokens"],), generator=generator)
        instruction = torch.randint(3, vocab, (preset["instruction_tokens"],), generator=generator)
        rows.append(torch.cat([system, torch.full((n_image,), adapter.image_token_id), instruction]))
    input_ids = torch.stack(rows)
    attention_mask = torch.ones_like(input_ids)
    side = vision["image_size"] // vision["patch_size"]
    layouts = compute_layouts(
        input_ids,
        attention_mask,
        adapter.image_token_id,
        [row[: preset["system_tokens"]].tolist() for row in rows],
        [[n_image]] * batch_size,
        [[(side, side)]] * batch_size,
    )
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(batch_size, 3, vision["image_size"], vision["image_size"], generator=generator)
    tensors = hf.with_pixel_values(
        {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}, pixels.to(device, dtype)
    )
    prompts = [RenderedPrompt(text="", content_start=0)] * batch_size
    return ModelInputs(tensors=tensors, prompts=prompts, layouts=layouts)


def measure_interleaved(
    steps: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int, model_bytes: int
) -> dict[str, Measurement]:
    """Median wall time and peak memory of each step, the steps taking turns in every round.

    Taking turns matters at batch 1, where a forward pass is bound by the host: the host's speed drifts during a
    run, and steps timed one after another would compare different machines.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    host_times: dict[str, list[float]] = {name: [] for name in steps}
    peaks = dict.fromkeys(steps, model_bytes)
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step()
            host_times[name].append(time.perf_counter() - start)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
    results = {}
    for name in steps:
        median = statistics.median(times[name])
        quartiles = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else [median, median, median]
        results[name] = Measurement(
            median,
            peaks[name] - model_bytes,
            statistics.median(host_times[name]),
            (quartiles[2] - quartiles[0]) / median,
        )
    return results


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall time covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reduce_attentions(attentions: tuple[torch.Tensor, ...], inputs: ModelInputs) -> list[torch.Tensor]:
    """The tracer's region masses computed the naive way, from every layer's returned (B, H, T, T) matrix."""
    plan = build_plan(inputs.layouts, inputs.input_ids.shape[1], 5, inputs.input_ids.device)
    reduced = []
    for weights in attentions:
        rows = torch.einsum("bgq,bhqk->bhgk", plan.query_weights, weights.float())
        reduced.append(torch.einsum("bhgk,bkr->bhgr", rows, plan.region_onehot))
    return reduced


def timed_steps(model: HFModel, inputs: ModelInputs) -> dict[str, Callable[[], object]]:
    """The four timed variants on one batch: SDPA forward, output_attentions + reductions, tracer, tracer + tables."""
    adapter = get_adapter(model)
    text_config = adapter.text_config
    batch_size = inputs.input_ids.shape[0]
    samples = [Sample(f"b{i}", [], prompt="", question="") for i in range(batch_size)]

    def plain() -> object:
        with torch.inference_mode():
            return model(**inputs.tensors).logits

    def with_output_attentions() -> object:
        hf.set_attention_implementation(text_config, "eager")
        try:
            with torch.inference_mode():
                output = model(**inputs.tensors, **hf.attention_weights_kwargs())
                return [mass.cpu() for mass in reduce_attentions(hf.returned_attentions(output), inputs)]
        finally:
            hf.set_attention_implementation(text_config, "sdpa")

    def trace_only() -> object:
        stats, _ = trace_batch(adapter, inputs)
        return stats.region_mass.cpu()

    def trace_and_tables() -> object:
        stats, _ = trace_batch(adapter, inputs)
        return batch_tables(samples, inputs, stats, [None] * batch_size, top_k=5)

    return {"plain": plain, "naive": with_output_attentions, "trace": trace_only, "tables": trace_and_tables}


def main(argv: list[str] | None = None) -> int:
    """Measure and print tracing overhead for each batch size."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.benchmarks.trace_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llava-1.5-7b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    model, model_bytes, name = benchmark_model(preset, device, getattr(torch, args.dtype))
    sys.stdout.write(
        f"device: {name}; preset {args.preset}; dtype {args.dtype}; torch {torch.__version__}; "
        f"transformers {hf.installed_transformers()}; model footprint {model_bytes / 2**30:.2f} GiB; "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up; memory: peak above the SDPA "
        "forward's peak\n"
    )
    header = (
        f"{'batch':>5} {'tokens':>6} {'sdpa ms':>8} {'out_attn ms':>11} {'trace ms':>8} {'+tables ms':>10} "
        f"{'out_attn/sdpa':>13} {'trace/sdpa':>10} {'+tables/sdpa':>12} {'trace IQR/med':>12} "
        f"{'out_attn +GiB':>13} {'trace +GiB':>10}"
    )
    sys.stdout.write(header + "\n")
    for batch_size in args.batch_sizes:
        inputs = build_inputs(model, preset, batch_size, device)

        measured = measure_interleaved(
            timed_steps(model, inputs),
            device,
            args.warmup,
            args.repeats,
            model_bytes,
        )
        plain_m, naive_m, trace_m, tables_m = (measured[name] for name in ("plain", "naive", "trace", "tables"))
        gib, ms = 2**30, 1e3
        sys.stdout.write(
            f"{batch_size:>5} {inputs.input_ids.shape[1]:>6} {plain_m.seconds * ms:>8.1f} "
            f"{naive_m.seconds * ms:>11.1f} "
            f"{trace_m.seconds * ms:>8.1f} {tables_m.seconds * ms:>10.1f} {naive_m.seconds / plain_m.seconds:>13.3f} "
            f"{trace_m.seconds / plain_m.seconds:>10.3f} {tables_m.seconds / plain_m.seconds:>12.3f} "
            f"{trace_m.spread:>12.3f} "
            f"{(naive_m.extra_bytes - plain_m.extra_bytes) / gib:>13.3f} "
            f"{(trace_m.extra_bytes - plain_m.extra_bytes) / gib:>10.3f}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
