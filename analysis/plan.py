"""``python -m analysis.plan``: how a run of a model over a dataset spreads over GPUs.

It prints the weights and the activation memory one copy of the model needs, how many GPUs one copy then spans
(``--device auto``), how many copies a node holds (``torchrun --nproc_per_node``), and the expected time: measured
when ``--calibrate K`` times K questions on this machine first, else only the compute bound at ``--peak-tflops``.

Memory per copy = weights + a batch's KV cache (every layer keeps every prompt and answer position) + the batch's
largest transient: one layer's MLP and attention activations and the float32 logits of every position (teacher-forced
probes keep them all). Only a share of each GPU, ``--headroom``, is planned on; the rest is left to the allocator and
to CUDA itself. The memory is an estimate from the architecture, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from analysis.cli import run_cli
from analysis.config import DEVICE_ALIASES, HelpFormatter
from analysis.errors import ConfigError
from analysis.pruner.flops import DecoderShape, kv_cache_bytes

if TYPE_CHECKING:
    from collections.abc import Sequence

    from analysis.data.samples import Sample

logger = logging.getLogger(__name__)

GIB = 2**30
UNITS = {"GiB": GIB, "GB": 10**9, "MiB": 2**20, "MB": 10**6}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Plan:
    """A run's layout over GPUs and its expected time."""

    parameters: int
    weights_bytes: int
    prompt_tokens: int
    activation_bytes: int  # per copy, for one batch
    copy_bytes: int
    gpus_per_copy: int
    copies_per_node: int
    copies: int
    seconds_per_question: float | None  # one copy's, measured by the calibration
    expected_seconds: float | None  # the whole run over every copy, from the calibration
    compute_bound_seconds: float | None  # the prefill FLOPs of every question at --peak-tflops on every GPU in use


