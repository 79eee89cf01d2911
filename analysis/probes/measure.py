"""Probe measurements: answer log-probs under interventions, contributions, logit lens, masked decoding."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from analysis.errors import ModelError
from analysis.hooks.attention import AttentionHooks, LastRowObservation, route_attention
from analysis.hooks.contributions import image_contributions, image_index_tensors
from analysis.models import hf
from analysis.models.adapters import FamilyAdapter, ModelInputs
from analysis.models.hf import HFModel


@dataclass
class TeacherForced:
    """A batch with each reference answer appended after its prompt (right-padded), for scoring answers."""

    tensors: dict[str, torch.Tensor]
    prompt_length: int
    answer_ids: torch.Tensor  # (B, A) answer token ids (pad where absent)
    answer_mask: torch.Tensor  # (B, A) bool


def teacher_forced(
    adapter: FamilyAdapter, inputs: ModelInputs, answers: Sequence[str | None], tokenizer: Any
) -> TeacherForced:
    """Append each answer's tokens to its prompt so one forward pass scores every answer token."""
    encoded = [tokenizer(answer or "", add_special_tokens=False)["input_ids"] for answer in answers]
    width = max(1, max(len(ids) for ids in encoded))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = inputs.input_ids.device
    answer_ids = torch.full((len(answers), width), pad, dtype=inputs.input_ids.dtype, device=device)
    answer_mask = torch.zeros(len(answers), width, dtype=torch.bool, device=device)
    for row, ids in enumerate(encoded):
        answer_ids[row, : len(ids)] = torch.as_tensor(ids, device=device)
        answer_mask[row, : len(ids)] = True
    tensors = adapter.append_tokens(inputs.tensors, answer_ids, answer_mask)
    return TeacherForced(tensors, inputs.input_ids.shape[1], answer_ids, answer_mask)


@dataclass
class AnswerScores:
    """Per sample: reference-answer log-prob and the next-token distribution at the last prompt position."""

    answer_logprob: torch.Tensor  # (B,) sum over answer tokens
    next_logprobs: torch.Tensor  # (B, V) float32 log-softmax at the last prompt position


def score_answers(model: HFModel, batch: TeacherForced) -> AnswerScores:
    """One teacher-forced forward pass; log-probs in float32."""
    with torch.inference_mode():
        logits = model(**batch.tensors).logits
    return answer_scores(logits, batch)


def answer_scores(logits: torch.Tensor, batch: TeacherForced, offset: int = 0) -> AnswerScores:
    """Answer scores from teacher-forced logits whose first column is sequence position ``offset``."""
    start = batch.prompt_length - 1 - offset
    width = batch.answer_ids.shape[1]
    logprobs = torch.log_softmax(logits[:, start : start + width].float(), dim=-1)
    token_logprobs = logprobs.gather(-1, batch.answer_ids[..., None]).squeeze(-1)
    answer_logprob = (token_logprobs * batch.answer_mask).sum(-1)
    return AnswerScores(answer_logprob, logprobs[:, 0])


