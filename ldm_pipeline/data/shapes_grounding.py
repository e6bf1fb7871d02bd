"""Which words of a shapes caption name which objects, and the objects' masks: the targets of the grounding loss
(``ldm_pipeline.grounding``), free from the renderer.

    "a red star and a green box"  ->  red, star -> object 0;  green, box -> object 1
    "a cat left of a tree"        ->  cat -> object 0;  tree -> object 1
    "three stars"                 ->  stars -> objects 0, 1, 2
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageDraw

from ldm_pipeline.data.shapes import NUMBERS, PLURALS, Scene, _draw_shape, _pixel_box


def grounded_words(scene: Scene) -> list[tuple[int, int, list[int]]]:
    """``(start, end, objects)`` for every word of ``scene.caption`` that names objects: each object's kind word
    and, when the caption names colours, its colour word; the plural of a counting caption names all objects."""
    if scene.category == "counting":
        kind = scene.objects[0].kind
        expected = [(kind if len(scene.objects) == 1 else PLURALS[kind], list(range(len(scene.objects))))]
    else:
        expected = []
        for index, obj in enumerate(scene.objects):
            if scene.colors_in_caption:
                expected.append((obj.color, [index]))
            expected.append((obj.kind, [index]))
    words = []
    for match in re.finditer(r"\S+", scene.caption):
        if expected and match.group() == expected[0][0]:
            words.append((match.start(), match.end(), expected.pop(0)[1]))
    if expected or (scene.category == "counting" and scene.caption.split()[0] not in NUMBERS):
        raise ValueError(f"Caption {scene.caption!r} does not name its scene's objects in order.")
    return words


def object_masks(scene: Scene, resolution: int) -> np.ndarray:
    """The visible pixels of each object as ``render_scene`` draws it: bool [num_objects, resolution, resolution]
    (an object drawn later covers the ones below it)."""
    masks = np.zeros((len(scene.objects), resolution, resolution), dtype=bool)
    for index, obj in enumerate(scene.objects):
        canvas = Image.new("L", (resolution, resolution), 0)
        _draw_shape(ImageDraw.Draw(canvas), obj.kind, _pixel_box(obj.rel_box, resolution))
        masks[index] = np.asarray(canvas) > 0
        masks[:index] &= ~masks[index]
    return masks


def scene_grounding(scene: Scene, resolution: int) -> list[tuple[int, int, np.ndarray]]:
    """``(start, end, mask)`` of each grounded word: its character span and the union of its objects' masks,
    float32 [resolution, resolution] in {0, 1}."""
    masks = object_masks(scene, resolution)
    return [(start, end, masks[objects].any(0).astype(np.float32)) for start, end, objects in grounded_words(scene)]
