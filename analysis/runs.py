"""The one run driver behind trace, probes and evaluate: config -> samples, identity, run folder, model, manifest,
resume, parts, progress and finish, so a command states only what it computes per batch.

A command builds a ``RunSpec``, plans it (``plan_run``: samples, identity, folder, nothing written yet) and calls
``start_run``; inside the returned context it may add work of its own to the folder (the probes command fills
tables added to an earlier run) and then calls ``Run.process`` with its batch function. Everything written goes
through ``RunFolder``: atomic parts, a manifest, an identity checked on resume.

Under ``torchrun`` every rank runs the command: rank 0 checks the folder (its verdict is every rank's, before any
model loads) and starts the manifest, which records the world size; the pending samples are cut into the batches a
single process would make, and each rank computes every N-th of them, writing its parts atomically into the shared
folder. A part is numbered by its first sample's position in the dataset and holds consecutive samples, so the
tables read back in dataset order whatever the world size, and a resume (with any number of processes) finds each
sample in exactly one committed part. Rank 0 marks the run complete once every rank has committed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from analysis.config import run_identity, to_dict
from analysis.data.samples import Sample
from analysis.distributed import World, barrier, current_world, from_main, rank_device
from analysis.errors import ConfigError, DataError
from analysis.models import hf
from analysis.models.adapters import ModelInputs
from analysis.models.registry import LoadedModel, default_device, load_model, parse_max_memory
from analysis.results import SAMPLES_TABLE, RunFolder

BatchFn = Callable[[Sequence[Sample], ModelInputs], dict[str, pa.Table]]
T = TypeVar("T")


@dataclass
class RunSpec:
    """What one command's run is: its config, tables and how it reads samples and loads the model."""

    command: str  # "analysis.trace": recorded in the manifest and named in resume hints
    config: Any  # the command's config dataclass (model, dataset, split, limit, data_dir, out, resume, dtype, device)
    schemas: dict[str, pa.Schema]
    out_dir: Callable[[str], Path]  # the run folder for a resolved split
    commit_table: str = SAMPLES_TABLE  # the table whose part commits a batch
    identity_extra: dict[str, Any] = field(default_factory=dict)  # more of what must match on resume
    check_identity: dict[str, Any] | None = None  # compare the stored run against this instead (a run extended)
    manifest_extra: dict[str, Any] = field(default_factory=dict)
    model_fields: tuple[str, ...] = ("num_layers", "num_heads", "num_kv_heads")
    require_answers: bool = False  # every sample must carry a reference answer (probes score it)
    # What needs the loaded model, run before anything is written: checks of the config against it (layer ranges,
    # the trace's top-k against an image's tokens) and what the batches need from it (a parsed pruning config);
    # its result is ``Run.prepared``.
    prepare: Callable[[LoadedModel, list[Sample]], Any] | None = None
    description: str | None = None  # the progress bar's label; default: the command's name


@dataclass
class PlannedRun:
    """A run before it starts: its samples, resolved split, identity and folder (nothing written yet)."""

    spec: RunSpec
    samples: list[Sample]
    split: str
    identity: dict[str, Any]
    folder: RunFolder

    def stored_manifest(self) -> dict[str, Any]:
        """The manifest already in the folder ({} for a new run)."""
        return self.folder.read_manifest() or {}


@dataclass
class Run:
    """A started run: its samples, folder, model and the samples still to do."""

    spec: RunSpec
    samples: list[Sample]
    split: str
    folder: RunFolder
    loaded: LoadedModel
    done: set[str]
    pending: list[Sample]
    prepared: Any = None  # what RunSpec.prepare returned
    progress: Any = None  # the progress bar while processing
    world: World = field(default_factory=World)

    def inputs(self, batch: Sequence[Sample]) -> ModelInputs:
        """A batch tokenised for the run's model, on its device."""
        return self.loaded.adapter.build_inputs(self.loaded.processor, batch, device=self.loaded.device)

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's share of work items every rank lists alike: every N-th, from its rank on."""
        return list(items[self.world.rank :: self.world.size])

    def process(self, batch_tables: BatchFn) -> None:
        """Compute and commit this rank's pending batches (one part each), then wait for every rank's."""
        for first, batch in self.share(pending_batches(self.samples, self.done, self.spec.config.batch_size)):
            self.folder.write_part(batch_tables(batch, self.inputs(batch)), index=first)
            self.advance(len(batch))
        barrier(self.world)

    def advance(self, n_samples: int) -> None:
        """Count samples on the progress bar."""
        if self.progress is not None:
            self.progress.update(n_samples)

    def add_work(self, n_samples: int) -> None:
        """Count samples processed outside ``process`` (tables added to committed parts) on the progress bar."""
        if self.progress is not None:
            self.progress.total += n_samples
            self.progress.refresh()


