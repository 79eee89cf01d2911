"""The lmms-eval plugin, run through lmms-eval's own entry points: its model registry (our entry point), its task
loader (a local ShapesVQA task) and its command line; nothing here calls the plugin's class directly."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lmms_eval", reason="the lmms extra is not installed (pip install -e '.[lmms]')")

from analysis.data import DEFAULT_DATASET  # noqa: E402
from analysis.data.loaders import load_samples  # noqa: E402
from analysis.evaluate import EvalConfig, evaluate, run_evaluation  # noqa: E402
from analysis.models.registry import load_model  # noqa: E402
from analysis.pruner.config import PruningConfig  # noqa: E402
from analysis.pruner.simulate import PruningHooks, masked_pruning  # noqa: E402

MODEL = "shapes-llava"
N_QUESTIONS = 12
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "shapes-llava.visipruner.json"
TASK_FILES = Path(__file__).resolve().parent / "lmms_task"

GENERATE_TASK = """task: shapes_vqa_lmms
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
generation_kwargs:
  max_new_tokens: 8
  until: ["\\n\\n"]
process_results: !function utils.{process}
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of local lmms-eval tasks over the first ShapesVQA test questions, saved as a dataset on disk."""
    import datasets

    root = tmp_path_factory.mktemp("lmms")
    samples = load_samples(DEFAULT_DATASET, "test", N_QUESTIONS)
    columns: dict[str, list[Any]] = {
        "sample_id": [s.sample_id for s in samples],
        "image": [s.images[0] for s in samples],
        "prompt": [s.prompt for s in samples],
        "second_prompt": [samples[(i + 1) % len(samples)].prompt for i in range(len(samples))],
        "question": [s.question for s in samples],
        "answer": [s.answer for s in samples],
        "family": [s.family for s in samples],
        "answer_type": [s.answer_type for s in samples],
        "choices": [list(s.choices) for s in samples],
    }
    features = datasets.Features(
        {
            **{name: datasets.Value("string") for name in columns if name not in ("image", "choices")},
            "image": datasets.Image(),
            "choices": datasets.Sequence(datasets.Value("string")),
        }
    )
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(root / "data")
    folder = root / "tasks"
    folder.mkdir()
    shutil.copy(TASK_FILES / "utils.py", folder / "utils.py")
    for name, output_type, process, metric in (
        ("shapes_vqa_lmms", "generate_until", "process_results", "accuracy"),
        ("shapes_vqa_lmms_ll", "loglikelihood", "process_loglikelihood", "logprob"),
        ("shapes_vqa_lmms_rounds", "generate_until_multi_round", "process_results", "accuracy"),
    ):
        text = GENERATE_TASK.format(data=root / "data", output_type=output_type, process=process, metric=metric)
        (folder / f"{name}.yaml").write_text(text.replace("task: shapes_vqa_lmms", f"task: {name}"))
    return folder


def lmms_run(tasks: Path, task: str, model_args: str, batch_size: int = 1, model: str = MODEL) -> dict[str, Any]:
    """lmms-eval's ``simple_evaluate`` with the model named as on its command line (found by our entry point)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(
        model="visipruner",
        model_args=f"pretrained={model},device=cpu,dtype=float32" + (f",{model_args}" if model_args else ""),
        tasks=[task],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=batch_size,
        log_samples=True,
        device="cpu",
    )


def replies(results: dict[str, Any], task: str) -> list[Any]:
    """Each document's raw reply, in document order."""
    logged = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return [sample["resps"][0][0] for sample in logged]


@pytest.fixture(scope="module")
def unpruned(tasks: Path) -> dict[str, Any]:
    """The unpruned organism on the generation task, batch size 1."""
    return lmms_run(tasks, "shapes_vqa_lmms", "")


@pytest.fixture(scope="module")
def pruned(tasks: Path) -> dict[str, Any]:
    """The organism under its shipped VisiPruner config, batch size 1."""
    return lmms_run(tasks, "shapes_vqa_lmms", f"pruning={CONFIG}")