def parse_size(text: str) -> int:
    """A memory size such as ``141GiB`` or ``80GB`` in bytes."""
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            try:
                value = float(text[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * factor)
    raise ConfigError(f"--gpu-memory {text!r}: write a positive size with a unit, e.g. 141GiB or 80GB")


def activation_bytes(shape: DecoderShape, vocab: int, tokens: int, batch: int, value_bytes: int) -> int:
    """One batch's KV cache over every layer plus its largest transient (a layer's activations, float32 logits)."""
    cache = kv_cache_bytes(shape, [tokens] * shape.num_layers, value_bytes)
    layer = tokens * (2 * shape.intermediate + 4 * shape.hidden + shape.num_heads * shape.head_dim) * value_bytes
    logits = tokens * vocab * 4
    return batch * (cache + layer + logits)


def calibrate(
    model: str, dataset: str, split: str | None, questions: int, batch_size: int, device: str
) -> tuple[float, int]:
    """Seconds one copy spends per question on greedy answers of ``questions`` of them (after one warm-up batch),
    and their median prompt length."""
    from analysis.data.loaders import load_samples
    from analysis.data.samples import batched
    from analysis.generation import generate_answers
    from analysis.models.registry import load_model

    loaded = load_model(model, device=device)
    warmup, *timed = batched(load_samples(dataset, split, questions + batch_size), batch_size)
    if not timed:
        raise ConfigError(f"--calibrate needs more than one batch of {batch_size} questions in {dataset}")
    lengths: list[int] = []

    def answer(batch: Sequence[Sample]) -> None:
        inputs = loaded.adapter.build_inputs(loaded.processor, batch, device=loaded.device)
        generate_answers(loaded, inputs, 8)
        lengths.extend(layout.length for layout in inputs.layouts)

    answer(warmup)  # pays for kernels' first use, not for the questions
    started = time.perf_counter()
    for batch in timed:
        answer(batch)
    elapsed = time.perf_counter() - started
    return elapsed / sum(len(batch) for batch in timed), int(statistics.median(lengths))


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan the command line asks for."""
    from analysis.models.registry import model_size

    if min(args.questions, args.gpus, args.nodes, args.batch_size) < 1 or not 0 < args.headroom <= 1:
        raise ConfigError("--questions, --gpus, --nodes and --batch-size must be >= 1 and --headroom in (0, 1]")
    if args.prompt_tokens is None and not args.calibrate:
        raise ConfigError("the plan needs the prompt length: pass --prompt-tokens N, or --calibrate K to measure it")
    size = model_size(args.model)
    value_bytes = size.dtype_bytes if args.dtype == "auto" else DTYPE_BYTES[args.dtype]
    seconds, tokens = None, args.prompt_tokens or 0
    if args.calibrate:
        seconds, measured = calibrate(
            args.model, args.dataset, args.split, args.calibrate, args.batch_size, args.device
        )
        tokens = args.prompt_tokens or measured
    shape = DecoderShape.from_config(size.text_config)
    vocab = int(size.text_config.vocab_size)
    total_tokens = tokens + args.new_tokens
    weights = size.parameters * value_bytes
    activations = activation_bytes(shape, vocab, total_tokens, args.batch_size, value_bytes)
    usable = args.headroom * parse_size(args.gpu_memory)
    gpus_per_copy = max(1, math.ceil((weights + activations) / usable))
    if gpus_per_copy > args.gpus:
        raise ConfigError(
            f"one copy needs {gpus_per_copy} GPUs of {args.gpu_memory} ({(weights + activations) / GIB:.1f} GiB at "
            f"{args.headroom:.0%} use) but a node has {args.gpus}; lower --batch-size, use a smaller dtype, or plan "
            "for bigger GPUs"
        )
    copies_per_node = args.gpus // gpus_per_copy
    copies = copies_per_node * args.nodes
    # A copy over several GPUs runs its layers one GPU after another (accelerate's device map), so it computes at
    # about one GPU's rate: the bound counts one GPU per copy.
    flops = 2 * size.language * tokens * args.questions
    bound = None if args.peak_tflops is None else flops / (args.peak_tflops * 1e12 * copies)
    return Plan(
        parameters=size.parameters,
        weights_bytes=weights,
        prompt_tokens=tokens,
        activation_bytes=activations,
        copy_bytes=weights + activations,
        gpus_per_copy=gpus_per_copy,
        copies_per_node=copies_per_node,
        copies=copies,
        seconds_per_question=seconds,
        expected_seconds=None if seconds is None else seconds * args.questions / copies,
        compute_bound_seconds=bound,
    )


def describe(plan: Plan, args: argparse.Namespace) -> str:
    """The plan as the command prints it."""

    def hours(seconds: float) -> str:
        return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"

    lines = [
        f"model {args.model}: {plan.parameters / 1e9:.2f}B parameters, weights {plan.weights_bytes / GIB:.1f} GiB",
        f"activations per copy: {plan.activation_bytes / GIB:.1f} GiB (batch {args.batch_size} of "
        f"{plan.prompt_tokens} prompt + {args.new_tokens} new tokens)",
        f"one copy: {plan.copy_bytes / GIB:.1f} GiB -> {plan.gpus_per_copy} GPU(s) of {args.gpu_memory} at "
        f"{args.headroom:.0%} use",
        f"copies: {plan.copies_per_node} per node x {args.nodes} node(s) = {plan.copies}",
        f"launch: torchrun --nproc_per_node {plan.copies_per_node} -m analysis.trace --model {args.model} "
        + ("--device auto" if plan.gpus_per_copy > 1 else "--device cuda")
        + " ...",
    ]
    if plan.expected_seconds is not None and plan.seconds_per_question is not None:
        lines.append(
            f"expected time for {args.questions} questions: {hours(plan.expected_seconds)} "
            f"(calibration: {plan.seconds_per_question:.3f} s per question per copy on {args.device})"
        )
    else:
        lines.append("expected time: pass --calibrate K on the machine that will run it")
    if plan.compute_bound_seconds is not None:
        lines.append(
            f"compute bound at {args.peak_tflops:g} TFLOP/s per copy: {hours(plan.compute_bound_seconds)} "
            "(prefill FLOPs only; no run is faster)"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The plan command's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.plan",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, help="model alias, hub id or local path (a config.json suffices)")
    parser.add_argument("--dataset", default="shapes-vqa", help="dataset the calibration reads")
    parser.add_argument("--split", default=None, help="dataset split")
    parser.add_argument("--questions", type=int, required=True, help="questions the run will hold")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (else measured by calibration)")
    parser.add_argument("--new-tokens", type=int, default=8, help="answer tokens per question")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per forward pass")
    parser.add_argument("--dtype", default="bfloat16", choices=("auto", *DTYPE_BYTES), help="weights' dtype")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1, help="nodes")
    parser.add_argument("--gpu-memory", default="139GiB", help="memory of one GPU (an H200 reports about 139 GiB)")
    parser.add_argument("--headroom", type=float, default=0.9, help="share of each GPU's memory planned on")
    parser.add_argument("--peak-tflops", type=float, default=None, help="one GPU's dense peak, for the compute bound")
    parser.add_argument("--calibrate", type=int, default=0, help="time this many questions here first (0: none)")
    parser.add_argument(
        "--device", *DEVICE_ALIASES, default="cpu", help="device of the calibration (cuda, auto for a sharded copy)"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and print the plan."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        plan = make_plan(args)
        text = json.dumps(asdict(plan), indent=2) if args.json else describe(plan, args)
        sys.stdout.write(text + "\n")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
