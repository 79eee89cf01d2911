"""Benchmark and local dataset loaders that turn rows into decoded, validated ``Sample`` records."""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from analysis.data.samples import Sample
from analysis.data.scoring import normalize_answer
from analysis.errors import DataError

logger = logging.getLogger(__name__)

ANSWER_TYPES = ("open", "yes_no", "multiple_choice")

# Instruction suffixes of the LLaVA-1.5 evaluation prompts.
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER_SUFFIX = "\nAnswer with the option's letter from the given choices directly."

LOCAL_JSONL = "samples.jsonl"
_PARQUET_BATCH_ROWS = 256

Row = Mapping[str, Any]


@dataclass(frozen=True)
class _Benchmark:
    """How one hub benchmark is fetched and how each of its rows becomes a ``Sample``."""

    hub_id: str
    config: str | None
    default_split: str
    description: str
    required_columns: tuple[str, ...]
    id_column: str | None
    build: Callable[[Row, str, list[Image.Image]], Sample]
    # GQA keeps its images in a sibling config, joined on the questions' ``imageId``.
    image_config: str | None = None


def _gqa_sample(row: Row, sample_id: str, images: list[Image.Image]) -> Sample:
    """Map a GQA testdev-balanced question to a short-answer sample."""
    question = str(row["question"]).strip()
    types = row.get("types")
    family = str(types.get("structural") or "") if isinstance(types, Mapping) else ""
    return Sample(
        sample_id=sample_id,
        images=images,
        prompt=question + SHORT_ANSWER_SUFFIX,
        question=question,
        answer=_text_or_none(row["answer"]),
        dataset="gqa",
        family=family,
        answer_type="open",
    )


def _pope_sample(row: Row, sample_id: str, images: list[Image.Image]) -> Sample:
    """Map a POPE object-probing question to a yes/no sample."""
    question = str(row["question"]).strip()
    return Sample(
        sample_id=sample_id,
        images=images,
        prompt=question + SHORT_ANSWER_SUFFIX,
        question=question,
        answer=_yes_no_or_none(row["answer"]),
        dataset="pope",
        family=str(row["category"] or ""),
        answer_type="yes_no",
    )


def _mme_sample(row: Row, sample_id: str, images: list[Image.Image]) -> Sample:
    """Map an MME question, whose text already asks for yes or no, to a yes/no sample."""
    question = str(row["question"]).strip()
    return Sample(
        sample_id=sample_id,
        images=images,
        prompt=question,
        question=question,
        answer=_yes_no_or_none(row["answer"]),
        dataset="mme",
        family=str(row["category"] or ""),
        answer_type="yes_no",
    )


def _textvqa_sample(row: Row, sample_id: str, images: list[Image.Image]) -> Sample:
    """Map a TextVQA question to a short-answer sample whose reference is the annotators' majority answer."""
    question = str(row["question"]).strip()
    return Sample(
        sample_id=sample_id,
        images=images,
        prompt=question + SHORT_ANSWER_SUFFIX,
        question=question,
        answer=_majority_answer(row["answers"] or []),
        dataset="textvqa",
        answer_type="open",
    )


def _scienceqa_sample(row: Row, sample_id: str, images: list[Image.Image]) -> Sample:
    """Map a ScienceQA-IMG question (answer given as a choice index) to a lettered multiple-choice sample."""
    question = str(row["question"]).strip()
    choices = [str(choice) for choice in row["choices"]]
    answer_index = row["answer"]
    answer = None
    if answer_index is not None:
        if not 0 <= int(answer_index) < len(choices):
            raise DataError(
                f"scienceqa-img sample {sample_id!r}: answer index {answer_index} is outside its "
                f"{len(choices)} choices; the parquet files are damaged, re-download them"
            )
        answer = chr(ord("A") + int(answer_index))
    hint = _text_or_none(row["hint"])
    context = f"Context: {hint}\n" if hint else ""
    return Sample(
        sample_id=sample_id,
        images=images,
        prompt=context + _choice_block(question, choices),
        question=question,
        answer=answer,
        dataset="scienceqa-img",
        family=str(row["subject"] or ""),
        choices=choices,
        answer_type="multiple_choice",
    )


