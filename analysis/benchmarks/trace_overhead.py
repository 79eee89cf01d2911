"""Tracing cost vs a plain eager forward on a model with LLaVA-1.5-7B's architecture and random weights.

``python -m analysis.benchmarks.trace_overhead [--preset llava-1.5-7b|tiny] [--batch-sizes 1 8]``
prints, per batch size, the time of a plain eager forward, of the traced forward (reductions
included) and of the traced forward plus building the parquet tables, the overhead ratios, and
peak accelerator memory above the model's own footprint.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from analysis.data.samples import Sample
from analysis.layout import compute_layouts
from analysis.models.adapters import ModelInputs, RenderedPrompt, get_adapter
from analysis.trace.run import batch_tables
from analysis.trace.tracer import trace_batch, traced

# The shape of llava-hf/llava-1.5-7b-hf's config.json (CLIP ViT-L/14-336 + Vicuna-7B).
LLAVA_15_7B = {
    "vision": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
    "text": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
        pad_token_id=32001,
    ),
    "image_token_id": 32000,
    "system_tokens": 35,
    "instruction_tokens": 40,
}
TINY = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                   patch_size=7, projection_dim=32),
    "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=128, max_position_embeddings=512, pad_token_id=1),
    "image_token_id": 100,
    "system_tokens": 8,
    "instruction_tokens": 10,
}
PRESETS = {"llava-1.5-7b": LLAVA_15_7B, "tiny": TINY}


@dataclass
class Measurement:
    """Median seconds per batch, peak memory above the model footprint, and median host seconds per batch."""

    seconds: float
    extra_bytes: int
    # Until the call returns, before waiting for the device: when it is close to ``seconds`` the work is bound by
    # the host launching kernels, not by the device, and fewer FLOPs cannot make it faster.
    host_seconds: float = 0.0
    spread: float = 0.0  # interquartile range over the median, where measured


def build_model(preset: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A LlavaForConditionalGeneration of the preset's shape with HF's random initialisation, eager attention."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**preset["vision"]),
        text_config=LlamaConfig(**preset["text"]),
        image_token_id=preset["image_token_id"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = "eager"
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


def benchmark_model(preset: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, int, str]:
    """The preset's random model on ``device``, the bytes its weights take there, and the device's name."""
    model = build_model(preset, device, dtype)
    synchronize(device)
    model_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return model, model_bytes, name


def build_inputs(model: torch.nn.Module, preset: dict, batch_size: int, device: torch.device) -> ModelInputs:
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
        input_ids, attention_mask, adapter.image_token_id, [row[: preset["system_tokens"]].tolist() for row in rows],
        [[n_image]] * batch_size, [[(side, side)]] * batch_size,
    )
    dtype = next(model.parameters()).dtype
    pixel_values = torch.randn(batch_size, 3, vision["image_size"], vision["image_size"], generator=generator)
    tensors = {
        "input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
        "pixel_values": pixel_values.to(device, dtype),
    }
    prompts = [RenderedPrompt(text="", content_start=0)] * batch_size
    return ModelInputs(tensors=tensors, prompts=prompts, layouts=layouts)


def measure(step: Callable[[], object], device: torch.device, warmup: int, repeats: int, model_bytes: int) -> Measurement:
    """Median wall time of ``step`` and its peak memory above the model's weights."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, host_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        host_times.append(time.perf_counter() - start)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else model_bytes
    return Measurement(statistics.median(times), peak - model_bytes, statistics.median(host_times))


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall time covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    """Measure and print tracing overhead for each batch size."""
    parser = argparse.ArgumentParser(prog="python -m analysis.benchmarks.trace_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llava-1.5-7b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    model, model_bytes, name = benchmark_model(preset, device, getattr(torch, args.dtype))
    adapter = get_adapter(model)
    sys.stdout.write(
        f"device: {name}; preset {args.preset}; dtype {args.dtype}; eager attention; "
        f"model footprint {model_bytes / 2**30:.2f} GiB; median of {args.repeats} after {args.warmup} warm-up\n"
    )
    header = (f"{'batch':>5} {'tokens':>6} {'plain s':>8} {'trace s':>8} {'+tables s':>9} {'trace/plain':>11} "
              f"{'+tables/plain':>13} {'plain extra GiB':>15} {'trace extra GiB':>15} {'trace-plain GiB':>15}")
    sys.stdout.write(header + "\n")
    for batch_size in args.batch_sizes:
        inputs = build_inputs(model, preset, batch_size, device)
        samples = [Sample(f"b{i}", [], prompt="", question="") for i in range(batch_size)]

        def plain() -> object:
            with torch.inference_mode():
                return model(**inputs.tensors)

        plain_m = measure(plain, device, args.warmup, args.repeats, model_bytes)
        with traced(model) as traced_model:
            def trace_only() -> object:
                stats, _ = trace_batch(traced_model, adapter, inputs)
                return [s.region_mass.cpu() for s in stats]

            def trace_and_tables() -> object:
                stats, _ = trace_batch(traced_model, adapter, inputs)
                return batch_tables(samples, inputs, stats, [None] * batch_size, top_k=5)

            trace_m = measure(trace_only, device, args.warmup, args.repeats, model_bytes)
            tables_m = measure(trace_and_tables, device, args.warmup, args.repeats, model_bytes)
        gib = 2**30
        sys.stdout.write(
            f"{batch_size:>5} {inputs.input_ids.shape[1]:>6} {plain_m.seconds:>8.4f} {trace_m.seconds:>8.4f} "
            f"{tables_m.seconds:>9.4f} {trace_m.seconds / plain_m.seconds:>11.3f} "
            f"{tables_m.seconds / plain_m.seconds:>13.3f} {plain_m.extra_bytes / gib:>15.3f} "
            f"{trace_m.extra_bytes / gib:>15.3f} {(trace_m.extra_bytes - plain_m.extra_bytes) / gib:>15.3f}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
