"""ShapesVQA: a deterministic synthetic VQA dataset of coloured shapes and digit tiles.

Every scene is a pure function of ``(seed, split, index)``, so a split can be regenerated anywhere without
storing images. Each split only keeps scenes whose object set hashes to it, which guarantees that scenes
with the same objects (wherever they are placed) never end up in different splits.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from analysis.data.samples import Sample
from analysis.errors import DataError

if TYPE_CHECKING:
    import datasets

DATASET_NAME = "shapes-vqa"
SPLITS = ("train", "validation", "test")
FAMILIES = ("color", "shape", "count", "exist", "spatial", "read", "control")
# Training-only question families, never in the default rotation (so no split changes): region grounding, as
# LLaVA-1.5's instruction mix holds region-level data beside its VQA: an object's 3 x 3 region ("where") or its
# bounding box in tenths of the image ("box", as LLaVA-1.5's RefCOCO / Visual Genome prompts ask for coordinates).
GROUNDING_FAMILIES = ("where", "box")
# Each box coordinate is a digit: which tenth of the image the edge falls in.
BOX_BINS = 10
KNOWN_FAMILIES = FAMILIES + GROUNDING_FAMILIES
PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
# Hues far apart in RGB so a tiny vision tower separates them without needing fine colour constancy.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (150, 60, 190),
}
SIZES = ("small", "large")
TILE = "tile"
DIGITS = tuple("0123456789")
RELATIONS = ("to the left of", "to the right of", "above", "below")

# Seven-segment encoding (top, upper right, lower right, bottom, lower left, upper left, middle):
# digits built from rectangles stay crisp at 112 px without shipping a font file.
_SEGMENTS = {
    "0": "abcdef",
    "1": "bc",
    "2": "abged",
    "3": "abgcd",
    "4": "fgbc",
    "5": "afgcd",
    "6": "afgedc",
    "7": "abc",
    "8": "abcdefg",
    "9": "abcdfg",
}

_REGION_NAMES = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)

# Text-only facts: the image is irrelevant, so these measure how much the model answers from language alone.
_CONTROL_FACTS = (
    ("What color is the sky on a clear day?", "blue"),
    ("What color is fresh grass?", "green"),
    ("What color is a ripe banana?", "yellow"),
    ("What color is a ripe tomato?", "red"),
    ("What color do you get by mixing red and blue?", "purple"),
    ("What is one plus one?", "2"),
    ("What is two plus three?", "5"),
    ("What is four minus three?", "1"),
    ("What is three plus three?", "6"),
    ("How many sides does a triangle have?", "3"),
    ("How many sides does a square have?", "4"),
    ("What shape is a wheel?", "circle"),
    ("Is ice cold?", "yes"),
    ("Is fire cold?", "no"),
)

_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class ShapesConfig:
    """Generation parameters for ShapesVQA; sizes are numbers of question samples per split."""

    seed: int = 0
    image_size: int = 112
    min_objects: int = 2
    max_objects: int = 6
    small_fraction: float = 0.16
    large_fraction: float = 0.28
    tile_probability: float = 0.8
    textured_probability: float = 0.5
    repeat_probability: float = 0.4
    spatial_margin_fraction: float = 0.05
    train_size: int = 20000
    validation_size: int = 1000
    test_size: int = 1000
    families: tuple[str, ...] = FAMILIES
    all_families_splits: tuple[str, ...] = ("train",)
    # Questions per scene and family in the all-families splits (default one): several distinct questions of a
    # hard family about the same image, as instruction data asks several things of one picture.
    draws: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image_size < 48:
            raise DataError(
                f"ShapesConfig.image_size={self.image_size} is too small for legible digits; use 48 or more"
            )
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise DataError(
                f"ShapesConfig needs 1 <= min_objects <= max_objects <= 9 (single-digit counts), "
                f"got {self.min_objects}..{self.max_objects}"
            )
        if not 0 < self.small_fraction < self.large_fraction <= 0.4:
            raise DataError("ShapesConfig needs 0 < small_fraction < large_fraction <= 0.4 so objects fit the image")
        bad_draws = {
            f: n
            for f, n in self.draws.items()
            if f not in KNOWN_FAMILIES or isinstance(n, bool) or not isinstance(n, int) or n < 1
        }
        if bad_draws:
            raise DataError(
                f"ShapesConfig.draws needs positive whole counts keyed by families of {list(KNOWN_FAMILIES)}, "
                f"got {bad_draws}"
            )
        unknown = sorted(set(self.families) - set(KNOWN_FAMILIES))
        if unknown or not self.families:
            raise DataError(
                f"ShapesConfig.families has unknown or no families {unknown}; choose from {list(KNOWN_FAMILIES)}"
            )

    def split_size(self, split: str) -> int:
        """The configured number of samples of ``split``."""
        _check_split(split)
        return {"train": self.train_size, "validation": self.validation_size, "test": self.test_size}[split]


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; ``box`` is (x0, y0, x1, y1) in pixels with exclusive x1, y1."""

    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]
    glyph: str | None = None

    @property
    def center(self) -> tuple[float, float]:
        """The pixel centre (x, y)."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def name(self) -> str:
        """The referring phrase used in questions ("red circle" or "tile")."""
        return TILE if self.shape == TILE else f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene's full description: rendering it is deterministic and needs nothing else."""

    split: str
    index: int
    image_size: int
    background: int
    texture_seed: int | None
    objects: tuple[SceneObject, ...]

    @property
    def shapes(self) -> tuple[SceneObject, ...]:
        """The coloured shapes, without the digit tile."""
        return tuple(o for o in self.objects if o.shape != TILE)

    @property
    def tile(self) -> SceneObject | None:
        """The digit tile, if the scene has one."""
        return next((o for o in self.objects if o.shape == TILE), None)

    def region(self, obj: SceneObject) -> tuple[int, int]:
        """The (row, column) cell of ``obj``'s centre in a 3x3 grid over the image."""
        cx, cy = obj.center
        return min(2, int(cy * 3 / self.image_size)), min(2, int(cx * 3 / self.image_size))

    def content_hash(self) -> str:
        """A hash of the scene's semantic content (objects and their coarse regions), ignoring exact pixels."""
        # Coarse regions make near-duplicates (same objects, slightly moved) collide, so dedupe drops them.
        items = sorted((o.shape, o.color, o.size, o.glyph or "", *self.region(o)) for o in self.objects)
        return hashlib.sha1(repr(items).encode()).hexdigest()