class SuffixScorer:
    """Teacher-forced answer scores under attention hooks that recompute only the positions from ``split`` on.

    A query before ``split`` sees only earlier keys, so while the hooks block no edge from such a query its
    hidden states and keys/values in every layer are those of the clean pass: they are kept as a KV cache
    and only the rest of the sequence goes through the language model again. Hooks that do touch those
    queries get a full forward pass. Below the first layer the hooks act in, the rest of the sequence is as in the
    clean pass too: those layers hand back their clean outputs instead of computing them.
    """

    def __init__(
        self,
        model: HFModel,
        adapter: FamilyAdapter,
        batch: TeacherForced,
        split: int,
        language_inputs: hf.LanguageModelInputs,
        cache: Any,
    ) -> None:
        if language_inputs.embeds is None:
            raise ModelError(f"{type(model).__name__} did not pass input embeddings to its language model")
        self.model = model
        self.adapter = adapter
        self.batch = batch
        self.split = split
        # What the language model received for the whole sequence.
        self.language_inputs = language_inputs
        self.cache = cache  # clean keys/values of positions [0, split) in every layer
        # Per decoder layer, its clean output at positions [split, end) (empty when a layer's output is not a
        # plain tensor, which the skipping below does not rebuild).
        self.clean_outputs: list[torch.Tensor] = []

    @classmethod
    def capture(
        cls, model: HFModel, adapter: FamilyAdapter, batch: TeacherForced, split: int
    ) -> tuple[SuffixScorer, AnswerScores]:
        """Run the clean teacher-forced pass, keeping what the language model received and its KV cache."""
        # The last prompt position must be recomputed: it is where the next-token distribution is read.
        split = max(0, min(split, batch.prompt_length - 1))
        received: list[hf.LanguageModelInputs] = []

        def keep(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            # Image features are already merged into the embeddings; positions may be absent (derived from the
            # cache length, as they are again in the suffix pass) or Qwen2.5-VL's M-RoPE ids.
            received.append(hf.language_model_inputs(kwargs))

        outputs: dict[int, Any] = {}

        def keep_output(_module: Any, _args: Any, output: Any, layer: int) -> None:
            outputs[layer] = output[:, split:] if isinstance(output, torch.Tensor) else None

        cache = hf.new_cache()
        handles = [adapter.language_model().register_forward_pre_hook(keep, with_kwargs=True)]
        handles += [
            layer.register_forward_hook(functools.partial(keep_output, layer=index))
            for index, layer in enumerate(adapter.decoder_layers())
        ]
        try:
            with torch.inference_mode():
                logits = model(**batch.tensors, **hf.cache_kwargs(model, cache)).logits
        finally:
            for handle in handles:
                handle.remove()
        scorer = cls(model, adapter, batch, split, received[0], cache)
        clean = [outputs.get(index) for index in range(adapter.num_layers)]
        scorer.clean_outputs = [output for output in clean if output is not None] if None not in clean else []
        scorer._crop()
        return scorer, answer_scores(logits, batch)

    def score(self, hooks: AttentionHooks) -> AnswerScores:
        """Answer scores with ``hooks`` applied, from the suffix alone when the hooks spare the prefix."""
        if not self._spares_prefix(hooks):
            with route_attention(self.adapter, hooks, self.batch.prompt_length - 1):
                return score_answers(self.model, self.batch)
        # Only the logits that are scored go through the LM head.
        first = self.batch.prompt_length - 1
        width = self.batch.answer_ids.shape[1]
        with route_attention(self.adapter, hooks, first), torch.inference_mode(), self._clean_below(hooks):
            try:
                suffix = self.language_inputs.after(self.split)
                hidden = hf.run_language_model(self.adapter.language_model(), suffix, self.cache)
            finally:
                self._crop()
            logits = self.adapter.lm_head()(hidden[:, first - self.split : first - self.split + width])
        return answer_scores(logits, self.batch, offset=first)

    @contextlib.contextmanager
    def _clean_below(self, hooks: AttentionHooks) -> Iterator[None]:
        """Inside the block, the decoder layers below the first one the hooks act in return their clean outputs."""
        layers = self.adapter.decoder_layers()
        skipped = layers[: self._first_layer_acted_in(hooks)] if self.clean_outputs else []
        for layer, output in zip(skipped, self.clean_outputs, strict=False):
            layer.forward = functools.partial(_clean_output, output)
        try:
            yield
        finally:
            for layer in skipped:
                del layer.forward

    def _first_layer_acted_in(self, hooks: AttentionHooks) -> int:
        """The first layer in which the hooks block, zero or watch anything of the positions from ``split`` on."""
        end = self.split + self.clean_outputs[0].shape[1] if self.clean_outputs else self.split
        queries = end - self.split
        for layer in range(self.adapter.num_layers):
            if hooks.wants_last_row(layer, self.split, queries) or hooks.wants_call(layer, self.split, queries):
                return layer
            zeroed = hooks.zeroed(layer, self.split, queries, end)
            for edges in (hooks.blocked(layer, self.split, queries, end), None if zeroed is None else zeroed.edges):
                if edges is not None and bool(edges.any()):
                    return layer
        return self.adapter.num_layers

    def _spares_prefix(self, hooks: AttentionHooks) -> bool:
        """Whether the hooks leave every query before ``split`` as in the clean pass."""
        for layer in range(self.adapter.num_layers):
            if hooks.wants_last_row(layer, 0, self.split):
                return False
            zeroed = hooks.zeroed(layer, 0, self.split, self.split)
            for edges in (hooks.blocked(layer, 0, self.split, self.split), None if zeroed is None else zeroed.edges):
                if edges is not None and bool(edges.any()):
                    return False
        return True

    def _crop(self) -> None:
        """Drop every cached position from ``split`` on, so one pass's suffix never reaches the next."""
        hf.crop_cache(self.cache, self.split)


class PrefixGenerator:
    """Greedy answers under attention hooks that leave every prompt position before the last as in the clean pass.

    Those positions' keys and values are the clean prompt's in every layer, so they are computed once and kept as a
    KV cache; each generation runs the last prompt position and the new tokens only, under its hooks, with the
    positions and padding mask the language model received for the prompt (as ``generate`` does, it stops when
    every row has ended and pads a row after its end).
    """

    def __init__(
        self, adapter: FamilyAdapter, language_inputs: hf.LanguageModelInputs, cache: Any, input_ids: torch.Tensor
    ) -> None:
        self.adapter = adapter
        self.language_inputs = language_inputs  # the prompt's, as the language model received it
        self.cache = cache  # clean keys/values of positions [0, prompt_length - 1) in every layer
        self.rows, self.prompt_length = input_ids.shape
        self.device = input_ids.device

    @classmethod
    def capture(cls, model: HFModel, adapter: FamilyAdapter, inputs: ModelInputs) -> PrefixGenerator | None:
        """A clean pass over the prompts keeping their KV cache; None where the language model's inputs cannot be
        continued a token at a time here (no input embeddings, or a mask it was handed already expanded)."""
        received: list[hf.LanguageModelInputs] = []

        def keep(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            received.append(hf.language_model_inputs(kwargs))

        cache = hf.new_cache()
        handle = adapter.language_model().register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with torch.inference_mode():
                model(**inputs.tensors, **hf.cache_kwargs(model, cache), **hf.last_logits_only())
        finally:
            handle.remove()
        language_inputs = received[0]
        mask = language_inputs.attention_mask
        if language_inputs.embeds is None or not (mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2)):
            return None
        generator = cls(adapter, language_inputs, cache, inputs.input_ids)
        generator._crop()
        return generator

    def generate(self, hooks: AttentionHooks, max_new_tokens: int, tokenizer: Any) -> list[str]:
        """Greedy answers of the batch with ``hooks`` applied, from the kept prompt cache."""
        last = self.prompt_length - 1
        step = self.language_inputs.after(last)
        mask, positions = step.attention_mask, step.positions
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        text_model, head = self.adapter.language_model(), self.adapter.lm_head()
        tokens: list[torch.Tensor] = []
        with route_attention(self.adapter, hooks, last), torch.inference_mode():
            try:
                finished = torch.zeros(self.rows, dtype=torch.bool, device=self.device)
                for _ in range(max_new_tokens):
                    hidden = hf.run_language_model(text_model, step, self.cache)
                    token = head(hidden[:, -1]).argmax(-1)
                    if pad is not None:
                        token = token.masked_fill(finished, pad)
                    tokens.append(token)
                    if eos is not None:
                        finished = finished | (token == eos)
                    if bool(finished.all()):
                        break
                    if mask is not None:
                        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                    if positions is not None:
                        positions = positions[..., -1:] + 1
                    step = hf.LanguageModelInputs(self.adapter.embed_tokens(token[:, None]), mask, positions)
            finally:
                self._crop()
        generated = torch.stack(tokens, dim=1)
        return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def _crop(self) -> None:
        """Keep the cached prompt positions before the last one, so one generation never reaches the next."""
        hf.crop_cache(self.cache, self.prompt_length - 1)


def _clean_output(output: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
    """A decoder layer's forward that returns its clean-pass output (it receives what the layer would)."""
    return output


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) of two batches of log-prob rows."""
    return (reference.exp() * (reference - other)).sum(-1)


class ObserveAll(AttentionHooks):
    """Observe the last prompt row of every layer during the prefill, optionally on top of other hooks."""

    def __init__(
        self,
        prompt_length: int,
        image_index: torch.Tensor,
        image_valid: torch.Tensor,
        inner: AttentionHooks | None = None,
    ) -> None:
        self.prompt_length = prompt_length
        self.image_index = image_index  # (B, N) padded positions of image tokens
        self.image_valid = image_valid  # (B, N)
        self.inner = inner
        self.records: dict[int, dict[str, torch.Tensor]] = {}

    def blocked(self, layer: int, query_start: int, query_length: int, key_length: int) -> torch.Tensor | None:
        """Delegate to the inner hooks."""
        return None if self.inner is None else self.inner.blocked(layer, query_start, query_length, key_length)

    def wants_last_row(self, layer: int, query_start: int, query_length: int) -> bool:
        """Only in the pass that contains the last prompt position as a query."""
        return query_start <= self.prompt_length - 1 < query_start + query_length

    def observe(self, observation: LastRowObservation) -> None:
        """Record the layer's contributions (see ``image_contributions``)."""
        self.records[observation.layer] = image_contributions(observation, self.image_index, self.image_valid)


def observe_prefill(
    model: HFModel, adapter: FamilyAdapter, batch: TeacherForced, inputs: ModelInputs, *, lens: bool = True
) -> tuple[ObserveAll, dict[int, torch.Tensor]]:
    """A clean teacher-forced pass recording every layer's last-row contributions and (optionally) residuals."""
    index, valid = image_index_tensors(inputs.layouts, inputs.input_ids.device)
    observer = ObserveAll(batch.prompt_length, index, valid)
    residuals: dict[int, torch.Tensor] = {}
    handles = []
    if lens:
        for layer_index, layer in enumerate(adapter.decoder_layers()):

            def keep(_module: Any, _inputs: Any, output: Any, layer_index: int = layer_index) -> None:
                hidden = output[0] if isinstance(output, tuple) else output
                residuals[layer_index] = hidden[:, batch.prompt_length - 1].float()

            handles.append(layer.register_forward_hook(keep))
    try:
        with route_attention(adapter, observer, batch.prompt_length - 1), torch.inference_mode():
            model(**batch.tensors)
    finally:
        for handle in handles:
            handle.remove()
    return observer, residuals


def lens_logprobs(adapter: FamilyAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head applied to residual-stream vectors (B, D) -> float32 log-probs (B, V)."""
    norm, head = adapter.final_norm(), adapter.lm_head()
    weight: Any = head.weight
    with torch.inference_mode():
        weight_dtype = weight.dtype
        logits = head(norm(hidden.to(weight_dtype)))
    return torch.log_softmax(logits.float(), dim=-1)


def head_projections(adapter: FamilyAdapter, layer: int, head_output: torch.Tensor) -> torch.Tensor:
    """Each head's output at the last position through its slice of the output projection: (B, H, d) -> (B, H, D)."""
    weight = adapter.output_projection(adapter.decoder_layers()[layer]).weight.float()  # (D, H*d)
    batch, heads, dim = head_output.shape
    slices = weight.reshape(weight.shape[0], heads, dim)  # (D, H, d)
    return torch.einsum("bhd,Dhd->bhD", head_output.float(), slices)
