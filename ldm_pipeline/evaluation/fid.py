"""Frechet distances between sets of image features: the kind classifier's features, and Inception when local.

For two sets of features modelled as Gaussians N(mu_1, S_1) and N(mu_2, S_2) the Frechet distance is

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

``Tr((S_1 S_2)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the symmetric
positive semi-definite matrix ``S_1^(1/2) S_2 S_1^(1/2)`` (it has the same eigenvalues as ``S_1 S_2``), which
needs only ``eigh`` and stays real.

The classifier FID ("fid" in the report) embeds each whole image by the kind classifier's penultimate features
of its foreground mask (``GenEvalScorer.image_features``), as MNIST FIDs use a LeNet. The Inception FID (the standard one) needs the pt_inception weights of
pytorch-fid as a local file and a TorchScript-free re-implementation of that network; this project has
neither, so :func:`inception_fid_unavailable_reason` explains why it is not computed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``features`` [N, D]; N must be at least 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape [N>=2, D], got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mu_1: np.ndarray, sigma_1: np.ndarray, mu_2: np.ndarray, sigma_2: np.ndarray) -> float:
    """d^2 = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^(1/2)); see the module docstring."""
    mu_1, mu_2 = np.asarray(mu_1, np.float64), np.asarray(mu_2, np.float64)
    sigma_1, sigma_2 = np.asarray(sigma_1, np.float64), np.asarray(sigma_2, np.float64)
    if mu_1.shape != mu_2.shape or sigma_1.shape != sigma_2.shape:
        raise ValueError(f"feature dimensions differ: {mu_1.shape} vs {mu_2.shape}")
    sqrt_sigma_1 = _symmetric_sqrt(sigma_1)
    cross = np.linalg.eigvalsh(sqrt_sigma_1 @ sigma_2 @ sqrt_sigma_1)
    trace_sqrt_product = np.sqrt(np.clip(cross, 0, None)).sum()
    distance = np.sum((mu_1 - mu_2) ** 2) + np.trace(sigma_1) + np.trace(sigma_2) - 2 * trace_sqrt_product
    return float(max(distance, 0.0))


def frechet_distance_of_features(features_1: np.ndarray, features_2: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*feature_statistics(features_1), *feature_statistics(features_2))


def inception_fid_unavailable_reason(weights_path: str | Path | None) -> str:
    """Why the Inception FID is not computed (it is never downloaded)."""
    if weights_path is None:
        return "Inception FID not computed: pass --inception_weights PATH to a local pt_inception weights file."
    if not Path(weights_path).is_file():
        return f"Inception FID not computed: --inception_weights {weights_path} is not a file."
    return (
        f"Inception FID not computed: found {weights_path}, but the FID Inception-v3 network definition comes "
        "from torchvision/pytorch-fid, which this project does not depend on; compute it with pytorch-fid on "
        "the saved sample images instead."
    )
