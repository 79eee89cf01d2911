"""Writers of tiny on-disk datasets (lmms-lab hub schemas and the local formats) for the data-layer tests."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    """A solid-colour PNG, small enough to keep fixtures fast."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_png() -> bytes:
    """A PNG cut short: the header parses but decoding the pixels fails."""
    data = png_bytes(GREEN, size=(64, 64))
    return data[: len(data) // 2]


def hub_image(color: tuple[int, int, int], name: str) -> dict[str, Any]:
    """An image cell as ``datasets`` stores it in parquet: encoded bytes plus the original file name."""
    return {"bytes": png_bytes(color), "path": name}


def write_hub_parquet(folder: Path, split: str, rows: dict[str, list[Any]], features: dict[str, Any]) -> Path:
    """Write one hub-style shard ``{split}-00000-of-00001.parquet`` with the given ``datasets`` features."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}-00000-of-00001.parquet"
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(str(path))
    return path


def _string() -> datasets.Value:
    """A string column feature."""
    return datasets.Value("string")


def write_gqa(root: Path) -> Path:
    """GQA as on the hub: questions and images in two configs, joined on ``imageId`` = ``id``."""
    base = root / "gqa"
    types = {"structural": _string(), "semantic": _string(), "detailed": _string()}
    write_hub_parquet(
        base / "testdev_balanced_instructions",
        "testdev",
        {
            "id": ["201307251", "201640614", "202225914"],
            "imageId": ["n161313", "n235859", "n161313"],
            "question": ["Is it overcast?", "Who is wearing a shirt?", "What color is the sky?"],
            "answer": ["no", "woman", "blue"],
            "fullAnswer": ["No, it is clear.", "The woman is wearing a shirt.", "The sky is blue."],
            "isBalanced": [True, True, True],
            "types": [
                {"structural": "verify", "semantic": "global", "detailed": "weatherVerify"},
                {"structural": "query", "semantic": "rel", "detailed": "relS"},
                {"structural": "query", "semantic": "attr", "detailed": "directOf"},
            ],
        },
        {
            "id": _string(),
            "imageId": _string(),
            "question": _string(),
            "answer": _string(),
            "fullAnswer": _string(),
            "isBalanced": datasets.Value("bool"),
            "types": types,
        },
    )
    write_hub_parquet(
        base / "testdev_balanced_images",
        "testdev",
        {
            "id": ["n235859", "n161313", "n999999"],
            "image": [hub_image(GREEN, "n235859.jpg"), hub_image(RED, "n161313.jpg"), hub_image(WHITE, "x.jpg")],
        },
        {"id": _string(), "image": datasets.Image()},
    )
    return base


POPE_FEATURES = {
    "id": _string(),
    "question_id": _string(),
    "question": _string(),
    "answer": _string(),
    "image_source": _string(),
    "image": datasets.Image(),
    "category": _string(),
}


def write_pope(root: Path, *, corrupt_second: bool = False, drop_category: bool = False) -> Path:
    """POPE's default config (``data/test-*``); optionally with a corrupt image or without ``category``."""
    base = root / ("pope_bad" if corrupt_second or drop_category else "pope")
    second = {"bytes": truncated_png(), "path": "COCO_val2014_000000310196.jpg"} if corrupt_second else None
    rows: dict[str, list[Any]] = {
        "id": ["0", "1", "2"],
        "question_id": ["1", "2", "3"],
        "question": ["Is there a snowboard in the image?", "Is there a car in the image?", "Is there a dog?"],
        "answer": ["yes", "no", "No"],
        "image_source": ["COCO_val2014_000000310196", "COCO_val2014_000000310196", "COCO_val2014_000000210789"],
        "image": [
            hub_image(RED, "a.jpg"),
            second or hub_image(GREEN, "b.jpg"),
            hub_image(BLUE, "c.jpg"),
        ],
        "category": ["adversarial", "popular", "random"],
    }
    features = dict(POPE_FEATURES)
    if drop_category:
        del rows["category"], features["category"]
    write_hub_parquet(base / "data", "test", rows, features)
    return base


def write_mme(root: Path) -> Path:
    """MME: two questions per image share one ``question_id``, as in the hub data."""
    base = root / "mme"
    write_hub_parquet(
        base / "data",
        "test",
        {
            "question_id": ["code_reasoning/0020.png", "code_reasoning/0020.png", "existence/000000006040.jpg"],
            "image": [hub_image(RED, "0020.png"), hub_image(RED, "0020.png"), hub_image(BLUE, "6040.jpg")],
            "question": [
                "Is a c++ code shown in the picture? Please answer yes or no.",
                "Is a python code shown in the picture? Please answer yes or no.",
                "Is there a train in this image? Please answer yes or no.",
            ],
            "answer": ["Yes", "No", "Yes"],
            "category": ["code_reasoning", "code_reasoning", "existence"],
        },
        {
            "question_id": _string(),
            "image": datasets.Image(),
            "question": _string(),
            "answer": _string(),
            "category": _string(),
        },
    )
    return base


def write_textvqa(root: Path) -> Path:
    """TextVQA's default config with ``train`` and ``validation`` shards and ten answers per question."""
    base = root / "textvqa"
    features = {
        "image_id": _string(),
        "question_id": datasets.Value("int32"),
        "question": _string(),
        "question_tokens": datasets.List(_string()),
        "image": datasets.Image(),
        "answers": datasets.List(_string()),
        "ocr_tokens": datasets.List(_string()),
        "set_name": _string(),
    }
    write_hub_parquet(
        base / "data",
        "validation",
        {
            "image_id": ["003a8ae2ef43b901", "0054c91397f2fe05"],
            "question_id": [34602, 34603],
            "question": ["what is the brand of this camera?", "what does the small white text spell?"],
            "question_tokens": [["what", "is"], ["what", "does"]],
            "image": [hub_image(RED, "cam.jpg"), hub_image(GREEN, "txt.jpg")],
            "answers": [
                [
                    "nous les gosses",
                    "dakota",
                    "clos culombu",
                    "dakota digital",
                    "dakota",
                    "dakota",
                    "Dakota.",
                    "dakota digital",
                    "dakota",
                    "dakota",
                ],
                [
                    "copenhagen",
                    "copenhagen",
                    "Copenhagen",
                    "thursday",
                    "copenhagen",
                    "copenhagen",
                    "copenhagen",
                    "copenhagen",
                    "copenhagen",
                    "copenhagen",
                ],
            ],
            "ocr_tokens": [["DAKOTA"], ["COPENHAGEN"]],
            "set_name": ["val", "val"],
        },
        features,
    )
    write_hub_parquet(
        base / "data",
        "train",
        {
            "image_id": ["t1"],
            "question_id": [1],
            "question": ["what number is on the bus?"],
            "question_tokens": [["what"]],
            "image": [hub_image(BLUE, "bus.jpg")],
            "answers": [["12"] * 10],
            "ocr_tokens": [["12"]],
            "set_name": ["train"],
        },
        features,
    )
    return base


SCIENCEQA_FEATURES = {
    "image": datasets.Image(),
    "question": _string(),
    "choices": datasets.List(_string()),
    "answer": datasets.Value("int8"),
    "hint": _string(),
    "task": _string(),
    "grade": _string(),
    "subject": _string(),
    "topic": _string(),
    "category": _string(),
    "skill": _string(),
    "lecture": _string(),
    "solution": _string(),
}


def write_scienceqa(root: Path, *, text_only_row: bool = False) -> Path:
    """ScienceQA's ``ScienceQA-IMG`` config; ``text_only_row`` adds a row without an image (as in FULL)."""
    base = root / ("scienceqa_text" if text_only_row else "scienceqa")
    rows: dict[str, list[Any]] = {
        "image": [hub_image(RED, "map.png"), hub_image(GREEN, "magnet.png")],
        "question": ["Which of these states is farthest north?", "Will these magnets attract or repel?"],
        "choices": [["West Virginia", "Louisiana", "Arizona", "Oklahoma"], ["repel", "attract"]],
        "answer": [0, 1],
        "hint": ["", "Two magnets are placed as shown."],
        "task": ["closed choice", "closed choice"],
        "grade": ["grade2", "grade4"],
        "subject": ["social science", "natural science"],
        "topic": ["geography", "physics"],
        "category": ["Geography", "Magnets"],
        "skill": ["Read a map: cardinal directions", "Predict magnet behavior"],
        "lecture": ["", ""],
        "solution": ["", ""],
    }
    if text_only_row:
        for column, values in rows.items():
            values.append(None if column == "image" else values[0])
    write_hub_parquet(base / "ScienceQA-IMG", "test", rows, SCIENCEQA_FEATURES)
    return base


def write_mmbench(root: Path) -> Path:
    """MMBench's ``en`` config, ``dev`` split: options in columns A-D, unused ones "nan"."""
    base = root / "mmbench"
    write_hub_parquet(
        base / "en",
        "dev",
        {
            "index": ["241", "242"],
            "question": ["What is the main color of the object?", "Which animal is shown?"],
            "hint": ["The object is a fruit.", None],
            "answer": ["B", "A"],
            "A": ["green", "cat"],
            "B": ["red", "dog"],
            "C": ["blue", "bird"],
            "D": ["yellow", "nan"],
            "category": ["attribute_recognition", "image_topic"],
            "image": [hub_image(RED, "241.jpg"), hub_image(BLUE, "242.jpg")],
            "source": ["MMBench", "MMBench"],
            "L2-category": ["fine-grained perception", "coarse perception"],
            "comment": [None, None],
            "split": ["dev", "dev"],
        },
        {
            "index": _string(),
            "question": _string(),
            "hint": _string(),
            "answer": _string(),
            "A": _string(),
            "B": _string(),
            "C": _string(),
            "D": _string(),
            "category": _string(),
            "image": datasets.Image(),
            "source": _string(),
            "L2-category": _string(),
            "comment": _string(),
            "split": _string(),
        },
    )
    return base


LOCAL_RECORDS: list[dict[str, Any]] = [
    {
        "id": "q1",
        "image": "images/red.png",
        "question": "What color is the square?",
        "answer": "red",
        "prompt": "What color is the square?\nAnswer the question using a single word or phrase.",
        "family": "color",
    },
    {"id": "q2", "image": "images/green.png", "question": "Is the square green?", "answer": "Yes", "family": "color"},
    {
        "id": "q3",
        "image": "images/blue.png",
        "question": "Which shape is shown?",
        "choices": ["circle", "square"],
        "answer": "square",
        "family": "shape",
    },
    {
        "id": "q4",
        "images": ["images/red.png", "images/blue.png"],
        "question": "Are the two images the same?",
        "prompt": "<image>\n<image>\nAre the two images the same?",
        "answer": "no",
        "answer_type": "yes_no",
    },
]


LOCAL_IMAGE_COLORS = {"images/red.png": RED, "images/green.png": GREEN, "images/blue.png": BLUE}


def _write_local_images(folder: Path) -> None:
    """The three solid-colour images the local records refer to."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for path, color in LOCAL_IMAGE_COLORS.items():
        (folder / path).write_bytes(png_bytes(color))


def write_jsonl(folder: Path, records: list[dict[str, Any]]) -> Path:
    """A local dataset folder: ``samples.jsonl`` plus the images it names."""
    _write_local_images(folder)
    with (folder / "samples.jsonl").open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return folder


def write_local_jsonl(root: Path) -> Path:
    """The reference local jsonl dataset (open, yes/no, multiple-choice and two-image samples)."""
    return write_jsonl(root / "local_jsonl", LOCAL_RECORDS)


def write_local_parquet(root: Path, *, embed_bytes: bool) -> Path:
    """The reference local records as a parquet file, images embedded as bytes dicts or given as paths."""
    folder = root / ("local_parquet_bytes" if embed_bytes else "local_parquet_paths")
    folder.mkdir(parents=True, exist_ok=True)
    if not embed_bytes:
        _write_local_images(folder)
    rows = []
    for record in LOCAL_RECORDS:
        paths = record.get("images") or [record["image"]]
        if embed_bytes:
            # No image files sit next to this parquet: the bytes are the only copy.
            cells: list[Any] = [
                {"bytes": png_bytes(LOCAL_IMAGE_COLORS[path]), "path": Path(path).name} for path in paths
            ]
        else:
            cells = list(paths)
        rows.append(
            {
                "id": record["id"],
                "images": cells,
                "question": record["question"],
                "answer": record["answer"],
                "prompt": record.get("prompt"),
                "family": record.get("family"),
                "choices": record.get("choices", []),
                "answer_type": record.get("answer_type"),
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), folder / "samples.parquet")
    return folder
