"""Find objects in an image of the ``shapes`` kind by their pixels alone: plain background, coloured objects.

1. Background: the most frequent colour of the border pixels (colours are binned to ``BIN`` levels per channel,
   the background is the mean of the border pixels in the most frequent bin). A border where fewer than
   ``min_background_fraction`` of the pixels are within ``threshold`` of that colour is not a plain background:
   such an image has no readable objects.
2. Foreground: pixels whose largest channel difference to the background exceeds ``threshold``, minus specks
   (pixels with fewer than 2 of their 8 neighbours in the foreground).
3. Objects: connected components of the foreground (8-connected), minus specks smaller than
   ``min_area_fraction`` of the image.
4. Colour: each object pixel votes for its nearest palette colour (Euclidean RGB); the majority wins. Pixels on
   the object's edge (blended with the background) only vote when nothing else is left.
5. Box: (x0, y0, x1, y1) with x1, y1 exclusive, the convention of ``ldm_pipeline.data.shapes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BIN = 16


@dataclass
class DetectedObject:
    """One connected component: its box (x0, y0, x1, y1, exclusive end), pixel count, colour and kind."""

    box: tuple[int, int, int, int]
    area: int
    color: str
    mask: np.ndarray = field(repr=False)
    kind: str | None = None
    kind_probability: float = 0.0

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


def as_uint8_array(image) -> np.ndarray:
    """PIL image or array -> uint8 array [H, W, 3]."""
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got an array of shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}; convert with PIL or (x * 255).round()")
    return array


def border_pixels(image: np.ndarray) -> np.ndarray:
    """The pixels of the outermost rows and columns, [N, 3]."""
    return np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).reshape(-1, 3)


def estimate_background(image: np.ndarray, threshold: int) -> tuple[np.ndarray, float]:
    """(background RGB as float [3], fraction of border pixels within ``threshold`` of it)."""
    border = border_pixels(image).astype(np.int64)
    bins = border // BIN
    keys = (bins[:, 0] * 256 + bins[:, 1]) * 256 + bins[:, 2]
    values, counts = np.unique(keys, return_counts=True)
    background = border[keys == values[np.argmax(counts)]].mean(axis=0)
    close = np.abs(border - background).max(axis=1) <= threshold
    return background, float(close.mean())


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask: (labels [H, W] with 0 = off and 1..n in raster order, n).

    Same result as ``scipy.ndimage.label`` (connectivity 4 = its default cross, 8 = a full 3x3 structure):
    every pixel takes the smallest raster index among its neighbours, followed by pointer jumping, until stable.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    sentinel = height * width
    labels = np.where(mask, np.arange(sentinel).reshape(height, width), sentinel)
    shifts = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        shifts += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    while True:
        padded = np.pad(labels, 1, constant_values=sentinel)
        smallest = labels
        for dy, dx in shifts:
            smallest = np.minimum(smallest, padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width])
        smallest = np.where(mask, smallest, sentinel)
        jumped = np.append(smallest.ravel(), sentinel)[smallest]
        if np.array_equal(jumped, labels):
            break
        labels = jumped
    roots, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(height, width) + 1
    dense[~mask] = 0
    return dense, int(np.count_nonzero(roots != sentinel))


def remove_specks(mask: np.ndarray, min_neighbours: int = 2) -> np.ndarray:
    """``mask`` without the pixels that have fewer than ``min_neighbours`` of their 8 neighbours on: drops the
    isolated specks and pairs that pixel noise adds (on the background or stuck to an object's edge). Never turns
    a pixel on, so objects that are apart stay apart."""
    padded = np.pad(mask, 1, constant_values=False).astype(np.int8)
    height, width = mask.shape
    neighbours = sum(padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)) - mask
    return mask & (neighbours >= min_neighbours)


def erode(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` whose four neighbours are all in ``mask``."""
    padded = np.pad(mask, 1, constant_values=False)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def box_iou(a, b) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1), exclusive ends."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    intersection = width * height
    return intersection / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection)


def read_color(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    """Majority vote of the nearest palette colour of each pixel [N, 3]."""
    names = list(palette)
    colors = np.array([palette[name] for name in names], dtype=np.float64)
    distances = ((pixels[:, None, :].astype(np.float64) - colors[None]) ** 2).sum(-1)
    votes = np.bincount(distances.argmin(axis=1), minlength=len(names))
    return names[int(votes.argmax())]


class ObjectDetector:
    """Detect objects (box, area, colour, mask) on a plain background; see the module docstring.

    Args:
        palette: colour name -> RGB, normally ``ldm_pipeline.data.shapes.COLORS``.
        threshold: largest per-channel difference (0-255) from the background that still counts as background.
        min_area_fraction: components smaller than this fraction of the image are specks and dropped.
        min_background_fraction: share of border pixels that must match the background colour.
        smooth: clean the foreground mask with `remove_specks` (robust to pixel noise of generated images).
    """

    def __init__(
        self,
        palette: dict[str, tuple[int, int, int]],
        threshold: int = 48,
        min_area_fraction: float = 0.004,
        min_background_fraction: float = 0.5,
        smooth: bool = True,
    ):
        self.palette = dict(palette)
        self.threshold = threshold
        self.min_area_fraction = min_area_fraction
        self.min_background_fraction = min_background_fraction
        self.smooth = smooth

    def foreground(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(background RGB, foreground mask [H, W]) or None when the image has no plain background."""
        background, fraction = estimate_background(image, self.threshold)
        if fraction < self.min_background_fraction:
            return None
        return background, self._threshold(image, background)

    def _threshold(self, image: np.ndarray, background: np.ndarray) -> np.ndarray:
        mask = np.abs(image.astype(np.float64) - background).max(axis=2) > self.threshold
        return remove_specks(mask) if self.smooth else mask

    def foreground_mask(self, image: np.ndarray) -> np.ndarray:
        """Pixels farther than ``threshold`` from the estimated background, plain or not, [H, W] bool."""
        background, _ = estimate_background(image, self.threshold)
        return self._threshold(image, background)

    def __call__(self, image) -> list[DetectedObject]:
        image = as_uint8_array(image)
        found = self.foreground(image)
        if found is None:
            return []
        _, mask = found
        labels, count = label_components(mask)
        min_area = self.min_area_fraction * mask.size
        objects = []
        for label in range(1, count + 1):
            component = labels == label
            area = int(component.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(component)
            inner = erode(component)
            voters = image[inner] if inner.sum() >= max(4, area // 4) else image[component]
            objects.append(
                DetectedObject(
                    box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                    area=area,
                    color=read_color(voters, self.palette),
                    mask=component,
                )
            )
        return objects
