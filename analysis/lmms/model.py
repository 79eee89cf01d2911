"""The ``visipruner`` model of lmms-eval: any registered family, unpruned or pruned by the token-dropping runtime.

``lmms-eval --model visipruner --model_args pretrained=...,pruning=config.json`` (or ``method=fastv,budget=64``)
evaluates a model of any family the toolkit registers with the family adapter's processor and chat template, the
way ``python -m analysis.evaluate`` does, so the two give the same answers on the same questions. Each prompt's
image tokens are pruned per sample (left-padded batches, every sample its own decisions), so the batch size does not
change a score.

Next to the scores, lmms-eval's results file gains what the pruning cost and saved, per task, under ``throughput``
(lmms-eval's own channel for what a model measures; it prefixes each key with ``avg_``):
``pruning/<task>/prefill_flops_cut`` (% of the unpruned prefill's exact FLOPs), ``pruning/<task>/rule_fired`` (% of
samples whose selection rule fired, or whose tokens a one-shot method cut), ``pruning/<task>/kept_image_tokens`` and
``pruning/<task>/image_tokens`` (means per sample) and ``pruning/<task>/image_tokens_layer_<L>`` (image tokens layer L
processed, mean per sample).

Bad model arguments stop the run with one line on stderr before any sample runs: lmms-eval prints a traceback for
any exception a model raises, so these errors leave through ``SystemExit`` instead.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from PIL import Image

from analysis.data.samples import Sample, batched
from analysis.errors import ConfigError, DataError, ToolkitError
from analysis.generation import decode_answers, generate_answers
from analysis.models.adapters import ModelInputs
from analysis.models.registry import DEFAULT_MODEL, LoadedModel, default_device, load_model
from analysis.probes.measure import answer_scores, teacher_forced
from analysis.pruner.config import PruningConfig, config_for_model
from analysis.pruner.flops import DecoderShape, LayerTokens, prefill_flops
from analysis.pruner.latency import latency_generate
from analysis.pruner.methods import METHODS, method_for
from analysis.pruner.runtime import pruned_runtime
from analysis.pruner.simulate import Decisions, sample_flops
from analysis.pruner.sweep import with_budget

logger = logging.getLogger(__name__)

# lmms-eval's own default when a task sets no max_new_tokens (its built-in models use it).
DEFAULT_MAX_NEW_TOKENS = 1024
MODEL_ARGS = (
    "pretrained",
    "dtype",
    "device",
    "batch_size",
    "pruning",
    "method",
    "budget",
    "prune_layer",
    "authors_layer0",
    "latency",
)


def fail(error: ToolkitError | str) -> NoReturn:
    """Stop the lmms-eval run with one line naming the fix (lmms-eval prints a traceback for exceptions)."""
    raise SystemExit(f"error: visipruner model: {error}")


@dataclass(frozen=True)
class SampleCost:
    """What one sample's prefill processed: exact FLOPs pruned and unpruned, image tokens per layer."""

    flops: float
    flops_full: float
    image_tokens: list[int]
    n_image: int
    n_kept: int
    fired: bool


