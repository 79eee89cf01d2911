"""Tests of the dataset layer: benchmark column mapping, local formats, input errors and scoring."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from fixtures_data import (
    BLUE,
    GREEN,
    LOCAL_RECORDS,
    RED,
    truncated_png,
    write_gqa,
    write_jsonl,
    write_local_jsonl,
    write_local_parquet,
    write_mmbench,
    write_mme,
    write_pope,
    write_scienceqa,
    write_textvqa,
)

from analysis.data import IMAGE_PLACEHOLDER, Sample, is_correct, list_datasets, load_samples
from analysis.data.scoring import normalize_answer
from analysis.errors import DataError

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def _color(sample: Sample, index: int = 0) -> tuple[int, int, int]:
    """The top-left pixel of one of a sample's images."""
    return sample.images[index].getpixel((0, 0))


def _sample(answer: str | None, answer_type: str = "open", choices: list[str] | None = None) -> Sample:
    """A minimal sample for scoring tests (scoring never looks at the images)."""
    return Sample(
        sample_id="s",
        images=[],
        prompt="q",
        question="q",
        answer=answer,
        choices=choices or [],
        answer_type=answer_type,
    )


# --- registry ----------------------------------------------------------------------------------


def test_list_datasets_names_every_benchmark() -> None:
    """Every registry key is listed with its hub id and config."""
    listing = list_datasets()
    assert set(listing) == {"shapes-vqa", "gqa", "pope", "mme", "textvqa", "scienceqa-img", "mmbench"}
    assert "lmms-lab/GQA" in listing["gqa"] and "testdev" in listing["gqa"]
    assert "ScienceQA-IMG" in listing["scienceqa-img"]


# --- benchmark mappings on hub-schema fixtures ---------------------------------------------------


def test_gqa_joins_images_and_builds_short_answer_prompt(tmp_path: Path) -> None:
    """GQA questions get their image via imageId and the short-answer prompt."""
    samples = load_samples("gqa", data_dir=str(write_gqa(tmp_path)))
    assert [s.sample_id for s in samples] == ["201307251", "201640614", "202225914"]
    first = samples[0]
    assert first.prompt == "Is it overcast?" + SHORT
    assert first.question == "Is it overcast?"
    assert (first.answer, first.family, first.answer_type, first.dataset) == ("no", "verify", "open", "gqa")
    # imageId n161313 is red, n235859 green: the join must follow ids, not row positions.
    assert [_color(s) for s in samples] == [RED, GREEN, RED]
    assert first.images[0].mode == "RGB"


def test_pope_maps_category_to_family_and_yes_no_answers(tmp_path: Path) -> None:
    """POPE's category becomes the family and answers are lowercase yes/no."""
    samples = load_samples("POPE", data_dir=str(write_pope(tmp_path)))
    assert [s.family for s in samples] == ["adversarial", "popular", "random"]
    assert [s.answer for s in samples] == ["yes", "no", "no"]
    assert samples[0].prompt == "Is there a snowboard in the image?" + SHORT
    assert {s.answer_type for s in samples} == {"yes_no"}
    assert [_color(s) for s in samples] == [RED, GREEN, BLUE]


def test_mme_keeps_question_as_prompt_and_makes_paired_ids_unique(tmp_path: Path) -> None:
    """MME prompts are the raw question and the two questions of an image get distinct ids."""
    samples = load_samples("mme", data_dir=str(write_mme(tmp_path)))
    assert [s.sample_id for s in samples] == [
        "code_reasoning/0020.png",
        "code_reasoning/0020.png#2",
        "existence/000000006040.jpg",
    ]
    assert samples[0].prompt == "Is a c++ code shown in the picture? Please answer yes or no."
    assert [s.answer for s in samples] == ["yes", "no", "yes"]
    assert samples[2].family == "existence"
    assert samples[0].answer_type == "yes_no"


def test_textvqa_uses_validation_split_and_majority_answer(tmp_path: Path) -> None:
    """TextVQA defaults to validation and keeps the most common annotator answer."""
    samples = load_samples("textvqa", data_dir=str(write_textvqa(tmp_path)))
    assert [s.sample_id for s in samples] == ["34602", "34603"]
    assert samples[0].answer == "dakota"
    assert samples[1].answer == "copenhagen"
    assert samples[0].prompt == "what is the brand of this camera?" + SHORT
    assert samples[0].answer_type == "open"
    train = load_samples("textvqa", split="train", data_dir=str(write_textvqa(tmp_path / "again")))
    assert [s.answer for s in train] == ["12"]