def test_unpruned_scores_and_answers_equal_analysis_evaluate(unpruned: dict[str, Any]) -> None:
    """Through lmms-eval, every answer and the accuracy are those of ``python -m analysis.evaluate``."""
    ours = evaluate(
        EvalConfig(model=MODEL, split="test", limit=N_QUESTIONS, device="cpu", dtype="float32"), progress=False
    )
    assert replies(unpruned, "shapes_vqa_lmms") == ours["prediction"].tolist()
    accuracy = unpruned["results"]["shapes_vqa_lmms"]["accuracy,none"]
    assert accuracy == pytest.approx(ours["correct"].mean())
    cost = unpruned["throughput"]
    assert cost["avg_pruning/shapes_vqa_lmms/prefill_flops_cut"] == 0.0
    assert cost["avg_pruning/shapes_vqa_lmms/rule_fired"] == 0.0


def evaluated(pruning: Path, out: Path) -> Any:
    """``python -m analysis.evaluate`` (token-dropping runtime) on the task's questions under a pruning config."""
    return run_evaluation(
        EvalConfig(
            model=MODEL,
            split="test",
            limit=N_QUESTIONS,
            device="cpu",
            dtype="float32",
            pruning_config=str(pruning),
            out=str(out),
        ),
        progress=False,
    )


def test_pruned_scores_answers_and_costs_equal_analysis_evaluate(pruned: dict[str, Any], tmp_path: Path) -> None:
    """Under a pruning config the answers, accuracy, FLOPs cut, kept tokens and firing rate are those of
    ``python -m analysis.evaluate --pruning-config`` with the token-dropping runtime, in lmms-eval's results."""
    result = evaluated(CONFIG, tmp_path / "eval")
    per_sample, summary = result.per_sample, result.summary["summary"]
    assert replies(pruned, "shapes_vqa_lmms") == per_sample["pruned_answer"].tolist()
    assert pruned["results"]["shapes_vqa_lmms"]["accuracy,none"] == pytest.approx(summary["accuracy"] / 100)
    cost = pruned["throughput"]
    assert cost["avg_pruning/shapes_vqa_lmms/prefill_flops_cut"] == pytest.approx(summary["flops_cut"])
    assert cost["avg_pruning/shapes_vqa_lmms/kept_image_tokens"] == pytest.approx(summary["kept_tokens"])
    assert cost["avg_pruning/shapes_vqa_lmms/rule_fired"] == pytest.approx(summary["fired"])
    assert summary["flops_cut"] > 0  # the config prunes these questions: the comparison is not of two no-ops
    layers = [cost[f"avg_pruning/shapes_vqa_lmms/image_tokens_layer_{layer:02d}"] for layer in range(12)]
    assert layers[0] == cost["avg_pruning/shapes_vqa_lmms/image_tokens"] and layers[-1] < layers[0]


def test_batch_of_four_scores_as_batch_of_one(tasks: Path, pruned: dict[str, Any]) -> None:
    """Batch size 4 (left padding, per-sample pruning) gives every answer and score of batch size 1."""
    batched = lmms_run(tasks, "shapes_vqa_lmms", f"pruning={CONFIG}", batch_size=4)
    assert replies(batched, "shapes_vqa_lmms") == replies(pruned, "shapes_vqa_lmms")
    assert (
        batched["results"]["shapes_vqa_lmms"]["accuracy,none"] == pruned["results"]["shapes_vqa_lmms"]["accuracy,none"]
    )
    assert batched["throughput"]["avg_pruning/shapes_vqa_lmms/prefill_flops_cut"] == pytest.approx(
        pruned["throughput"]["avg_pruning/shapes_vqa_lmms/prefill_flops_cut"]
    )


