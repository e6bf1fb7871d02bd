"""Memorization: how close each generation is to its nearest training image, against real held-out images.

Somepalli et al., CVPR 2023 (arXiv:2212.03860) search the training set for each generation's nearest neighbour
in a feature space; Carlini et al., 2023 (arXiv:2301.13188) in pixel space. Both spaces are searched here:

    pixels:   d(x, y) = ||x - y||₂ / sqrt(D)           (root-mean-square difference, images in [0, 1])
    features: d(x, y) = 1 - <φ(x), φ(y)> / (||φ(x)|| ||φ(y)||)   (cosine distance of image-tower features)

A nearest distance means little alone, so the rule compares it with real held-out images, which the model never
saw: ``τ`` = the ``percentile``-th percentile (default 5) of the held-out images' nearest-training distances,
and a generation is flagged when its nearest-training distance is ``<= τ``. A model that generalises like held-out
data gets about ``percentile`` % flagged (the held-out rate is reported beside it); a model that reproduces
training images gets far more.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ldm_pipeline.evaluation.feature_metrics import pairwise_distances

SPACES = ("pixels", "features")
DEFAULT_PERCENTILE = 5.0


def rms_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] ``||a_i - b_j||₂ / sqrt(D)`` for flattened images ``a`` [N, D] and ``b`` [M, D]."""
    return pairwise_distances(a, b) / np.sqrt(a.shape[1])


def cosine_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] ``1 - cos(a_i, b_j)``."""
    a = np.asarray(a, np.float64) / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = np.asarray(b, np.float64) / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return 1 - a @ b.T


DISTANCES = {"pixels": rms_distances, "features": cosine_distances}


def nearest_training_images(queries: dict[str, np.ndarray], training_batches: Iterable[tuple[dict, np.ndarray]]
                            ) -> dict[str, dict[str, np.ndarray]]:
    """Nearest training image of every query, in each space, streaming over the training set.

    ``queries[space]`` is [Q, D_space] (``"pixels"``: flattened images in [0, 1]; ``"features"``);
    ``training_batches`` yields ``({space: [B, D_space]}, indices [B])``. Returns, per space, ``"distance"`` [Q]
    and ``"index"`` [Q] (the training index of the nearest image; the first one on ties).
    """
    best = {space: {"distance": np.full(len(query), np.inf), "index": np.full(len(query), -1)}
            for space, query in queries.items()}
    for batch, indices in training_batches:
        for space, query in queries.items():
            distances = DISTANCES[space](query, batch[space])  # [Q, B]
            column = distances.argmin(axis=1)
            closest = distances[np.arange(len(query)), column]
            closer = closest < best[space]["distance"]
            best[space]["distance"][closer] = closest[closer]
            best[space]["index"][closer] = np.asarray(indices)[column[closer]]
    if any((best[space]["index"] < 0).any() for space in best):
        raise ValueError("The training set is empty: memorization needs at least one training image.")
    return best


def memorization_summary(generated: dict, heldout: dict, percentile: float = DEFAULT_PERCENTILE) -> dict:
    """Per space: ``threshold`` τ (the held-out percentile), ``share_generated`` and ``share_heldout`` (the share
    of each set at distance <= τ), the median nearest distances and the boolean ``flags`` of the generations.

    ``generated`` and ``heldout`` are outputs of :func:`nearest_training_images`.
    """
    summary = {}
    for space in generated:
        threshold = float(np.percentile(heldout[space]["distance"], percentile))
        flags = generated[space]["distance"] <= threshold
        summary[space] = {
            "threshold": threshold,
            "share_generated": float(flags.mean()),
            "share_heldout": float((heldout[space]["distance"] <= threshold).mean()),
            "median_distance_generated": float(np.median(generated[space]["distance"])),
            "median_distance_heldout": float(np.median(heldout[space]["distance"])),
            "flags": flags,
        }
    return summary
