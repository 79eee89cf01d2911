"""The probe interface: one file per probe (in ``analysis/probes/kinds/``) declaring its tables, the options that
shape its results and what it computes from a batch's shared clean pass; registered in ``PROBE_KINDS``.

A probe reads the ``ProbeBatch`` (the clean pass, its KV cache, the region masks) and never changes it: an
intervention on a token subset builds its own masks (``RegionMasks.with_keys``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

from analysis.data.samples import Sample
from analysis.errors import ConfigError
from analysis.hooks.attention import RegionMasks
from analysis.models.adapters import ModelInputs
from analysis.models.registry import LoadedModel
from analysis.probes.measure import AnswerScores, ObserveAll, SuffixScorer, TeacherForced, kl_divergence
from analysis.registry import Registry
from analysis.results import table_schema

EFFECTS_SCHEMA = table_schema(
    [
        ("sample_id", pa.string()),
        ("probe", pa.string()),
        ("variant", pa.string()),
        ("layer_start", pa.int16()),
        ("layer_end", pa.int16()),
        ("seed", pa.int32()),
        ("answer_logprob", pa.float32()),
        ("delta_logprob", pa.float32()),
        ("answer_prob", pa.float32()),
        ("delta_prob", pa.float32()),
        ("kl", pa.float32()),
        ("top1_match", pa.bool_()),
    ],
    "Effect of an attention intervention in layers [layer_start, layer_end) on the reference answer "
    "(teacher-forced log-prob summed over its tokens, and its probability), KL(clean || intervened) of the "
    "next-token distribution at the last prompt position, and whether its argmax is unchanged. probe "
    "'knockout': variant 'query->key' with mode in the variant suffix; probe 'masking': image tokens hidden "
    "from text queries, variant top / bottom / random (seed) / all.",
)


@dataclass(frozen=True)
class ProbeBatch:
    """What every probe of one batch shares, computed once: the clean pass and what it recorded."""

    loaded: LoadedModel
    config: Any  # the run's ProbeConfig
    samples: Sequence[Sample]
    inputs: ModelInputs
    answers: list[str | None]  # the unmodified model's greedy answers
    forced: TeacherForced  # prompts with the reference answers appended
    observer: ObserveAll  # every layer's last-row contributions in the clean pass
    residuals: dict[int, torch.Tensor]  # residual stream at the last prompt position (when a probe needs it)
    masks: RegionMasks
    scorer: SuffixScorer  # scores hooks from the clean pass's KV cache
    clean: AnswerScores

    @property
    def ids(self) -> list[str]:
        """The batch's sample ids."""
        return [sample.sample_id for sample in self.samples]

    @property
    def num_layers(self) -> int:
        """The model's depth."""
        return self.loaded.adapter.num_layers


class Probe:
    """One probe: its tables and options, and its rows for a batch."""

    name: ClassVar[str]
    tables: ClassVar[dict[str, pa.Schema]]  # table name -> schema (probes may share a table: "effects")
    options: ClassVar[tuple[str, ...]] = ()  # ProbeConfig options that shape this probe's results alone
    needs_residuals: ClassVar[bool] = False  # the clean pass must keep every layer's residual stream
    description: ClassVar[str] = ""

    def rows(self, batch: ProbeBatch) -> dict[str, pa.Table]:
        """This probe's rows of each of its tables for one batch."""
        raise NotImplementedError


PROBE_KINDS: Registry[type[Probe]] = Registry(
    "probe",
    {
        "knockout": "analysis.probes.kinds.knockout:KnockoutProbe",
        "masking": "analysis.probes.kinds.masking:MaskingProbe",
        "kv_removal": "analysis.probes.kinds.kv_removal:KVRemovalProbe",
        "logit_lens": "analysis.probes.kinds.logit_lens:LogitLensProbe",
        "contribution": "analysis.probes.kinds.contribution:ContributionProbe",
        "token_ablation": "analysis.probes.kinds.token_ablation:TokenAblationProbe",
    },
    hint="Write a Probe subclass in analysis/probes/kinds/ and add it to PROBE_KINDS in analysis/probes/base.py, "
    "or call register_probe(YourProbe)",
    error=ConfigError,
)
# The built-in probes in the order their rows are written.
BUILTIN_PROBES = ("knockout", "masking", "kv_removal", "logit_lens", "contribution", "token_ablation")


def register_probe(cls: type[Probe]) -> type[Probe]:
    """Add a probe under its ``name`` (an error if the name is taken)."""
    return PROBE_KINDS.register(cls.name, cls)


def probe_names() -> list[str]:
    """Every registered probe: the built-in ones in their order, then those registered later."""
    return [*BUILTIN_PROBES, *(name for name in PROBE_KINDS.names() if name not in BUILTIN_PROBES)]


def effect_rows(
    ids: list[str], probe: str, variant: str, start: int, end: int, seed: int, clean: AnswerScores, scores: AnswerScores
) -> list[dict[str, Any]]:
    """One effects row per sample comparing an intervention with the clean pass."""
    kl = kl_divergence(clean.next_logprobs, scores.next_logprobs).tolist()
    same_top = (clean.next_logprobs.argmax(-1) == scores.next_logprobs.argmax(-1)).tolist()
    clean_lp, lp = clean.answer_logprob.tolist(), scores.answer_logprob.tolist()
    return [
        {
            "sample_id": sample_id,
            "probe": probe,
            "variant": variant,
            "layer_start": start,
            "layer_end": end,
            "seed": seed,
            "answer_logprob": lp[i],
            "delta_logprob": lp[i] - clean_lp[i],
            "answer_prob": float(np.exp(lp[i])),
            "delta_prob": float(np.exp(lp[i]) - np.exp(clean_lp[i])),
            "kl": kl[i],
            "top1_match": same_top[i],
        }
        for i, sample_id in enumerate(ids)
    ]