def test_scienceqa_builds_lettered_prompt_with_optional_context(tmp_path: Path) -> None:
    """ScienceQA-IMG prompts list lettered choices, with a Context line only when a hint exists."""
    samples = load_samples("scienceqa-img", data_dir=str(write_scienceqa(tmp_path)))
    no_hint, with_hint = samples
    assert no_hint.prompt == (
        "Which of these states is farthest north?\nA. West Virginia\nB. Louisiana\nC. Arizona\nD. Oklahoma" + LETTER
    )
    assert with_hint.prompt == (
        "Context: Two magnets are placed as shown.\nWill these magnets attract or repel?\nA. repel\nB. attract" + LETTER
    )
    assert (no_hint.answer, with_hint.answer) == ("A", "B")
    assert with_hint.choices == ["repel", "attract"]
    assert (with_hint.family, with_hint.answer_type) == ("natural science", "multiple_choice")
    assert [s.sample_id for s in samples] == ["test-0", "test-1"]


def test_mmbench_reads_option_columns_and_hint(tmp_path: Path) -> None:
    """MMBench options come from columns A-D, stopping at the first unused one."""
    samples = load_samples("mmbench", data_dir=str(write_mmbench(tmp_path)))
    first, second = samples
    assert first.prompt == (
        "The object is a fruit.\nWhat is the main color of the object?\nA. green\nB. red\nC. blue\nD. yellow" + LETTER
    )
    assert second.prompt == "Which animal is shown?\nA. cat\nB. dog\nC. bird" + LETTER
    assert second.choices == ["cat", "dog", "bird"]
    assert (first.answer, first.family, first.sample_id) == ("B", "attribute_recognition", "241")
    assert first.answer_type == "multiple_choice"


# --- local formats -------------------------------------------------------------------------------


def test_local_jsonl_maps_fields_and_infers_answer_types(tmp_path: Path) -> None:
    """A samples.jsonl folder maps every field and infers missing answer types."""
    folder = write_local_jsonl(tmp_path)
    samples = load_samples(str(folder))
    assert [s.sample_id for s in samples] == ["q1", "q2", "q3", "q4"]
    open_q, yes_no, choice, pair = samples
    assert open_q.prompt == LOCAL_RECORDS[0]["prompt"]
    assert (open_q.answer_type, open_q.family, open_q.dataset) == ("open", "color", "local_jsonl")
    assert (yes_no.answer_type, yes_no.answer, yes_no.prompt) == ("yes_no", "yes", "Is the square green?")
    assert (choice.answer_type, choice.answer) == ("multiple_choice", "B")
    assert choice.prompt == "Which shape is shown?\nA. circle\nB. square" + LETTER
    assert pair.prompt.count(IMAGE_PLACEHOLDER) == 2
    assert [_color(pair, 0), _color(pair, 1)] == [RED, BLUE]
    direct = load_samples(str(folder / "samples.jsonl"))
    assert [s.sample_id for s in direct] == ["q1", "q2", "q3", "q4"]


@pytest.mark.parametrize("embed_bytes", [True, False])
def test_local_parquet_with_bytes_or_paths(tmp_path: Path, embed_bytes: bool) -> None:
    """Local parquet loads from a file or folder with embedded bytes or relative paths."""
    folder = write_local_parquet(tmp_path, embed_bytes=embed_bytes)
    from_folder = load_samples(str(folder))
    from_file = load_samples(str(folder / "samples.parquet"))
    for samples in (from_folder, from_file):
        assert [s.sample_id for s in samples] == ["q1", "q2", "q3", "q4"]
        assert [_color(s) for s in samples] == [RED, GREEN, BLUE, RED]
        assert samples[2].answer == "B"
        assert samples[3].answer_type == "yes_no"


def test_limit_takes_the_first_samples_in_a_stable_order(tmp_path: Path) -> None:
    """limit keeps the first rows, identically on every load."""
    folder = write_local_jsonl(tmp_path)
    assert [s.sample_id for s in load_samples(str(folder), limit=2)] == ["q1", "q2"]
    pope = str(write_pope(tmp_path))
    first = [s.sample_id for s in load_samples("pope", limit=2, data_dir=pope)]
    again = [s.sample_id for s in load_samples("pope", limit=2, data_dir=pope)]
    assert first == again == ["1", "2"]
    assert len(load_samples("pope", limit=50, data_dir=pope)) == 3


# --- bad input -----------------------------------------------------------------------------------