def _mmbench_sample(row: Row, sample_id: str, images: list[Image.Image]) -> Sample:
    """Map an MMBench row (options in columns A-E, optional hint) to a lettered multiple-choice sample."""
    question = str(row["question"]).strip()
    choices: list[str] = []
    # Options fill A, B, ... in order; the first missing column ends the list (unused ones hold "nan").
    for letter in "ABCDE":
        option = _text_or_none(row.get(letter))
        if option is None:
            break
        choices.append(option)
    hint = _text_or_none(row.get("hint"))
    body = f"{hint}\n{question}" if hint else question
    return Sample(
        sample_id=sample_id,
        images=images,
        prompt=_choice_block(body, choices),
        question=question,
        answer=_text_or_none(row.get("answer")),
        dataset="mmbench",
        family=str(row["category"] or ""),
        choices=choices,
        answer_type="multiple_choice",
    )


_BENCHMARKS: dict[str, _Benchmark] = {
    "gqa": _Benchmark(
        hub_id="lmms-lab/GQA",
        config="testdev_balanced_instructions",
        default_split="testdev",
        description="GQA testdev-balanced compositional questions, short open answers",
        required_columns=("id", "imageId", "question", "answer"),
        id_column="id",
        build=_gqa_sample,
        image_config="testdev_balanced_images",
    ),
    "pope": _Benchmark(
        hub_id="lmms-lab/POPE",
        config=None,
        default_split="test",
        description="POPE object-hallucination probes, yes/no (family: random/popular/adversarial)",
        required_columns=("question_id", "question", "answer", "category", "image"),
        id_column="question_id",
        build=_pope_sample,
    ),
    "mme": _Benchmark(
        hub_id="lmms-lab/MME",
        config=None,
        default_split="test",
        description="MME perception and cognition subtasks, yes/no (family: subtask)",
        required_columns=("question_id", "question", "answer", "category", "image"),
        id_column="question_id",
        build=_mme_sample,
    ),
    "textvqa": _Benchmark(
        hub_id="lmms-lab/textvqa",
        config=None,
        default_split="validation",
        description="TextVQA questions about text in images, short open answers (majority reference)",
        required_columns=("question_id", "question", "answers", "image"),
        id_column="question_id",
        build=_textvqa_sample,
    ),
    "scienceqa-img": _Benchmark(
        hub_id="lmms-lab/ScienceQA",
        config="ScienceQA-IMG",
        default_split="test",
        description="ScienceQA questions with an image context, multiple choice (family: subject)",
        required_columns=("question", "choices", "answer", "hint", "subject", "image"),
        id_column=None,
        build=_scienceqa_sample,
    ),
    "mmbench": _Benchmark(
        hub_id="lmms-lab/MMBench",
        config="en",
        default_split="dev",
        description="MMBench English, multiple choice (family: ability category)",
        required_columns=("index", "question", "A", "B", "category", "image"),
        id_column="index",
        build=_mmbench_sample,
    ),
}


@dataclass(frozen=True)
class _Generated:
    """A dataset the toolkit synthesises offline, deterministically."""

    default_split: str
    description: str
    generate: Callable[[str, int | None], list[Sample]]


def _shapes_vqa(split: str, limit: int | None) -> list[Sample]:
    """ShapesVQA samples with the default generator config."""
    from analysis.data.shapes import generate_samples

    return generate_samples(split, limit)


# Every command's default dataset: generated offline, the organism's own questions.
DEFAULT_DATASET = "shapes-vqa"
_GENERATED: dict[str, _Generated] = {
    DEFAULT_DATASET: _Generated(
        default_split="test",
        description="ShapesVQA, synthetic shapes/colours/counts/digits questions generated offline "
        "(the model organism's dataset) [splits train/validation/test, default split 'test']",
        generate=_shapes_vqa,
    ),
}


