"""`shapes`: a procedural, seeded, captioned-image dataset that doubles as a small GenEval.

Every image shows one to four flat-coloured objects on a plain background, described by a caption from a
small fixed grammar, one grammar rule per category:

    single_object      "a cat"
    two_objects        "a cat and a house"
    counting           "three stars"                       (one to four objects of one kind)
    colors             "a red cat"
    position           "a cat left of a house"             (left of / right of / above / below)
    color_attribution  "a red cat and a blue house"

Rendering contract (what the evaluation relies on):

- The background is the single colour `BACKGROUND`; no palette colour is near it.
- Every object pixel has exactly its palette colour `COLORS[color]` (no anti-aliasing). Small features (a cat's
  eyes, a house's door, a car's window) are holes that show the background, left out in objects smaller than
  `MIN_HOLE_OBJECT_PX`, so that every object is one 8-connected piece.
- `RenderedObject.box` is the tight pixel box ``(x0, y0, x1, y1)`` of the object, right/bottom exclusive (PIL's
  ``getbbox`` convention, ``array[y0:y1, x0:x1]``). All of the object's pixels lie in it, and boxes of different
  objects are at least one pixel apart at resolution >= 32, so 8-connected components separate the objects.
- For "position", ``objects[0] RELATION objects[1]``: the boxes are separated along the relation's axis and that
  axis dominates the centre offset.

Scenes are laid out in resolution-relative coordinates (`SceneObject.rel_box`, in [0, 1]), so one scene renders
at any size. Sample ``i`` of seed ``s`` uses ``numpy.random.default_rng([s, split, i])``: the same seed gives the
same bytes whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
"""Bump when a change to this module changes the samples of a seed (caches key on it)."""

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution")

BACKGROUND = (232, 232, 232)

COLORS = {
    "red": (230, 30, 30),
    "orange": (250, 130, 0),
    "yellow": (245, 225, 40),
    "green": (30, 160, 60),
    "blue": (30, 80, 230),
    "purple": (140, 50, 190),
    "pink": (250, 120, 200),
    "brown": (120, 70, 30),
}

OBJECT_KINDS = ("cat", "house", "tree", "car", "star", "heart", "ball", "box")

PLURALS = {kind: kind + "es" if kind.endswith(("x", "s")) else kind + "s" for kind in OBJECT_KINDS}

NUMBERS = ("one", "two", "three", "four")

RELATIONS = ("left of", "right of", "above", "below")

SPLITS = {"train": 0, "validation": 1, "test": 2}

# Width / height of each kind's box (scaled by the sampled size).
ASPECTS = {"cat": (1.0, 0.95), "house": (1.0, 1.0), "tree": (0.8, 1.0), "car": (1.15, 0.8), "star": (1.0, 0.95),
           "heart": (1.0, 0.9), "ball": (1.0, 1.0), "box": (0.9, 0.9)}

# Relative object sizes (longer side, fraction of the image) by number of objects in the scene.
SIZE_RANGES = {1: (0.36, 0.72), 2: (0.26, 0.42), 3: (0.24, 0.34), 4: (0.24, 0.31)}

MARGIN = 0.08
BORDER = 0.03

# Holes (eyes, door, window) are cut only in objects at least this many pixels wide and high: in smaller ones
# they would split the object into pieces.
MIN_HOLE_OBJECT_PX = 7


def _star_points(num_points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    points = []
    for i in range(2 * num_points):
        radius = 1.0 if i % 2 == 0 else inner
        angle = math.pi * i / num_points - math.pi / 2
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    xs, ys = zip(*points)
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in points]


# Each kind is drawn in its unit box ([0, 1]^2, y down) as a list of (primitive, geometry, ink):
# ink 1 paints the object, ink 0 cuts a hole that shows the background.
SHAPES = {
    "cat": [
        ("ellipse", (0.0, 0.22, 1.0, 1.0), 1),
        ("polygon", ((0.03, 0.55), (0.1, 0.0), (0.48, 0.3)), 1),
        ("polygon", ((0.97, 0.55), (0.9, 0.0), (0.52, 0.3)), 1),
        ("ellipse", (0.22, 0.48, 0.40, 0.66), 0),
        ("ellipse", (0.60, 0.48, 0.78, 0.66), 0),
    ],
    "house": [
        ("polygon", ((0.0, 0.48), (0.5, 0.0), (1.0, 0.48)), 1),
        ("rectangle", (0.12, 0.46, 0.88, 1.0), 1),
        ("rectangle", (0.40, 0.68, 0.60, 1.0), 0),
    ],
    "tree": [
        ("ellipse", (0.0, 0.0, 1.0, 0.72), 1),
        ("rectangle", (0.36, 0.6, 0.64, 1.0), 1),
    ],
    "car": [
        ("polygon", ((0.2, 0.42), (0.32, 0.0), (0.68, 0.0), (0.82, 0.42)), 1),
        ("rectangle", (0.0, 0.38, 1.0, 0.78), 1),
        ("ellipse", (0.10, 0.56, 0.38, 1.0), 1),
        ("ellipse", (0.62, 0.56, 0.90, 1.0), 1),
        ("rectangle", (0.42, 0.16, 0.58, 0.34), 0),
    ],
    "star": [("polygon", tuple(_star_points()), 1)],
    "heart": [
        ("ellipse", (0.0, 0.0, 0.56, 0.56), 1),
        ("ellipse", (0.44, 0.0, 1.0, 0.56), 1),
        ("polygon", ((0.03, 0.38), (0.97, 0.38), (0.5, 1.0)), 1),
    ],
    "ball": [("ellipse", (0.0, 0.0, 1.0, 1.0), 1)],
    "box": [("rectangle", (0.0, 0.0, 1.0, 1.0), 1)],
}


@dataclass
class SceneObject:
    """One object of a scene: kind, palette colour and its box relative to the image, ``(x0, y0, x1, y1)`` in [0, 1]."""

    kind: str
    color: str
    rel_box: tuple[float, float, float, float]


@dataclass
class Scene:
    """A caption's structured ground truth.

    For "position", ``relation`` holds between ``objects[0]`` and ``objects[1]``. ``colors_in_caption`` says
    whether the caption names the colours (only "colors" and "color_attribution"); otherwise colours are random.
    """

    category: str
    objects: list[SceneObject]
    relation: str | None = None
    caption: str = ""

    @property
    def colors_in_caption(self) -> bool:
        return self.category in ("colors", "color_attribution")

    def to_dict(self) -> dict:
        return {"category": self.category, "caption": self.caption, "relation": self.relation,
                "objects": [asdict(obj) for obj in self.objects]}


@dataclass
class RenderedObject:
    """An object as rendered: kind, colour name and tight pixel box ``(x0, y0, x1, y1)``, right/bottom exclusive."""

    kind: str
    color: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: SceneObject, with_color: bool) -> str:
    words = f"{obj.color} {obj.kind}" if with_color else obj.kind
    return f"{_article(words)} {words}"


def make_caption(scene: Scene) -> str:
    """Turn a scene into its caption with the grammar of its category."""
    objs, with_color = scene.objects, scene.colors_in_caption
    if scene.category in ("single_object", "colors"):
        return _phrase(objs[0], with_color)
    if scene.category in ("two_objects", "color_attribution"):
        return f"{_phrase(objs[0], with_color)} and {_phrase(objs[1], with_color)}"
    if scene.category == "counting":
        kind = objs[0].kind
        return f"{NUMBERS[len(objs) - 1]} {kind if len(objs) == 1 else PLURALS[kind]}"
    if scene.category == "position":
        return f"{_phrase(objs[0], False)} {scene.relation} {_phrase(objs[1], False)}"
    raise ValueError(f"Unknown category {scene.category!r}; expected one of {CATEGORIES}.")


_KIND_WORDS = {**{kind: kind for kind in OBJECT_KINDS}, **{plural: kind for kind, plural in PLURALS.items()}}
_CAPTION_PATTERNS = [
    ("counting", re.compile(rf"^(?P<n>{'|'.join(NUMBERS)}) (?P<k0>\w+)$")),
    ("colors", re.compile(r"^an? (?P<c0>\w+) (?P<k0>\w+)$")),
    ("single_object", re.compile(r"^an? (?P<k0>\w+)$")),
    ("color_attribution", re.compile(r"^an? (?P<c0>\w+) (?P<k0>\w+) and an? (?P<c1>\w+) (?P<k1>\w+)$")),
    ("two_objects", re.compile(r"^an? (?P<k0>\w+) and an? (?P<k1>\w+)$")),
    ("position", re.compile(rf"^an? (?P<k0>\w+) (?P<rel>{'|'.join(RELATIONS)}) an? (?P<k1>\w+)$")),
]


def parse_caption(caption: str) -> dict:
    """Parse a caption of the grammar into ``{"category", "kinds", "colors" (None where unnamed), "count", "relation"}``.

    Raises ValueError for a caption outside the grammar.
    """
    text = " ".join(caption.lower().split())
    for category, pattern in _CAPTION_PATTERNS:
        match = pattern.match(text)
        if match is None:
            continue
        groups = match.groupdict()
        kinds = [_KIND_WORDS.get(groups.get(f"k{i}")) for i in range(2) if groups.get(f"k{i}")]
        colors = [groups.get(f"c{i}") for i in range(len(kinds))]
        if None in kinds or any(c is not None and c not in COLORS for c in colors):
            continue
        count = NUMBERS.index(groups["n"]) + 1 if category == "counting" else len(kinds)
        return {"category": category, "kinds": kinds, "colors": colors, "count": count,
                "relation": groups.get("rel")}
    raise ValueError(f"Caption {caption!r} is not in the shapes grammar (see ldm_pipeline.data.shapes).")


INVERSE_RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def grammar_caption(category: str, kinds: list[str], colors: list[str | None], relation: str | None = None) -> str:
    """The grammar's caption of these words (articles follow the words: "a red box", "an orange box")."""
    objects = [SceneObject(kind, color or "", (0.0, 0.0, 0.0, 0.0)) for kind, color in zip(kinds, colors)]
    return make_caption(Scene(category, objects, relation))


