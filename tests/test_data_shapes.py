"""The built-in shapes generator: determinism, pixels agreeing with the ground truth, captions agreeing with scenes."""

import hashlib

import numpy as np
import pytest
from scipy import ndimage

from ldm_pipeline.data.shapes import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    NUMBERS,
    OBJECT_KINDS,
    PLURALS,
    RELATIONS,
    Scene,
    SceneObject,
    ShapesDataset,
    make_caption,
    parse_caption,
    render_scene,
    sample_scene,
    scene_rng,
)

PALETTE = {name: np.array(rgb, dtype=np.uint8) for name, rgb in COLORS.items()}


def image_digest(image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def samples():
    """(resolution, item) pairs: 400 scenes at 32 px, 200 at 64 px, 60 at 128 px."""
    items = []
    for resolution, count in ((32, 400), (64, 200), (128, 60)):
        items += [(resolution, item) for item in ShapesDataset(count, resolution, seed=3)]
    return items


def test_same_seed_same_bytes_different_seed_different_bytes():
    first = [image_digest(item["image"]) for item in ShapesDataset(30, 64, seed=7)]
    again = [image_digest(item["image"]) for item in ShapesDataset(30, 64, seed=7)]
    other_seed = [image_digest(item["image"]) for item in ShapesDataset(30, 64, seed=8)]
    other_split = [image_digest(item["image"]) for item in ShapesDataset(30, 64, seed=7, split="validation")]
    assert first == again
    assert len(set(first) & set(other_seed)) <= 1
    assert len(set(first) & set(other_split)) <= 1
    assert len(set(first)) >= 29


def test_item_depends_only_on_seed_split_and_index():
    dataset = ShapesDataset(20, 32, seed=5)
    forward = [image_digest(dataset[i]["image"]) for i in range(20)]
    backward = [image_digest(dataset[i]["image"]) for i in reversed(range(20))][::-1]
    assert forward == backward
    bigger = ShapesDataset(100, 32, seed=5)
    assert [image_digest(bigger[i]["image"]) for i in range(20)] == forward
    assert dataset[-1]["caption"] == dataset[19]["caption"]
    with pytest.raises(IndexError):
        dataset[20]


def test_every_pixel_is_background_or_exact_palette_colour(samples):
    allowed = {tuple(BACKGROUND)} | {tuple(rgb) for rgb in COLORS.values()}
    for _, item in samples:
        pixels = np.asarray(item["image"]).reshape(-1, 3)
        assert {tuple(p) for p in np.unique(pixels, axis=0)} <= allowed


def test_object_pixels_lie_in_their_box_with_the_named_colour(samples):
    for resolution, item in samples:
        image = np.asarray(item["image"])
        assert image.shape == (resolution, resolution, 3)
        objects = item["objects"]
        assert [(o.kind, o.color) for o in objects] == [(o.kind, o.color) for o in item["scene"].objects]
        covered = np.zeros(image.shape[:2], dtype=bool)
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= resolution and 0 <= y0 < y1 <= resolution
            inside = (image[y0:y1, x0:x1] == PALETTE[obj.color]).all(-1)
            rows, cols = np.nonzero(inside)
            # The box is tight: the named colour touches all four of its sides.
            assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == (0, 0, y1 - y0, x1 - x0)
            assert not covered[y0:y1, x0:x1].any(), "boxes of two objects overlap"
            covered[y0:y1, x0:x1] = True
        foreground = (image != np.array(BACKGROUND, dtype=np.uint8)).any(-1)
        assert not (foreground & ~covered).any(), "an object pixel lies outside every box"


def test_objects_are_separate_connected_components(samples):
    """What the evaluation's detector relies on: one 8-connected component per object."""
    for _, item in samples:
        foreground = (np.asarray(item["image"]) != np.array(BACKGROUND, dtype=np.uint8)).any(-1)
        _, count = ndimage.label(foreground, structure=np.ones((3, 3)))
        assert count == len(item["objects"]), item["caption"]


def test_caption_round_trips_through_parse_caption(samples):
    for _, item in samples:
        scene = item["scene"]
        parsed = parse_caption(scene.caption)
        assert parsed["category"] == scene.category
        assert parsed["count"] == len(scene.objects)
        assert parsed["relation"] == scene.relation
        kinds = [obj.kind for obj in scene.objects]
        if scene.category == "counting":
            assert parsed["kinds"] == kinds[:1] and set(kinds) == {kinds[0]}
            assert scene.caption.split()[0] == NUMBERS[len(kinds) - 1]
            assert scene.caption.split()[1] == (kinds[0] if len(kinds) == 1 else PLURALS[kinds[0]])
        else:
            assert parsed["kinds"] == kinds
        if scene.colors_in_caption:
            assert parsed["colors"] == [obj.color for obj in scene.objects]
        else:
            assert parsed["colors"] == [None] * len(parsed["kinds"])
        if scene.category in ("two_objects", "color_attribution", "position"):
            assert kinds[0] != kinds[1]
        if scene.category == "color_attribution":
            assert scene.objects[0].color != scene.objects[1].color
        assert make_caption(scene) == scene.caption


def test_relations_hold_on_the_rendered_boxes(samples):
    seen = set()
    for _, item in samples:
        scene = item["scene"]
        if scene.category != "position":
            continue
        seen.add(scene.relation)
        a, b = item["objects"]
        (ax, ay), (bx, by) = a.center, b.center
        dx, dy = ax - bx, ay - by
        if scene.relation == "left of":
            assert a.box[2] <= b.box[0] and abs(dy) < abs(dx)
        elif scene.relation == "right of":
            assert b.box[2] <= a.box[0] and abs(dy) < abs(dx)
        elif scene.relation == "above":
            assert a.box[3] <= b.box[1] and abs(dx) < abs(dy)
        else:
            assert b.box[3] <= a.box[1] and abs(dx) < abs(dy)
    assert seen == set(RELATIONS)


def test_coverage_of_categories_kinds_colours_and_counts(samples):
    scenes = [item["scene"] for _, item in samples]
    assert {s.category for s in scenes} == set(CATEGORIES)
    assert {o.kind for s in scenes for o in s.objects} == set(OBJECT_KINDS)
    assert {o.color for s in scenes if s.colors_in_caption for o in s.objects} == set(COLORS)
    assert {len(s.objects) for s in scenes if s.category == "counting"} == {1, 2, 3, 4}
    assert len(OBJECT_KINDS) >= 8 and "cat" in OBJECT_KINDS and len(COLORS) >= 8
    sizes = [(o.box[2] - o.box[0]) / r for r, item in samples for o in item["objects"]]
    assert min(sizes) < 0.3 < 0.6 < max(sizes)


def test_one_scene_renders_at_any_resolution():
    scene = sample_scene(scene_rng(0, 4), "position")
    boxes = {}
    for resolution in (32, 64, 128, 48):
        image, objects = render_scene(scene, resolution)
        assert image.size == (resolution, resolution)
        boxes[resolution] = np.array([o.box for o in objects]) / resolution
    for resolution in (32, 64, 48):
        assert np.abs(boxes[resolution] - boxes[128]).max() <= 2 / resolution + 1 / 128
    with pytest.raises(ValueError, match="resolution"):
        render_scene(scene, 8)


def test_cat_has_ears_and_eyes():
    """The cat is a head with two ears (two peaks on its top rows) and two eye holes (background inside it)."""
    scene = Scene("single_object", [SceneObject("cat", "red", (0.1, 0.1, 0.9, 0.9))])
    scene.caption = make_caption(scene)
    for resolution in (32, 64):
        image, (cat,) = render_scene(scene, resolution)
        x0, y0, x1, y1 = cat.box
        mask = (np.asarray(image)[y0:y1, x0:x1] == PALETTE["red"]).all(-1)
        top_row = mask[1]
        runs = np.count_nonzero(np.diff(top_row.astype(int)) == 1) + int(top_row[0])
        assert runs == 2, "expected two ears"
        _, holes = ndimage.label(~mask & ndimage.binary_fill_holes(mask))
        assert holes == 2, "expected two eyes"


def test_parse_caption_rejects_text_outside_the_grammar():
    assert parse_caption("An orange  Cat")["colors"] == ["orange"]
    assert parse_caption("four boxes") == {"category": "counting", "kinds": ["box"], "colors": [None], "count": 4,
                                           "relation": None}
    for caption in ("a dog", "a red cat or a blue house", "five cats", "a cat near a tree", "a teal cat"):
        with pytest.raises(ValueError):
            parse_caption(caption)
    with pytest.raises(ValueError):
        sample_scene(scene_rng(0, 0), "unknown")
    with pytest.raises(ValueError):
        ShapesDataset(4, 32, split="dev")


# ------------------------------------------------------------------------------------------ held-out word orders


def order_captions(category: str) -> list[str]:
    """Every caption of ``category`` ("position": one relation per axis; "color_attribution")."""
    from ldm_pipeline.data.shapes import grammar_caption

    kinds = [(k0, k1) for k0 in OBJECT_KINDS for k1 in OBJECT_KINDS if k0 != k1]
    if category == "position":
        return [grammar_caption(category, [k0, k1], [None, None], relation)
                for k0, k1 in kinds for relation in ("left of", "above")]
    return [grammar_caption(category, [k0, k1], [c0, c1]) for k0, k1 in kinds if k0 < k1
            for c0 in COLORS for c1 in COLORS if c0 != c1]


@pytest.mark.parametrize("category", ["position", "color_attribution"])
def test_held_out_orders_keep_the_reverse_of_every_held_out_caption(category):
    from ldm_pipeline.data.shapes import binding_counterpart, canonical_caption, grammar_caption, is_held_out_order

    captions = order_captions(category)
    for fraction in (0.25, 0.5):
        held_out = {caption for caption in captions if is_held_out_order(caption, fraction, seed=0)}
        assert all(not is_held_out_order(binding_counterpart(caption), fraction, seed=0) for caption in held_out)
        share = len(held_out) / len(captions)
        if fraction == 0.5:  # one member of every pair, exactly
            assert share == 0.5
        else:  # a hash picks the pairs: about a quarter of the meanings
            assert abs(share - fraction) < (0.08 if category == "position" else 0.03), share
    # the same meaning written the other way round is the same member; another seed holds out other orders
    for caption in captions:
        parsed = parse_caption(caption)
        if category == "position":
            inverse = {"left of": "right of", "above": "below"}[parsed["relation"]]
            rewritten = grammar_caption(category, parsed["kinds"][::-1], [None, None], inverse)
        else:  # the other object first
            rewritten = grammar_caption(category, parsed["kinds"][::-1], parsed["colors"][::-1])
        assert canonical_caption(rewritten) == canonical_caption(caption) and rewritten != caption
        assert is_held_out_order(rewritten, 0.25, 0) == is_held_out_order(caption, 0.25, 0)
    assert [is_held_out_order(c, 0.25, 0) for c in captions] != [is_held_out_order(c, 0.25, 1) for c in captions]
    for caption in ("a cat", "a red cat", "two cats", "a cat and a house", "a red cat and a red house",
                    "a cat left of a cat", "a photo of my dog"):
        assert not is_held_out_order(caption, 0.5, 0)
    with pytest.raises(ValueError, match="at most|0.5"):
        is_held_out_order("a cat left of a tree", 0.6)


def test_training_data_with_held_out_orders_never_shows_them_and_keeps_its_categories():
    from ldm_pipeline.data.shapes import is_held_out_order

    plain = ShapesDataset(600, 32, seed=0, categories=("position", "color_attribution", "colors"))
    held = ShapesDataset(600, 32, seed=0, categories=("position", "color_attribution", "colors"), held_out_orders=0.25)
    scenes = [held.scene(i) for i in range(600)]
    assert not any(is_held_out_order(scene.caption, 0.25, 0) for scene in scenes)
    assert sum(is_held_out_order(plain.scene(i).caption, 0.25, 0) for i in range(600)) > 60
    categories = [scene.category for scene in scenes]
    assert [plain.scene(i).category for i in range(600)] == categories, "a redraw keeps its item's category"
    unchanged = [i for i in range(600) if not is_held_out_order(plain.scene(i).caption, 0.25, 0)]
    assert all(plain.scene(i).caption == scenes[i].caption for i in unchanged)