@dataclass(frozen=True)
class ShapesItem:
    """One question about one scene, with the scene kept so answers can be checked against it."""

    scene: Scene
    family: str
    question: str
    answer: str
    answer_type: str
    draw: int = 0  # which of the family's questions about this scene (ShapesConfig.draws)

    @property
    def sample_id(self) -> str:
        """A stable id such as ``shapes-test-000123-color`` (``-2`` appended for a scene's third draw)."""
        suffix = f"-{self.draw}" if self.draw else ""
        return f"shapes-{self.scene.split}-{self.scene.index:06d}-{self.family}{suffix}"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown ShapesVQA split {split!r}; use one of {list(SPLITS)}")


def _object_side(config: ShapesConfig, size: str) -> int:
    fraction = config.large_fraction if size == "large" else config.small_fraction
    return max(8, round(fraction * config.image_size))


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(rng: random.Random, sides: list[int], image_size: int) -> list[tuple[int, int, int, int]] | None:
    """Rejection-sample non-overlapping boxes for ``sides`` (largest first), or None when they do not fit."""
    border, gap = 2, 3
    boxes: list[tuple[int, int, int, int]] = []
    for side in sides:
        span = image_size - 2 * border - side + 1
        for _ in range(60):
            # random() is several times faster than randint and this loop dominates generation time.
            x0 = border + int(rng.random() * span)
            y0 = border + int(rng.random() * span)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_separated(box, other, gap) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _kinds_owner(kinds: list[tuple[str, str, str, str | None]]) -> str:
    """The split that owns every scene made of these objects, wherever they are placed."""
    digest = hashlib.sha1(repr(sorted(kinds, key=repr)).encode()).hexdigest()
    return SPLITS[int(digest[:12], 16) % len(SPLITS)]