def test_latency_mode_answers_as_eager(tasks: Path, pruned: dict[str, Any]) -> None:
    """``latency=true`` (static buffers, CUDA graphs on CUDA) gives the eager runtime's answers and costs."""
    fast = lmms_run(tasks, "shapes_vqa_lmms", f"pruning={CONFIG},latency=true", batch_size=4)
    assert replies(fast, "shapes_vqa_lmms") == replies(pruned, "shapes_vqa_lmms")
    key = "avg_pruning/shapes_vqa_lmms/prefill_flops_cut"
    assert fast["throughput"][key] == pytest.approx(pruned["throughput"][key])


def test_another_family_batches_as_single_samples(tasks: Path) -> None:
    """On a Qwen2.5-VL model (tiny, random: its answers are noise, but deterministic) the plugin runs through the same
    adapter machinery, and DART pruning per sample at batch size 4 gives batch size 1's answers and costs."""
    args = "method=dart,budget=4,prune_layer=1"
    one = lmms_run(tasks, "shapes_vqa_lmms", args, model="tiny-qwen2.5-vl")
    four = lmms_run(tasks, "shapes_vqa_lmms", args, batch_size=4, model="tiny-qwen2.5-vl")
    assert replies(four, "shapes_vqa_lmms") == replies(one, "shapes_vqa_lmms")
    key = "avg_pruning/shapes_vqa_lmms/prefill_flops_cut"
    assert four["throughput"][key] == pytest.approx(one["throughput"][key]) and one["throughput"][key] > 0


def test_the_authors_json_runs_as_analysis_evaluate_runs_it(tasks: Path, tmp_path: Path) -> None:
    """The authors' JSON of the organism's config gives, through lmms-eval, the answers and FLOPs cut of
    ``python -m analysis.evaluate`` with the same file."""
    authors = CONFIG.with_name("shapes-llava.visipruner.authors.json")
    results = lmms_run(tasks, "shapes_vqa_lmms", f"pruning={authors}", batch_size=4)
    result = evaluated(authors, tmp_path / "eval")
    assert replies(results, "shapes_vqa_lmms") == result.per_sample["pruned_answer"].tolist()
    cut = results["throughput"]["avg_pruning/shapes_vqa_lmms/prefill_flops_cut"]
    assert cut == pytest.approx(result.summary["summary"]["flops_cut"])


def test_baseline_method_by_name_and_budget(tasks: Path) -> None:
    """A baseline named with its budget runs at that budget: FastV keeping 16 of 64 image tokens from layer K = 2 on
    (chosen by layer 1's attention)."""
    results = lmms_run(tasks, "shapes_vqa_lmms", "method=fastv,budget=16,prune_layer=2")
    cost = results["throughput"]
    assert cost["avg_pruning/shapes_vqa_lmms/kept_image_tokens"] == 16
    assert cost["avg_pruning/shapes_vqa_lmms/image_tokens_layer_01"] == 64
    assert cost["avg_pruning/shapes_vqa_lmms/image_tokens_layer_02"] == 16
    assert cost["avg_pruning/shapes_vqa_lmms/rule_fired"] == 100


def direct_logprobs(config: PruningConfig | None) -> list[float]:
    """Each reference answer's log-probability after its prompt, from one teacher-forced forward per question with
    the answer's tokens appended, pruned by attention masks (the mask-based model) when a config is given."""
    loaded = load_model(MODEL, dtype="float32", device="cpu")
    tokenizer = loaded.processor.tokenizer
    values = []
    for sample in load_samples(DEFAULT_DATASET, "test", N_QUESTIONS):
        inputs = loaded.adapter.build_inputs(loaded.processor, [sample])
        answer = torch.tensor([tokenizer(sample.answer, add_special_tokens=False)["input_ids"]])
        tensors = loaded.adapter.append_tokens(inputs.tensors, answer, torch.ones_like(answer, dtype=torch.bool))
        prompt_length = inputs.input_ids.shape[1]
        with torch.inference_mode():
            if config is None:
                logits = loaded.model(**tensors).logits
            else:
                from analysis.hooks.attention import RegionMasks

                masks = RegionMasks.from_layouts(inputs.layouts, prompt_length, loaded.device)
                with masked_pruning(loaded.adapter, PruningHooks(config, masks, inputs.layouts, prompt_length)):
                    logits = loaded.model(**tensors).logits
        steps = torch.log_softmax(logits[0, prompt_length - 1 : prompt_length - 1 + answer.shape[1]].float(), -1)
        values.append(float(steps.gather(-1, answer[0][:, None]).sum()))
    return values


