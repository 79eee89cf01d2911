"""The probe command's core: causal interventions over a dataset, recorded as parquet tables in a run folder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from analysis.config import DEVICE_ALIASES, DEVICE_HELP, LIMIT_HELP, command_line, option
from analysis.data import DEFAULT_DATASET
from analysis.data.samples import Sample
from analysis.errors import ConfigError
from analysis.generation import add_sample_row, generate_answers
from analysis.hooks.attention import (
    KEY_REGIONS,
    QUERY_REGIONS,
    Knockout,
    RegionMasks,
)
from analysis.models.adapters import ModelInputs
from analysis.models.registry import DEFAULT_MODEL, DTYPES, LoadedModel
from analysis.probes.base import PROBE_KINDS, ProbeBatch, probe_names
from analysis.probes.measure import (
    SuffixScorer,
    observe_prefill,
    teacher_forced,
)
from analysis.results import SAMPLES_TABLE, TRACE_SCHEMAS, RunFolder, default_run_dir, now
from analysis.runs import RunSpec, plan_run, start_run

logger = logging.getLogger(__name__)

# The built-in probes (analysis/probes/kinds/) and the tables they write; probes registered later join at run time.
PROBES = tuple(probe_names())
DEFAULT_PROBES = ("knockout", "masking", "kv_removal", "logit_lens", "contribution")
KNOCKOUT_MODES = ("single", "window", "from", "upto")


def _schemas_for(probes: Sequence[str]) -> dict[str, pa.Schema]:
    """The tables a set of probes writes and their schemas, in the run's order (registered probes' order)."""
    wanted = set(probes)
    return {
        table: schema
        for name in probe_names()
        if name in wanted
        for table, schema in PROBE_KINDS.get(name).tables.items()
    }


PROBE_SCHEMAS = _schemas_for(PROBES)


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
    probe_options: str = option(
        "", "options of probes registered outside the built-in ones, as name=value,... (read with probe_option)"
    )
    batch_size: int = option(8, "samples per forward pass (results do not depend on it)", identity=False)
    out: str | None = option(None, "output folder; default runs/probe/<model>/<dataset>-<split>", identity=False)
    resume: bool = option(False, "continue an interrupted run in --out (same config required)", identity=False)
    dtype: str = option("auto", "weights dtype; probes are computed in float32", choices=tuple(DTYPES))
    device: str | None = option(None, DEVICE_HELP, identity=False, aliases=DEVICE_ALIASES)
    max_memory: str | None = option(
        None,
        "with --device auto: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB (the rest is offloaded to disk)",
        identity=False,
    )

    def probe_option(self, name: str, default: str) -> str:
        """The value of a ``--probe-options`` entry (for probes registered outside the built-in ones)."""
        entries = dict(part.split("=", 1) for part in self.probe_options.split(",") if "=" in part)
        return entries.get(name, default).strip()

    def selected(self) -> list[str]:
        """The probes to run, validated."""
        names = _probe_names(self.probes)
        known = probe_names()
        unknown = sorted(set(names) - set(known))
        if unknown or not names:
            raise ConfigError(f"unknown probes {unknown or self.probes!r}; choose from {', '.join(known)}")
        return names

    def validate(self, num_layers: int | None = None) -> None:
        """Reject bad values before any work; layer indices are checked once the model's depth is known."""
        problems = []
        self.selected()
        if self.limit is not None and self.limit < 1:
            problems.append("--limit must be >= 1 (or all, the default, for the whole split)")
        malformed = [part for part in self.probe_options.split(",") if part.strip() and "=" not in part]
        if malformed:
            problems.append(f"--probe-options entries must be name=value, got {malformed}")
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
    schemas = _schemas_for(probes)
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
        mine = run.share(list(incomplete.items()))  # under torchrun, every rank completes its share of the parts
        run.add_work(sum(len(batch) for _, (_, batch) in mine))
        for index, (tables, batch) in mine:
            needed = [probe for probe in probes if set(_tables_for([probe])) & set(tables)]
            results = probe_batch(model, config, needed, batch, run.inputs(batch))
            run.folder.add_to_part(index, {name: results[name] for name in tables})
            run.advance(len(batch))
        run.process(lambda batch, inputs: probe_batch(model, config, probes, batch, inputs))
    return ProbeResult(run.folder.root, len(run.samples), len(run.pending))


# The options that shape each probe's results alone (so a run that gains a probe may set them).
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
    free = {"probes", *(option for probe in added for option in PROBE_KINDS.get(probe).options)}
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
    """Tables a set of probes writes, in the run's order."""
    return list(_schemas_for(probes))


@torch.inference_mode()
def probe_batch(
    loaded: LoadedModel, config: ProbeConfig, probes: list[str], batch: Sequence[Sample], inputs: ModelInputs
) -> dict[str, pa.Table]:
    """All selected probes on one batch: one shared clean pass, then each probe's rows."""
    from analysis.data.scoring import is_correct

    adapter, model, tokenizer = loaded.adapter, loaded.model, loaded.processor.tokenizer
    selected = [PROBE_KINDS.get(name)() for name in probe_names() if name in set(probes)]
    answers = generate_answers(loaded, inputs, config.max_new_tokens)
    forced = teacher_forced(adapter, inputs, [sample.answer for sample in batch], tokenizer)
    lens = any(probe.needs_residuals for probe in selected)
    observer, residuals = observe_prefill(model, adapter, forced, inputs, lens=lens)
    masks = RegionMasks.from_layouts(inputs.layouts, forced.prompt_length, inputs.input_ids.device)
    scorer, clean = SuffixScorer.capture(model, adapter, forced, _first_text_query(masks))
    shared = ProbeBatch(loaded, config, batch, inputs, answers, forced, observer, residuals, masks, scorer, clean)
    parts: dict[str, list[pa.Table]] = {}
    for probe in selected:
        for table, rows in probe.rows(shared).items():
            parts.setdefault(table, []).append(rows)
    tables = {table: pa.concat_tables(rows) for table, rows in parts.items()}
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