def canonical_caption(caption: str) -> tuple | None:
    """A key equal for two captions of the grammar exactly when they mean the same scene; None outside the grammar.

    Word order that carries no meaning is removed: "color_attribution" is the multiset of (colour, kind) pairs
    ("a red star and a green box" = "a green box and a red star"), "two_objects" the multiset of kinds, and
    "position" is written with "left of" or "above" (``(k0, rel, k1) = (k1, inverse(rel), k0)``: "a cat right of
    a tree" = "a tree left of a cat"). Other categories keep their parsed words.
    """
    try:
        parsed = parse_caption(caption)
    except ValueError:
        return None
    category, kinds, colors, relation = parsed["category"], parsed["kinds"], parsed["colors"], parsed["relation"]
    if category == "color_attribution":
        return category, tuple(sorted(zip(colors, kinds)))
    if category == "two_objects":
        return category, tuple(sorted(kinds))
    if category == "position":
        if relation in ("right of", "below"):
            kinds, relation = kinds[::-1], INVERSE_RELATIONS[relation]
        return category, kinds[0], relation, kinds[1]
    return category, tuple(kinds), tuple(colors), parsed["count"]


def binding_counterpart(caption: str) -> str | None:
    """The caption with the same words whose binding or order is swapped, or None when there is none.

    "color_attribution": the two colours change places ("a red star and a green box" -> "a green star and a red
    box"); "position": the two objects change places, the relation stays ("a cat left of a tree" -> "a tree left
    of a cat"). These are the hard negatives of NegCLIP (Yuksekgonul et al. 2023, arXiv:2210.01936, sec. 4).
    None for the other categories, for captions outside the grammar, and where the swap means the same scene
    (`canonical_caption`): one colour twice ("a red star and a red box"), one kind twice ("a cat left of a cat",
    "a red box and a green box").
    """
    try:
        parsed = parse_caption(caption)
    except ValueError:
        return None
    category, kinds, colors = parsed["category"], parsed["kinds"], parsed["colors"]
    if category == "color_attribution":
        counterpart = grammar_caption(category, kinds, colors[::-1])
    elif category == "position":
        counterpart = grammar_caption(category, kinds[::-1], colors, parsed["relation"])
    else:
        return None
    return None if canonical_caption(counterpart) == canonical_caption(caption) else counterpart


