"""Frechet distances between sets of image features: the kind classifier's features, and Inception when local.

For two sets of features modelled as Gaussians N(mu_1, S_1) and N(mu_2, S_2) the Frechet distance is

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

``Tr((S_1 S_2)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the symmetric
positive semi-definite matrix ``S_1^(1/2) S_2 S_1^(1/2)`` (it has the same eigenvalues as ``S_1 S_2``), which
needs only ``eigh`` and stays real.

The classifier FID ("fid" in the report) embeds each whole image by the kind classifier's penultimate features
of its foreground mask (``GenEvalScorer.image_features``), as MNIST FIDs use a LeNet. The standard Inception FID
(Heusel et al. 2017, arXiv:1706.08500, eq. 6) uses the 2048-d pool features of the FID Inception-v3 network
(Szegedy et al. 2016, arXiv:1512.00567, as ported from TensorFlow by pytorch-fid), written here in plain torch with
the published layer names, so that a local weights file (``pt_inception-2015-12-05-6726825d.pth`` or a safetensors
copy of it) loads as is. It is never downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048
INCEPTION_HEAD_PREFIXES = ("fc.", "AuxLogits.")  # classifier heads in the weights file; FID uses neither


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


# ------------------------------------------------------------------------------------------------ FID Inception-v3


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, TensorFlow's), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 average pool, stride 1, that ignores the zero padding (TensorFlow's, which the FID weights expect)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """The last two blocks; the FID network pools the first with TensorFlow's average pool and the second with a
    3x3 max pool (``pool="max"``), as the TensorFlow graph the weights come from does."""

    def __init__(self, in_channels: int, pool: str = "avg"):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.pool == "max" else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 up to its 2048-d average pool (pytorch-fid's block 3), with the layer names of the
    ``pt_inception-2015-12-05`` weights: images ``[N, 3, H, W]`` in [0, 1] are resized bilinearly to 299 x 299,
    mapped to [-1, 1] and embedded as ``[N, 2048]``."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 64, 73, 73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 192, 35, 35]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # [N, 2048, 8, 8] after Mixed_7c
        return x.mean(dim=(2, 3))  # [N, 2048]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth`` file read with ``weights_only=True`` (no code runs)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError("it does not hold a flat dictionary of tensors (a state dict)")
    return state_dict


def load_fid_inception(weights_path: str | Path, device: str | torch.device | None = None) -> FIDInceptionV3:
    """``FIDInceptionV3`` in eval mode on ``device`` (default: CUDA if available) with the weights of
    ``weights_path``; the classifier heads (``fc.*``,
    ``AuxLogits.*``) and ``num_batches_tracked`` counters are ignored, every other tensor must be there with its
    shape. A missing or unreadable file, or another layout, raises ``ValueError``/``FileNotFoundError`` naming it."""
    path = Path(weights_path).expanduser()
    expected = "the FID Inception weights of pytorch-fid (pt_inception-2015-12-05-6726825d.pth) or a safetensors copy"
    if not path.is_file():
        raise FileNotFoundError(f"--inception_weights {path}: no such file; pass a local copy of {expected}.")
    try:
        state_dict = read_state_dict(path)
    except Exception as error:  # torch and safetensors raise many types for a damaged or foreign file
        raise ValueError(f"--inception_weights {path} cannot be read ({error}); pass {expected}.") from error
    state_dict = {
        key: value for key, value in state_dict.items()
        if not key.startswith(INCEPTION_HEAD_PREFIXES) and not key.endswith("num_batches_tracked")
    }
    model = FIDInceptionV3()
    expected_shapes = {key: value.shape for key, value in model.state_dict().items()
                       if not key.endswith("num_batches_tracked")}
    missing = sorted(set(expected_shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected_shapes))
    wrong_shape = sorted(key for key in set(expected_shapes) & set(state_dict)
                         if tuple(state_dict[key].shape) != tuple(expected_shapes[key]))
    if missing or unexpected or wrong_shape:
        problems = [f"{label} {len(keys)} tensors (e.g. {keys[0]})"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape of", wrong_shape))
                    if keys]
        raise ValueError(f"--inception_weights {path} is not in the FID Inception layout: {'; '.join(problems)}. "
                         f"Pass {expected}.")
    model.load_state_dict(state_dict, strict=False)
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


@torch.no_grad()
def inception_features(model: FIDInceptionV3, images: Iterable[Image.Image], batch_size: int = 16) -> np.ndarray:
    """Pool features ``[N, 2048]`` (float64) of RGB images, read as uint8 / 255 as pytorch-fid does."""
    images = list(images)
    device = next(model.parameters()).device
    features = []
    for first in range(0, len(images), batch_size):
        batch = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in
                          images[first : first + batch_size]])
        pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)  # [B, 3, H, W] in [0, 1]
        features.append(model(pixels).double().cpu().numpy())
    return np.concatenate(features)


def inception_fid(model: FIDInceptionV3, images: list[Image.Image], reference: list[Image.Image]) -> float:
    """The Inception FID: the Frechet distance between the pool features of ``images`` and of ``reference``."""
    return frechet_distance_of_features(inception_features(model, images), inception_features(model, reference))


INCEPTION_FID_NOT_REQUESTED = (
    "Inception FID not computed: pass --inception_weights PATH to a local copy of the FID Inception weights "
    "(pt_inception-2015-12-05-6726825d.pth); they are never downloaded."
)
