"""Speed of the token-dropping pruned runtime vs the unpruned model, on LLaVA-1.5-7B's architecture with random weights.

``python -m analysis.benchmarks.pruned_speed [--preset llava-1.5-7b|tiny] [--batch-sizes 1 8] [--cuda-graphs]`` prints,
per batch size and variant (unpruned; VisiPruner; FastV at the same prefill FLOPs), the median latency of the
decoder's prefill, the median end-to-end latency of a greedy ``generate`` of ``--new-tokens`` tokens from pixels and
token ids (vision tower included) with its spread, the peak accelerator memory a call allocates, the measured speedup
next to the ideal one implied by the FLOPs cut (``analysis.pruner.flops``, exact convention) and their ratio, and the
prefill's host time (until the call returns, before synchronising): where it is about the prefill time, the pass is
bound by Python and kernel launches, and no FLOPs cut can speed it up. Every step is timed in rounds that rotate
through all of them, so drift of the machine falls on all variants alike. Random weights make the selection rule
meaningless, so selections are pinned: VisiPruner keeps ``--keep`` evenly spaced image tokens after
``--selection-layer`` and drops all after ``--exit-layer``; FastV keeps the number of tokens after ``--fastv-layer``
whose prefill FLOPs come closest. The cost of evaluating the rule (a float32 last-row recomputation in observed
layers) is therefore not in the table; ``--rule-cost`` times it on its own. ``--methods`` adds other registered
methods (DART, CDPruner, PyramidDrop, random, pre-LLM) at VisiPruner's exact prefill FLOPs, each running its own
rule, whose token counts do not depend on the weights. The TTFT column (time to first token: pixels and token ids
to one greedy token, a fresh runtime per call) includes every rule's cost; for VisiPruner only the pinned part.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from analysis.benchmarks.device_peaks import DevicePeaks, measure_peaks
from analysis.benchmarks.trace_overhead import PRESETS, Measurement, benchmark_model, build_inputs, synchronize
from analysis.errors import ConfigError
from analysis.models import hf
from analysis.models.adapters import ModelInputs, get_adapter
from analysis.models.hf import HFModel
from analysis.pruner.config import PruningConfig
from analysis.pruner.flops import DecoderShape, LayerTokens, decode_flops, prefill_flops, roofline_seconds
from analysis.pruner.methods import method_for
from analysis.pruner.runtime import pruned_runtime
from analysis.pruner.simulate import Decisions
from analysis.pruner.sweep import matched_budget

# Pinned selections per preset: LLaVA-1.5-7B's keep selection near layer 9 with ~10-60 tokens (the paper's FLOPs cut).
PINNED = {
    "llava-1.5-7b": {"selection_layer": 8, "keep": 58, "exit_layer": 20, "fastv_layer": 2},
    "tiny": {"selection_layer": 1, "keep": 4, "exit_layer": 2, "fastv_layer": 1},
}
# The narrow preset has the 7B's depth and token layout, so it takes the 7B's schedule.
PINNED["llava-1.5-7b-narrow"] = PINNED["llava-1.5-7b"]


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


def pinned_tokens(
    num_layers: int, length: int, n_image: int, keep: int, selection: int, exit_layer: int
) -> list[LayerTokens]:
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
    selection, keep, exit_layer, fastv_layer = (
        pinned[k] for k in ("selection_layer", "keep", "exit_layer", "fastv_layer")
    )
    if not 0 <= selection < exit_layer < layers or not 1 <= fastv_layer < layers or not 0 <= keep <= n_image:
        raise ConfigError(
            f"pinned selection {pinned} does not fit a {layers}-layer model with {n_image} image "
            "tokens: pass --selection-layer < --exit-layer < layers, 1 <= --fastv-layer < layers "
            "and --keep <= image tokens"
        )
    full = [LayerTokens(length, n_image)] * layers
    ours = pinned_tokens(layers, length, n_image, keep, selection, exit_layer)
    target = prefill_flops(shape, ours)["exact"]
    fastv_keep = min(
        range(n_image + 1),
        key=lambda k: abs(
            prefill_flops(shape, pinned_tokens(layers, length, n_image, k, fastv_layer - 1, -1))["exact"] - target
        ),
    )
    fastv = pinned_tokens(layers, length, n_image, fastv_keep, fastv_layer - 1, -1)

    def decisions(keep_count: int, selection_layer: int, exit_at: int) -> Decisions:
        return Decisions(
            np.full(batch, selection_layer),
            np.full(batch, exit_at),
            [spread(n_image, keep_count)] * batch,
            [n_image] * batch,
        )

    visipruner = PruningConfig(
        num_layers=layers,
        stages=["middle", "deep"],
        shallow_mid_layer=0,
        provenance={"source": "pinned selection (random weights)"},
    )
    fastv_config = PruningConfig(method="fastv", num_layers=layers, prune_layer=fastv_layer, keep_tokens=fastv_keep)
    return [
        Variant("unpruned", None, None, full),
        Variant(
            f"visipruner keep {keep} @{selection} exit @{exit_layer}",
            visipruner,
            decisions(keep, selection, exit_layer),
            ours,
        ),
        Variant(
            f"fastv keep {fastv_keep} @{fastv_layer}", fastv_config, decisions(fastv_keep, fastv_layer - 1, -1), fastv
        ),
    ]


def matched_variant(
    method: str, shape: DecoderShape, length: int, n_image: int, target_flops: float, prune_layer: int
) -> Variant:
    """``method`` at the budget whose exact prefill FLOPs come closest to ``target_flops``, running its own rule."""
    layers = shape.num_layers
    full = prefill_flops(shape, [LayerTokens(length, n_image)] * layers)["exact"]
    template = PruningConfig(method=method, num_layers=layers, prune_layer=prune_layer)
    if method_for(template).image_tokens(0, n_image) is None:
        raise ConfigError(f"--methods {method}: its token counts depend on the weights, so no budget can be matched")
    sizes = pd.DataFrame({"n_tokens": [length], "n_image": [n_image]})
    config = matched_budget(shape, sizes, template, 100 * (1 - target_flops / full))
    rule = method_for(config)
    tokens = []
    for layer in range(layers):
        image = rule.image_tokens(layer, n_image)
        assert image is not None  # checked above on the template
        tokens.append(LayerTokens(length - n_image + image, image))
    return Variant(f"{method} {rule.settings()}", config, None, tokens)


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
def running(model: HFModel, variant: Variant, inputs: ModelInputs) -> Iterator[object]:
    """The model as the variant runs it; yields the pruned runtime (None for the unmodified model)."""
    if variant.config is None:
        yield None
        return
    with pruned_runtime(model, variant.config, inputs.layouts, decisions=variant.decisions) as runtime:
        yield runtime


@dataclass
class Timed:
    """A step to time and the context it must run in (None: none, as for a graph replay or the unpruned model)."""

    key: str
    step: Callable[[], object]
    context: Callable[[], AbstractContextManager[object]] | None = None


def interleaved(
    entries: list[Timed], device: torch.device, warmup: int, repeats: int, rounds: int
) -> dict[str, Measurement]:
    """Median wall and host seconds of each entry, timed in rounds that rotate through all entries."""
    # Rounds spread slow drift of the host or the device (clocks, other tenants) over every entry alike, where timing
    # one entry after the other let it fall on one of them: end-to-end generate times moved by 40% between runs.
    per_round = max(1, -(-repeats // rounds))
    wall: dict[str, list[float]] = {entry.key: [] for entry in entries}
    host: dict[str, list[float]] = {entry.key: [] for entry in entries}
    for entry in entries:
        with entry.context() if entry.context else nullcontext():
            for _ in range(warmup):
                entry.step()
    for round_index in range(rounds):
        shift = round_index % len(entries)
        for entry in entries[shift:] + entries[:shift]:
            with entry.context() if entry.context else nullcontext():
                if entry.context:
                    entry.step()  # untimed: a runtime's first pass after entering builds its per-layer layouts
                for _ in range(per_round):
                    synchronize(device)
                    start = time.perf_counter()
                    entry.step()
                    host[entry.key].append(time.perf_counter() - start)
                    synchronize(device)
                    wall[entry.key].append(time.perf_counter() - start)
    return {
        key: Measurement(statistics.median(wall[key]), 0, statistics.median(host[key]), relative_spread(wall[key]))
        for key in wall
    }


def relative_spread(seconds: list[float]) -> float:
    """Interquartile range over the median."""
    low, _, high = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else (seconds[0],) * 3
    return (high - low) / statistics.median(seconds)


def peak_bytes(
    step: Callable[[], object], context: Callable[[], AbstractContextManager[object]] | None, device: torch.device
) -> int:
    """Peak accelerator memory one call of ``step`` allocates above what was allocated before it."""
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with context() if context else nullcontext():
        step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def device_busy_seconds(
    step: Callable[[], object], context: Callable[[], AbstractContextManager[object]] | None, device: torch.device
) -> float | None:
    """Seconds the accelerator spends in kernels and copies during one call of ``step`` (None off CUDA)."""
    # Eager decoding at batch 1 is bound by the host launching kernels, which hides what pruning saves on the device;
    # the kernels' own time is what a server that launches them faster (CUDA graphs, a compiled loop) would pay.
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with warnings.catch_warnings():
        # The profiler warns that it keeps one cycle's events; one call is all this profile is.
        warnings.filterwarnings("ignore", message=".*Profiler clears events")
        with context() if context else nullcontext(), profile(activities=[ProfilerActivity.CUDA]) as profiler:
            step()
            synchronize(device)
    return sum(event.self_device_time_total for event in profiler.key_averages()) / 1e6


def compile_around_attention(model: HFModel) -> None:
    """Compile, in place, every child module of each decoder layer except its attention."""
    for layer in get_adapter(model).decoder_layers():
        for name, child in layer.named_children():
            if "attn" not in name and any(True for _ in child.parameters()):
                child.compile()


def main(argv: list[str] | None = None) -> int:
    """Measure and print pruned-runtime latency and memory against the ideal FLOPs speedup."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.benchmarks.pruned_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llava-1.5-7b")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--selection-layer", type=int, help="layer whose decision drops tokens from the next on")
    parser.add_argument("--keep", type=int, help="image tokens kept after the selection layer")
    parser.add_argument("--exit-layer", type=int, help="layer after which no image token is left")
    parser.add_argument("--fastv-layer", type=int, help="FastV's pruning layer K")
    parser.add_argument(
        "--methods",
        nargs="*",
        default=[],
        help="more pruning methods to run at VisiPruner's prefill FLOPs, each with its own rule (e.g. random pre_llm "
        "dart cdpruner pyramiddrop)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each step before the rounds")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each step, in all")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the timed calls are spread over")
    parser.add_argument(
        "--rule-cost",
        action="store_true",
        help="also time the selection rule itself: a prefill that evaluates it in every layer (it "
        "keeps every token and never exits, so the tokens are the unpruned ones) against the "
        "same decisions pinned",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile each decoder layer's modules other than attention (MLP, norms) with "
        "torch.compile, for every variant: fused small kernels; attention stays eager, as the "
        "runtime's hooks live there",
    )
    parser.add_argument(
        "--latency",
        action="store_true",
        help="also time the latency mode (analysis.pruner.latency: static buffers, CUDA graphs on CUDA) end to end, "
        "unpruned, VisiPruner with its rule live (thresholds calibrated so that on these random weights it selects "
        "at --selection-layer keeping about --keep tokens and exits near --exit-layer) and FastV at VisiPruner's "
        "measured prefill FLOPs, its rule live too",
    )
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="time only the latency mode's rows (implies --latency): the eager table, with its pinned selections, is "
        "left out, which takes a few minutes off a GPU run",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="time the prefill as a CUDA-graph replay (every variant, the unpruned one too), which "
        "takes Python and kernel launches out of the measurement; needs unpadded batches",
    )
    args = parser.parse_args(argv)
    args.latency = args.latency or args.latency_only
    if args.new_tokens < 1:
        parser.error("--new-tokens must be >= 1")
    if args.repeats < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--repeats and --rounds must be >= 1 and --warmup >= 0")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        parser.error("--cuda-graphs needs a CUDA device")
    pinned = dict(PINNED[args.preset])
    for key in ("selection_layer", "keep", "exit_layer", "fastv_layer"):
        if getattr(args, key) is not None:
            pinned[key] = getattr(args, key)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    model, _, name = benchmark_model(preset, device, getattr(torch, args.dtype))
    model.set_attn_implementation("sdpa")
    if args.compile:
        compile_around_attention(model)
    shape = DecoderShape.from_config(model.config.get_text_config())
    peaks = measure_peaks(device, getattr(torch, args.dtype))
    sys.stdout.write(
        f"device: {name}; {peaks.describe()}; preset {args.preset}; dtype {args.dtype}; SDPA; "
        f"{args.new_tokens} new tokens; "
        f"median of {args.repeats} in {args.rounds} rounds over all steps, after {args.warmup} warm-up; "
        f"prefill: decoder only, {'replayed as a CUDA graph' if args.cuda_graphs else 'run eagerly'}"
        f"{', MLP and norms compiled' if args.compile else ''}; "
        f"generate: end to end from pixels and token ids (vision tower included), eager; "
        f"speedup = unpruned / variant, ideal = decoder FLOPs ratio (exact), ratio = speedup / ideal; n-ideal = the "
        f"speedup if every layer ran as fast as the unpruned model does at that layer's token count; roof = the "
        f"roofline ideal (per layer the larger of FLOPs / peak FLOP/s and bytes / bandwidth, both measured above), "
        f"roof eff = roofline time / measured prefill time; host s = prefill "
        f"time until the call returns; spread = interquartile range / median; peak = most memory a prefill or "
        f"generate call allocates; GPU s = time the GPU spends in kernels during one generate (profiled); TTFT = "
        f"pixels and token ids to one greedy token, each call in a fresh runtime, so a method's rule runs every time; "
        f"decode tok/s = batch x (new tokens - 1) / (generate s - TTFT s)\n"
    )
    header = (
        f"{'batch':>5} {'tokens':>6} {'variant':<40} {'prefill s':>9} {'host s':>7} {'generate s':>10} "
        f"{'spread':>6} {'peak GiB':>8} {'prefill x':>9} {'ideal':>6} {'ratio':>6} {'n-ideal':>8} {'ratio':>6} "
        f"{'roof':>6} {'ratio':>6} {'roof eff':>8} "
        f"{'generate x':>10} {'ideal':>6} {'ratio':>6} {'GPU s':>7} {'GPU x':>6} {'TTFT s':>7} {'TTFT x':>6} "
        f"{'dec tok/s':>9}"
    )
    if not args.latency_only:
        sys.stdout.write(header + "\n")
    for batch_size in args.batch_sizes:
        _benchmark_batch(model, preset, shape, pinned, batch_size, device, args, peaks)
    return 0


