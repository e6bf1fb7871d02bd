"""Object masks of user data for the U-Net's grounding loss (``ldm_pipeline.grounding``): a column of an
imagefolder's ``metadata.jsonl`` that maps words of the caption to mask images.

    {"file_name": "0001.png", "text": "a red cat left of a dog",
     "grounding": {"cat": "masks/0001_cat.png", "red": "masks/0001_cat.png", "dog": "masks/0001_dog.png"}}

A mask is any image of the same framing as its image: nonzero pixels are the object. It is cropped and resized
exactly as the image is (``crop_box``), so it lines up with the training image. A word (or phrase) is matched as
a whole word, case-insensitively, at its first occurrence in the caption. Rows without the column train without
the loss; data without the column (or not an imagefolder) trains without it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from .file_checks import check_inside


def read_grounding_column(records: list[tuple[int, dict]], folder: Path, column: str,
                          metadata_path: Path) -> list[dict[str, str] | None] | None:
    """Per metadata row, ``{word: mask file path}`` (None where the row has no masks), every value checked; None
    when no row has the column."""
    if not any(column in record for _, record in records):
        return None
    groundings = []
    for number, record in records:
        value, where = record.get(column), f"{metadata_path} line {number}"
        if value is None:
            groundings.append(None)
            continue
        if not isinstance(value, dict) or not all(isinstance(word, str) and word.strip() and isinstance(path, str)
                                                  and path.strip() for word, path in value.items()):
            raise ValueError(f"{where}: {column!r} must be an object of words of the caption to mask files, "
                             f'e.g. {{"cat": "masks/0001_cat.png"}}; got {value!r}.')
        for path in value.values():
            check_inside(folder, path, where)
        groundings.append({word: str(folder / path) for word, path in value.items()})
    return groundings


def word_span(caption: str, word: str, where: str) -> tuple[int, int]:
    """Character span of the first whole-word, case-insensitive occurrence of ``word`` in ``caption``."""
    match = re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", caption, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"{where}: the grounding word {word!r} is not a word of the caption {caption!r}: name words "
                         "of the caption (or fix the caption).")
    return match.span()


def load_mask(path: str, resolution: int, where: str) -> np.ndarray:
    """The mask image at ``path`` as the training image sees it: nonzero pixels = 1, centre crop and resize of
    ``crop_box`` (area average), float32 [resolution, resolution] in [0, 1]."""
    from .datasets import crop_box  # the images' own framing

    try:
        with Image.open(path) as image:
            binary = image.convert("L").point(lambda value: 255 if value else 0)
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: cannot read mask {path}: {error}. Fix the file or the 'grounding' entry.") from None
    box = crop_box(*binary.size, resolution)
    resized = binary.resize((resolution, resolution), Image.Resampling.BOX, box=box)
    return np.asarray(resized, dtype=np.float32) / 255


def row_grounding(caption: str, masks: dict[str, str] | None, resolution: int,
                  where: str) -> list[tuple[int, int, np.ndarray]] | None:
    """``(start, end, mask)`` for each word of a row's grounding column (None when the row has none)."""
    if not masks:
        return None
    return [(*word_span(caption, word, where), load_mask(path, resolution, f"{where}, word {word!r}"))
            for word, path in masks.items()]
