"""Data: the built-in `shapes` dataset and loaders for user datasets."""

from .shapes import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    OBJECT_KINDS,
    RenderedObject,
    Scene,
    SceneObject,
    ShapesDataset,
    make_caption,
    parse_caption,
    render_scene,
    sample_scene,
)