def list_datasets() -> dict[str, str]:
    """Registered dataset names mapped to a one-line description with source and default split."""
    listing = {name: spec.description for name, spec in _GENERATED.items()}
    for name, spec in _BENCHMARKS.items():
        source = spec.hub_id + (f" ({spec.config})" if spec.config else "")
        listing[name] = f"{spec.description} [{source}, default split {spec.default_split!r}]"
    return listing


def resolve_split(dataset: str, split: str | None) -> str:
    """The split a load will read: the given one, the benchmark's default, or "all" for a local dataset."""
    key = dataset.strip().lower()
    if split is not None:
        return split
    if key in _GENERATED:
        return _GENERATED[key].default_split
    return _BENCHMARKS[key].default_split if key in _BENCHMARKS else "all"


def load_samples(
    dataset: str, split: str | None = None, limit: int | None = None, *, data_dir: str | None = None
) -> list[Sample]:
    """Load the first ``limit`` samples, in dataset order, of a benchmark (hub or ``data_dir``) or a local path."""
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be a positive number of samples, got {limit}; omit it to load all")
    key = dataset.strip().lower()
    # Names win over same-named folders in the working directory, so a stray "gqa/" cannot hijack the
    # benchmark; such a folder is still reachable as "./gqa".
    if key in _GENERATED:
        if data_dir is not None:
            raise DataError(f"{key} is generated offline and reads no --data-dir; drop it")
        samples = _GENERATED[key].generate(resolve_split(key, split), limit)
    elif key in _BENCHMARKS:
        samples = _load_benchmark(key, _BENCHMARKS[key], split, limit, data_dir)
    else:
        path = Path(dataset).expanduser()
        if not path.exists() and ("/" in dataset or "\\" in dataset or path.suffix):
            raise DataError(f"dataset path {dataset} does not exist; check the path or use a benchmark name")
        if not path.exists():
            known = ", ".join(sorted([*_GENERATED, *_BENCHMARKS]))
            raise DataError(
                f"unknown dataset {dataset!r}; use one of {known}, or the path of a local dataset "
                f"(a folder with {LOCAL_JSONL}, or .parquet files)"
            )
        if data_dir is not None:
            raise DataError(f"--data-dir applies to benchmark names only; drop it when loading the path {dataset!r}")
        samples = _load_local(path, split, limit)
    logger.info("loaded %d samples from %s", len(samples), dataset)
    return samples


# --- hub benchmarks -----------------------------------------------------------------------------


def _load_benchmark(
    name: str, spec: _Benchmark, split: str | None, limit: int | None, data_dir: str | None
) -> list[Sample]:
    """Fetch a benchmark split (hub or ``data_dir``), check its columns, then map and decode its rows."""
    split = split or spec.default_split
    table = _open_split(name, spec.hub_id, spec.config, split, data_dir)
    _require_columns(name, spec.config, table.column_names, spec.required_columns)
    if limit is not None and limit < len(table):
        table = table.select(range(limit))
    images_table = None
    image_rows: dict[str, int] = {}
    if spec.image_config is not None:
        images_table = _open_split(name, spec.hub_id, spec.image_config, split, data_dir)
        _require_columns(name, spec.image_config, images_table.column_names, ("id", "image"))
        images_table = _undecoded_images(images_table)
        image_rows = {str(image_id): index for index, image_id in enumerate(images_table["id"])}
    else:
        table = _undecoded_images(table)

    base_dir = Path(data_dir) if data_dir is not None else None
    samples = []
    for sample_id, row in _with_unique_ids(table, spec.id_column, split):
        if images_table is not None:
            image_id = str(row["imageId"])
            if image_id not in image_rows:
                raise DataError(
                    f"{name} sample {sample_id!r}: image {image_id!r} is missing from config "
                    f"{spec.image_config!r}; use the {split!r} split of both configs"
                )
            image_value = images_table[image_rows[image_id]]["image"]
        else:
            image_value = row["image"]
        images = _decode_images([image_value], sample_id, base_dir)
        samples.append(spec.build(row, sample_id, images))
    return samples


