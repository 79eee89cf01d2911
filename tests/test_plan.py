"""``python -m analysis.plan``: memory per copy from the architecture, GPUs per copy and copies per node, the time
from a measured calibration, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.data.loaders import load_samples
from analysis.models.registry import load_model, model_size
from analysis.plan import GIB, Plan, activation_bytes, build_parser, main, make_plan, parse_size
from analysis.pruner.flops import DecoderShape
from analysis.pruner.sweep import prompt_sizes

PLAN_72B = Path(__file__).resolve().parents[1] / "configs" / "plan" / "qwen2.5-vl-72b-instruct"


def plan_of(*argv: str) -> Plan:
    """The plan for a command line."""
    return make_plan(build_parser().parse_args(list(argv)))


def test_memory_and_layout_follow_the_architecture() -> None:
    """Weights are parameters x dtype bytes; activations the batch's KV cache, a layer's activations and float32
    logits; a GPU too small for one copy makes each copy span several, and the node holds what fits."""
    size = model_size("tiny-llava")
    shape = DecoderShape.from_config(size.text_config)
    activations = activation_bytes(shape, int(size.text_config.vocab_size), 50 + 8, 4, 2)
    copy = 2 * size.parameters + activations
    gpu = copy * 0.6  # one copy needs two such GPUs at 90% use
    plan = plan_of("--model", "tiny-llava", "--questions", "100", "--prompt-tokens", "50", "--batch-size", "4",
                   "--gpus", "5", "--gpu-memory", f"{gpu / 1e6}MB")  # fmt: skip
    assert plan.weights_bytes == 2 * size.parameters and plan.activation_bytes == activations
    assert plan.gpus_per_copy == 2 and plan.copies_per_node == 2 and plan.copies == 2
    assert plan.expected_seconds is None  # no calibration, no time


def test_the_worked_72b_plan() -> None:
    """Qwen2.5-VL-72B from its architecture alone: 73.4B parameters, 136.7 GiB of bf16 weights, two H200s per copy
    and four copies on a node of eight; the compute bound counts one GPU per copy."""
    plan = plan_of("--model", str(PLAN_72B), "--questions", "10000", "--prompt-tokens", "300",
                   "--peak-tflops", "715")  # fmt: skip
    assert plan.parameters == pytest.approx(73.4e9, rel=1e-3)
    assert plan.weights_bytes / GIB == pytest.approx(136.7, abs=0.1)
    assert (plan.gpus_per_copy, plan.copies_per_node) == (2, 4)
    language = model_size(str(PLAN_72B)).language
    assert plan.compute_bound_seconds == pytest.approx(2 * language * 300 * 10000 / (715e12 * 4))


def test_a_calibration_measures_the_time_and_the_prompt_length() -> None:
    """``--calibrate K`` answers K questions after a warm-up batch; the expected time is K's rate over every copy and
    the prompt length the median of the questions it read (warm-up included), as the processor tokenises them."""
    plan = plan_of("--model", "shapes-llava", "--questions", "1000", "--calibrate", "4", "--batch-size", "2",
                   "--gpus", "4", "--gpu-memory", "1GiB")  # fmt: skip
    loaded = load_model("shapes-llava")
    sizes = prompt_sizes(loaded, load_samples("shapes-vqa", None, 6), 6)
    assert plan.prompt_tokens == int(sizes["n_tokens"].median())
    assert plan.seconds_per_question is not None and plan.seconds_per_question > 0
    assert plan.expected_seconds == pytest.approx(plan.seconds_per_question * 1000 / plan.copies)
    assert plan.copies == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt-tokens", "10", "--gpu-memory", "12XB"], "--gpu-memory '12XB': write a positive size"),
        ([], "pass --prompt-tokens N, or --calibrate K"),
        (["--prompt-tokens", "10", "--gpu-memory", "0.0001MB", "--gpus", "2"], "lower --batch-size"),
        (["--prompt-tokens", "10", "--headroom", "1.5"], "--headroom in (0, 1]"),
        (["--prompt-tokens", "10", "--model", "no-such-model"], "no-such-model"),
    ],
)
def test_bad_plans_stop_with_one_line(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each bad input prints one error line naming the fix and writes no plan."""
    argv = ["--model", "tiny-llava", "--questions", "10", *extra]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in captured.err


def test_sizes_parse_in_binary_and_decimal_units() -> None:
    """GiB and GB differ as they should."""
    assert parse_size("141GiB") == 141 * 2**30 and parse_size("80GB") == 80 * 10**9
