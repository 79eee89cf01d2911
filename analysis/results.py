"""Run folders: declared parquet schemas, atomic part files, a manifest, resume and config checks."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from analysis.config import config_hash
from analysis.errors import ConfigError, RunInterrupted

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: image_tokens gained "piece" (images of several grids)
MANIFEST = "manifest.json"
SAMPLES_TABLE = "samples"
_PART = re.compile(r"^part-(\d{5})\.parquet$")
_INDEX_NOTE = (
    "layer i is model.model.language_model.layers[i] in Hugging Face module order (0 = closest to the "
    "embeddings); head h is the h-th query head of that layer's attention, i.e. columns "
    "[h*head_dim, (h+1)*head_dim) of q_proj's output. Token positions count from the sample's first "
    "non-padding token."
)


def table_schema(fields: list[tuple[str, pa.DataType]], description: str) -> pa.Schema:
    """A pyarrow schema carrying the schema version, a description and the index convention."""
    return pa.schema(
        fields,
        metadata={"schema_version": str(SCHEMA_VERSION), "description": description, "index_convention": _INDEX_NOTE},
    )


TRACE_SCHEMAS: dict[str, pa.Schema] = {
    "attention": table_schema(
        [
            ("sample_id", pa.string()),
            ("layer", pa.int16()),
            ("head", pa.int16()),
            ("query", pa.string()),
            ("key_region", pa.string()),
            ("mass", pa.float32()),
        ],
        "Attention mass from a query group (last = last prompt position; instruction = mean over instruction "
        "tokens incl. the last; image = mean over image tokens) onto a key region (system/image/instruction).",
    ),
    "sinks": table_schema(
        [
            ("sample_id", pa.string()),
            ("layer", pa.int16()),
            ("head", pa.int16()),
            ("query", pa.string()),
            ("image_mass", pa.float32()),
            ("top_k", pa.int16()),
            ("top_k_share", pa.float32()),
            ("entropy", pa.float32()),
            ("normalized_entropy", pa.float32()),
            ("top_indices", pa.list_(pa.int32())),
        ],
        "Concentration of a query group's image-directed attention: share of it on the top_k image tokens, "
        "entropy (nats) of the renormalised image distribution and entropy / log(n_image_tokens); "
        "top_indices are image-token ordinals (0 = first token of the first image), most attended first.",
    ),
    "image_tokens": table_schema(
        [
            ("sample_id", pa.string()),
            ("layer", pa.int16()),
            ("image_index", pa.int16()),
            ("token_index", pa.int32()),
            ("piece", pa.int16()),
            ("row", pa.int16()),
            ("col", pa.int16()),
            ("position", pa.int32()),
            ("value_l1", pa.float32()),
            ("last_attention", pa.float32()),
            ("instruction_attention", pa.float32()),
        ],
        "Per image token and layer: L1 norm of its value vector over all KV heads, and the attention it "
        "receives from the last position and from the instruction tokens (mean over query heads). piece, row "
        "and col place it in its image: the piece (0 for an image of one grid; LLaVA-NeXT: 0 base image, 1 "
        "tiles) and its cell there (a row's newline token has col = the piece's column count).",
    ),
    SAMPLES_TABLE: table_schema(
        [
            ("sample_id", pa.string()),
            ("dataset", pa.string()),
            ("family", pa.string()),
            ("question", pa.string()),
            ("prompt", pa.string()),
            ("reference", pa.string()),
            ("model_answer", pa.string()),
            ("correct", pa.bool_()),
            ("n_tokens", pa.int32()),
            ("system_start", pa.int32()),
            ("system_end", pa.int32()),
            ("image_starts", pa.list_(pa.int32())),
            ("image_ends", pa.list_(pa.int32())),
            ("image_rows", pa.list_(pa.int16())),
            ("image_cols", pa.list_(pa.int16())),
            ("piece_images", pa.list_(pa.int16())),
            ("piece_kinds", pa.list_(pa.string())),
            ("piece_rows", pa.list_(pa.int16())),
            ("piece_cols", pa.list_(pa.int16())),
            ("piece_newlines", pa.list_(pa.bool_())),
            ("marker_images", pa.list_(pa.int16())),
            ("marker_positions", pa.list_(pa.int32())),
            ("instruction_positions", pa.list_(pa.int32())),
            ("last_position", pa.int32()),
        ],
        "One row per sample: text, reference and greedy model answer, and the token layout (half-open spans). "
        "image_rows / image_cols: each image's (first) grid; piece_*: every image's parts in token order (its "
        "image, kind, grid rows and columns, and whether a newline token ends each row); marker_*: the family's "
        "marker text tokens around each image (InternVL's <img> and </img>), by image and position.",
    ),
}


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape results."""
    versions = {"python": platform.python_version()}
    for name in ("visipruner-analysis", "torch", "transformers", "nnsight", "pandas", "pyarrow", "datasets", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_hash() -> str | None:
    """The toolkit's git commit (with '-dirty' for uncommitted changes), or None outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under the current umask (mkstemp always makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so readers see either the old content or the new, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    """Atomically write pretty-printed JSON."""
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    """Atomically write one parquet file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_run_dir(command: str, model: str, dataset: str, split: str) -> Path:
    """``runs/<command>/<model>/<dataset>-<split>`` with path separators in names made safe."""

    def safe(text: str) -> str:
        return text.replace("/", "_").replace("\\", "_").strip("._") or "local"

    return Path("runs") / command / safe(model) / f"{safe(Path(dataset).name)}-{safe(split)}"


def now() -> str:
    """UTC timestamp in ISO format."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunFolder:
    """One run's output folder: tables of numbered parts, written atomically, plus ``manifest.json``.

    A batch is committed when its part of the commit table (``samples`` unless told otherwise) exists; parts of
    other tables without one are leftovers of an interrupted write and are removed on resume.
    """

    def __init__(self, root: Path, schemas: dict[str, pa.Schema], *, commit_table: str = SAMPLES_TABLE) -> None:
        self.root = Path(root)
        self.schemas = schemas
        self.commit_table = commit_table

    @property
    def manifest_path(self) -> Path:
        """Where the manifest lives."""
        return self.root / MANIFEST

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when the folder holds no run."""
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError:
            raise ConfigError(
                f"{self.manifest_path} is not valid JSON; delete the folder or choose another --out"
            ) from None

    def check_compatible(self, identity: dict[str, Any], *, resume: bool, command: str | None = None) -> None:
        """Refuse a folder holding another command's run or another config, or an unfinished run of this one
        without --resume.

        A complete run of the same config is accepted: re-running it finds nothing left to do.
        """
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--out {self.root} is a file; give a folder path")
        manifest = self.read_manifest()
        if manifest is None:
            if self.root.exists() and any(self.root.iterdir()):
                raise ConfigError(f"{self.root} is not empty and holds no run manifest; choose an empty or new --out")
            return
        if command is not None and manifest.get("command") != command:
            raise ConfigError(
                f"{self.root} holds a run of {manifest.get('command') or 'another command'}, not of "
                f"{command}; choose another --out"
            )
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(
                f"{self.root} holds schema version {manifest.get('schema_version')}, this toolkit writes "
                f"{SCHEMA_VERSION}; choose a new --out"
            )
        stored = manifest.get("identity", {})
        if stored != identity:
            changed = sorted(key for key in set(stored) | set(identity) if stored.get(key) != identity.get(key))
            details = ", ".join(f"{key}: {stored.get(key)!r} -> {identity.get(key)!r}" for key in changed)
            raise ConfigError(
                f"{self.root} holds a run with a different config ({details}); "
                "choose a new --out or use the same config"
            )
        if not resume and manifest.get("status") != "complete":
            raise ConfigError(
                f"{self.root} holds an unfinished run of this config; "
                "pass --resume to continue it or choose a new --out"
            )

    def part_indices(self, table: str) -> set[int]:
        """Indices of the committed part files of a table."""
        folder = self.root / table
        if not folder.is_dir():
            return set()
        return {int(match.group(1)) for name in os.listdir(folder) if (match := _PART.match(name))}

    def clean_uncommitted(self) -> None:
        """Remove temp files and parts of batches whose samples part was never written."""
        committed = self.part_indices(self.commit_table)
        for table in self.schemas:
            folder = self.root / table
            if not folder.is_dir():
                continue
            for name in os.listdir(folder):
                match = _PART.match(name)
                if name.endswith(".tmp") or (match and int(match.group(1)) not in committed):
                    logger.info("removing uncommitted %s", folder / name)
                    (folder / name).unlink()

    def done_sample_ids(self) -> list[str]:
        """Ids of samples in committed parts, in part order."""
        ids: list[str] = []
        for index in sorted(self.part_indices(self.commit_table)):
            ids.extend(self.part_sample_ids(index))
        return ids

    def part_sample_ids(self, index: int) -> list[str]:
        """Ids of the samples of one committed part."""
        table = pq.read_table(self._part_path(self.commit_table, index), columns=["sample_id"])
        return table.column(0).to_pylist()

    def missing_tables(self) -> dict[int, list[str]]:
        """Committed parts that lack some table of the folder's schemas (tables added to an existing run)."""
        present = {name: self.part_indices(name) for name in self.schemas}
        missing = {
            index: [name for name in self.schemas if index not in present[name]]
            for index in sorted(self.part_indices(self.commit_table))
        }
        return {index: names for index, names in missing.items() if names}

    @contextmanager
    def interruptible(self, total: int) -> Iterator[None]:
        """Inside the block, Ctrl-C becomes a RunInterrupted that says what the folder keeps."""
        try:
            yield
        except KeyboardInterrupt:
            raise RunInterrupted(self.root, len(self.done_sample_ids()), total) from None

    def start(self, manifest: dict[str, Any], identity: dict[str, Any]) -> None:
        """Create the folder and write the manifest of a new or resumed run."""
        self.root.mkdir(parents=True, exist_ok=True)
        previous = self.read_manifest() or {}
        manifest = {
            **manifest,
            "identity": identity,
            "config_hash": config_hash(identity),
            "schema_version": SCHEMA_VERSION,
            "tables": {name: schema.metadata[b"description"].decode() for name, schema in self.schemas.items()},
            "index_convention": _INDEX_NOTE,
            "commit_table": self.commit_table,
            "started": previous.get("started", now()),
            "resumed": [*previous.get("resumed", []), now()] if previous else [],
            "finished": None,
            "status": "running",
            "package_versions": package_versions(),
            "git_hash": git_hash(),
        }
        atomic_write_json(self.manifest_path, manifest)

    def write_part(self, tables: dict[str, pa.Table], index: int | None = None) -> int:
        """Commit one batch: every table's part first, the samples part last; returns the part index.

        ``index`` numbers the part (the run driver gives its first sample's dataset position); default: the next.
        """
        missing = set(self.schemas) - set(tables)
        if missing:
            raise ValueError(f"batch lacks tables {sorted(missing)}")
        if index is None:
            index = max(self.part_indices(self.commit_table), default=-1) + 1
        elif index in self.part_indices(self.commit_table):
            raise ValueError(f"part {index} is already committed")
        for name in [*(t for t in self.schemas if t != self.commit_table), self.commit_table]:
            table = tables[name].cast(self.schemas[name])
            atomic_write_table(self._part_path(name, index), table)
        return index

    def add_to_part(self, index: int, tables: dict[str, pa.Table]) -> None:
        """Write further tables' parts for an already committed batch (a table added to an existing run)."""
        if index not in self.part_indices(self.commit_table):
            raise ValueError(f"part {index} is not committed")
        for name, table in tables.items():
            atomic_write_table(self._part_path(name, index), table.cast(self.schemas[name]))

    def finish(self, extra: dict[str, Any]) -> None:
        """Mark the run complete in the manifest."""
        manifest = self.read_manifest() or {}
        manifest.update(extra)
        manifest.update({"finished": now(), "status": "complete"})
        atomic_write_json(self.manifest_path, manifest)

    def _part_path(self, table: str, index: int) -> Path:
        """Path of one part file."""
        return self.root / table / f"part-{index:05d}.parquet"


def read_manifest(run_dir: str | Path, *, made_by: str | None = None) -> dict[str, Any]:
    """A run folder's manifest; a ConfigError naming the command that makes one when the folder holds no run."""
    manifest = RunFolder(Path(run_dir), {}).read_manifest()
    if manifest is None:
        maker = f"; make one with `python -m {made_by}`" if made_by else ""
        raise ConfigError(f"{run_dir} is not a run folder (no {MANIFEST}){maker}")
    return manifest


def read_table(run_dir: str | Path, table: str) -> pa.Table:
    """Read all committed parts of one table of a run, checking the schema version."""
    folder = RunFolder(Path(run_dir), {})
    manifest = folder.read_manifest()
    if manifest is None:
        raise ConfigError(f"{run_dir} holds no {MANIFEST}; point to a run folder written by this toolkit")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(
            f"{run_dir} was written with schema version {manifest.get('schema_version')}; this toolkit reads "
            f"{SCHEMA_VERSION}. Re-run the trace with this version"
        )
    folder.commit_table = manifest.get("commit_table", SAMPLES_TABLE)
    indices = sorted(folder.part_indices(folder.commit_table))
    paths = [folder._part_path(table, index) for index in indices]
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise ConfigError(f"{run_dir} lacks table {table!r} parts ({missing[0]}); the run recorded other probes")
    if not paths:
        raise ConfigError(f"{run_dir} has no committed results yet")
    return pa.concat_tables([pq.read_table(path) for path in paths])
