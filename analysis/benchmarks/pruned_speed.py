"""Speed of the token-dropping pruned runtime vs the unpruned model, on LLaVA-1.5-7B's architecture with random weights.

``python -m analysis.benchmarks.pruned_speed [--preset llava-1.5-7b|tiny] [--batch-sizes 1 8]`` prints, per batch
size and variant (unpruned; VisiPruner; FastV at the same prefill FLOPs), the median prefill latency, the median
latency of a greedy ``generate`` of ``--new-tokens`` tokens, peak accelerator memory above the weights, the
measured speedup next to the ideal one implied by the FLOPs cut (``analysis.pruner.flops``, exact convention) and
their ratio, and the prefill's host time (until the call returns, before synchronising): where it is about the
prefill time, the pass is bound by Python and kernel launches, and no FLOPs cut can speed it up. Random weights make the selection rule meaningless, so selections are pinned: VisiPruner keeps
``--keep`` evenly spaced image tokens after ``--selection-layer`` and drops all after ``--exit-layer``; FastV keeps the
number of tokens after ``--fastv-layer`` whose prefill FLOPs come closest. The cost of evaluating the rule (a float32
last-row recomputation in observed layers) is therefore not included. The vision tower is not run: it is the same
for every variant and pruning does not touch it, so prompts enter as embeddings and the speedups are the decoder's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from analysis.benchmarks.trace_overhead import PRESETS, Measurement, benchmark_model, build_inputs, measure
from analysis.errors import ConfigError
from analysis.models.adapters import ModelInputs
from analysis.pruner.config import PruningConfig
from analysis.pruner.flops import DecoderShape, LayerTokens, decode_flops, prefill_flops
from analysis.pruner.runtime import pruned_runtime
from analysis.pruner.simulate import Decisions

# Pinned selections per preset: LLaVA-1.5-7B's keep selection near layer 9 with ~10-60 tokens (the paper's FLOPs cut).
PINNED = {
    "llava-1.5-7b": {"selection_layer": 8, "keep": 58, "exit_layer": 20, "fastv_layer": 2},
    "tiny": {"selection_layer": 1, "keep": 4, "exit_layer": 2, "fastv_layer": 1},
}


@dataclass
class Variant:
    """One way to run the batch: a pruning config and pinned decisions (None: the unmodified model)."""

    name: str
    config: PruningConfig | None
    decisions: Decisions | None
    tokens: list[LayerTokens]  # per layer, for one sample's prefill


def spread(n_image: int, keep: int) -> list[int]:
    """``keep`` evenly spaced image-token ordinals."""
    return sorted(set(np.linspace(0, n_image - 1, num=keep).round().astype(int).tolist())) if keep else []


def pinned_tokens(num_layers: int, length: int, n_image: int, keep: int, selection: int, exit_layer: int) -> list[
    LayerTokens
]:
    """Tokens each prefill layer processes when ``keep`` image tokens stay after ``selection`` and none after exit."""
    counts = []
    for layer in range(num_layers):
        image = n_image if layer <= selection else keep
        if 0 <= exit_layer < layer:
            image = 0
        counts.append(LayerTokens(length - n_image + image, image))
    return counts


def generation_flops(shape: DecoderShape, tokens: list[LayerTokens], new_tokens: int) -> float:
    """Exact FLOPs of a prefill plus ``new_tokens`` decoding steps (each layer's cache keeps its prefill tokens)."""
    total = prefill_flops(shape, tokens)["exact"]
    # The first new token comes from the prefill's logits; each later one costs one decoding step.
    for step in range(new_tokens - 1):
        total += decode_flops(shape, [layer.total + step for layer in tokens])
    return total


def variants(shape: DecoderShape, length: int, n_image: int, batch: int, pinned: dict[str, int]) -> list[Variant]:
    """Unpruned, VisiPruner (pinned) and FastV (pinned, at VisiPruner's prefill FLOPs)."""
    layers = shape.num_layers
    selection, keep, exit_layer, fastv_layer = (pinned[k] for k in ("selection_layer", "keep", "exit_layer",
                                                                    "fastv_layer"))
    if not 0 <= selection < exit_layer < layers or not 1 <= fastv_layer < layers or not 0 <= keep <= n_image:
        raise ConfigError(f"pinned selection {pinned} does not fit a {layers}-layer model with {n_image} image "
                          "tokens: pass --selection-layer < --exit-layer < layers, 1 <= --fastv-layer < layers "
                          "and --keep <= image tokens")
    full = [LayerTokens(length, n_image)] * layers
    ours = pinned_tokens(layers, length, n_image, keep, selection, exit_layer)
    target = prefill_flops(shape, ours)["exact"]
    fastv_keep = min(range(n_image + 1), key=lambda k: abs(
        prefill_flops(shape, pinned_tokens(layers, length, n_image, k, fastv_layer - 1, -1))["exact"] - target))
    fastv = pinned_tokens(layers, length, n_image, fastv_keep, fastv_layer - 1, -1)

    def decisions(keep_count: int, selection_layer: int, exit_at: int) -> Decisions:
        return Decisions(np.full(batch, selection_layer), np.full(batch, exit_at),
                         [spread(n_image, keep_count)] * batch, [n_image] * batch)

    visipruner = PruningConfig(num_layers=layers, stages=["middle", "deep"], shallow_mid_layer=0,
                               provenance={"source": "pinned selection (random weights)"})
    fastv_config = PruningConfig(method="fastv", num_layers=layers, prune_layer=fastv_layer, keep_tokens=fastv_keep)
    return [
        Variant("unpruned", None, None, full),
        Variant(f"visipruner keep {keep} @{selection} exit @{exit_layer}", visipruner,
                decisions(keep, selection, exit_layer), ours),
        Variant(f"fastv keep {fastv_keep} @{fastv_layer}", fastv_config, decisions(fastv_keep, fastv_layer - 1, -1),
                fastv),
    ]


def graphed(step: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``step`` captured once as a CUDA graph (after warm-up passes on a side stream); returns its replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@contextmanager
def running(model: torch.nn.Module, variant: Variant, inputs: ModelInputs) -> Iterator[None]:
    """The model as the variant runs it."""
    if variant.config is None:
        yield
        return
    with pruned_runtime(model, variant.config, inputs.layouts, decisions=variant.decisions):
        yield


def main(argv: list[str] | None = None) -> int:
    """Measure and print pruned-runtime latency and memory against the ideal FLOPs speedup."""
    parser = argparse.ArgumentParser(prog="python -m analysis.benchmarks.pruned_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llava-1.5-7b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--selection-layer", type=int, help="layer whose decision drops tokens from the next on")
    parser.add_argument("--keep", type=int, help="image tokens kept after the selection layer")
    parser.add_argument("--exit-layer", type=int, help="layer after which no image token is left")
    parser.add_argument("--fastv-layer", type=int, help="FastV's pruning layer K")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time the prefill as a CUDA-graph replay (every variant, the unpruned one too), which "
                             "takes Python and kernel launches out of the measurement; needs unpadded batches")
    args = parser.parse_args(argv)
    if args.new_tokens < 1:
        parser.error("--new-tokens must be >= 1")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        parser.error("--cuda-graphs needs a CUDA device")
    pinned = dict(PINNED[args.preset])
    for key in ("selection_layer", "keep", "exit_layer", "fastv_layer"):
        if getattr(args, key) is not None:
            pinned[key] = getattr(args, key)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    model, model_bytes, name = benchmark_model(preset, device, getattr(torch, args.dtype))
    model.set_attn_implementation("sdpa")
    shape = DecoderShape.from_config(model.config.get_text_config())
    sys.stdout.write(
        f"device: {name}; preset {args.preset}; dtype {args.dtype}; SDPA; {args.new_tokens} new tokens; "
        f"median of {args.repeats} after {args.warmup} warm-up; decoder only (vision tower excluded); "
        f"prefill {'replayed as a CUDA graph' if args.cuda_graphs else 'run eagerly'}; "
        f"speedup = unpruned / variant, ideal = FLOPs ratio (exact), ratio = speedup / ideal; n-ideal = the speedup "
        f"if every layer ran as fast as the unpruned model does at that layer's token count; host s = prefill time "
        f"until the call returns\n"
    )
    header = (f"{'batch':>5} {'tokens':>6} {'variant':<34} {'prefill s':>9} {'host s':>7} {'generate s':>10} {'peak GiB':>8} "
              f"{'prefill x':>9} {'ideal':>6} {'ratio':>6} {'n-ideal':>8} {'ratio':>6} "
              f"{'generate x':>10} {'ideal':>6} {'ratio':>6}")
    sys.stdout.write(header + "\n")
    gib = 2**30
    for batch_size in args.batch_sizes:
        inputs = build_inputs(model, preset, batch_size, device)
        with torch.inference_mode():
            embeds = model.get_input_embeddings()(inputs.input_ids)
        length, n_image = inputs.input_ids.shape[1], inputs.layouts[0].n_image_tokens
        pad = model.config.get_text_config().pad_token_id
        base: dict[str, float] = {}
        unpruned: dict[int, Measurement] = {}

        def prefill_step(n_tokens: int) -> Callable[[], object]:
            """The prefill of the prompts' first ``n_tokens`` positions, eager or as a CUDA-graph replay."""
            prefix, mask = embeds[:, :n_tokens], inputs.attention_mask[:, :n_tokens]

            def prefill() -> object:
                with torch.inference_mode():
                    return model(inputs_embeds=prefix, attention_mask=mask, logits_to_keep=1)

            def static_prefill() -> object:
                # Equal-length prompts need no mask, and without one nothing in the pass reads the device back.
                with torch.inference_mode():
                    return model(inputs_embeds=prefix, logits_to_keep=1, use_cache=False)

            return graphed(static_prefill, device) if args.cuda_graphs else prefill

        def unpruned_at(n_tokens: int) -> Measurement:
            """The unpruned prefill of ``n_tokens``-token prompts (measured once per length)."""
            if n_tokens not in unpruned:
                unpruned[n_tokens] = measure(prefill_step(n_tokens), device, args.warmup, args.repeats, model_bytes)
            return unpruned[n_tokens]

        for variant in variants(shape, length, n_image, batch_size, pinned):
            def generate() -> object:
                with torch.inference_mode():
                    return model.generate(inputs_embeds=embeds, attention_mask=inputs.attention_mask,
                                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                          do_sample=False, pad_token_id=pad)

            # What the variant would take if each layer ran as fast as the unpruned model at that layer's token
            # count: the ideal that also knows where a pass is memory- or launch-bound, unlike the FLOPs ratio.
            at_counts = sum(unpruned_at(layer.total).seconds for layer in variant.tokens) / len(variant.tokens)
            with running(model, variant, inputs):
                # The unpruned variant's prefill is the full-length one the token-count ideal already measured.
                prefill_m = (unpruned_at(length) if variant.config is None else
                             measure(prefill_step(length), device, args.warmup, args.repeats, model_bytes))
                generate_m: Measurement = measure(generate, device, args.warmup, args.repeats, model_bytes)
            flops = {"prefill": prefill_flops(shape, variant.tokens)["exact"],
                     "generate": generation_flops(shape, variant.tokens, args.new_tokens)}
            seconds = {"prefill": prefill_m.seconds, "generate": generate_m.seconds}
            if variant.config is None:
                base = {**{f"{k} s": v for k, v in seconds.items()}, **{f"{k} flops": v for k, v in flops.items()}}
            cells = []
            for kind in ("prefill", "generate"):
                speedup = base[f"{kind} s"] / seconds[kind]
                ideal = base[f"{kind} flops"] / flops[kind]
                cells.append(f"{speedup:>{9 if kind == 'prefill' else 10}.3f} {ideal:>6.3f} {speedup / ideal:>6.3f}")
            counts_ideal = base["prefill s"] / at_counts
            sys.stdout.write(
                f"{batch_size:>5} {length:>6} {variant.name:<34} {prefill_m.seconds:>9.4f} {prefill_m.host_seconds:>7.4f} "
                f"{generate_m.seconds:>10.4f} "
                f"{max(prefill_m.extra_bytes, generate_m.extra_bytes) / gib:>8.3f} {cells[0]} "
                f"{counts_ideal:>8.3f} {base['prefill s'] / seconds['prefill'] / counts_ideal:>6.3f} {cells[1]}\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