def pending_batches(samples: Sequence[Sample], done: set[str], batch_size: int) -> list[tuple[int, list[Sample]]]:
    """The samples not yet done, in batches of consecutive dataset positions, each with its first position."""
    batches: list[tuple[int, list[Sample]]] = []
    for position, sample in enumerate(samples):
        if sample.sample_id in done:
            continue
        last = batches[-1] if batches else None
        if last is not None and len(last[1]) < batch_size and last[0] + len(last[1]) == position:
            last[1].append(sample)
        else:
            batches.append((position, [sample]))
    return batches


def load_run_samples(spec: RunSpec) -> tuple[list[Sample], str]:
    """The config's samples and its resolved split; duplicate ids (and, where needed, missing answers) refused."""
    from analysis.data.loaders import load_samples, resolve_split

    config = spec.config
    samples = load_samples(config.dataset, config.split, config.limit, data_dir=config.data_dir)
    seen: set[str] = set()
    for sample in samples:
        if not sample.images:
            raise DataError(f"sample {sample.sample_id!r} has no image, so it has no image region to analyse; drop it")
        if sample.sample_id in seen:
            raise DataError(f"dataset has duplicate sample id {sample.sample_id!r}; sample ids must be unique")
        seen.add(sample.sample_id)
        if spec.require_answers and sample.answer is None:
            raise DataError(f"sample {sample.sample_id!r} has no reference answer; probes score the reference answer")
    return samples, resolve_split(config.dataset, config.split)


def plan_run(spec: RunSpec) -> PlannedRun:
    """Read the samples and derive the identity and folder of a run, writing nothing."""
    samples, split = load_run_samples(spec)
    identity = {**run_identity(spec.config, split), **spec.identity_extra}
    folder = RunFolder(spec.out_dir(split), spec.schemas, commit_table=spec.commit_table)
    return PlannedRun(spec, samples, split, identity, folder)


@contextmanager
def start_run(
    plan: RunSpec | PlannedRun,
    *,
    loaded: LoadedModel | None = None,
    attn_implementation: str = "sdpa",
    progress: bool = True,
) -> Iterator[Run]:
    """Check the folder against the config, load the model, start the manifest; finish the run when the block ends.

    The identity check comes before the model is loaded, so a mismatched folder costs nothing.
    """
    from tqdm.auto import tqdm

    planned = plan_run(plan) if isinstance(plan, RunSpec) else plan
    spec, samples, split, identity, folder = (
        planned.spec,
        planned.samples,
        planned.split,
        planned.identity,
        planned.folder,
    )
    config = spec.config
    world = current_world()
    # Rank 0 judges the folder and every rank stops on its verdict, before any model loads.
    verdict = None
    if world.main:
        try:
            folder.check_compatible(spec.check_identity or identity, resume=config.resume, command=spec.command)
        except ConfigError as error:
            verdict = str(error)
    verdict = from_main(world, verdict)
    if verdict is not None:
        raise ConfigError(verdict)
    if loaded is None:
        loaded = load_model(
            config.model,
            dtype=config.dtype,
            device=rank_device(world, config.device or default_device()),
            attn_implementation=attn_implementation,
            revision=getattr(config, "revision", None),
            max_memory=parse_max_memory(getattr(config, "max_memory", None)),
            replica=(world.local_rank, world.local_size),
        )
    prepared = spec.prepare(loaded, samples) if spec.prepare is not None else None
    adapter = loaded.adapter
    model_record = {
        "name": loaded.name,
        "source": loaded.source,
        "revision": loaded.revision,
        "model_type": adapter.model_type,
        **{name: getattr(adapter, name) for name in spec.model_fields},
        "dtype": str(next(loaded.model.parameters()).dtype),
        # Where accelerate placed each module of a sharded model (--device auto), to read a run's memory plan from.
        **({"device_map": placement} if (placement := hf.device_map(loaded.model)) else {}),
    }
    if world.main:
        if config.resume:
            folder.clean_uncommitted()
        folder.start(
            {
                "command": spec.command,
                "config": {**to_dict(config), "split": split},
                "model": model_record,
                "dataset": {"name": config.dataset, "split": split, "n_samples": len(samples)},
                "world_size": world.size,
                **spec.manifest_extra,
            },
            identity,
        )
    barrier(world)  # every rank reads the committed parts after rank 0 cleaned the uncommitted ones
    done = set(folder.done_sample_ids())
    pending = [sample for sample in samples if sample.sample_id not in done]
    run = Run(spec, samples, split, folder, loaded, done, pending, prepared, world=world)
    description = spec.description or spec.command.removeprefix("analysis.")
    with (
        folder.interruptible(len(samples)),
        tqdm(
            total=len(samples),
            initial=len(done),
            desc=description,
            unit="sample",
            disable=not progress or not world.main,
        ) as bar,
    ):
        run.progress = bar
        yield run
        run.progress = None
    barrier(world)
    if world.main:
        folder.finish({"n_samples": len(samples)})
    barrier(world)  # no rank returns before the run is marked complete