def _benchmark_batch(
    model: HFModel,
    preset: dict,
    shape: DecoderShape,
    pinned: dict[str, int],
    batch_size: int,
    device: torch.device,
    args: argparse.Namespace,
    roofline: DevicePeaks,
) -> None:
    """Time every variant's prefill and end-to-end generate for one batch size and print their rows."""
    inputs = build_inputs(model, preset, batch_size, device)
    if args.latency_only:
        _latency_rows(model, inputs, shape, pinned, batch_size, device, args, roofline)
        return
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(inputs.input_ids)
    length, n_image = inputs.input_ids.shape[1], inputs.layouts[0].n_image_tokens
    pad = model.config.get_text_config().pad_token_id
    all_variants = variants(shape, length, n_image, batch_size, pinned)
    target = prefill_flops(shape, all_variants[1].tokens)["exact"]
    all_variants += [
        matched_variant(method, shape, length, n_image, target, pinned["fastv_layer"]) for method in args.methods
    ]

    def prefill(n_tokens: int) -> Callable[[], object]:
        """The eager decoder prefill of the prompts' first ``n_tokens`` positions."""
        prefix, mask = embeds[:, :n_tokens], inputs.attention_mask[:, :n_tokens]

        def step() -> object:
            with torch.inference_mode():
                return hf.embeds_forward(model, prefix, mask)

        return step

    def static_prefill(n_tokens: int) -> Callable[[], object]:
        """The same prefill as a CUDA graph's replay (equal-length prompts need no mask, so nothing reads back)."""
        prefix = embeds[:, :n_tokens]

        def step() -> object:
            with torch.inference_mode():
                return hf.embeds_forward(model, prefix, cache=False)

        return graphed(step, device)

    def generate() -> object:
        with torch.inference_mode():
            return model.generate(
                **inputs.tensors,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )

    adapter = get_adapter(model)

    def vision_tower() -> object:
        with torch.inference_mode():
            return adapter.image_features(inputs.tensors)

    def first_token(variant: Variant) -> Callable[[], object]:
        """Pixels and token ids to one greedy token, the runtime (and so the rule) made anew in every call."""

        def step() -> object:
            with running(model, variant, inputs), torch.inference_mode():
                return model.generate(**inputs.tensors, max_new_tokens=1, do_sample=False, pad_token_id=pad)

        return step

    entries = [Timed("vision tower", vision_tower)]
    # What a variant would take if each layer ran as fast as the unpruned model at that layer's token count: the
    # ideal that also knows where a pass is memory- or launch-bound, unlike the FLOPs ratio.
    for n_tokens in sorted({layer.total for variant in all_variants for layer in variant.tokens}):
        entries.append(
            Timed(f"unpruned prefill {n_tokens}", static_prefill(n_tokens) if args.cuda_graphs else prefill(n_tokens))
        )
    peaks: dict[str, int] = {}
    busy: dict[str, float | None] = {}
    # A captured graph reads its runtime's per-layer index tensors, which must outlive the block it was captured in.
    captured_runtimes: list[object] = []
    for variant in all_variants:

        def context(variant: Variant = variant) -> AbstractContextManager[object]:
            return running(model, variant, inputs)

        @contextmanager
        def primed(variant: Variant = variant) -> Iterator[object]:
            """The variant's runtime for a decoder-only prefill: a rule that reads the vision tower (VisionZip) sees
            one untimed tower pass first, as the prefill from embeddings never runs the tower."""
            with running(model, variant, inputs) as runtime:
                if variant.config is not None and method_for(variant.config).reads_vision:
                    vision_tower()
                yield runtime

        if variant.config is not None:
            if args.cuda_graphs:
                with primed() as runtime:
                    entries.append(Timed(f"{variant.name} prefill", static_prefill(length)))
                captured_runtimes.append(runtime)
            else:
                entries.append(Timed(f"{variant.name} prefill", prefill(length), primed))
        entries.append(Timed(f"{variant.name} generate", generate, context))
        entries.append(Timed(f"{variant.name} first token", first_token(variant)))
        peaks[variant.name] = max(peak_bytes(prefill(length), primed, device), peak_bytes(generate, context, device))
        busy[variant.name] = device_busy_seconds(generate, context, device)
    timed = interleaved(entries, device, args.warmup, args.repeats, args.rounds)

    base_prefill, base_generate = timed[f"unpruned prefill {length}"], timed["unpruned generate"]
    full_flops = {
        "prefill": prefill_flops(shape, all_variants[0].tokens)["exact"],
        "generate": generation_flops(shape, all_variants[0].tokens, args.new_tokens),
    }
    for variant in all_variants:
        prefill_m = timed[f"unpruned prefill {length}" if variant.config is None else f"{variant.name} prefill"]
        generate_m = timed[f"{variant.name} generate"]
        at_counts = sum(timed[f"unpruned prefill {layer.total}"].seconds for layer in variant.tokens) / len(
            variant.tokens
        )
        prefill_x, generate_x = base_prefill.seconds / prefill_m.seconds, base_generate.seconds / generate_m.seconds
        prefill_ideal = full_flops["prefill"] / prefill_flops(shape, variant.tokens)["exact"]
        generate_ideal = full_flops["generate"] / generation_flops(shape, variant.tokens, args.new_tokens)
        counts_ideal = base_prefill.seconds / at_counts
        limits = (roofline.matmul_flops, roofline.copy_bandwidth)
        bytes_per_value = roofline.bytes_per_value
        roof_time = roofline_seconds(shape, variant.tokens, *limits, batch=batch_size, bytes_per_value=bytes_per_value)
        base_roof = roofline_seconds(
            shape, all_variants[0].tokens, *limits, batch=batch_size, bytes_per_value=bytes_per_value
        )
        roof_ideal = base_roof / roof_time
        gpu, base_gpu = busy[variant.name], busy[all_variants[0].name]
        gpu_cells = f"{gpu:>7.4f} {base_gpu / gpu:>6.3f}" if gpu and base_gpu else f"{'-':>7} {'-':>6}"
        ttft = timed[f"{variant.name} first token"].seconds
        gpu_cells += f" {ttft:>7.4f} {timed['unpruned first token'].seconds / ttft:>6.3f}"
        decoding = generate_m.seconds - ttft
        rate = batch_size * (args.new_tokens - 1) / decoding if args.new_tokens > 1 and decoding > 0 else None
        gpu_cells += f" {rate:>9.1f}" if rate is not None else f" {'-':>9}"
        sys.stdout.write(
            f"{batch_size:>5} {length:>6} {variant.name:<40} {prefill_m.seconds:>9.4f} {prefill_m.host_seconds:>7.4f} "
            f"{generate_m.seconds:>10.4f} {generate_m.spread:>6.2f} {peaks[variant.name] / 2**30:>8.3f} "
            f"{prefill_x:>9.3f} {prefill_ideal:>6.3f} {prefill_x / prefill_ideal:>6.3f} "
            f"{counts_ideal:>8.3f} {prefill_x / counts_ideal:>6.3f} "
            f"{roof_ideal:>6.3f} {prefill_x / roof_ideal:>6.3f} {roof_time / prefill_m.seconds:>8.3f} "
            f"{generate_x:>10.3f} {generate_ideal:>6.3f} {generate_x / generate_ideal:>6.3f} {gpu_cells}\n"
        )
    tower = timed["vision tower"]
    sys.stdout.write(f"{batch_size:>5} vision tower alone (inside every generate): {tower.seconds:.4f} s\n")
    if args.rule_cost:
        _rule_cost(model, inputs, prefill(length), shape.num_layers, batch_size, device, args)
    if args.latency:
        _latency_rows(model, inputs, shape, pinned, batch_size, device, args, roofline)


