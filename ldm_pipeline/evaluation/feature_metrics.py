"""Fidelity and diversity of generated images in a feature space: FID and k-NN precision/recall.

Precision and recall after Kynkäänniemi et al., 2019 (arXiv:1904.06991, Eq. 1-2). The manifold of a feature
set ``Φ`` is the union of balls around each of its points with radius the distance to its k-th nearest
neighbour in ``Φ`` (itself excluded):

    f(φ, Φ) = 1  if  ||φ - φ'||₂ <= ||φ' - NN_k(φ', Φ)||₂  for at least one φ' in Φ,  else 0
    precision(Φ_r, Φ_g) = 1/|Φ_g| Σ_{φ_g} f(φ_g, Φ_r)      (generations that lie on the real manifold)
    recall(Φ_r, Φ_g)    = 1/|Φ_r| Σ_{φ_r} f(φ_r, Φ_g)      (real images that lie on the generated manifold)

The paper uses k = 3. FID is ``ldm_pipeline.evaluation.fid.frechet_distance_of_features`` on the same features.
"""

from __future__ import annotations

import numpy as np

from ldm_pipeline.evaluation.fid import frechet_distance_of_features

DEFAULT_K = 3


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [N, M] between the rows of ``a`` [N, D] and ``b`` [M, D]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(squared, 0, None))


def knn_radii(features: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """[N] distance of each point to its k-th nearest neighbour in ``features``, itself excluded."""
    if not 1 <= k < len(features):
        raise ValueError(f"k={k} needs at least k + 1 = {k + 1} feature vectors, got {len(features)}.")
    distances = pairwise_distances(features, features)
    np.fill_diagonal(distances, np.inf)
    return np.partition(distances, k - 1, axis=1)[:, k - 1]


def manifold_coverage(queries: np.ndarray, support: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
    """[Q] booleans ``f(φ, support)`` of the module docstring, one per row of ``queries``."""
    return (pairwise_distances(queries, support) <= knn_radii(support, k)[None, :]).any(axis=1)


def precision_recall(real_features: np.ndarray, generated_features: np.ndarray, k: int = DEFAULT_K) -> dict:
    """``{"precision", "recall", "k"}`` of the module docstring."""
    return {
        "precision": float(manifold_coverage(generated_features, real_features, k).mean()),
        "recall": float(manifold_coverage(real_features, generated_features, k).mean()),
        "k": k,
    }


def fidelity_and_diversity(real_features: np.ndarray, generated_features: np.ndarray, k: int = DEFAULT_K) -> dict:
    """FID, precision and recall of generated against real features ([N, D] each)."""
    return {"fid": frechet_distance_of_features(generated_features, real_features),
            **precision_recall(real_features, generated_features, k)}
