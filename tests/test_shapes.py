"""ShapesVQA: determinism, split hygiene, answer correctness and the organism's closed vocabulary."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import Counter

import pytest

from analysis.data.shapes import (
    COLORS,
    DIGITS,
    FAMILIES,
    PLURALS,
    PROMPT_SUFFIX,
    SHAPES,
    SPLITS,
    SceneObject,
    ShapesConfig,
    as_hf_dataset,
    caption,
    generate_items,
    generate_samples,
    iter_scenes,
    make_scene,
    owner_split,
    relation_holds,
    render,
    tokens,
    vocabulary,
)
from analysis.errors import DataError

CONFIG = ShapesConfig(seed=7)
_SINGULAR = {plural: shape for shape, plural in PLURALS.items()}


def _image_digest(image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def train_items():
    return generate_items("train", 1400, CONFIG)


@pytest.fixture(scope="module")
def test_items():
    return generate_items("test", 700, CONFIG)


def test_same_seed_gives_identical_samples_and_other_seed_differs():
    first = generate_samples("train", 60, CONFIG)
    again = generate_samples("train", 60, ShapesConfig(seed=7))
    other = generate_samples("train", 60, ShapesConfig(seed=8))
    assert [(s.sample_id, s.prompt, s.answer) for s in first] == [(s.sample_id, s.prompt, s.answer) for s in again]
    assert [_image_digest(s.images[0]) for s in first] == [_image_digest(s.images[0]) for s in again]
    assert [s.prompt for s in first] != [s.prompt for s in other]
    assert {_image_digest(s.images[0]) for s in first}.isdisjoint(_image_digest(s.images[0]) for s in other)


def test_a_shorter_request_is_a_prefix_of_a_longer_one():
    short = generate_items("validation", 25, CONFIG)
    long = generate_items("validation", 60, CONFIG)
    assert [i.sample_id for i in short] == [i.sample_id for i in long[:25]]


def test_splits_never_share_a_scene_or_an_image():
    hashes, images = {}, {}
    for split in SPLITS:
        scenes = list(itertools.islice(iter_scenes(split, CONFIG), 300))
        assert all(owner_split(scene) == split for scene in scenes)
        hashes[split] = [scene.content_hash() for scene in scenes]
        images[split] = {_image_digest(render(scene)) for scene in scenes}
        assert len(set(hashes[split])) == len(scenes)
    for a, b in itertools.combinations(SPLITS, 2):
        assert set(hashes[a]).isdisjoint(hashes[b])
        assert images[a].isdisjoint(images[b])


def test_content_dedupe_drops_repeated_scenes():
    # One object and no tile leaves few distinct scenes, so raw candidates repeat and dedupe must act.
    config = ShapesConfig(min_objects=1, max_objects=1, tile_probability=0.0)
    raw = [make_scene("train", i, config) for i in range(600)]
    owned = [scene.content_hash() for scene in raw if owner_split(scene) == "train"]
    assert len(set(owned)) < len(owned)
    kept = [scene.content_hash() for scene in itertools.islice(iter_scenes("train", config), 100)]
    assert len(set(kept)) == len(kept)


def test_every_family_is_present_with_well_formed_samples():
    samples = generate_samples("train", 700, CONFIG) + generate_samples("test", 700, CONFIG)
    assert {s.family for s in samples} == set(FAMILIES)
    allowed = {
        "color": set(COLORS),
        "shape": set(SHAPES),
        "count": {str(n) for n in range(CONFIG.max_objects + 1)},
        "exist": {"yes", "no"},
        "spatial": {"yes", "no"},
        "read": set(DIGITS),
    }
    ids = [s.sample_id for s in samples]
    assert len(set(ids)) == len(ids)
    for s in samples:
        assert re.fullmatch(rf"shapes-(train|test)-\d{{6}}-{s.family}", s.sample_id)
        assert s.dataset == "shapes-vqa"
        assert s.prompt == s.question + PROMPT_SUFFIX
        assert len(s.images) == 1 and s.images[0].size == (CONFIG.image_size, CONFIG.image_size)
        assert len(s.answer.split()) == 1
        assert s.answer_type == ("yes_no" if s.answer in ("yes", "no") else "open")
        if s.family in allowed:
            assert s.answer in allowed[s.family], s


def test_answers_are_unambiguous_and_match_the_scene(train_items, test_items):
    margin = round(CONFIG.spatial_margin_fraction * CONFIG.image_size)
    control: dict[str, str] = {}
    for item in train_items + test_items:
        shapes = item.scene.shapes
        if item.family == "color":
            (shape,) = re.fullmatch(r"What color is the (\w+)\?", item.question).groups()
            (target,) = [o for o in shapes if o.shape == shape]
            assert item.answer == target.color
        elif item.family == "shape":
            (color,) = re.fullmatch(r"What shape is the (\w+) object\?", item.question).groups()
            (target,) = [o for o in shapes if o.color == color]
            assert item.answer == target.shape
        elif item.family == "count":
            value, objects = re.fullmatch(r"How many (\w+) (objects )?are there\?", item.question).groups()
            n = sum(o.color == value for o in shapes) if objects else sum(o.shape == _SINGULAR[value] for o in shapes)
            assert item.answer == str(n)
        elif item.family == "exist":
            color, shape = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", item.question).groups()
            assert item.answer == ("yes" if any(o.color == color and o.shape == shape for o in shapes) else "no")
        elif item.family == "spatial":
            pattern = r"Is the (.+) (to the left of|to the right of|above|below) the (.+)\?"
            first, relation, second = re.fullmatch(pattern, item.question).groups()
            (a,) = [o for o in item.scene.objects if o.name == first]
            (b,) = [o for o in item.scene.objects if o.name == second]
            # A "no" must be clearly false: the reverse relation holds with the margin.
            expected = relation_holds(a, b, relation, margin)
            assert item.answer == ("yes" if expected else "no")
            assert expected or relation_holds(b, a, relation, margin)
        elif item.family == "read":
            assert item.scene.tile is not None and item.answer == item.scene.tile.glyph
        else:
            assert control.setdefault(item.question, item.answer) == item.answer


def test_yes_no_families_are_balanced(train_items, test_items):
    for items in (train_items, test_items):
        for family in ("exist", "spatial"):
            answers = Counter(i.answer for i in items if i.family == family)
            assert abs(answers["yes"] - answers["no"]) <= 1, (family, answers)


def test_family_balance_is_roughly_uniform(train_items, test_items):
    for items in (train_items, test_items):
        counts = Counter(i.family for i in items)
        assert max(counts.values()) <= 1.4 * min(counts.values()), counts


def test_objects_stay_inside_the_image_without_overlap():
    config = ShapesConfig(seed=3, image_size=128)
    for scene in itertools.islice(iter_scenes("train", config), 200):
        assert config.min_objects <= len(scene.objects) <= config.max_objects
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        for a, b in itertools.combinations(scene.objects, 2):
            assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
        assert render(scene).size == (128, 128)


def test_caption_names_every_object(train_items):
    for item in train_items[:200]:
        text = caption(item.scene)
        assert text == caption(item.scene) and text.startswith("A ") and text.endswith(".")
        assert text.count(" at the ") == len(item.scene.objects)
        for obj in item.scene.shapes:
            assert f"{obj.size} {obj.color} {obj.shape}" in text
        if item.scene.tile is not None:
            assert f"tile with the digit {item.scene.tile.glyph}" in text


def test_vocabulary_covers_all_generated_text(train_items, test_items):
    from tokenizers import pre_tokenizers

    # The organism's tokenizer splits on whitespace, then punctuation; check against that exact splitter.
    splitter = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    vocab = set(vocabulary(CONFIG))
    texts = {text for i in train_items + test_items for text in (i.question + PROMPT_SUFFIX, i.answer)}
    texts |= {caption(i.scene) for i in train_items}
    used = set()
    for text in texts:
        words = [word for word, _ in splitter.pre_tokenize_str(text)]
        assert words == tokens(text)
        used.update(words)
    assert used <= vocab, used - vocab
    assert len(vocab) < 150


def test_hf_dataset_has_the_loader_columns(tmp_path):
    import datasets
    import pandas as pd

    ds = as_hf_dataset("validation", 14, CONFIG)
    assert set(ds.column_names) == {"id", "image", "question", "prompt", "answer", "family", "choices", "answer_type"}
    assert isinstance(ds.features["image"], datasets.Image)
    row = ds[0]
    assert row["image"].size == (CONFIG.image_size, CONFIG.image_size)
    assert row["id"] == generate_samples("validation", 1, CONFIG)[0].sample_id
    ds.to_parquet(str(tmp_path / "shapes.parquet"))
    frame = pd.read_parquet(tmp_path / "shapes.parquet")
    assert len(frame) == 14 and isinstance(frame["image"][0]["bytes"], bytes)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 32},
        {"min_objects": 4, "max_objects": 3},
        {"max_objects": 12},
        {"families": ("colour",)},
        {"draws": {"spatial": 0}},
        {"draws": {"colour": 2}},
    ],
)
def test_bad_config_raises_data_error(kwargs):
    with pytest.raises(DataError):
        ShapesConfig(**kwargs)


def test_unknown_split_raises_data_error():
    with pytest.raises(DataError, match="validation"):
        generate_samples("val", 3, CONFIG)


def test_a_family_no_scene_can_answer_raises_data_error():
    config = ShapesConfig(tile_probability=0.0, families=("read",))
    with pytest.raises(DataError, match="tile_probability"):
        generate_items("test", 5, config)


def test_count_question_when_every_shape_is_present() -> None:
    """A scene holding every shape never gets the answer 0 for a shape count (it used to crash)."""
    import random

    from analysis.data import shapes

    objects = tuple(
        shapes.SceneObject(shape=shape, color="red", size="small", box=(i * 18, 0, i * 18 + 16, 16))
        for i, shape in enumerate(shapes.SHAPES)
    )
    scene = shapes.Scene(split="train", index=0, image_size=112, background=128, texture_seed=None, objects=objects)

    class ZeroFirst(random.Random):
        """Draws the 'ask for zero' branch and the by-shape branch."""

        def random(self) -> float:
            return 0.0

    question, answer = shapes._ask_count(scene, ZeroFirst(0))
    assert answer != "0" and int(answer) == sum(
        1 for o in objects if o.shape in question or shapes.PLURALS[o.shape] in question
    )


def test_draws_ask_a_family_several_distinct_questions_per_train_scene(train_items) -> None:
    """ShapesConfig.draws: up to N different questions of a family per train scene, each with its own id, the
    other families and the evaluation splits unchanged."""
    config = ShapesConfig(seed=7, draws={"spatial": 4})
    items = generate_items("train", 1400, config)
    assert len({item.sample_id for item in items}) == len(items)
    per_scene = Counter(item.scene.index for item in items if item.family == "spatial")
    assert max(per_scene.values()) == 4 and sum(per_scene.values()) > 2 * len(per_scene)
    by_scene: dict[int, list[str]] = {}
    for item in items:
        if item.family == "spatial":
            by_scene.setdefault(item.scene.index, []).append(item.question)
    assert all(len(set(questions)) == len(questions) for questions in by_scene.values())
    others = [(i.sample_id, i.question) for i in items if i.family != "spatial"]
    reference = [(i.sample_id, i.question) for i in train_items if i.family != "spatial"]
    assert others == reference[: len(others)]
    answers = Counter(item.answer for item in items if item.family == "spatial")
    assert abs(answers["yes"] - answers["no"]) <= 1
    for split in ("validation", "test"):
        assert generate_items(split, 50, config) == generate_items(split, 50, CONFIG)


def test_where_questions_name_the_region_of_a_unique_object_and_leave_the_default_splits_alone() -> None:
    """The training-only grounding family asks where one uniquely named object is and answers its 3 x 3 region;
    it is in no split unless asked for, so every default split stays as it was."""
    from analysis.data.shapes import FAMILIES, KNOWN_FAMILIES

    items = generate_items("train", 400, ShapesConfig(families=KNOWN_FAMILIES))
    where = [item for item in items if item.family == "where"]
    assert where and len({item.scene.index for item in where}) == len(where)  # one per scene
    regions = [["top left", "top", "top right"], ["left", "center", "right"], ["bottom left", "bottom", "bottom right"]]
    for item in where:
        name = item.question.removeprefix("Where is the ").removesuffix("?")
        matches = [o for o in item.scene.objects if o.name == name]
        assert len(matches) == 1
        row, col = item.scene.region(matches[0])
        assert item.answer == regions[row][col]
    assert "Where" in vocabulary(ShapesConfig(families=KNOWN_FAMILIES)) and "Where" not in vocabulary()
    # An organism trained with grounding is evaluated on exactly the questions of one trained without it.
    from analysis.organism.train import eval_items

    with_grounding, _ = eval_items("test", 40, ShapesConfig(families=KNOWN_FAMILIES))
    plain, _ = eval_items("test", 40, ShapesConfig())
    assert [(i.sample_id, i.question) for i in with_grounding] == [(i.sample_id, i.question) for i in plain]
    assert {i.family for i in plain} <= set(FAMILIES)


def test_box_questions_give_a_unique_objects_edges_in_tenths_of_the_image() -> None:
    """The box grounding family answers four digits (left, top, right, bottom), each the tenth of the image its
    edge's last pixel lies in; it too stays out of every default split."""
    from analysis.data.shapes import box_digits

    items = generate_items("train", 400, ShapesConfig(families=(*ShapesConfig().families, "box")))
    boxes = [item for item in items if item.family == "box"]
    assert boxes and len({item.scene.index for item in boxes}) == len(boxes)
    for item in boxes:
        name = item.question.removeprefix("What is the box of the ").removesuffix("?")
        (target,) = [o for o in item.scene.objects if o.name == name]
        left, top, right, bottom = (int(digit) for digit in item.answer.split())
        size = item.scene.image_size
        x0, y0, x1, y1 = target.box
        assert (left, top) == (x0 * 10 // size, y0 * 10 // size)
        assert (right, bottom) == (min(9, (x1 - 1) * 10 // size), min(9, (y1 - 1) * 10 // size))
        assert left <= right and top <= bottom
    scene = boxes[0].scene
    corner = SceneObject("circle", "red", "small", (0, 0, scene.image_size, scene.image_size))
    assert box_digits(scene, corner) == "0 0 9 9"
    assert "box" in vocabulary(ShapesConfig(families=("box",))) and "box" not in vocabulary()
