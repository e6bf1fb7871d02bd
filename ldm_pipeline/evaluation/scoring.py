"""GenEval-style prompt-following scores from pixels alone, on the ``shapes`` grammar.

Each image is read by `ObjectDetector` (objects on the plain background, their boxes and palette colours) and
the `ObjectClassifier` (each object's kind from its silhouette; objects named with probability below
``min_kind_probability`` count as nothing, as GenEval drops low-confidence detections). The prompt is parsed by
``ldm_pipeline.data.shapes.parse_caption`` into GenEval's requirements, then judged as GenEval's
``evaluate`` does (objects of a kind are taken most confident first):

    single_object      at least one object of the kind
    two_objects        at least one of each kind
    counting           exactly N objects of the kind
    colors             the (most confident) object of the kind has the colour
    position           both kinds present and ``A RELATION B`` holds for their boxes (GenEval's rule, below)
    color_attribution  the object of each kind has its colour

Relative position (GenEval): with centres c_A, c_B and box sizes d_A, d_B (width, height), the offset
``o = c_A - c_B`` is shrunk by ``0.1 (d_A + d_B)`` towards 0 per axis and divided by ``|o|``; "left of" holds when
its x is < -0.5, "right of" > 0.5, "above" y < -0.5, "below" y > 0.5.

Each category's score is the fraction of its images judged correct; ``overall`` is the mean of the six.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ldm_pipeline.data.shapes import (
    CATEGORIES,
    COLORS,
    Scene,
    is_held_out_order,
    parse_caption,
    render_scene,
    sample_scene,
)
from ldm_pipeline.evaluation.classifier import ObjectClassifier, crop_mask, load_object_classifier
from ldm_pipeline.evaluation.detector import DetectedObject, ObjectDetector, as_uint8_array, box_iou

POSITION_THRESHOLD = 0.1
PROMPT_STREAM = 1000


@dataclass
class EvalPrompt:
    """One prompt of the evaluation set with the scene it was drawn from (renders give the real reference)."""

    category: str
    prompt: str
    scene: Scene
    index: int


@dataclass
class Judgement:
    """The verdict on one image: correct or not, why, and what was seen."""

    category: str
    prompt: str
    correct: bool
    reason: str
    objects: list[DetectedObject] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        seen = [{"kind": o.kind, "color": o.color, "box": list(o.box), "kind_probability": round(o.kind_probability, 4)}
                for o in self.objects]
        return {"category": self.category, "prompt": self.prompt, "correct": self.correct, "reason": self.reason,
                "objects": seen}


ORDER_CATEGORIES = ("position", "color_attribution")
WORD_ORDERS = ("all", "held_out", "trained")


def make_prompt_set(num_per_category: int, seed: int = 0, categories: Sequence[str] | None = None,
                    word_orders: str = "all", held_out_orders: float = 0.0, data_seed: int = 0) -> list[EvalPrompt]:
    """``num_per_category`` prompts of each of ``categories`` (default all, in `CATEGORIES` order), prompt ``i`` of
    category ``c`` drawn by ``sample_scene(numpy.random.default_rng([seed, 1000 + c, i]), c)``: a stream no dataset
    split uses.

    ``word_orders`` "held_out" keeps only captions whose order training left out (`is_held_out_order` with
    ``held_out_orders`` and ``data_seed``, the training data's settings), "trained" only the others: a prompt
    that does not qualify is drawn again from its stream. Only `ORDER_CATEGORIES` have orders, so these two
    default to them.
    """
    if num_per_category <= 0:
        raise ValueError(f"num_per_category must be positive, got {num_per_category}")
    if word_orders not in WORD_ORDERS:
        raise ValueError(f"word_orders must be one of {WORD_ORDERS}, got {word_orders!r}.")
    if word_orders != "all":
        if not held_out_orders:
            raise ValueError(f"--word_orders {word_orders} needs --shapes_held_out_orders: the fraction of orders "
                             "the training data left out (and its --data_seed).")
        categories = ORDER_CATEGORIES if categories is None else categories
        other = [category for category in categories if category not in ORDER_CATEGORIES]
        if other:
            raise ValueError(f"--word_orders {word_orders}: {', '.join(other)} captions have no word order to hold "
                             f"out; choose --categories among {', '.join(ORDER_CATEGORIES)}.")
    categories = CATEGORIES if categories is None else categories
    unknown = [category for category in categories if category not in CATEGORIES]
    if unknown:
        raise ValueError(f"Unknown categories {unknown}; choose among {', '.join(CATEGORIES)}.")
    prompts = []
    for category in [category for category in CATEGORIES if category in categories]:
        for i in range(num_per_category):
            rng = np.random.default_rng([seed, PROMPT_STREAM + CATEGORIES.index(category), i])
            scene = sample_scene(rng, category)
            while word_orders != "all" and is_held_out_order(scene.caption, held_out_orders, data_seed) != (
                    word_orders == "held_out"):
                scene = sample_scene(rng, category)
            prompts.append(EvalPrompt(category, scene.caption, scene, i))
    return prompts


def render_prompt_set(prompts: list[EvalPrompt], resolution: int) -> list:
    """The real images: each prompt's scene rendered at ``resolution``."""
    return [render_scene(prompt.scene, resolution)[0] for prompt in prompts]


def relative_position(box_a, box_b) -> set[str]:
    """GenEval's relations of box A to box B (see the module docstring); boxes are (x0, y0, x1, y1)."""
    boxes = np.array([box_a, box_b], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=1)
    size_a, size_b = boxes[:, 1] - boxes[:, 0]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def requirements(caption: str) -> tuple[str, list[dict], list[dict]]:
    """GenEval metadata of a caption: (category, include, exclude), include items {"kind", "count"[, "color"]
    [, "position": (relation, index of the include item it refers to)]}."""
    parsed = parse_caption(caption)
    category, kinds, colors = parsed["category"], parsed["kinds"], parsed["colors"]
    if category == "counting":
        return category, [{"kind": kinds[0], "count": parsed["count"]}], [{"kind": kinds[0], "count": parsed["count"] + 1}]
    if category == "position":
        return category, [{"kind": kinds[1], "count": 1}, {"kind": kinds[0], "count": 1,
                                                           "position": (parsed["relation"], 0)}], []
    include = []
    for kind, color in zip(kinds, colors):
        include.append({"kind": kind, "count": 1} | ({"color": color} if color is not None else {}))
    return category, include, []


def judge(objects: list[DetectedObject], caption: str) -> tuple[bool, str]:
    """GenEval's ``evaluate`` on detected (and classified) objects: (correct, reason when not)."""
    _, include, exclude = requirements(caption)
    by_kind = defaultdict(list)
    for obj in sorted(objects, key=lambda o: -o.kind_probability):
        if obj.kind is not None:
            by_kind[obj.kind].append(obj)
    correct, reasons, matched_groups = True, [], []
    for item in include:
        kind, count = item["kind"], item["count"]
        found = by_kind[kind][:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {kind}>={count}, found {len(found)}")
        else:
            if "color" in item:
                colors = [obj.color for obj in found]
                if colors.count(item["color"]) < count:
                    matched = False
                    reasons.append(f"expected {item['color']} {kind}, found {' '.join(colors)} {kind}")
            if "position" in item and matched:
                relation, target = item["position"]
                if matched_groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {kind} {relation}")
                else:
                    for obj in found:
                        for target_obj in matched_groups[target]:
                            seen = relative_position(obj.box, target_obj.box)
                            if relation not in seen:
                                matched = False
                                reasons.append(f"expected {kind} {relation} target, found {sorted(seen) or 'overlap'}")
                                break
                        if not matched:
                            break
        correct &= matched
        matched_groups.append(found if matched else None)
    for item in exclude:
        if len(by_kind[item["kind"]]) >= item["count"]:
            correct = False
            reasons.append(f"expected {item['kind']}<{item['count']}, found {len(by_kind[item['kind']])}")
    return correct, "; ".join(reasons)


class GenEvalScorer:
    """Detect, classify and judge images against ``shapes`` captions (see the module docstring)."""

    def __init__(self, classifier: ObjectClassifier | None = None, detector: ObjectDetector | None = None,
                 min_kind_probability: float = 0.5):
        self.classifier = classifier if classifier is not None else load_object_classifier()
        self.detector = detector if detector is not None else ObjectDetector(COLORS)
        self.min_kind_probability = min_kind_probability

    def detect(self, image) -> list[DetectedObject]:
        """The objects of ``image`` with ``kind`` set (None below ``min_kind_probability``)."""
        objects = self.detector(image)
        if not objects:
            return objects
        size = self.classifier.config.crop_size
        crops = np.stack([crop_mask(obj.mask, obj.box, size) for obj in objects])
        kinds, probabilities = self.classifier.predict(crops)
        for obj, kind, probability in zip(objects, kinds, probabilities):
            obj.kind_probability = float(probability)
            obj.kind = kind if probability >= self.min_kind_probability else None
        return objects

    def judge(self, image, caption: str) -> Judgement:
        objects = self.detect(image)
        correct, reason = judge(objects, caption)
        return Judgement(parse_caption(caption)["category"], caption, correct, reason, objects)

    def score(self, images, captions) -> tuple[dict[str, float], list[Judgement]]:
        """({category: fraction correct, ..., "overall": mean over the categories present}, judgements)."""
        if len(images) != len(captions):
            raise ValueError(f"got {len(images)} images for {len(captions)} captions")
        judgements = [self.judge(image, caption) for image, caption in zip(images, captions)]
        return summarize(judgements), judgements

    @torch.no_grad()
    def image_features(self, images) -> np.ndarray:
        """FID features of whole images [N, feature_dim]: the classifier's ``features`` of each image's foreground
        mask (pixels differing from the estimated background by more than the detector's threshold), resized to
        the crop size like an object crop."""
        size = self.classifier.config.crop_size
        crops = []
        for image in images:
            array = as_uint8_array(image)
            mask = self.detector.foreground_mask(array)
            crops.append(crop_mask(mask, (0, 0, array.shape[1], array.shape[0]), size))
        return self.classifier.embed(np.stack(crops))


def classifier_accuracy(scorer: GenEvalScorer, scenes: list[Scene], resolution: int) -> tuple[float, int]:
    """(fraction of rendered objects whose detection, IoU >= 0.5 with the true box, gets the true kind; number of
    objects) over ``scenes`` rendered at ``resolution``. An object not detected counts as wrong."""
    hits = []
    for scene in scenes:
        image, rendered = render_scene(scene, resolution)
        found = scorer.detect(image)
        for obj in rendered:
            ious = [box_iou(f.box, obj.box) for f in found]
            match = found[int(np.argmax(ious))] if ious and max(ious) >= 0.5 else None
            hits.append(match is not None and match.kind == obj.kind)
    return (float(np.mean(hits)) if hits else 0.0), len(hits)


def summarize(judgements: list[Judgement]) -> dict[str, float]:
    """Fraction correct per category (in `CATEGORIES` order, those present) and their mean as "overall"."""
    scores = {}
    for category in CATEGORIES:
        verdicts = [j.correct for j in judgements if j.category == category]
        if verdicts:
            scores[category] = float(np.mean(verdicts))
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else 0.0
    return scores