def _open_split(name: str, hub_id: str, config: str | None, split: str, data_dir: str | None) -> Any:
    """One split as a ``datasets.Dataset``, from the hub or from parquet files under ``data_dir``."""
    import datasets

    if data_dir is not None:
        files = _parquet_files_by_split(name, Path(data_dir), config)
        if split not in files:
            raise DataError(
                f"{name}: split {split!r} does not exist under {data_dir}; "
                f"available splits: {', '.join(sorted(files))}; pass one of them as the split"
            )
        return datasets.load_dataset("parquet", data_files={split: files[split]}, split=split)
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except ValueError as exc:
        # datasets reports a missing split as ValueError('Unknown split "x". Should be one of [...]').
        if "split" not in str(exc).lower():
            raise
        available = re.search(r"\[(.*)\]", str(exc))
        listed = available.group(1).replace("'", "") if available else "see the dataset card"
        raise DataError(
            f"{name}: split {split!r} does not exist in {hub_id}; available splits: {listed}; "
            "pass one of them as --split"
        ) from exc
    except (datasets.exceptions.DatasetsError, ConnectionError, OSError) as exc:
        raise DataError(
            f"{name}: cannot load {hub_id}{f' ({config})' if config else ''} from the Hugging Face Hub "
            f"({type(exc).__name__}: {_one_line(exc)}); check network access and `huggingface-cli login`, "
            "or download the parquet files and pass their folder as --data-dir"
        ) from exc


def _parquet_files_by_split(name: str, root: Path, config: str | None) -> dict[str, list[str]]:
    """Parquet files under ``root`` (or its ``config`` subfolder, as in a hub snapshot), grouped by split."""
    folder = root / config if config is not None and (root / config).is_dir() else root
    if not folder.is_dir():
        raise DataError(f"{name}: --data-dir {root} is not a folder; pass the folder holding the parquet files")
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise DataError(
            f"{name}: no .parquet files under {folder}; download the hub repository there, e.g. "
            f"`huggingface-cli download <hub id> --repo-type dataset --local-dir {root}`"
        )
    by_split: dict[str, list[str]] = {}
    for file in files:
        by_split.setdefault(_split_of(file), []).append(str(file))
    return by_split


def _split_of(file: Path) -> str:
    """The split a parquet shard belongs to, from hub naming: ``{split}-00000-of-00001.parquet``."""
    head = file.name.removesuffix(".parquet").split("-", 1)[0]
    # The hub's parquet-converter layout is {config}/{split}/0000.parquet: the folder names the split.
    return file.parent.name if head.isdigit() else head


def _require_columns(name: str, config: str | None, present: list[str], required: Iterable[str]) -> None:
    """Fail before decoding anything when the schema lacks a column the mapping needs."""
    missing = [column for column in required if column not in present]
    if missing:
        where = f"{name} ({config})" if config else name
        raise DataError(
            f"{where}: missing column(s) {', '.join(missing)}; the data has columns {', '.join(present)}; "
            "use files in the lmms-lab hub schema"
        )


def _undecoded_images(table: Any) -> Any:
    """The table with its image column left as raw bytes/paths so decoding errors name the sample."""
    import datasets

    if isinstance(table.features.get("image"), datasets.Image):
        return table.cast_column("image", datasets.Image(decode=False))
    return table


def _with_unique_ids(table: Iterable[Row], id_column: str | None, split: str) -> Iterator[tuple[str, Row]]:
    """Rows with a unique sample id; repeats get ``#2``, ``#3``... (MME has two questions per image id)."""
    seen: Counter[str] = Counter()
    for index, row in enumerate(table):
        base = str(row[id_column]) if id_column is not None else f"{split}-{index}"
        seen[base] += 1
        yield (base if seen[base] == 1 else f"{base}#{seen[base]}"), row


# --- local datasets ----------------------------------------------------------------------------