def _unit_hash(*key) -> float:
    """A number in [0, 1) that depends only on ``key`` (the same in every process and run)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2 ** 64


MAX_HELD_OUT_ORDERS = 0.5


def is_held_out_order(caption: str, fraction: float, seed: int = 0) -> bool:
    """Whether ``caption``'s word order is one of the ``fraction`` of orders held out of training.

    Orders come in pairs, a caption and its `binding_counterpart` ("a cat left of a tree" / "a tree left of a
    cat"; "a red star and a green box" / "a green star and a red box"), each member one meaning
    (`canonical_caption`: "a tree right of a cat" is the same member as "a cat left of a tree"). A share ``2 ·
    fraction`` of the pairs, chosen by a hash of the pair and ``seed``, has one member held out, also chosen by
    hash; its counterpart stays in training. So a held-out order is one whose words, and whose reverse, the model
    has seen: drawing it right needs word order, not a bag of words. Captions of the other categories, outside
    the grammar, or without a counterpart are never held out. ``fraction`` is at most 0.5 (one of every pair).
    """
    if not 0 <= fraction <= MAX_HELD_OUT_ORDERS:
        raise ValueError(f"held-out order fraction {fraction}: it must be in [0, {MAX_HELD_OUT_ORDERS}] (one "
                         "member of each pair at most).")
    if fraction == 0:
        return False
    counterpart = binding_counterpart(caption)
    if counterpart is None:
        return False
    members = sorted([canonical_caption(caption), canonical_caption(counterpart)])
    if _unit_hash("pair", seed, members) >= 2 * fraction:
        return False
    held_out = members[int(_unit_hash("member", seed, members) < 0.5)]
    return canonical_caption(caption) == held_out


def scene_from_caption(caption: str, rng: np.random.Generator) -> Scene:
    """A scene that ``caption`` (of the grammar) describes, laid out as `sample_scene` lays out its scenes; colours
    the caption does not name are drawn from ``rng``. Raises ValueError for a caption outside the grammar."""
    parsed = parse_caption(caption)
    kinds = parsed["kinds"] * parsed["count"] if parsed["category"] == "counting" else parsed["kinds"]
    named = parsed["colors"] + [None] * (len(kinds) - len(parsed["colors"]))
    colors = [color if color is not None else _choice(rng, COLORS) for color in named]
    sizes = [_box_size(rng, kind, len(kinds)) for kind in kinds]
    boxes = _place(rng, sizes, parsed["relation"])
    objects = [SceneObject(kind, color, tuple(box)) for kind, color, box in zip(kinds, colors, boxes)]
    scene = Scene(category=parsed["category"], objects=objects, relation=parsed["relation"])
    scene.caption = make_caption(scene)
    return scene


def _choice(rng: np.random.Generator, options, exclude=()):
    options = [o for o in options if o not in exclude]
    return options[int(rng.integers(len(options)))]


def _box_size(rng: np.random.Generator, kind: str, num_objects: int) -> tuple[float, float]:
    low, high = SIZE_RANGES[num_objects]
    size = low + (high - low) * float(rng.random())
    aspect_w, aspect_h = ASPECTS[kind]
    return size * aspect_w, size * aspect_h


def _separated(a, b, margin: float = MARGIN) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def _relation_holds(a, b, relation: str) -> bool:
    """``a RELATION b``: separated along the relation's axis, and that axis dominates the centre offset."""
    dx = (a[0] + a[2] - b[0] - b[2]) / 2
    dy = (a[1] + a[3] - b[1] - b[3]) / 2
    if relation in ("left of", "right of"):
        apart = a[2] + MARGIN <= b[0] if relation == "left of" else b[2] + MARGIN <= a[0]
        return apart and abs(dy) < 0.5 * abs(dx)
    apart = a[3] + MARGIN <= b[1] if relation == "above" else b[3] + MARGIN <= a[1]
    return apart and abs(dx) < 0.5 * abs(dy)


def _place_in_grid(rng: np.random.Generator, sizes):
    """Boxes in distinct random cells of a 2 x 2 grid (up to four objects), ``MARGIN`` apart by construction."""
    cell = (1 - 2 * BORDER) / 2
    room = cell - MARGIN
    boxes = []
    for (w, h), cell_index in zip(sizes, rng.permutation(4)):
        w, h = min(w, room), min(h, room)
        x0 = BORDER + cell * (cell_index % 2) + MARGIN / 2 + (room - w) * float(rng.random())
        y0 = BORDER + cell * (cell_index // 2) + MARGIN / 2 + (room - h) * float(rng.random())
        boxes.append((x0, y0, x0 + w, y0 + h))
    return boxes


def _place_related(rng: np.random.Generator, sizes, relation: str):
    """Two boxes with ``box0 RELATION box1``: laid out along the relation's axis, then jittered across it."""
    horizontal = relation in ("left of", "right of")
    first, second = (0, 1) if relation in ("left of", "above") else (1, 0)
    lengths = [w if horizontal else h for w, h in sizes]
    widths = [h if horizontal else w for w, h in sizes]
    span, gap_min = 1 - 2 * BORDER, MARGIN * 1.05
    scale = min(1.0, (span - gap_min) / (lengths[0] + lengths[1]))
    lengths, widths = [v * scale for v in lengths], [v * scale for v in widths]
    slack = span - gap_min - lengths[0] - lengths[1]
    gap = gap_min + slack * float(rng.random())
    start = BORDER + (slack - (gap - gap_min)) * float(rng.random())
    lows = {first: start, second: start + lengths[first] + gap}
    distance = lengths[0] / 2 + gap + lengths[1] / 2
    low0, high0 = BORDER + widths[0] / 2, 1 - BORDER - widths[0] / 2
    low1, high1 = BORDER + widths[1] / 2, 1 - BORDER - widths[1] / 2
    center1 = low1 + (high1 - low1) * float(rng.random())
    low, high = max(low0, center1 - 0.45 * distance), min(high0, center1 + 0.45 * distance)
    if low > high:
        center1 = 0.5
        low, high = max(low0, center1 - 0.45 * distance), min(high0, center1 + 0.45 * distance)
    centers = [low + (high - low) * float(rng.random()), center1]
    boxes = []
    for i in range(2):
        along = (lows[i], lows[i] + lengths[i])
        across = (centers[i] - widths[i] / 2, centers[i] + widths[i] / 2)
        boxes.append((along[0], across[0], along[1], across[1]) if horizontal else (across[0], along[0], across[1], along[1]))
    return boxes


def _place(rng: np.random.Generator, sizes, relation: str | None = None, max_tries: int = 20):
    """Non-overlapping boxes (``MARGIN`` apart, ``BORDER`` from the edges) for the given (w, h) sizes.

    Rejection sampling, falling back to a jittered 2 x 2 grid (three or four objects) or to shrinking (two);
    a relation is laid out by construction.
    """
    if relation is not None:
        return _place_related(rng, sizes, relation)
    for attempt in range(max_tries):
        boxes = []
        for w, h in sizes:
            x0 = BORDER + (1 - 2 * BORDER - w) * float(rng.random())
            y0 = BORDER + (1 - 2 * BORDER - h) * float(rng.random())
            box = (x0, y0, x0 + w, y0 + h)
            if not all(_separated(box, other) for other in boxes):
                break
            boxes.append(box)
        else:
            return boxes
    if len(sizes) > 2:
        return _place_in_grid(rng, sizes)
    return _place(rng, [(w * 0.9, h * 0.9) for w, h in sizes], None, max_tries)


def sample_scene(rng: np.random.Generator, category: str | None = None) -> Scene:
    """Draw a scene (and its caption) of ``category`` (uniform over `CATEGORIES` when None) from ``rng``."""
    if category is None:
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    if category not in CATEGORIES:
        raise ValueError(f"Unknown category {category!r}; expected one of {CATEGORIES}.")
    relation = None
    if category in ("single_object", "colors"):
        kinds = [_choice(rng, OBJECT_KINDS)]
        colors = [_choice(rng, COLORS)]
    elif category == "counting":
        kinds = [_choice(rng, OBJECT_KINDS)] * (1 + int(rng.integers(len(NUMBERS))))
        colors = [_choice(rng, COLORS) for _ in kinds]
    else:
        first = _choice(rng, OBJECT_KINDS)
        kinds = [first, _choice(rng, OBJECT_KINDS, exclude=(first,))]
        first_color = _choice(rng, COLORS)
        exclude = (first_color,) if category == "color_attribution" else ()
        colors = [first_color, _choice(rng, COLORS, exclude=exclude)]
        if category == "position":
            relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    sizes = [_box_size(rng, kind, len(kinds)) for kind in kinds]
    boxes = _place(rng, sizes, relation)
    objects = [SceneObject(kind, color, tuple(box)) for kind, color, box in zip(kinds, colors, boxes)]
    scene = Scene(category=category, objects=objects, relation=relation)
    scene.caption = make_caption(scene)
    return scene


def _pixel_box(rel_box, resolution: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box that lies inside ``rel_box * resolution``."""
    x0, y0, x1, y1 = rel_box
    px0, py0 = math.floor(x0 * resolution), math.floor(y0 * resolution)
    px1, py1 = max(px0, math.ceil(x1 * resolution) - 1), max(py0, math.ceil(y1 * resolution) - 1)
    return px0, py0, px1, py1


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    with_holes = min(w, h) + 1 >= MIN_HOLE_OBJECT_PX
    for primitive, geometry, ink in SHAPES[kind]:
        if not ink and not with_holes:
            continue
        fill = 255 if ink else 0
        if primitive == "polygon":
            draw.polygon([(round(x0 + u * w), round(y0 + v * h)) for u, v in geometry], fill=fill)
        else:
            u0, v0, u1, v1 = geometry
            rect = (round(x0 + u0 * w), round(y0 + v0 * h), round(x0 + u1 * w), round(y0 + v1 * h))
            if primitive == "ellipse":
                draw.ellipse(rect, fill=fill)
            else:
                draw.rectangle(rect, fill=fill)


def render_scene(scene: Scene, resolution: int) -> tuple[Image.Image, list[RenderedObject]]:
    """Render ``scene`` as a ``resolution`` x ``resolution`` RGB image and return it with the objects' pixel boxes.

    Each object is drawn as a binary mask and pasted with its exact palette colour.
    """
    if resolution < 16:
        raise ValueError(f"resolution must be at least 16 (got {resolution}); objects are not legible below that.")
    image = Image.new("RGB", (resolution, resolution), BACKGROUND)
    mask = Image.new("L", (resolution, resolution), 0)
    draw = ImageDraw.Draw(mask)
    rendered = []
    for obj in scene.objects:
        box = _pixel_box(obj.rel_box, resolution)
        draw.rectangle(box, fill=0)
        _draw_shape(draw, obj.kind, box)
        crop_box = (box[0], box[1], box[2] + 1, box[3] + 1)
        region = mask.crop(crop_box)
        image.paste(COLORS[obj.color], crop_box, region)
        x0, y0, x1, y1 = region.getbbox()
        rendered.append(RenderedObject(obj.kind, obj.color, (box[0] + x0, box[1] + y0, box[0] + x1, box[1] + y1)))
    return image, rendered


def scene_rng(seed: int, index: int, split: str = "train") -> np.random.Generator:
    """The generator of sample ``index``: seeded by ``(seed, split, index)`` only."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {tuple(SPLITS)}.")
    return np.random.default_rng([seed, SPLITS[split], index])


class ShapesDataset:
    """``num_samples`` captioned images of ``resolution`` pixels drawn from ``seed``, generated on access.

    Items: ``{"image": PIL RGB, "caption": str, "scene": Scene, "objects": list[RenderedObject]}``. ``split``
    ("train", "validation", "test") selects a disjoint random stream for the same seed; ``categories`` restricts
    the categories (uniform over them). ``held_out_orders`` leaves that fraction of the relation and attribute
    orders out (`is_held_out_order` with ``seed``): a scene drawn with one is drawn again, in its category.
    """

    def __init__(self, num_samples: int, resolution: int, seed: int = 0, split: str = "train",
                 categories: tuple[str, ...] | None = None, held_out_orders: float = 0.0):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0 (got {num_samples}).")
        categories = tuple(categories) if categories else CATEGORIES
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"Unknown categories {unknown}; expected some of {CATEGORIES}.")
        scene_rng(seed, 0, split)
        is_held_out_order("a cat", held_out_orders)  # checks the fraction
        self.num_samples, self.resolution, self.seed, self.split = num_samples, resolution, seed, split
        self.categories, self.held_out_orders = categories, held_out_orders

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> Scene:
        rng = scene_rng(self.seed, index, self.split)
        category = self.categories[int(rng.integers(len(self.categories)))]
        scene = sample_scene(rng, category)
        while is_held_out_order(scene.caption, self.held_out_orders, self.seed):
            scene = sample_scene(rng, category)
        return scene

    def __getitem__(self, index: int) -> dict:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= max(self.num_samples, 1)
        scene = self.scene(index)
        image, objects = render_scene(scene, self.resolution)
        return {"image": image, "caption": scene.caption, "scene": scene, "objects": objects}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def to_hf_dataset(self):
        """This data as a `datasets.Dataset` with columns image, text, category, relation, objects (pixel boxes)."""
        import datasets

        def rows():
            for item in self:
                yield {"image": item["image"], "text": item["caption"], "category": item["scene"].category,
                       "relation": item["scene"].relation, "objects": [asdict(obj) for obj in item["objects"]]}

        features = datasets.Features({
            "image": datasets.Image(), "text": datasets.Value("string"), "category": datasets.Value("string"),
            "relation": datasets.Value("string"),
            "objects": [{"kind": datasets.Value("string"), "color": datasets.Value("string"),
                         "box": datasets.Sequence(datasets.Value("int32"), length=4)}],
        })
        return datasets.Dataset.from_generator(rows, features=features)