def _live_decisions(model: HFModel, inputs: ModelInputs, config: PruningConfig) -> Decisions:
    """The live rule's decisions in one eager prefill."""
    with torch.inference_mode(), pruned_runtime(model, config, inputs.layouts) as runtime:
        hf.embeds_forward(model, model.get_input_embeddings()(inputs.input_ids), inputs.attention_mask)
    return runtime.decisions(inputs.layouts)


def mean_layer_tokens(decisions: Decisions, length: int, num_layers: int) -> list[LayerTokens]:
    """Per layer, the samples' mean tokens (rounded) under their own decisions: one sample standing for the batch."""
    rows = [decisions.tokens_per_layer(row, length, num_layers) for row in range(len(decisions.kept))]
    return [
        LayerTokens(
            int(round(np.mean([row[layer].total for row in rows]))),
            int(round(np.mean([row[layer].image for row in rows]))),
        )
        for layer in range(num_layers)
    ]


def _mean_decisions(model: HFModel, inputs: ModelInputs, config: PruningConfig) -> tuple[float, float, float]:
    """Mean kept image tokens, selection layer and exit layer (exits past the last layer for none) of the live rule
    in one eager prefill."""
    return decision_means(_live_decisions(model, inputs, config), config.num_layers)


def decision_means(decisions: Decisions, num_layers: int) -> tuple[float, float, float]:
    """Mean kept image tokens, selection layer and exit layer (``num_layers`` for a sample that never exits)."""
    kept = float(np.mean([decisions.n_kept(row) for row in range(len(decisions.kept))]))
    exits = np.where(decisions.exit_layer >= 0, decisions.exit_layer, num_layers)
    return kept, float(np.mean(decisions.selection_layer)), float(np.mean(exits))