def _load_local(path: Path, split: str | None, limit: int | None) -> list[Sample]:
    """Load a local folder (``samples.jsonl`` or parquet files) or a single .jsonl or .parquet file."""
    if split is not None:
        raise DataError(f"local dataset {path} has a single split; drop the split argument ({split!r})")
    if path.is_file():
        if path.suffix not in (".parquet", ".jsonl"):
            raise DataError(
                f"{path} is not a dataset; pass a .jsonl or .parquet file, or a folder containing {LOCAL_JSONL}"
            )
        records = _jsonl_records(path) if path.suffix == ".jsonl" else _parquet_records([path])
        base_dir = path.parent
    elif (path / LOCAL_JSONL).is_file():
        records = _jsonl_records(path / LOCAL_JSONL)
        base_dir = path
    else:
        parquet_files = sorted(path.rglob("*.parquet"))
        if not parquet_files:
            raise DataError(f"{path} holds neither {LOCAL_JSONL} nor .parquet files; add one of them")
        records = _parquet_records(parquet_files)
        base_dir = path

    samples = []
    seen: Counter[str] = Counter()
    for index, (source, record) in enumerate(records):
        if limit is not None and index >= limit:
            break
        sample = _record_to_sample(record, index, source, base_dir, dataset=path.name)
        seen[sample.sample_id] += 1
        if seen[sample.sample_id] > 1:
            raise DataError(f"{source}: sample id {sample.sample_id!r} appears more than once; make ids unique")
        samples.append(sample)
    return samples


