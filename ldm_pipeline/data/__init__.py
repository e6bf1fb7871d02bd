"""Data: the built-in `shapes` dataset and loaders for user datasets."""

from .datasets import (
    StreamingImageCaptionDataset,
    add_data_args,
    build_dataset,
    collate_examples,
    dataset_captions,
    dataset_fingerprint,
    image_to_tensor,
    preprocess_image,
    stream_source,
    tar_shards,
)

from .shapes import (
    BACKGROUND,
    CATEGORIES,
    GENERATOR_VERSION,
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