@pytest.mark.parametrize("pruning", [False, True], ids=["unpruned", "pruned"])
def test_loglikelihood_equals_a_direct_teacher_forced_computation(tasks: Path, pruning: bool) -> None:
    """lmms-eval's log-likelihood requests get the answer's teacher-forced log-probability, at batch size 4 (answers
    of different lengths), unpruned and pruned (token-dropping runtime against the mask-based model)."""
    from analysis.pruner.config import load_config

    config = load_config(CONFIG, 12) if pruning else None
    results = lmms_run(tasks, "shapes_vqa_lmms_ll", f"pruning={CONFIG}" if pruning else "", batch_size=4)
    spec = importlib.util.spec_from_file_location("shapes_vqa_task_utils", TASK_FILES / "utils.py")
    assert spec is not None and spec.loader is not None
    task_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task_utils)  # the local task's own reading of a reply
    logged = [task_utils.loglikelihood_of(reply)[0] for reply in replies(results, "shapes_vqa_lmms_ll")]
    assert logged == pytest.approx(direct_logprobs(config), abs=1e-4)


def test_multi_round_answers_each_round_as_a_fresh_prompt(tasks: Path, unpruned: dict[str, Any]) -> None:
    """A multi-round task's first round is the single-round answer, its second that of the next round's prompt."""
    results = lmms_run(tasks, "shapes_vqa_lmms_rounds", "")
    rounds = sorted(results["samples"]["shapes_vqa_lmms_rounds"], key=lambda sample: sample["doc_id"])
    first = [sample["resps"][0][0][0] for sample in rounds]
    assert first == replies(unpruned, "shapes_vqa_lmms")
    assert all(len(sample["resps"][0][0]) == 2 for sample in rounds)


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        ("method=nope", "unknown pruning method 'nope'"),
        ("pruning={depth16}", "config is for a 16-layer model but this model has 12 layers"),
        ("pretrained={blip2}", "blip-2"),
        ("method=fastv,budget=16,prune_layer=40", "invalid pruning config"),
        ("batch=4", "unknown model_args ['batch']"),
    ],
    ids=[
        "unknown-method",
        "config-for-another-depth",
        "unregistered-family",
        "bad-method-parameter",
        "unknown-argument",
    ],
)
def test_bad_model_arguments_stop_the_cli_with_one_line(
    tasks: Path, tmp_path: Path, model_args: str, message: str
) -> None:
    """lmms-eval's command line with a bad model argument exits non-zero before any sample runs, printing one error
    line naming the problem and no traceback."""
    import json

    depth16 = tmp_path / "depth16.json"
    depth16.write_text(json.dumps({**json.loads(CONFIG.read_text()), "num_layers": 16}))
    blip2 = tmp_path / "blip2"  # a checkpoint folder of a family no adapter is registered for
    blip2.mkdir()
    (blip2 / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    model_args = model_args.format(depth16=depth16, blip2=blip2)
    args = ["--model", "visipruner", "--model_args", f"device=cpu,{model_args}", "--tasks", "shapes_vqa_lmms"]
    run = subprocess.run(
        [sys.executable, "-m", "lmms_eval", *args, "--include_path", str(tasks)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: visipruner model:")]
    assert len(errors) == 1 and message in errors[0], run.stderr[-2000:]
    assert "Running generate_until requests" not in run.stdout + run.stderr