def _candidate(split: str, index: int, config: ShapesConfig, owned_only: bool) -> Scene | None:
    # A string seed goes through SHA-512 inside random.Random, so streams are stable across runs and
    # the split name keeps the three splits' seed spaces disjoint.
    rng = random.Random(f"{DATASET_NAME}/{config.seed}/{split}/{index}")
    background = rng.randint(200, 235)
    texture_seed = rng.getrandbits(63) if rng.random() < config.textured_probability else None
    for _ in range(100):
        n_objects = rng.randint(config.min_objects, config.max_objects)
        kinds: list[tuple[str, str, str, str | None]] = []
        if rng.random() < config.tile_probability:
            # The tile is always large: the digit must survive a 14-16 px patch grid.
            kinds.append((TILE, "white", "large", rng.choice(DIGITS)))
        for _ in range(n_objects - len(kinds)):
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            earlier = [k for k in kinds if k[0] != TILE]
            # Reusing an earlier shape or colour makes counts above one common enough to learn.
            if earlier and rng.random() < config.repeat_probability:
                if rng.random() < 0.5:
                    shape = rng.choice(earlier)[0]
                else:
                    color = rng.choice(earlier)[1]
            kinds.append((shape, color, rng.choice(SIZES), None))
        # Checking ownership before placement skips the costly part for the two thirds of candidates
        # another split owns.
        if owned_only and _kinds_owner(kinds) != split:
            return None
        order = sorted(range(len(kinds)), key=lambda i: kinds[i][2] != "large")
        boxes = _place(rng, [_object_side(config, kinds[i][2]) for i in order], config.image_size)
        if boxes is None:
            continue
        placed = {i: box for i, box in zip(order, boxes, strict=True)}
        objects = tuple(SceneObject(s, c, z, placed[i], g) for i, (s, c, z, g) in enumerate(kinds))
        return Scene(split, index, config.image_size, background, texture_seed, objects)
    raise DataError(f"ShapesVQA objects do not fit a {config.image_size}px image; lower max_objects or large_fraction")


def make_scene(split: str, index: int, config: ShapesConfig) -> Scene:
    """The candidate scene at ``index`` of ``split``; a pure function of (seed, split, index, config)."""
    _check_split(split)
    scene = _candidate(split, index, config, owned_only=False)
    assert scene is not None  # owned_only=False never rejects
    return scene


def owner_split(scene: Scene) -> str:
    """The split allowed to hold ``scene``: a hash of its objects, so equal content never crosses splits."""
    return _kinds_owner([(o.shape, o.color, o.size, o.glyph) for o in scene.objects])


def iter_scenes(split: str, config: ShapesConfig) -> Iterator[Scene]:
    """Yield the scenes of ``split`` in order: candidates it owns, minus content duplicates within it."""
    _check_split(split)
    seen: set[str] = set()
    index = 0
    while True:
        scene = _candidate(split, index, config, owned_only=True)
        index += 1
        if scene is None:
            continue
        digest = scene.content_hash()
        if digest in seen:
            continue
        seen.add(digest)
        yield scene


def _draw_digit(draw: ImageDraw.ImageDraw, digit: str, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    side = x1 - x0
    width, height = round(side * 0.5), round(side * 0.72)
    stroke = max(2, round(side * 0.11))
    left, top = x0 + (side - width) // 2, y0 + (side - height) // 2
    right, bottom = left + width, top + height
    mid = top + height // 2
    half = stroke // 2
    rects = {
        "a": (left, top, right, top + stroke),
        "b": (right - stroke, top, right, mid + half),
        "c": (right - stroke, mid - half, right, bottom),
        "d": (left, bottom - stroke, right, bottom),
        "e": (left, mid - half, left + stroke, bottom),
        "f": (left, top, left + stroke, mid + half),
        "g": (left, mid - half, right, mid - half + stroke),
    }
    for segment in _SEGMENTS[digit]:
        sx0, sy0, sx1, sy1 = rects[segment]
        draw.rectangle((sx0, sy0, sx1 - 1, sy1 - 1), fill=(20, 20, 20))


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x0, y0, x1, y1 = obj.box
    last = (x1 - 1, y1 - 1)
    if obj.shape == TILE:
        draw.rectangle((x0, y0, *last), fill=(250, 250, 250), outline=(40, 40, 40), width=max(1, (x1 - x0) // 16))
        _draw_digit(draw, obj.glyph or "0", obj.box)
        return
    fill = COLORS[obj.color]
    cx, cy = (x0 + last[0]) / 2, (y0 + last[1]) / 2
    if obj.shape == "circle":
        draw.ellipse((x0, y0, *last), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, *last), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (last[0], last[1]), (x0, last[1])], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (last[0], cy), (cx, last[1]), (x0, cy)], fill=fill)
    else:
        arm = (x1 - x0) / 6
        draw.rectangle((cx - arm, y0, cx + arm, last[1]), fill=fill)
        draw.rectangle((x0, cy - arm, last[0], cy + arm), fill=fill)


