"""A local lmms-eval task over ShapesVQA questions, scored as ``python -m analysis.evaluate`` scores them."""

from __future__ import annotations

import ast
from typing import Any

from analysis.data.samples import Sample
from analysis.data.scoring import is_correct


def _sample(doc: dict[str, Any]) -> Sample:
    """The toolkit sample a document was written from (its image left out: scoring reads the text)."""
    return Sample(
        doc["sample_id"],
        [],
        doc["prompt"],
        doc["question"],
        doc["answer"],
        family=doc["family"],
        choices=list(doc["choices"]),
        answer_type=doc["answer_type"],
    )


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The document's one image."""
    return [doc["image"]]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: Any = None, **rounds: Any) -> Any:
    """The prompt; in a multi-round task, round 1 asks the document's second question and round 2 ends."""
    round_idx = rounds.get("round_idx")
    if round_idx is None:
        return doc["prompt"]
    previous = list(rounds.get("previous_output") or [])
    if round_idx == 1:
        return [doc["image"]], doc["second_prompt"], False, previous, None
    return None, None, True, previous, None


def doc_to_target(doc: dict[str, Any]) -> str:
    """The reference answer, as the continuation a log-likelihood task scores."""
    return doc["answer"]


def process_results(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """Accuracy of the reply (the first round's, in a multi-round task)."""
    reply = results[0]
    if isinstance(reply, (list, tuple)):
        reply = reply[0]
    return {"accuracy": float(is_correct(str(reply), _sample(doc)))}


def process_loglikelihood(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """The reference answer's log-probability."""
    return {"logprob": loglikelihood_of(results[0])[0]}


def loglikelihood_of(reply: Any) -> tuple[float, bool]:
    """A log-likelihood reply as (log-probability, greedy): lmms-eval 0.7.3 hands tasks the string form of what the
    model returned (its unwrap_generation_output turns every non-text result into ``str(result)``)."""
    value = ast.literal_eval(reply) if isinstance(reply, str) else reply
    return float(value[0]), bool(value[1])