def live_visipruner(
    model: HFModel, inputs: ModelInputs, num_layers: int, selection: int, keep: int, exit_layer: int
) -> PruningConfig:
    """A VisiPruner config whose live rule on this model and batch selects at ``selection`` keeping about ``keep``
    image tokens and exits near ``exit_layer``: the token threshold found by bisection, the exit by the deep stage's
    patience (random weights give the rule no meaning of its own, so its thresholds reproduce a paper-like
    schedule)."""
    base = PruningConfig(
        num_layers=num_layers,
        stages=["middle", "deep"],
        shallow_mid_layer=max(selection - 1, 0),
        layer_threshold=1.0,  # fires at the first observed layer
        deep_cosine=1.0,
        provenance={"source": "live rule, thresholds calibrated on random weights (pruned_speed --latency)"},
    )

    def kept(threshold: float) -> float:
        """Mean image tokens the rule keeps at this norm threshold."""
        return _mean_decisions(model, inputs, replace(base, tokens_threshold=threshold))[0]

    # Fewer tokens pass a higher norm threshold: bisect for the one keeping ``keep``.
    low, high = 0.0, 1.0
    while kept(high) > keep and high < 1e6:
        high *= 4
    for _ in range(14):
        middle = (low + high) / 2
        low, high = (middle, high) if kept(middle) > keep else (low, middle)
    threshold = (low + high) / 2
    selected = replace(base, tokens_threshold=threshold)
    # Random weights' cosines jump past any one deep threshold, which a bisection over it cannot place: count every
    # layer whose kept tokens do not point against the output as negligible and scan the patience instead.
    quiet = replace(selected, deep_cosine=1e-6)

    def distance(patience: int) -> float:
        """How far the mean exit at this patience lies from ``exit_layer``."""
        return abs(_mean_decisions(model, inputs, replace(quiet, deep_patience=patience))[2] - exit_layer)

    patience = min(range(1, num_layers), key=distance)
    return replace(quiet, deep_patience=patience)


