"""The object-kind classifier: a small CNN that names the kind of one detected object from its silhouette.

Input: the object's connected-component mask (see `detector.py`), cut out of its box padded to a square, resized
to ``crop_size`` x ``crop_size`` (bilinear, antialiased), values in [0, 1]; colour and background play no part.
Output: logits over ``kinds`` (``ldm_pipeline.data.shapes.OBJECT_KINDS``). Its penultimate activations
(``features``) are the feature space of the classifier FID, as MNIST FIDs use a LeNet.

The weights shipped in ``weights/`` are trained by ``python -m ldm_pipeline.evaluation.train_classifier``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn

from ldm_pipeline.data.shapes import OBJECT_KINDS

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_NAME = "object_classifier.safetensors"
CONFIG_NAME = "object_classifier.json"


def square_box(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The square of side ``max(w, h)`` centred on ``box`` (x0, y0, x1, y1, exclusive end); may leave the image."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    left, top = x0 - (side - (x1 - x0)) // 2, y0 - (side - (y1 - y0)) // 2
    return left, top, left + side, top + side


def crop_mask(mask: np.ndarray, box: tuple[int, int, int, int], crop_size: int = 32) -> np.ndarray:
    """``mask`` [H, W] (bool) inside ``square_box(box)``, zero-padded outside the image, resized -> float32
    [crop_size, crop_size] in [0, 1]."""
    x0, y0, x1, y1 = square_box(box)
    height, width = mask.shape
    side = x1 - x0
    canvas = np.zeros((side, side), dtype=np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = mask[sy0:sy1, sx0:sx1] * 255
    resized = Image.fromarray(canvas).resize((crop_size, crop_size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


class ObjectClassifier(ModelMixin, ConfigMixin):
    """Conv(3x3)-BN-ReLU-MaxPool blocks, global average pool, a ``feature_dim`` hidden layer, then kind logits.

    ``features(x)`` is the hidden layer (after ReLU): the FID feature space.
    """

    config_name = CONFIG_NAME

    @register_to_config
    def __init__(
        self,
        kinds: tuple[str, ...] = OBJECT_KINDS,
        crop_size: int = 32,
        block_channels: tuple[int, ...] = (16, 32, 64),
        feature_dim: int = 64,
    ):
        super().__init__()
        layers, in_channels = [], 1
        for channels in block_channels:
            layers += [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU(), nn.MaxPool2d(2)]
            in_channels = channels
        self.trunk = nn.Sequential(*layers)
        spatial = crop_size // 2 ** len(block_channels)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * spatial * spatial, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, len(kinds))

    def features(self, crops: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] crops in [0, 1] -> [B, feature_dim]."""
        size = self.config.crop_size
        if crops.ndim != 4 or crops.shape[1:] != (1, size, size):
            raise ValueError(f"expected crops of shape [B, 1, {size}, {size}], got {tuple(crops.shape)}")
        return self.hidden(self.trunk(crops * 2 - 1))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] crops in [0, 1] -> logits [B, len(kinds)]."""
        return self.head(self.features(crops))

    @torch.no_grad()
    def predict(self, crops: np.ndarray | torch.Tensor, batch_size: int = 512) -> tuple[list[str], np.ndarray]:
        """Kinds and their probabilities for crops [B, S, S] or [B, 1, S, S]."""
        probabilities = self._batched(crops, batch_size, lambda x: self(x).softmax(-1))
        if len(probabilities) == 0:
            return [], np.zeros(0)
        kinds = [self.config.kinds[i] for i in probabilities.argmax(axis=1)]
        return kinds, probabilities.max(axis=1)

    @torch.no_grad()
    def embed(self, crops: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
        """``features`` of crops [B, S, S] or [B, 1, S, S] as float64 [B, feature_dim]."""
        return self._batched(crops, batch_size, self.features)

    def _batched(self, crops, batch_size, function) -> np.ndarray:
        crops = torch.as_tensor(np.asarray(crops, dtype=np.float32))
        if crops.ndim == 3:
            crops = crops[:, None]
        was_training = self.training
        self.eval()
        outputs = [function(crops[i : i + batch_size].to(self.device, self.dtype)).float().cpu()
                   for i in range(0, len(crops), batch_size)]
        self.train(was_training)
        if not outputs:
            return np.zeros((0, 0))
        return torch.cat(outputs).double().numpy()


def load_object_classifier(path: str | Path | None = None) -> ObjectClassifier:
    """The classifier saved in ``path`` (default: the weights shipped in the package), in eval mode."""
    directory = Path(path) if path is not None else WEIGHTS_DIR
    if not (directory / WEIGHTS_NAME).is_file() or not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"No object classifier in {directory} (expected {WEIGHTS_NAME} and {CONFIG_NAME}); train it with "
            "`python -m ldm_pipeline.evaluation.train_classifier`."
        )
    from safetensors.torch import load_file

    model = ObjectClassifier.from_config(ObjectClassifier.load_config(directory / CONFIG_NAME))
    model.load_state_dict(load_file(directory / WEIGHTS_NAME))
    return model.eval()


def save_object_classifier(model: ObjectClassifier, path: str | Path) -> None:
    """Write ``object_classifier.safetensors`` and ``object_classifier.json`` into ``path``."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_config(directory)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