def _jsonl_records(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Records of a JSON-lines file, each tagged with ``file:line`` for error messages."""
    with file.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{file}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where} is not valid JSON ({exc.msg}); write one JSON object per line") from exc
            if not isinstance(record, dict):
                raise DataError(f"{where} is not a JSON object; write one object per line")
            yield where, record


def _parquet_records(files: list[Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of parquet files in file then row order, read in batches so a limit stops reading early."""
    import pyarrow.parquet as pq

    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except (OSError, ValueError) as exc:
            raise DataError(f"{file} is not a readable parquet file ({_one_line(exc)}); re-export it") from exc
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                yield str(file), record


def _record_to_sample(record: dict[str, Any], index: int, source: str, base_dir: Path, dataset: str) -> Sample:
    """Validate one local record and build its ``Sample``, decoding its images."""
    sample_id = str(record["id"]) if record.get("id") is not None else str(index)
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{source}: sample {sample_id!r} has no 'question' text; add one")
    question = question.strip()

    if record.get("images") is not None:
        image_values = list(record["images"])
    elif record.get("image") is not None:
        image_values = [record["image"]]
    else:
        image_values = []
    images = _decode_images(image_values, sample_id, base_dir)

    choices = [str(choice) for choice in record.get("choices") or []]
    answer = _text_or_none(record.get("answer"))
    answer_type = record.get("answer_type") or _infer_answer_type(answer, choices)
    if answer_type not in ANSWER_TYPES:
        raise DataError(
            f"{source}: sample {sample_id!r} has answer_type {answer_type!r}; use one of {', '.join(ANSWER_TYPES)}"
        )
    if answer_type == "multiple_choice":
        if not choices:
            raise DataError(f"{source}: multiple-choice sample {sample_id!r} has no 'choices'; list the options")
        if answer is not None:
            answer = _answer_letter(answer, choices, sample_id, source)
    elif answer_type == "yes_no" and answer is not None:
        answer = normalize_answer(answer)

    prompt = record.get("prompt")
    if not prompt:
        prompt = _choice_block(question, choices) if answer_type == "multiple_choice" else question
    return Sample(
        sample_id=sample_id,
        images=images,
        prompt=str(prompt),
        question=question,
        answer=answer,
        dataset=dataset,
        family=str(record.get("family") or ""),
        choices=choices,
        answer_type=answer_type,
    )


def _infer_answer_type(answer: str | None, choices: list[str]) -> str:
    """Guess the answer type of a local record that does not state it."""
    if choices:
        return "multiple_choice"
    if answer is not None and normalize_answer(answer) in ("yes", "no"):
        return "yes_no"
    return "open"


def _answer_letter(answer: str, choices: list[str], sample_id: str, source: str) -> str:
    """A multiple-choice reference as its option letter, given a letter, a 0-based index or the option text."""
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    if answer.upper() in letters:
        return answer.upper()
    if answer.isdigit() and int(answer) < len(choices):
        return letters[int(answer)]
    for letter, choice in zip(letters, choices, strict=False):
        if normalize_answer(choice) == normalize_answer(answer):
            return letter
    raise DataError(
        f"{source}: sample {sample_id!r} answer {answer!r} is not an option letter "
        f"({', '.join(letters)}), an index or one of its choices; fix the answer"
    )


# --- shared helpers ----------------------------------------------------------------------------


def _choice_block(question: str, choices: list[str]) -> str:
    """The question, its lettered options one per line, and the answer-with-a-letter instruction."""
    options = "\n".join(f"{chr(ord('A') + i)}. {choice}" for i, choice in enumerate(choices))
    return f"{question}\n{options}{LETTER_ANSWER_SUFFIX}"


def _decode_images(values: list[Any], sample_id: str, base_dir: Path | None) -> list[Image.Image]:
    """Fully decode every image of a sample to RGB, so corrupt files fail here and not inside a model."""
    if not values or any(value is None for value in values):
        raise DataError(
            f"sample {sample_id!r} has no image; the toolkit traces image-text samples only, "
            "so drop text-only samples from the dataset"
        )
    return [_decode_image(value, sample_id, base_dir) for value in values]


def _decode_image(value: Any, sample_id: str, base_dir: Path | None) -> Image.Image:
    """Decode one image given as a PIL image, raw bytes, a path, or a ``{"bytes", "path"}`` dict."""
    if isinstance(value, Image.Image):
        source: Any = value
        label = "in-memory image"
    elif isinstance(value, (bytes, bytearray)):
        source, label = io.BytesIO(value), "embedded image bytes"
    elif isinstance(value, Mapping) and value.get("bytes"):
        source = io.BytesIO(value["bytes"])
        label = f"embedded image {value['path']}" if value.get("path") else "embedded image bytes"
    elif isinstance(value, Mapping) and value.get("path"):
        source = _resolve(str(value["path"]), base_dir)
        label = str(source)
    elif isinstance(value, (str, Path)) and str(value):
        source = _resolve(str(value), base_dir)
        label = str(source)
    else:
        raise DataError(
            f"sample {sample_id!r} has no image; the toolkit traces image-text samples only, "
            "so drop text-only samples from the dataset"
        )
    if isinstance(source, Path) and not source.is_file():
        raise DataError(f"sample {sample_id!r}: image file {source} does not exist; fix the image path")
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image.load()
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"sample {sample_id!r}: {label} is unreadable or corrupt ({_one_line(exc)}); replace or remove the image"
        ) from exc


def _one_line(exc: BaseException) -> str:
    """An exception's message collapsed onto one line, since DataError messages are single lines."""
    return " ".join(str(exc).split())


def _resolve(path: str, base_dir: Path | None) -> Path:
    """An image path, relative ones taken from the dataset's folder."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() or base_dir is None else base_dir / candidate


def _text_or_none(value: Any) -> str | None:
    """Stripped text, or None for missing values (None, NaN, empty, the string "nan" pandas exports)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return None if not text or text.lower() == "nan" else text


def _yes_no_or_none(value: Any) -> str | None:
    """A yes/no reference in lowercase without trailing punctuation."""
    text = _text_or_none(value)
    return normalize_answer(text) if text is not None else None


def _majority_answer(answers: Iterable[Any]) -> str | None:
    """The most common annotator answer (compared after normalisation; ties go to the first given)."""
    texts = [text for text in (_text_or_none(answer) for answer in answers) if text is not None]
    if not texts:
        return None
    counts = Counter(normalize_answer(text) for text in texts)
    winner = counts.most_common(1)[0][0]
    return next(text for text in texts if normalize_answer(text) == winner)