def _latency_rows(
    model: HFModel,
    inputs: ModelInputs,
    shape: DecoderShape,
    pinned: dict[str, int],
    batch_size: int,
    device: torch.device,
    args: argparse.Namespace,
    roofline: DevicePeaks,
) -> None:
    """Time the latency mode end to end, every rule live, and print one row per variant."""
    from analysis.pruner.latency import LatencyEngine

    layers = shape.num_layers
    length, n_image = inputs.input_ids.shape[1], inputs.layouts[0].n_image_tokens
    ours = live_visipruner(model, inputs, layers, pinned["selection_layer"], pinned["keep"], pinned["exit_layer"])
    live = _live_decisions(model, inputs, ours)
    kept, selection, exit_mean = decision_means(live, layers)
    # The ideals count what each sample's own decisions leave (the engine pads a batch to its widest row).
    ours_tokens = mean_layer_tokens(live, length, layers)
    target = prefill_flops(shape, ours_tokens)["exact"]
    fastv = matched_variant("fastv", shape, length, n_image, target, pinned["fastv_layer"])
    engine = LatencyEngine(model)
    # The live rule's own decisions pinned: the same schedule without the rule, so live minus pinned is its cost.
    configs: list[tuple[str, PruningConfig | None, list[LayerTokens], Decisions | None]] = [
        ("unpruned", None, [LayerTokens(length, n_image)] * layers, None),
        (f"visipruner live: kept {kept:.1f} @{selection:.1f} exit @{exit_mean:.1f}", ours, ours_tokens, None),
        ("visipruner, its live decisions pinned", ours, ours_tokens, live),
        (
            f"fastv live {method_for(fastv.config).settings()}" if fastv.config else "fastv",
            fastv.config,
            fastv.tokens,
            None,
        ),
    ]

    with torch.inference_mode():
        embeds = hf.language_model_embeddings(model, get_adapter(model).language_model(), inputs.tensors)

    def call(
        config: PruningConfig | None, new_tokens: int, pinned: Decisions | None, merged: torch.Tensor | None = None
    ) -> Callable[[], object]:
        return lambda: engine.generate(inputs, new_tokens, config, embeds=merged, decisions=pinned)

    entries = []
    for name, config, _, decisions in configs:
        entries.append(Timed(f"{name} prefill", call(config, 1, decisions, embeds)))
        entries.append(Timed(f"{name} ttft", call(config, 1, decisions)))
        entries.append(Timed(f"{name} generate", call(config, args.new_tokens, decisions)))
    timed = interleaved(entries, device, max(args.warmup, 1), args.repeats, args.rounds)
    limits = (roofline.matmul_flops, roofline.copy_bandwidth)
    base_roof = roofline_seconds(
        shape, configs[0][2], *limits, batch=batch_size, bytes_per_value=roofline.bytes_per_value
    )
    full = prefill_flops(shape, configs[0][2])["exact"]
    base_ttft, base_prefill = timed["unpruned ttft"].seconds, timed["unpruned prefill"].seconds
    mode = "CUDA graphs" if engine.graphs else "static buffers, uncaptured"
    for name, config, tokens, decisions in configs:
        ttft, generate_s = timed[f"{name} ttft"].seconds, timed[f"{name} generate"].seconds
        prefill_s = timed[f"{name} prefill"].seconds
        roof_time = roofline_seconds(shape, tokens, *limits, batch=batch_size, bytes_per_value=roofline.bytes_per_value)
        roof = base_roof / roof_time
        ideal = full / prefill_flops(shape, tokens)["exact"]
        speedup = base_prefill / prefill_s
        rate = batch_size * (args.new_tokens - 1) / (generate_s - ttft) if generate_s > ttft else float("nan")
        # The kernels' time in one profiled prefill: the rest of the wall time the device waited for the host (the
        # rule's read-backs and the host work after them).
        busy = device_busy_seconds(call(config, 1, decisions, embeds), None, device)
        busy_cell = f"; GPU busy {busy:.4f} s ({busy / prefill_s:.0%} of the prefill)" if busy else ""
        sys.stdout.write(
            f"{batch_size:>5} latency mode ({mode}), {name:<52} prefill {prefill_s:.4f} s x{speedup:.3f} "
            f"(FLOPs ideal {ideal:.3f}, roofline ideal {roof:.3f}, x / roofline ideal {speedup / roof:.3f}, "
            f"roofline time / prefill {roof_time / prefill_s:.3f}){busy_cell}; TTFT {ttft:.4f} s "
            f"x{base_ttft / ttft:.3f}; generate {generate_s:.4f} s, decode {rate:.1f} tok/s\n"
        )


