"""The probe command's core: causal interventions over a dataset, recorded as parquet tables in a run folder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from analysis.config import LIMIT_HELP, command_line, option
from analysis.data import DEFAULT_DATASET
from analysis.data.samples import Sample
from analysis.errors import ConfigError
from analysis.generation import add_sample_row, generate_answers
from analysis.hooks.attention import (
    KEY_REGIONS,
    QUERY_REGIONS,
    SUBSET_KEY,
    Knockout,
    KnockoutHooks,
    RegionMasks,
    route_attention,
)
from analysis.models.adapters import ModelInputs
from analysis.models.registry import DEFAULT_MODEL, DTYPES, LoadedModel
from analysis.probes.measure import (
    AnswerScores,
    ObserveAll,
    SuffixScorer,
    head_projections,
    kl_divergence,
    lens_logprobs,
    observe_prefill,
    teacher_forced,
)
from analysis.results import SAMPLES_TABLE, TRACE_SCHEMAS, RunFolder, default_run_dir, now, table_schema
from analysis.runs import RunSpec, plan_run, start_run

logger = logging.getLogger(__name__)

PROBES = ("knockout", "masking", "kv_removal", "logit_lens", "contribution", "token_ablation")
DEFAULT_PROBES = ("knockout", "masking", "kv_removal", "logit_lens", "contribution")
KNOCKOUT_MODES = ("single", "window", "from", "upto")

PROBE_SCHEMAS: dict[str, pa.Schema] = {
    "effects": table_schema(
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
    ),
    "kv_removal": table_schema(
        [
            ("sample_id", pa.string()),
            ("layer_start", pa.int16()),
            ("answer", pa.string()),
            ("agrees", pa.bool_()),
            ("correct", pa.bool_()),
        ],
        "Greedy generation with image tokens removed from the KV cache of every layer >= layer_start for the "
        "last prompt position and every generated token; agrees = same text as the unmodified generation.",
    ),
    "logit_lens": table_schema(
        [
            ("sample_id", pa.string()),
            ("layer", pa.int16()),
            ("source", pa.string()),
            ("head", pa.int16()),
            ("target", pa.string()),
            ("token_id", pa.int32()),
            ("rank", pa.int32()),
            ("prob", pa.float32()),
            ("top_tokens", pa.list_(pa.string())),
            ("top_probs", pa.list_(pa.float32())),
        ],
        "Logit lens at the last prompt position: source 'residual' = layer output through final norm and LM "
        "head (head = -1); source 'head' = that head's attention output through its o_proj slice, final norm "
        "and LM head. target 'answer' = first token of the reference answer, other targets are task words; "
        "rank 0 = most likely. top_tokens/top_probs are filled on the 'answer' rows.",
    ),
    "token_ablation": table_schema(
        [
            ("sample_id", pa.string()),
            ("image_index", pa.int16()),
            ("token_index", pa.int32()),
            ("ordinal", pa.int32()),
            ("layer_start", pa.int16()),
            ("layer_end", pa.int16()),
            ("delta_logprob", pa.float32()),
            ("kl", pa.float32()),
            ("top1_match", pa.bool_()),
        ],
        "One image token (ordinal = index among all the sample's image tokens) hidden from the text queries "
        "in layers [layer_start, layer_end): change of the reference answer's log-prob, KL of the next-token "
        "distribution and whether its argmax is unchanged. Critical tokens are those whose removal changes the answer.",
    ),
    "contributions": table_schema(
        [
            ("sample_id", pa.string()),
            ("layer", pa.int16()),
            ("image_index", pa.int16()),
            ("token_index", pa.int32()),
            ("position", pa.int32()),
            ("attention", pa.float32()),
            ("cosine_without", pa.float32()),
            ("norm", pa.float32()),
        ],
        "VisiPruner's contribution probe at the last prompt position: c_j = concat_h(a[t,j] v_h[j]) before o_proj; "
        "cosine_without = cos(o - c_j, o), norm = ||c_j||_2, attention = head-mean a[t,j]; float32.",
    ),
}


def _int_list(text: str | None) -> list[int] | None:
    """Parse '1,2,5' (None stays None)."""
    if text is None or text == "":
        return None
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated layer numbers, got {text!r}") from None


@dataclass
class ProbeConfig:
    """Everything that defines a probe run; written to the run's manifest."""

    model: str = option(DEFAULT_MODEL, "model alias, hub id or local path")
    dataset: str = option(DEFAULT_DATASET, "dataset name or local path")
    split: str | None = option(None, "dataset split; default: the dataset's evaluation split")
    data_dir: str | None = option(None, "local copy of a hub benchmark's parquet files", identity=False)
    limit: int | None = option(None, LIMIT_HELP.format(verb="probe"))
    probes: str = option(",".join(DEFAULT_PROBES), f"comma-separated probes among {', '.join(PROBES)}")
    # "instruction" holds the last prompt position too, so the default is the paper's instruction+last -> image.
    knockout_queries: str = option("instruction", f"query regions for knockouts ({', '.join(QUERY_REGIONS)})")
    knockout_key: str = option("image", f"key region knocked out ({', '.join(KEY_REGIONS)})")
    knockout_modes: str = option(",".join(KNOCKOUT_MODES), "single layer, sliding window, all from L on, all up to L")
    window: int = option(3, "layers per sliding window")
    mask_percent: float = option(10.0, "masking probe: p, the percentage of most-attended image tokens (0 < p < 100)")
    mask_layers: str | None = option(None, "masking probe: mask in layers < L for each L listed; default n/4, n/2")
    mask_seeds: int = option(3, "masking probe: random subsets (seeds 0..N-1)")
    kv_layers: str | None = option(
        None, "KV-removal probe: remove image tokens from layer L on, for each L; default all"
    )
    max_new_tokens: int = option(8, "greedy answer length (baseline and KV-removal generations)")
    ablation_layers: str | None = option(
        None, "token ablation: layers START:END (half-open) where each image token is hidden; default the middle third"
    )
    task_words: str = option("number,color,shape,yes,no", "logit lens: words whose rank is recorded at every layer")
    lens_top_k: int = option(5, "logit lens: top tokens recorded per layer")
    batch_size: int = option(8, "samples per forward pass (results do not depend on it)", identity=False)
    out: str | None = option(None, "output folder; default runs/probe/<model>/<dataset>-<split>", identity=False)
    resume: bool = option(False, "continue an interrupted run in --out (same config required)", identity=False)
    dtype: str = option("auto", "weights dtype; probes are computed in float32", choices=tuple(DTYPES))
    device: str | None = option(None, "torch device; default cuda if available", identity=False)

    def selected(self) -> list[str]:
        """The probes to run, validated."""
        names = _probe_names(self.probes)
        unknown = sorted(set(names) - set(PROBES))
        if unknown or not names:
            raise ConfigError(f"unknown probes {unknown or self.probes!r}; choose from {', '.join(PROBES)}")
        return names

    def validate(self, num_layers: int | None = None) -> None:
        """Reject bad values before any work; layer indices are checked once the model's depth is known."""
        problems = []
        self.selected()
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be >= 1 (or all, the default, for the whole split)")
        if not 0 < self.mask_percent < 100:
            problems.append(f"--mask-percent must be in (0, 100), got {self.mask_percent}")
        for region in self.knockout_queries.split(","):
            if region not in QUERY_REGIONS:
                problems.append(f"unknown query region {region!r} (choose from {', '.join(QUERY_REGIONS)})")
        if self.knockout_key not in KEY_REGIONS:
            problems.append(f"unknown key region {self.knockout_key!r} (choose from {', '.join(KEY_REGIONS)})")
        modes = self.knockout_modes.split(",")
        if set(modes) - set(KNOCKOUT_MODES):
            problems.append(f"unknown knockout modes {sorted(set(modes) - set(KNOCKOUT_MODES))}")
        if self.window < 1 or self.mask_seeds < 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            problems.append("--window, --max-new-tokens and --batch-size must be >= 1 and --mask-seeds >= 0")
        if num_layers is not None:
            for flag, layers in (
                ("--mask-layers", _int_list(self.mask_layers)),
                ("--kv-layers", _int_list(self.kv_layers)),
            ):
                bad = [layer for layer in layers or [] if not 0 <= layer < num_layers]
                if bad:
                    problems.append(f"{flag} {bad} outside the model's layers 0..{num_layers - 1}")
            start, end = self.ablation_band(num_layers)
            if start >= end:
                problems.append(
                    f"--ablation-layers {start}:{end} is empty: START must be below END (a half-open "
                    f"band; {end}:{start} if you meant those layers)"
                    if end < start
                    else f"--ablation-layers {start}:{end} is empty: END is exclusive, so {start}:{start + 1} "
                    f"is layer {start} alone"
                )
            elif start < 0 or end > num_layers:
                problems.append(
                    f"--ablation-layers {start}:{end} reaches outside the model's layers "
                    f"0..{num_layers - 1} (END is exclusive, so at most {num_layers})"
                )
            if self.window > num_layers:
                problems.append(f"--window {self.window} exceeds the model's {num_layers} layers")
        if problems:
            raise ConfigError("; ".join(problems))

    def knockouts(self, num_layers: int) -> list[tuple[str, int, int, list[Knockout]]]:
        """(variant, layer_start, layer_end, knockouts) for every knockout intervention of the config."""
        plans = []
        for query in self.knockout_queries.split(","):
            for mode in self.knockout_modes.split(","):
                for start, end in _layer_ranges(mode, num_layers, self.window):
                    variant = f"{query}->{self.knockout_key}:{mode}"
                    plans.append(
                        (variant, start, end, [Knockout(query, self.knockout_key, frozenset(range(start, end)))])
                    )
        return plans

    def mask_depths(self, num_layers: int) -> list[int]:
        """Depths L for the masking probe."""
        return _int_list(self.mask_layers) or sorted({max(1, num_layers // 4), max(1, num_layers // 2)})

    def ablation_band(self, num_layers: int) -> tuple[int, int]:
        """Half-open layer band of the token-ablation probe."""
        if not self.ablation_layers:
            return num_layers // 3, max(num_layers // 3 + 1, 2 * num_layers // 3)
        try:
            start, end = (int(part) for part in self.ablation_layers.split(":"))
        except ValueError:
            raise ConfigError(f"--ablation-layers must look like START:END, got {self.ablation_layers!r}") from None
        return start, end

    def kv_depths(self, num_layers: int) -> list[int]:
        """Depths L for the KV-removal probe."""
        return _int_list(self.kv_layers) or list(range(num_layers))


def _layer_ranges(mode: str, num_layers: int, window: int) -> list[tuple[int, int]]:
    """Half-open layer ranges of a knockout mode."""
    if mode == "single":
        return [(layer, layer + 1) for layer in range(num_layers)]
    if mode == "window":
        return [(layer, layer + window) for layer in range(num_layers - window + 1)]
    if mode == "from":
        return [(layer, num_layers) for layer in range(num_layers)]
    return [(0, layer + 1) for layer in range(num_layers)]


@dataclass
class ProbeResult:
    """Where a finished probe run lives."""

    out_dir: Path
    n_samples: int
    n_new: int


def run_probes(config: ProbeConfig, *, loaded: LoadedModel | None = None, progress: bool = True) -> ProbeResult:
    """Run the selected probes over a dataset into a run folder (resumable; a resumed run may gain probes)."""
    config.validate()
    probes = config.selected()
    schemas = {name: PROBE_SCHEMAS[name] for name in _tables_for(probes)}
    schemas[SAMPLES_TABLE] = TRACE_SCHEMAS[SAMPLES_TABLE]

    def out_dir(split: str) -> Path:
        return Path(config.out) if config.out else default_run_dir("probe", config.model, config.dataset, split)

    spec = RunSpec(
        "analysis.probes",
        config,
        schemas,
        out_dir,
        require_answers=True,
        prepare=lambda model, _samples: config.validate(model.adapter.num_layers),
        description="probe",
    )
    planned = plan_run(spec)
    previous = planned.stored_manifest()
    added = added_probes(previous.get("identity", {}), planned.identity) if config.resume and previous else []
    # A run that gains probes is the stored run plus new tables: its stored identity must match, apart from those.
    if added:
        spec.check_identity = previous["identity"]
    extended = previous.get("extended", [])
    spec.manifest_extra = {"extended": [*extended, {"probes": added, "at": now()}] if added else extended}
    with start_run(planned, loaded=loaded, progress=progress) as run:
        model = run.loaded
        by_id = {sample.sample_id: sample for sample in run.samples}
        # Tables added to the run (or left unwritten by an interrupted addition), with the committed batches
        # lacking them.
        incomplete = {
            index: (tables, [by_id[sample_id] for sample_id in run.folder.part_sample_ids(index)])
            for index, tables in run.folder.missing_tables().items()
        }
        run.add_work(sum(len(batch) for _, batch in incomplete.values()))
        for index, (tables, batch) in incomplete.items():
            needed = [probe for probe in probes if set(_tables_for([probe])) & set(tables)]
            results = probe_batch(model, config, needed, batch, run.inputs(batch))
            run.folder.add_to_part(index, {name: results[name] for name in tables})
            run.advance(len(batch))
        run.process(lambda batch, inputs: probe_batch(model, config, probes, batch, inputs))
    return ProbeResult(run.folder.root, len(run.samples), len(run.pending))


# The options that shape each probe's results alone (so a run that gains a probe may set them).
PROBE_OPTIONS: dict[str, tuple[str, ...]] = {
    "knockout": ("knockout_queries", "knockout_key", "knockout_modes", "window"),
    "masking": ("mask_percent", "mask_layers", "mask_seeds"),
    "kv_removal": ("kv_layers",),
    "logit_lens": ("task_words", "lens_top_k"),
    "contribution": (),
    "token_ablation": ("ablation_layers",),
}


def _probe_names(text: str) -> list[str]:
    """The probe names of a comma-separated list."""
    return [name.strip() for name in str(text).split(",") if name.strip()]


def added_probes(stored: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """The probes a resumed config adds to a stored run, or [] where it is not such an extension.

    An extension keeps every stored probe and every other setting (the options of the added probes aside), and its
    new probes write tables the run does not hold yet; anything else is left for the identity check to report.
    """
    old, new = _probe_names(stored.get("probes", "")), _probe_names(identity.get("probes", ""))
    added = [probe for probe in new if probe not in old]
    if not added or set(old) - set(new):
        return []
    free = {"probes", *(option for probe in added for option in PROBE_OPTIONS[probe])}
    changed = {key for key in set(stored) | set(identity) if stored.get(key) != identity.get(key)}
    if changed - free:
        return []
    shared = sorted(set(_tables_for(added)) & set(_tables_for(old)))
    if shared:
        raise ConfigError(
            f"{', '.join(added)} would write into the {', '.join(shared)} table the run already holds "
            f"({', '.join(old)}); record them in a new --out"
        )
    return added


def extend_command(run_dir: str | Path, probes: Sequence[str]) -> str:
    """The command line that adds ``probes`` to an existing probe run (the same config, those probes, --resume)."""
    manifest = RunFolder(Path(run_dir), {}).read_manifest()
    if manifest is None or manifest.get("command") != "analysis.probes":
        return f"python -m analysis.probes --probes {','.join(probes)} --out NEW_FOLDER"
    values = dict(manifest["config"])
    recorded = _probe_names(values["probes"])
    values["probes"] = ",".join([*recorded, *(probe for probe in probes if probe not in recorded)])
    values.update(out=str(run_dir), resume=True)
    return command_line("python -m analysis.probes", ProbeConfig, values)


def _tables_for(probes: Sequence[str]) -> list[str]:
    """Tables a set of probes writes."""
    tables = []
    if {"knockout", "masking"} & set(probes):
        tables.append("effects")
    for probe, table in (
        ("kv_removal", "kv_removal"),
        ("logit_lens", "logit_lens"),
        ("contribution", "contributions"),
        ("token_ablation", "token_ablation"),
    ):
        if probe in probes:
            tables.append(table)
    return tables


@torch.inference_mode()
def probe_batch(
    loaded: LoadedModel, config: ProbeConfig, probes: list[str], batch: Sequence[Sample], inputs: ModelInputs
) -> dict[str, pa.Table]:
    """All selected probes on one batch."""
    from analysis.data.scoring import is_correct

    adapter, model, tokenizer = loaded.adapter, loaded.model, loaded.processor.tokenizer
    num_layers = adapter.num_layers
    answers = generate_answers(loaded, inputs, config.max_new_tokens)
    forced = teacher_forced(adapter, inputs, [sample.answer for sample in batch], tokenizer)
    observer, residuals = observe_prefill(model, adapter, forced, inputs, lens="logit_lens" in probes)
    masks = RegionMasks.from_layouts(inputs.layouts, forced.prompt_length, inputs.input_ids.device)
    scorer, clean = SuffixScorer.capture(model, adapter, forced, _first_text_query(masks))
    ids = [sample.sample_id for sample in batch]
    tables: dict[str, pa.Table] = {}
    effects: list[dict[str, Any]] = []
    if "knockout" in probes:
        for variant, start, end, knockouts in config.knockouts(num_layers):
            scores = scorer.score(KnockoutHooks(masks, knockouts))
            effects.extend(_effect_rows(ids, "knockout", variant, start, end, -1, clean, scores))
    if "masking" in probes:
        for depth in config.mask_depths(num_layers):
            for variant, seed, subset in _mask_subsets(observer, inputs, depth, config.mask_percent, config.mask_seeds):
                masks.extra_keys[SUBSET_KEY] = subset
                hooks = KnockoutHooks(masks, [Knockout("instruction", SUBSET_KEY, frozenset(range(depth)))])
                scores = scorer.score(hooks)
                effects.extend(_effect_rows(ids, "masking", variant, 0, depth, seed, clean, scores))
    if "effects" in _tables_for(probes):
        tables["effects"] = pa.Table.from_pylist(effects, schema=PROBE_SCHEMAS["effects"])
    if "kv_removal" in probes:
        rows = []
        for depth in config.kv_depths(num_layers):
            hooks = KnockoutHooks(masks, [Knockout("last", "image", frozenset(range(depth, num_layers)))])
            with route_attention(adapter, hooks, forced.prompt_length - 1):
                removed = generate_answers(loaded, inputs, config.max_new_tokens)
            for sample, baseline, answer in zip(batch, answers, removed, strict=True):
                rows.append(
                    {
                        "sample_id": sample.sample_id,
                        "layer_start": depth,
                        "answer": answer,
                        "agrees": answer == baseline,
                        "correct": bool(is_correct(answer or "", sample)),
                    }
                )
        tables["kv_removal"] = pa.Table.from_pylist(rows, schema=PROBE_SCHEMAS["kv_removal"])
    if "logit_lens" in probes:
        tables["logit_lens"] = _lens_table(loaded, config, batch, forced, observer, residuals)
    if "contribution" in probes:
        tables["contributions"] = _contribution_table(batch, inputs, observer)
    if "token_ablation" in probes:
        tables["token_ablation"] = _token_ablation_table(scorer, config, batch, inputs, masks, clean)
    sample_columns: dict[str, list[Any]] = {name: [] for name in TRACE_SCHEMAS[SAMPLES_TABLE].names}
    for sample, layout, answer in zip(batch, inputs.layouts, answers, strict=True):
        add_sample_row(sample_columns, sample, layout, answer, bool(is_correct(answer or "", sample)))
    tables[SAMPLES_TABLE] = pa.table(sample_columns, schema=TRACE_SCHEMAS[SAMPLES_TABLE])
    return tables


def _first_text_query(masks: RegionMasks) -> int:
    """The first padded position of any row's instruction (text) queries; the prompt length if there are none."""
    # "instruction" holds the last prompt position, so this also bounds the "last" queries; later positions
    # hold the answer, which counts as instruction too.
    rows = masks.queries["instruction"].any(0).nonzero()
    return int(rows[0]) if len(rows) else masks.prompt_length


def _effect_rows(
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


def _mask_subsets(
    observer: ObserveAll, inputs: ModelInputs, depth: int, percent: float, seeds: int
) -> list[tuple[str, int, torch.Tensor]]:
    """(variant, seed, (B, T) key subset) for the redundancy-paradox masking at one depth.

    "Most attended" ranks image tokens by the last position's head-mean attention averaged over the
    masked layers of the clean pass.
    """
    attention = torch.stack([observer.records[layer]["attention"] for layer in range(depth)]).mean(0)  # (B, N)
    batch, seq_len = inputs.input_ids.shape
    device = attention.device
    subsets: dict[tuple[str, int], torch.Tensor] = {}
    for row, layout in enumerate(inputs.layouts):
        positions = torch.as_tensor(layout.padded(layout.image_positions), device=device)
        n = len(positions)
        n_top = max(1, int(round(n * percent / 100)))
        order = torch.argsort(attention[row, :n], descending=True, stable=True)
        chosen = {("top", -1): order[:n_top], ("bottom", -1): order[n_top:], ("all", -1): order}
        for seed in range(seeds):
            generator = torch.Generator().manual_seed(seed)
            chosen[("random", seed)] = torch.randperm(n, generator=generator)[:n_top].to(device)
        for key, picked in chosen.items():
            subset = subsets.setdefault(key, torch.zeros(batch, seq_len, dtype=torch.bool, device=device))
            subset[row, positions[picked]] = True
    return [(variant, seed, subset) for (variant, seed), subset in subsets.items()]


def _token_ablation_table(
    scorer: SuffixScorer,
    config: ProbeConfig,
    batch: Sequence[Sample],
    inputs: ModelInputs,
    masks: RegionMasks,
    clean: AnswerScores,
) -> pa.Table:
    """Hide each image token, one at a time, from the text in the ablation band; one pass per token ordinal."""
    start, end = config.ablation_band(scorer.adapter.num_layers)
    layers = frozenset(range(start, end))
    batch_size, seq_len = inputs.input_ids.shape
    device = inputs.input_ids.device
    rows: list[dict[str, Any]] = []
    n_max = max(layout.n_image_tokens for layout in inputs.layouts)
    coordinates = [layout.image_token_coordinates for layout in inputs.layouts]
    for ordinal in range(n_max):
        subset = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=device)
        owners = [row for row, layout in enumerate(inputs.layouts) if ordinal < layout.n_image_tokens]
        for row in owners:
            subset[row, int(inputs.layouts[row].padded(inputs.layouts[row].image_positions[ordinal]))] = True
        masks.extra_keys[SUBSET_KEY] = subset
        scores = scorer.score(KnockoutHooks(masks, [Knockout("instruction", SUBSET_KEY, layers)]))
        kl = kl_divergence(clean.next_logprobs, scores.next_logprobs)
        same = clean.next_logprobs.argmax(-1) == scores.next_logprobs.argmax(-1)
        delta = scores.answer_logprob - clean.answer_logprob
        for row in owners:
            image_index, token_index = (int(part[ordinal]) for part in coordinates[row])
            rows.append(
                {
                    "sample_id": batch[row].sample_id,
                    "image_index": image_index,
                    "token_index": token_index,
                    "ordinal": ordinal,
                    "layer_start": start,
                    "layer_end": end,
                    "delta_logprob": float(delta[row]),
                    "kl": float(kl[row]),
                    "top1_match": bool(same[row]),
                }
            )
    return pa.Table.from_pylist(rows, schema=PROBE_SCHEMAS["token_ablation"])


def _lens_table(
    loaded: LoadedModel,
    config: ProbeConfig,
    batch: Sequence[Sample],
    forced: Any,
    observer: ObserveAll,
    residuals: dict[int, torch.Tensor],
) -> pa.Table:
    """Logit-lens rows for residual streams and per-head outputs at the last prompt position."""
    adapter, tokenizer = loaded.adapter, loaded.processor.tokenizer
    targets = [("answer", forced.answer_ids[:, 0])]
    for word in [w.strip() for w in config.task_words.split(",") if w.strip()]:
        word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if word_ids:
            targets.append((word, torch.full_like(forced.answer_ids[:, 0], word_ids[0])))
    rows: list[dict[str, Any]] = []
    for layer in range(adapter.num_layers):
        sources = [("residual", -1, lens_logprobs(adapter, residuals[layer]))]
        heads = head_projections(adapter, layer, observer.records[layer]["head_output"])  # (B, H, D)
        for head in range(heads.shape[1]):
            sources.append(("head", head, lens_logprobs(adapter, heads[:, head])))
        for source, head, logprobs in sources:
            top = logprobs.topk(config.lens_top_k, dim=-1)
            for target, token_ids in targets:
                target_logprob = logprobs.gather(-1, token_ids[:, None]).squeeze(-1)
                rank = (logprobs > target_logprob[:, None]).sum(-1)
                for row, sample in enumerate(batch):
                    is_answer = target == "answer"
                    rows.append(
                        {
                            "sample_id": sample.sample_id,
                            "layer": layer,
                            "source": source,
                            "head": head,
                            "target": target,
                            "token_id": int(token_ids[row]),
                            "rank": int(rank[row]),
                            "prob": float(target_logprob[row].exp()),
                            "top_tokens": tokenizer.convert_ids_to_tokens(top.indices[row].tolist())
                            if is_answer
                            else None,
                            "top_probs": top.values[row].exp().tolist() if is_answer else None,
                        }
                    )
    return pa.Table.from_pylist(rows, schema=PROBE_SCHEMAS["logit_lens"])


def _contribution_table(batch: Sequence[Sample], inputs: ModelInputs, observer: ObserveAll) -> pa.Table:
    """Contribution-probe rows: every image token at every layer."""
    columns: dict[str, list[np.ndarray]] = {name: [] for name in PROBE_SCHEMAS["contributions"].names}
    for row, (sample, layout) in enumerate(zip(batch, inputs.layouts, strict=True)):
        n = layout.n_image_tokens
        image_index, token_index = layout.image_token_coordinates
        for layer, record in sorted(observer.records.items()):
            columns["sample_id"].append(np.full(n, sample.sample_id, dtype=object))
            columns["layer"].append(np.full(n, layer))
            columns["image_index"].append(image_index)
            columns["token_index"].append(token_index)
            columns["position"].append(layout.image_positions)
            for name in ("attention", "norm"):
                columns[name].append(record[name][row, :n].cpu().numpy())
            columns["cosine_without"].append(record["cosine"][row, :n].cpu().numpy())
    return pa.table(
        {name: np.concatenate(parts) for name, parts in columns.items()}, schema=PROBE_SCHEMAS["contributions"]
    )