def pruning_config(
    loaded: LoadedModel,
    pruning: str | None,
    method: str | None,
    budget: float | None,
    prune_layer: int | None,
    authors_layer0: str,
) -> PruningConfig | None:
    """The run's pruning config from the model arguments (None: unpruned), checked against the loaded model."""
    adapter = loaded.adapter
    if pruning is not None and method is not None:
        raise ConfigError("give pruning=<config JSON> or method=<name>, not both")
    if method is None and (budget is not None or prune_layer is not None):
        raise ConfigError("budget and prune_layer set a method's parameters; name the method with method=<name>")
    if pruning is not None:
        config = config_for_model(pruning, adapter.model_type, adapter.text_config, authors_layer0)
    elif method is not None:
        config = PruningConfig(method=method, num_layers=adapter.num_layers)
        if prune_layer is not None:
            config = replace(config, prune_layer=int(prune_layer))
        if budget is not None:
            config = with_budget(config, budget)
        config.validate(adapter.num_layers)
    else:
        return None
    reason = method_for(config).unsupported(adapter)
    if reason is not None:
        raise ConfigError(f"{config.method} cannot run on this model: {reason}")
    return config


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the stop strings (all of it when none occurs)."""
    ends = [text.find(stop) for stop in until if stop and stop in text]
    return text[: min(ends)] if ends else text


class PrunedModel(lmms):
    """lmms-eval's ``visipruner`` model: generation and log-likelihoods of a toolkit model, pruned per sample."""

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        pruning: str | None = None,
        method: str | None = None,
        budget: float | None = None,
        prune_layer: int | None = None,
        authors_layer0: str = "auto",
        latency: bool | str = False,
        **unknown: Any,
    ) -> None:
        super().__init__()
        try:
            if unknown:
                raise ConfigError(f"unknown model_args {sorted(unknown)}; the model takes {', '.join(MODEL_ARGS)}")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ConfigError("the visipruner model runs in one process; launch lmms-eval without accelerate")
            if not str(batch_size).isdigit() or int(batch_size) < 1:
                raise ConfigError(f"batch_size must be a whole number >= 1, not {batch_size!r}")
            if method is not None and method not in METHODS:
                raise ConfigError(f"unknown pruning method {method!r}; choose from {', '.join(METHODS.names())}")
            if str(latency).lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"latency must be true or false, not {latency!r}")
            self.latency = str(latency).lower() in ("true", "1")
            self.loaded = load_model(str(pretrained), dtype=str(dtype), device=device or default_device())
            self.pruning = pruning_config(self.loaded, pruning, method, budget, prune_layer, str(authors_layer0))
        except ToolkitError as error:
            fail(error)
        self.batch_size_per_gpu = int(batch_size)
        self.chat_template = None  # the family adapter applies the checkpoint's own template to every prompt
        self.costs: dict[str, list[SampleCost]] = {}
        self._shape = DecoderShape.from_config(self.loaded.adapter.text_config)
        self._warned_sampling = False
        logger.info(
            "visipruner model: %s on %s, %s",
            pretrained,
            self.loaded.device,
            self.pruning.method if self.pruning else "unpruned",
        )

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> PrunedModel:
        """The model from lmms-eval's ``--model_args``; a value given there wins over lmms-eval's own option
        (``--batch_size`` has a default, so it would otherwise collide with ``batch_size=`` in the model args)."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {
            key: value for key, value in (additional_config or {}).items() if value is not None and key not in args
        }
        extra.pop("max_batch_size", None)  # automatic batch sizes are not offered: answers do not depend on them
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        """Requests per model call."""
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go."""
        return self.loaded.device

    # -- requests -------------------------------------------------------------------------------------------------
    def _sample(self, context: str, doc_to_visual: Callable[[Any], Any], doc_id: int, task: str, split: str) -> Sample:
        """A toolkit sample from one request: the task's context as the prompt, its document's images."""
        return self._sample_of(context, doc_to_visual(self.task_dict[task][split][doc_id]), doc_id, task, split)

    @staticmethod
    def _sample_of(context: str, visuals: Any, doc_id: int, task: str, split: str) -> Sample:
        """A toolkit sample of a context and its visuals, which must be images."""
        images = [visual for visual in (visuals or []) if visual is not None]
        if not images:
            fail(f"document {doc_id} of task {task} has no image; the model evaluates image-text tasks only")
        bad = sorted({type(visual).__name__ for visual in images if not isinstance(visual, Image.Image)})
        if bad:
            fail(f"task {task} gives {', '.join(bad)} visuals; the model evaluates image tasks (PIL images) only")
        return Sample(f"{task}/{split}/{doc_id}", [image.convert("RGB") for image in images], context, context)

    def _decode_settings(self, gen_kwargs: dict[str, Any]) -> tuple[int, list[str]]:
        """Answer length and stop strings of a task's generation arguments; decoding is always greedy."""
        sampling = bool(gen_kwargs.get("do_sample")) or float(gen_kwargs.get("temperature") or 0) > 0
        if (sampling or int(gen_kwargs.get("num_beams") or 1) > 1) and not self._warned_sampling:
            logger.warning("the visipruner model decodes greedily; the task's sampling or beam settings are ignored")
            self._warned_sampling = True
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        return int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), list(until)

    def _inputs(self, samples: Sequence[Sample]) -> ModelInputs:
        """A batch tokenised by the family adapter, on the model's device; an unusable sample stops the run."""
        loaded = self.loaded
        try:
            return loaded.adapter.build_inputs(loaded.processor, samples, device=loaded.device)
        except DataError as error:
            fail(error)

    def _run(self, inputs: ModelInputs, forward: Callable[[], Any]) -> tuple[Any, Decisions | None]:
        """``forward()`` on the model, pruned when a config prunes; the batch's decisions with it."""
        if self.pruning is None or not method_for(self.pruning).prunes:
            return forward(), None
        with pruned_runtime(self.loaded.model, self.pruning, inputs.layouts) as runtime:
            result = forward()
        return result, runtime.decisions(inputs.layouts)

    def _record(self, task: str, inputs: ModelInputs, decisions: Decisions | None, length: int) -> None:
        """Each sample's prefill cost under its decisions (``length``: tokens in the prefill)."""
        extra = length - inputs.input_ids.shape[1]
        for row, layout in enumerate(inputs.layouts):
            n_tokens, n_image = layout.length + extra, layout.n_image_tokens
            full = prefill_flops(self._shape, [LayerTokens(n_tokens, n_image)] * self._shape.num_layers)["exact"]
            if decisions is None or self.pruning is None:
                cost = SampleCost(full, full, [n_image] * self._shape.num_layers, n_image, n_image, False)
            else:
                layers = decisions.tokens_per_layer(row, n_tokens, self._shape.num_layers)
                staged = decisions.stage_drops is not None and any(d >= 0 for d in decisions.stage_drops[row])
                fired = bool(decisions.before_llm or decisions.selection_layer[row] >= 0 or staged)
                cost = SampleCost(
                    sample_flops(self.pruning, decisions, row, n_tokens, self._shape)["exact"],
                    full,
                    [layer.image for layer in layers],
                    n_image,
                    decisions.n_kept(row),
                    fired,
                )
            self.costs.setdefault(task, []).append(cost)

    def _report(self, tasks: Sequence[str], elapsed: float, new_tokens: int, requests: int) -> None:
        """Log the tasks' pruning costs through lmms-eval's metrics channel, into its results file."""
        metrics: dict[str, float] = {"total_requests": float(requests)}
        for task in dict.fromkeys(tasks):
            costs = self.costs.pop(task, [])  # one record per call: a later call reports only its own requests
            if not costs:
                continue
            n = len(costs)
            metrics[f"pruning/{task}/prefill_flops_cut"] = 100 * (
                1 - sum(c.flops for c in costs) / sum(c.flops_full for c in costs)
            )
            metrics[f"pruning/{task}/rule_fired"] = 100 * sum(c.fired for c in costs) / n
            metrics[f"pruning/{task}/kept_image_tokens"] = sum(c.n_kept for c in costs) / n
            metrics[f"pruning/{task}/image_tokens"] = sum(c.n_image for c in costs) / n
            for layer in range(self._shape.num_layers):
                metrics[f"pruning/{task}/image_tokens_layer_{layer:02d}"] = (
                    sum(c.image_tokens[layer] for c in costs) / n
                )
        log_metrics(elapsed, new_tokens, new_tokens / elapsed if elapsed > 0 else 0.0, metrics)

    def _generate(self, samples: Sequence[Sample], max_new_tokens: int, task: str) -> list[str]:
        """Greedy answers of a batch, pruned per sample; their costs recorded under ``task``."""
        loaded = self.loaded
        inputs = self._inputs(samples)
        fast = latency_generate(loaded, inputs, max_new_tokens, self.pruning) if self.latency else None
        if fast is not None:
            answers = decode_answers(loaded.processor.tokenizer, fast.tokens)
            prunes = self.pruning is not None and method_for(self.pruning).prunes
            decisions = fast.decisions(inputs) if prunes else None
        else:
            answers, decisions = self._run(inputs, lambda: generate_answers(loaded, inputs, max_new_tokens))
        self._record(task, inputs, decisions, inputs.input_ids.shape[1])
        return [answer or "" for answer in answers]

    def _count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens in the generated texts (for lmms-eval's throughput figures)."""
        tokenizer = self.loaded.processor.tokenizer
        return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, each cut at the task's stop strings; batches hold requests of one task and settings."""
        from tqdm.auto import tqdm

        started = time.perf_counter()
        answers: list[str] = [""] * len(requests)
        groups: dict[tuple[str, str], list[int]] = {}
        for index, request in enumerate(requests):
            _, gen_kwargs, _, _, task, _ = request.args
            groups.setdefault((task, json.dumps(gen_kwargs, sort_keys=True, default=str)), []).append(index)
        with tqdm(total=len(requests), desc="visipruner", unit="request", disable=self.rank != 0) as bar:
            for (task, _), indices in groups.items():
                max_new_tokens, until = self._decode_settings(dict(requests[indices[0]].args[1]))
                for chunk in batched(indices, self.batch_size):
                    samples = [self._sample(*self._request_fields(requests[i])) for i in chunk]
                    for index, text in zip(chunk, self._generate(samples, max_new_tokens, task), strict=True):
                        answers[index] = cut_at_stop(text, until)
                    bar.update(len(chunk))
        tasks = [request.args[4] for request in requests]
        self._report(tasks, time.perf_counter() - started, self._count_tokens(answers), len(requests))
        return answers

    @staticmethod
    def _request_fields(request: Instance) -> tuple[str, Callable[[Any], Any], int, str, str]:
        """Context, visual function, document id, task and split of a generation request."""
        context, _, doc_to_visual, doc_id, task, split = request.args
        return context, doc_to_visual, doc_id, task, split

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Rounds of greedy answers: after each, the task's ``doc_to_text`` gives the next round's images and context
        (or ends the request); each round is a fresh prompt, pruned on its own."""
        started = time.perf_counter()
        results: list[list[str]] = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            max_new_tokens, until = self._decode_settings(dict(gen_kwargs))
            doc = self.task_dict[task][split][doc_id]
            rounds: list[str] = []
            info: Any = None
            sample = self._sample(context, doc_to_visual, doc_id, task, split)
            round_index = 0
            while True:
                if round_index > 0:
                    visuals, context, done, previous, info = doc_to_text(
                        doc, previous_output=rounds, round_idx=round_index, previous_round_info=info
                    )
                    rounds = list(previous)
                    if done:
                        break
                    sample = self._sample_of(context, visuals, doc_id, task, split)
                rounds.append(cut_at_stop(self._generate([sample], max_new_tokens, task)[0], until))
                round_index += 1
            results.append(rounds)
        tasks = [request.args[5] for request in requests]
        self._report(
            tasks, time.perf_counter() - started, self._count_tokens([r for rs in results for r in rs]), len(requests)
        )
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context, teacher-forced in float32, and whether greedy
        decoding would produce it; batches hold continuations of one token length (the runtime takes no right
        padding)."""
        from tqdm.auto import tqdm

        started = time.perf_counter()
        tokenizer = self.loaded.processor.tokenizer
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        groups: dict[tuple[str, int], list[tuple[int, str]]] = {}
        for index, request in enumerate(requests):
            context, target, _, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            width = len(tokenizer(continuation, add_special_tokens=False)["input_ids"])
            if width:  # an empty continuation has probability 1 and is what greedy decoding adds
                groups.setdefault((task, width), []).append((index, continuation))
        with tqdm(total=len(requests), desc="visipruner", unit="request", disable=self.rank != 0) as bar:
            for (task, _), items in groups.items():
                for chunk in batched(items, self.batch_size):
                    samples = []
                    for index, _ in chunk:
                        context, _, doc_to_visual, doc_id, _, split = requests[index].args
                        samples.append(self._sample(context, doc_to_visual, doc_id, task, split))
                    for (index, _), scored in zip(
                        chunk, self._score(samples, [c for _, c in chunk], task), strict=True
                    ):
                        results[index] = scored
                    bar.update(len(chunk))
            bar.update(len(requests) - bar.n)
        self._report([request.args[4] for request in requests], time.perf_counter() - started, 0, len(requests))
        return results

    def _score(self, samples: Sequence[Sample], continuations: Sequence[str], task: str) -> list[tuple[float, bool]]:
        """Teacher-forced log-probabilities and greedy flags of one batch's continuations."""
        loaded = self.loaded
        inputs = self._inputs(samples)
        forced = teacher_forced(loaded.adapter, inputs, continuations, loaded.processor.tokenizer)

        def forward() -> torch.Tensor:
            with torch.inference_mode():
                return loaded.model(**forced.tensors).logits

        logits, decisions = self._run(inputs, forward)
        self._record(task, inputs, decisions, forced.prompt_length + forced.answer_ids.shape[1])
        scores = answer_scores(logits, forced)
        start, width = forced.prompt_length - 1, forced.answer_ids.shape[1]
        greedy = (logits[:, start : start + width].argmax(-1) == forced.answer_ids).all(-1)
        return [(float(lp), bool(g)) for lp, g in zip(scores.answer_logprob.tolist(), greedy.tolist(), strict=True)]