def test_unknown_dataset_lists_known_names_and_local_paths(tmp_path: Path) -> None:
    """An unknown name lists the registry and mentions local paths."""
    with pytest.raises(DataError, match="unknown dataset 'vqav9'") as error:
        load_samples("vqav9")
    assert "gqa" in str(error.value) and "mmbench" in str(error.value) and "local" in str(error.value)


def test_nonexistent_local_path_is_reported(tmp_path: Path) -> None:
    """A path-like argument that does not exist is reported as a missing path, not an unknown name."""
    with pytest.raises(DataError, match="does not exist; check the path"):
        load_samples(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("limit", [0, -3])
def test_non_positive_limit_is_rejected(limit: int) -> None:
    """A zero or negative limit fails before anything is loaded."""
    with pytest.raises(DataError, match="limit must be a positive"):
        load_samples("gqa", limit=limit)


def test_missing_split_in_data_dir_names_available_splits(tmp_path: Path) -> None:
    """A split absent from data_dir names the splits that exist."""
    with pytest.raises(DataError, match=r"split 'validation' does not exist.*available splits: test"):
        load_samples("pope", split="validation", data_dir=str(write_pope(tmp_path)))


def test_missing_hub_split_is_reraised_with_available_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The datasets library's unknown-split error becomes a DataError listing the splits."""

    def unknown_split(*args: object, **kwargs: object) -> None:
        raise ValueError("Unknown split \"val\". Should be one of ['testdev'].")

    monkeypatch.setattr(datasets, "load_dataset", unknown_split)
    with pytest.raises(DataError, match=r"gqa: split 'val' does not exist in lmms-lab/GQA; available splits: testdev"):
        load_samples("gqa", split="val")


def test_unreachable_hub_dataset_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub download failure suggests logging in or passing data_dir."""

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load lmms-lab/MME.*--data-dir"):
        load_samples("mme")


def test_missing_column_names_it_and_the_columns_present(tmp_path: Path) -> None:
    """A schema without a needed column fails naming it and the columns present."""
    with pytest.raises(DataError, match=r"missing column\(s\) category; the data has columns id, question_id"):
        load_samples("pope", data_dir=str(write_pope(tmp_path, drop_category=True)))


def test_local_sample_without_image_is_rejected(tmp_path: Path) -> None:
    """A text-only local record fails naming its id."""
    folder = write_jsonl(tmp_path / "noimg", [{"id": "text-only", "question": "What is 2+2?", "answer": "4"}])
    with pytest.raises(DataError, match="sample 'text-only' has no image; the toolkit traces image-text samples"):
        load_samples(str(folder))


def test_hub_row_without_image_is_rejected(tmp_path: Path) -> None:
    """A hub row with a null image fails naming its id."""
    with pytest.raises(DataError, match="sample 'test-2' has no image"):
        load_samples("scienceqa-img", data_dir=str(write_scienceqa(tmp_path, text_only_row=True)))


def test_corrupt_local_image_names_sample_and_file(tmp_path: Path) -> None:
    """A truncated image file fails at load time naming the sample and file."""
    folder = write_jsonl(tmp_path / "corrupt", [{"id": "bad", "image": "images/broken.png", "question": "q"}])
    (folder / "images" / "broken.png").write_bytes(truncated_png())
    with pytest.raises(DataError, match=r"sample 'bad': .*broken\.png is unreadable or corrupt"):
        load_samples(str(folder))


def test_corrupt_hub_image_is_caught_at_load_time(tmp_path: Path) -> None:
    """Corrupt embedded hub image bytes fail at load time naming the sample."""
    with pytest.raises(DataError, match=r"sample '2': embedded image COCO_val2014_000000310196\.jpg is unreadable"):
        load_samples("pope", data_dir=str(write_pope(tmp_path, corrupt_second=True)))


def test_missing_local_image_file_is_reported(tmp_path: Path) -> None:
    """A record pointing at a missing file fails naming the path."""
    folder = write_jsonl(tmp_path / "gone", [{"id": "g", "image": "images/nowhere.png", "question": "q"}])
    with pytest.raises(DataError, match=r"sample 'g': image file .*nowhere\.png does not exist"):
        load_samples(str(folder))


def test_local_dataset_rejects_a_split(tmp_path: Path) -> None:
    """Local datasets have one split, so passing one is an error."""
    with pytest.raises(DataError, match="single split"):
        load_samples(str(write_local_jsonl(tmp_path)), split="test")


def test_malformed_jsonl_line_is_reported(tmp_path: Path) -> None:
    """A broken JSON line is reported with its file and line number."""
    folder = write_local_jsonl(tmp_path)
    with (folder / "samples.jsonl").open("a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    with pytest.raises(DataError, match=r"samples\.jsonl:5 is not valid JSON"):
        load_samples(str(folder))


def test_multiple_choice_answer_outside_choices_is_rejected(tmp_path: Path) -> None:
    """A multiple-choice answer that matches no option is rejected."""
    record = {"id": "m", "image": "images/red.png", "question": "q", "choices": ["x", "y"], "answer": "z"}
    folder = write_jsonl(tmp_path / "mc", [record])
    with pytest.raises(DataError, match="answer 'z' is not an option letter"):
        load_samples(str(folder))


def test_duplicate_local_ids_are_rejected(tmp_path: Path) -> None:
    """Two local records with one id are rejected."""
    record = {"id": "dup", "image": "images/red.png", "question": "q"}
    folder = write_jsonl(tmp_path / "dup", [record, record])
    with pytest.raises(DataError, match="'dup' appears more than once"):
        load_samples(str(folder))


def test_local_records_keep_json_order(tmp_path: Path) -> None:
    """Local samples come back in file order, not sorted."""
    records = [{"id": f"r{i}", "image": "images/blue.png", "question": f"q{i}"} for i in (3, 1, 2)]
    folder = write_jsonl(tmp_path / "order", records)
    assert [s.sample_id for s in load_samples(str(folder))] == ["r3", "r1", "r2"]
    assert json.loads((folder / "samples.jsonl").read_text().splitlines()[0])["id"] == "r3"


# --- scoring -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Red Car.", "red car"),
        ("  two   dogs! ", "2 dogs"),
        ("1,000", "1000"),
        ("3.5 meters", "3.5 meters"),
        ("Don't", "dont"),
        ("an apple, a pear", "apple pear"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    """Normalisation drops case, punctuation and articles and spells numbers as digits."""
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Blue", "blue", True),
        ("The sky is blue.", "blue", False),
        ("Blue. The sky is clear.", "blue", True),
        ("two", "2", True),
        ("red and white", "red and white", True),
        ("1.5", "1", False),
        ("Dakota digital", "dakota", True),
        ("green", "blue", False),
    ],
)
def test_open_answers(prediction: str, answer: str, expected: bool) -> None:
    """Open answers match on the whole reply, its first phrase or its first word."""
    assert is_correct(prediction, _sample(answer)) is expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("Yes", "yes", True),
        ("No, there is no dog.", "no", True),
        ("I think yes.", "yes", True),
        ("There is a cat", "no", False),
        ("yes", "no", False),
    ],
)
def test_yes_no_answers(prediction: str, answer: str, expected: bool) -> None:
    """Yes/no replies are judged by their first yes or no word."""
    assert is_correct(prediction, _sample(answer, "yes_no")) is expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", True),
        ("B.", True),
        ("(B) red", True),
        ("The answer is B.", True),
        ("red", True),
        ("Red.", True),
        ("A", False),
        ("green", False),
        ("Blue is my guess", False),
        ("E", False),
    ],
)
def test_multiple_choice_answers(prediction: str, expected: bool) -> None:
    """Multiple-choice replies are judged by their leading letter or option text."""
    sample = _sample("B", "multiple_choice", ["green", "red", "blue", "yellow"])
    assert is_correct(prediction, sample) is expected


def test_option_text_that_starts_like_a_letter_is_read_as_text() -> None:
    """A reply equal to an option's text is not mistaken for the letter A."""
    sample = _sample("B", "multiple_choice", ["a dog", "A cat"])
    assert is_correct("A cat", sample)


def test_scoring_without_reference_answer_is_an_error() -> None:
    """Scoring a sample without a reference answer raises DataError."""
    with pytest.raises(DataError, match="has no reference answer"):
        is_correct("yes", _sample(None, "yes_no"))


def test_shapes_vqa_is_registered() -> None:
    """The generated dataset loads by name, defaults to its test split and refuses unknown splits."""
    from analysis.data.loaders import resolve_split

    samples = load_samples("shapes-vqa", limit=3)
    assert len(samples) == 3 and all(s.sample_id.startswith("shapes-test-") for s in samples)
    assert resolve_split("shapes-vqa", None) == "test"
    with pytest.raises(DataError, match="unknown ShapesVQA split"):
        load_samples("shapes-vqa", split="dev", limit=1)