def _rule_cost(
    model: HFModel,
    inputs: ModelInputs,
    prefill: Callable[[], object],
    num_layers: int,
    batch_size: int,
    device: torch.device,
    args: argparse.Namespace,
) -> None:
    """Time an eager prefill that evaluates the selection rule in every layer against the same decisions pinned."""
    # Decisions freeze after a block's first prefill, so every timed call gets a runtime of its own.
    config = PruningConfig(
        num_layers=num_layers,
        stages=["middle", "deep"],
        shallow_mid_layer=0,
        tokens_threshold=0.0,
        deep_cosine=1.0,
        provenance={"source": "rule cost: keeps every token, never exits"},
    )
    with pruned_runtime(model, config, inputs.layouts) as runtime:
        prefill()
    decisions = runtime.decisions(inputs.layouts)

    def fresh(pinned: Decisions | None) -> Callable[[], object]:
        def step() -> object:
            with pruned_runtime(model, config, inputs.layouts, decisions=pinned):
                return prefill()

        return step

    timed = interleaved(
        [Timed("rule", fresh(None)), Timed("pinned", fresh(decisions))], device, args.warmup, args.repeats, args.rounds
    )
    observed = num_layers - 1 - config.shallow_mid_layer
    extra = timed["rule"].seconds - timed["pinned"].seconds
    sys.stdout.write(
        f"{batch_size:>5} selection rule evaluated in {observed} layers: prefill {timed['rule'].seconds:.4f} s "
        f"(host {timed['rule'].host_seconds:.4f} s) against {timed['pinned'].seconds:.4f} s with the same decisions "
        f"pinned: {extra * 1e3:.1f} ms, {extra / observed * 1e3:.2f} ms per observed layer\n"
    )


if __name__ == "__main__":
    sys.exit(main())