def render(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an RGB image."""
    size = scene.image_size
    if scene.texture_seed is None:
        image = Image.new("RGB", (size, size), (scene.background,) * 3)
    else:
        # Low-amplitude grey noise: enough texture that "background" is not a constant the model can key on.
        noise = np.random.default_rng(scene.texture_seed).integers(-8, 9, size=(size, size, 1), dtype=np.int16)
        pixels = np.clip(scene.background + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
        image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj)
    return image


def caption(scene: Scene) -> str:
    """A deterministic caption listing every object with its size, colour, shape and coarse position."""
    parts = []
    for obj in sorted(scene.objects, key=lambda o: (*scene.region(o), o.center[1], o.center[0])):
        row, col = scene.region(obj)
        where = f"at the {_REGION_NAMES[row][col]}"
        if obj.shape == TILE:
            parts.append(f"a tile with the digit {obj.glyph} {where}")
        else:
            parts.append(f"a {obj.size} {obj.color} {obj.shape} {where}")
    text = ", ".join(parts[:-1]) + f" and {parts[-1]}." if len(parts) > 1 else f"{parts[0]}."
    return text[0].upper() + text[1:]


def _unique(values: list[str]) -> list[str]:
    return sorted(v for v in set(values) if values.count(v) == 1)


def _ask_color(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    shapes = _unique([o.shape for o in scene.shapes])
    if not shapes:
        return None
    shape = rng.choice(shapes)
    target = next(o for o in scene.shapes if o.shape == shape)
    return f"What color is the {shape}?", target.color


def _ask_shape(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    colors = _unique([o.color for o in scene.shapes])
    if not colors:
        return None
    color = rng.choice(colors)
    target = next(o for o in scene.shapes if o.color == color)
    return f"What shape is the {color} object?", target.shape


def _ask_count(scene: Scene, rng: random.Random) -> tuple[str, str]:
    by_shape = rng.random() < 0.5
    values = [o.shape if by_shape else o.color for o in scene.shapes]
    everything = SHAPES if by_shape else tuple(COLORS)
    # Draw the answer first (larger counts weighted up), then a value with it: picking values directly
    # would make "1" dominate.
    counts = sorted({values.count(v) for v in everything} - {0})
    # "0" needs a value the scene lacks: when every shape (or colour) is present it draws a count instead.
    draw_zero = rng.random() < 0.2 or not counts
    lacks_a_value = any(values.count(v) == 0 for v in everything)
    n = 0 if draw_zero and lacks_a_value else rng.choices(counts, weights=counts)[0]
    value = rng.choice([v for v in everything if values.count(v) == n])
    question = f"How many {PLURALS[value]} are there?" if by_shape else f"How many {value} objects are there?"
    return question, str(n)


def _ask_exist(scene: Scene, rng: random.Random, want_yes: bool) -> tuple[str, str]:
    present = sorted({(o.color, o.shape) for o in scene.shapes})
    if want_yes:
        color, shape = rng.choice(present)
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        # POPE-style hard negatives: half the time the colour or the shape does occur, just not together.
        hard = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        color, shape = rng.choice(hard if hard and rng.random() < 0.5 else absent)
    return f"Is there a {color} {shape} in the image?", "yes" if want_yes else "no"


def relation_holds(a: SceneObject, b: SceneObject, relation: str, margin: int) -> bool:
    """Whether ``a`` is clearly ``relation`` ``b``: their boxes are at least ``margin`` px apart on that axis."""
    if relation == "to the left of":
        return a.box[2] + margin <= b.box[0]
    if relation == "to the right of":
        return b.box[2] + margin <= a.box[0]
    if relation == "above":
        return a.box[3] + margin <= b.box[1]
    return b.box[3] + margin <= a.box[1]


def _referents(scene: Scene) -> list[SceneObject]:
    """The objects a question can name unambiguously: those whose name no other object in the scene shares."""
    names = [o.name for o in scene.objects]
    return [o for o in scene.objects if names.count(o.name) == 1]


def _ask_spatial(scene: Scene, rng: random.Random, want_yes: bool, margin: int) -> tuple[str, str] | None:
    referents = _referents(scene)
    relations = list(RELATIONS)
    rng.shuffle(relations)
    for relation in relations:
        pairs = [(a, b) for a in referents for b in referents if a is not b and relation_holds(a, b, relation, margin)]
        if pairs:
            a, b = rng.choice(pairs)
            # Swapping a clearly true pair gives a clearly false question, keeping yes/no exactly balanced.
            first, second = (a, b) if want_yes else (b, a)
            return f"Is the {first.name} {relation} the {second.name}?", "yes" if want_yes else "no"
    return None


def _ask_where(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    referents = _referents(scene)
    if not referents:
        return None
    target = rng.choice(referents)
    row, col = scene.region(target)
    return f"Where is the {target.name}?", _REGION_NAMES[row][col]


def box_digits(scene: Scene, obj: SceneObject) -> str:
    """``obj``'s bounding box as four digits (left, top, right, bottom): the tenth of the image each edge is in."""
    x0, y0, x1, y1 = obj.box
    # x1 and y1 are exclusive, so the last pixel row or column inside the object names the far edge's tenth.
    edges = (x0, y0, x1 - 1, y1 - 1)
    return " ".join(str(min(BOX_BINS - 1, edge * BOX_BINS // scene.image_size)) for edge in edges)


def _ask_box(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    referents = _referents(scene)
    if not referents:
        return None
    target = rng.choice(referents)
    return f"What is the box of the {target.name}?", box_digits(scene, target)


def ask(scene: Scene, family: str, config: ShapesConfig, want_yes: bool = True, draw: int = 0) -> ShapesItem | None:
    """The ``family`` question about ``scene`` (its ``draw``-th), or None when its answer would be ambiguous or
    undefined."""
    # One stream per (scene, family, draw) so a question never depends on which other families were asked.
    stream = f"{DATASET_NAME}/{config.seed}/{scene.split}/{scene.index}/{family}" + (f"/{draw}" if draw else "")
    rng = random.Random(stream)
    answer_type = "open"
    if family == "color":
        qa = _ask_color(scene, rng)
    elif family == "shape":
        qa = _ask_shape(scene, rng)
    elif family == "count":
        qa = _ask_count(scene, rng)
    elif family == "exist":
        qa, answer_type = _ask_exist(scene, rng, want_yes), "yes_no"
    elif family == "spatial":
        margin = max(1, round(config.spatial_margin_fraction * config.image_size))
        qa, answer_type = _ask_spatial(scene, rng, want_yes, margin), "yes_no"
    elif family == "where":
        qa = _ask_where(scene, rng)
    elif family == "box":
        qa = _ask_box(scene, rng)
    elif family == "read":
        tile = scene.tile
        qa = ("What digit is written on the tile?", tile.glyph or "") if tile else None
    elif family == "control":
        qa = rng.choice(_CONTROL_FACTS)
        answer_type = "yes_no" if qa[1] in ("yes", "no") else "open"
    else:
        raise DataError(f"unknown ShapesVQA family {family!r}; choose from {list(KNOWN_FAMILIES)}")
    if qa is None:
        return None
    return ShapesItem(scene, family, qa[0], qa[1], answer_type, draw)


def generate_items(split: str, n: int | None = None, config: ShapesConfig | None = None) -> list[ShapesItem]:
    """The first ``n`` questions of ``split`` (default: the configured split size), with their scenes."""
    config = config or ShapesConfig()
    n = config.split_size(split) if n is None else n
    every_family = split in config.all_families_splits
    # Counters alternate yes/no per family so exist and spatial answers are balanced exactly, not on average.
    asked = {family: 0 for family in config.families}
    items: list[ShapesItem] = []
    scenes = iter_scenes(split, config)
    barren = 0
    while len(items) < n:
        scene = next(scenes)
        # Otherwise one question per image, families in rotation; a scene that cannot answer the family is skipped.
        wanted = list(config.families) if every_family else [config.families[len(items) % len(config.families)]]
        before = len(items)
        for family in wanted:
            questions: set[str] = set()
            for draw in range(config.draws.get(family, 1) if every_family else 1):
                item = ask(scene, family, config, want_yes=asked[family] % 2 == 0, draw=draw)
                # A repeated draw that lands on a question already asked adds nothing.
                if item is not None and item.question not in questions and len(items) < n:
                    asked[family] += 1
                    questions.add(item.question)
                    items.append(item)
        # A family no scene can answer (e.g. "read" without tiles) would otherwise loop forever.
        barren = barren + 1 if len(items) == before else 0
        if barren > 1000:
            raise DataError(
                f"ShapesVQA scenes cannot answer family {wanted[0]!r}; raise tile_probability or max_objects, "
                "or drop it from ShapesConfig.families"
            )
    return items


def generate_samples(split: str, n: int | None = None, config: ShapesConfig | None = None) -> list[Sample]:
    """The first ``n`` ShapesVQA samples of ``split``; questions about one scene share one rendered image."""
    images: dict[int, Image.Image] = {}
    samples = []
    for item in generate_items(split, n, config):
        if item.scene.index not in images:
            images[item.scene.index] = render(item.scene)
        samples.append(item_sample(item, images[item.scene.index]))
    return samples


def item_sample(item: ShapesItem, image: Image.Image) -> Sample:
    """The toolkit's Sample for one ShapesVQA question, showing ``image`` (its scene rendered)."""
    return Sample(
        sample_id=item.sample_id,
        images=[image],
        prompt=item.question + PROMPT_SUFFIX,
        question=item.question,
        answer=item.answer,
        dataset=DATASET_NAME,
        family=item.family,
        answer_type=item.answer_type,
    )


def as_hf_dataset(split: str, n: int | None = None, config: ShapesConfig | None = None) -> datasets.Dataset:
    """``split`` as a ``datasets.Dataset`` with the columns the local-parquet loader reads."""
    import datasets

    samples = generate_samples(split, n, config)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "family": datasets.Value("string"),
            "choices": datasets.List(datasets.Value("string")),
            "answer_type": datasets.Value("string"),
        }
    )
    columns = {
        "id": [s.sample_id for s in samples],
        "image": [s.images[0] for s in samples],
        "question": [s.question for s in samples],
        "prompt": [s.prompt for s in samples],
        "answer": [s.answer for s in samples],
        "family": [s.family for s in samples],
        "choices": [s.choices for s in samples],
        "answer_type": [s.answer_type for s in samples],
    }
    return datasets.Dataset.from_dict(columns, features=features, split=datasets.Split(split))


def tokens(text: str) -> list[str]:
    """Split ``text`` into words and single punctuation marks, as the organism's word-level tokenizer does."""
    return _TOKEN.findall(text)


def vocabulary(config: ShapesConfig | None = None) -> list[str]:
    """Every token that can appear in a ShapesVQA prompt, answer or caption, sorted."""
    config = config or ShapesConfig()
    families = set(config.families)
    texts = [PROMPT_SUFFIX, *SHAPES, *COLORS, *DIGITS, "yes no"]
    # Caption skeleton: articles, sizes, region names and the tile phrase; "A" starts every caption.
    texts += ["A a , and .", *SIZES, "at the", *(name for row in _REGION_NAMES for name in row), "tile with the digit"]
    if "color" in families:
        texts.append("What color is the ?")
    if "shape" in families:
        texts.append("What shape is the object?")
    if "count" in families:
        texts += ["How many are there? objects", *PLURALS.values()]
    if "exist" in families:
        texts.append("Is there a in the image?")
    if "spatial" in families:
        texts += ["Is the the ?", TILE, *RELATIONS]
    if "read" in families:
        texts.append("What digit is written on the tile?")
    if "control" in families:
        texts += [text for fact in _CONTROL_FACTS for text in fact]
    if "where" in families:
        texts += ["Where is the ?", TILE]
    if "box" in families:
        texts += ["What is the box of the ?", TILE]
    return sorted({token for text in texts for token in tokens(text)})
