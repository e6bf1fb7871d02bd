"""Training data for every stage: the built-in `shapes` data or a user dataset, preprocessed to [-1, 1] tensors.

Sources (first that applies):

- ``--dataset_name NAME [--dataset_config_name CFG]``: ``datasets.load_dataset(NAME, CFG)``.
- ``--train_data_dir DIR``: an ``imagefolder`` (images + ``metadata.jsonl`` or ``metadata.csv`` with a
  ``file_name`` column, optionally in ``train/`` and ``validation/``/``test/`` sub-folders), a folder written
  by ``Dataset.save_to_disk``, or a folder of Parquet / Arrow files.
- ``--train_data_dir DIR`` of WebDataset tar shards (``DIR/*.tar``, or ``DIR/train/*.tar`` and
  ``DIR/validation/*.tar``): each sample is ``KEY.jpg|jpeg|png|webp`` with ``KEY.txt`` (the caption) or ``KEY.json``
  (the caption under ``caption_column``), read with ``datasets``' ``webdataset`` builder.
- ``--streaming``: tar shards, Parquet/Arrow files or a Hub dataset read as a ``datasets.IterableDataset``
  (`StreamingImageCaptionDataset`); ``StageTrainer.dataloader`` shuffles it and splits it across processes.
- neither: the built-in `shapes` data (`ldm_pipeline.data.shapes`); validation is a disjoint random stream.

What is held out of user data is the same for every stage and ``ldm-eval`` (``ldm_pipeline.data.split``): the
dataset's own "validation" (else "test") split, else a held-out slice of ``--num_held_out_samples`` items chosen
with ``data_seed`` (the training split is the rest). Tar shards, and every source with --streaming, hold out whole
shards instead: the last ``num_validation_shards`` data files in name order (the same partition with and without
--streaming). A stage's validation split is the first ``num_validation_samples`` of the held-out items (a streamed
one read into memory); `data_split_record` describes the split for ``OUTPUT_DIR/data_split.json``.

Items are ``{"pixel_values": FloatTensor[3, H, W] in [-1, 1], "caption": str, "index": int}``. Images are read as
a viewer shows them (`to_rgb`: EXIF orientation, 16-bit grey scaled to 8 bits, transparency on white), then the
square that resizing the shorter side to ``resolution`` and centre-cropping (or cropping at random with
--random_crop) would keep is resized (bicubic; `preprocess_image`).

User data is not opened up front: an unreadable image is found when its item is read and stops the run with an
error naming the file and metadata row, or with --skip_bad_images is replaced by the next readable row and
counted (`ImageCaptionDataset`). Metadata that cannot be read (not UTF-8, a line that is not a JSON object, a
row without a file name) is an error naming the file and line; a row without a caption is an error naming it,
or left out with --skip_bad_images.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from ldm_pipeline.config import DataConfig, add_dataclass_arguments, config_hash

from . import shapes
from .grounding_column import read_grounding_column, row_grounding
from .shapes_grounding import scene_grounding
from .split import HELD_OUT_FILES, HELD_OUT_SLICE, OWN_SPLIT, SHAPES, held_out_rows, split_record
from .file_checks import check_inside, check_one_layout, check_tar_shards, file_identity, load_local_dataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
VALIDATION_SPLITS = ("validation", "test")
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
PREPROCESSING_VERSION = 2  # part of the data fingerprint: caches of user data made before it are recomputed


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one flag per ``DataConfig`` field, with its default, to a command's parser; the parsed namespace
    becomes a ``DataConfig`` with ``ldm_pipeline.config.data_config_from_args``."""
    add_dataclass_arguments(parser, DataConfig, "data", with_defaults=True)
    return parser


def _check_split(split: str) -> None:
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation' (got {split!r}).")


# --------------------------------------------------------------------------------------------- preprocessing

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB as a viewer shows it; the input image is not changed.

    - EXIF orientation is applied (`PIL.ImageOps.exif_transpose`): a photo taken sideways trains upright.
    - 16-bit and 32-bit grey levels are scaled to 8 bits (`to_8_bit`), not clipped.
    - Transparent pixels (RGBA, LA, P or L/RGB with a transparent colour) are composited on white:
      ``c' = a c + (1 - a) 255`` with alpha ``a`` in [0, 1] (Porter & Duff, 1984, "over").
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) not in (None, 1):
        image = ImageOps.exif_transpose(image)
    if image.mode in HIGH_BIT_DEPTH_MODES:
        image = to_8_bit(image)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_8_bit(image: Image.Image) -> Image.Image:
    """A grey image of 16 or 32 bits -> mode "L" with ``round(v * 255 / v_max)``.

    ``v_max`` is 65535 for the integer modes (``I;16*``: 16-bit PNG and TIFF; ``I``: 16-bit PNG in older Pillow)
    and 1 for floating point (``F``). Values outside ``[0, v_max]`` have no agreed meaning: ValueError.
    """
    values = np.asarray(image, dtype=np.float64)
    v_max = 1.0 if image.mode == "F" else 65535.0
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= v_max):
        raise ValueError(f"its {image.mode!r} grey levels span [{values.min():g}, {values.max():g}], outside "
                         f"[0, {v_max:g}]; save it as an 8-bit or 16-bit image")
    return Image.fromarray(np.rint(values * (255.0 / v_max)).astype(np.uint8), mode="L")


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> FloatTensor[3, H, W] with ``x / 127.5 - 1`` in [-1, 1] (non-RGB images through `to_rgb`)."""
    array = np.array(to_rgb(image) if image.mode != "RGB" else image, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def crop_box(width: int, height: int, resolution: int, random_crop: bool = False) -> tuple[float, ...]:
    """The region ``(left, top, right, bottom)`` of a ``width`` x ``height`` image that becomes the training image.

    It is the square that resizing the shorter side to ``resolution`` and then cropping ``resolution`` x
    ``resolution`` (centred, or at a random offset) would keep, in the original image's coordinates: the resized
    size is ``(W, H) = (max(r, round(w s)), max(r, round(h s)))`` with ``s = r / min(w, h)``, the offset
    ``(x, y)`` is drawn in ``[0, W - r] x [0, H - r]`` (or centred) and the box is ``(x w / W, y h / H,
    (x + r) w / W, (y + r) h / H)``. Resizing only this box gives the same pixels (to rounding) without ever
    holding the resized full image, whatever the aspect ratio.
    """
    scale = resolution / min(width, height)
    resized_width, resized_height = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if random_crop:
        left = int(torch.randint(0, resized_width - resolution + 1, ()).item())
        top = int(torch.randint(0, resized_height - resolution + 1, ()).item())
    else:
        left, top = (resized_width - resolution) // 2, (resized_height - resolution) // 2
    x_scale, y_scale = width / resized_width, height / resized_height
    return (left * x_scale, top * y_scale, (left + resolution) * x_scale, (top + resolution) * y_scale)


def preprocess_image(image: Image.Image, resolution: int, random_crop: bool = False,
                     random_flip: bool = False) -> torch.Tensor:
    """`to_rgb`, then the ``resolution`` x ``resolution`` square of `crop_box` resized (bicubic), optionally flipped.

    The result is that of resizing the shorter side to ``resolution`` and cropping, but only the kept square is
    resampled, so a 1 x 100000 image costs no more than a square one. Randomness (crop offset, flip) comes from
    torch's global generator, seeded per DataLoader worker. Flipping is off by default because the mirror image
    of "a cat left of a tree" is "a cat right of a tree".
    """
    image = to_rgb(image)
    box = crop_box(*image.size, resolution, random_crop)
    if box[2] - box[0] == resolution and box[3] - box[1] == resolution:
        image = image.crop(tuple(round(edge) for edge in box))
    else:
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
    pixels = image_to_tensor(image)
    if random_flip and torch.rand(()) < 0.5:
        pixels = pixels.flip(-1)
    return pixels


def collate_examples(items: list[dict]) -> dict:
    """Stack items into ``{"pixel_values": [B, 3, H, W], "captions": list[str], "index": LongTensor[B]}``, and
    ``"groundings"`` (each item's list of ``(start, end, mask)``, or None) when any item has one."""
    batch = {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]).contiguous(),
        "captions": [item["caption"] for item in items],
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }
    if any("grounding" in item for item in items):
        batch["groundings"] = [item.get("grounding") for item in items]
    return batch


# --------------------------------------------------------------------------------------------- datasets

class ShapesTrainingDataset(torch.utils.data.Dataset):
    """The built-in shapes data as training items; each image is rendered on access (no cache needed)."""

    def __init__(self, num_samples: int, resolution: int, seed: int, split: str, random_flip: bool = False,
                 categories: Sequence[str] | None = None, held_out_orders: float = 0.0, grounding: bool = False):
        self.shapes = shapes.ShapesDataset(num_samples, resolution, seed=seed, split=split, categories=categories,
                                           held_out_orders=held_out_orders)
        self.random_flip = random_flip
        self.grounding = grounding  # items carry each object word's span and mask (``shapes_grounding``)

    @property
    def has_masks(self) -> bool:
        """Whether items carry object masks (``"grounding"``) for the grounding loss."""
        return self.grounding

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> dict:
        scene = self.shapes.scene(index)
        image, _ = shapes.render_scene(scene, self.shapes.resolution)
        pixels = image_to_tensor(image)
        flip = self.random_flip and torch.rand(()) < 0.5
        if flip:
            pixels = pixels.flip(-1)
        item = {"pixel_values": pixels, "caption": scene.caption, "index": index}
        if self.grounding:
            item["grounding"] = [(start, end, mask[:, ::-1].copy() if flip else mask)
                                 for start, end, mask in scene_grounding(scene, self.shapes.resolution)]
        return item


class ImageCaptionDataset(torch.utils.data.Dataset):
    """User data: item ``i`` is the image ``images.get(rows[i])`` captioned ``captions[rows[i]]``.

    ``images`` is a `_FolderImages` or `_ColumnImages`: images are read on access, nothing is held in memory.
    Nothing is opened up front: a bad image is found where it is decoded, in ``__getitem__``. Without
    ``skip_bad_images`` it stops the run with a ValueError naming the file and row. With it, the item is that of
    the next readable row (in ``rows`` order, wrapping around): a replacement that depends on the files alone, so
    batches keep their size and a resumed run draws the same items. Rows without a caption (missing or null)
    are an error naming the row, or with ``skip_bad_images`` are left out up front.

    Counting: ``skipped_images`` is the number of distinct rows found unreadable so far. The flags live in a
    shared-memory tensor, so DataLoader workers (forked or spawned) mark them for the main process to count; in a
    multi-process (distributed) run every process counts the rows its own items reached. `skipped_summary`
    gives the line a training script prints at the end.
    """

    def __init__(self, images, captions: list[str | None], rows: list[int], resolution: int,
                 random_crop: bool = False, random_flip: bool = False, skip_bad_images: bool = False,
                 groundings: list[dict[str, str] | None] | None = None):
        uncaptioned = [row for row in rows if captions[row] is None]
        if uncaptioned and not skip_bad_images:
            raise ValueError(f"{images.describe(uncaptioned[0])} has no caption (its caption column is missing or "
                             f"null; {len(uncaptioned)} row(s) like it). Add the caption or delete the row, or pass "
                             "--skip_bad_images to leave such rows out.")
        self.images, self.captions = images, captions
        self.rows = [row for row in rows if captions[row] is not None]
        if not self.rows:
            first = f" ({images.describe(rows[0])} is the first)" if rows else ""
            raise ValueError(f"None of the {len(rows)} row(s) has a caption{first}: fill in the caption column.")
        self.uncaptioned_rows = [images.describe(row) for row in uncaptioned]
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip
        self.skip_bad_images = skip_bad_images
        self.groundings = groundings  # per row {word: mask file} (``grounding_column``), or None: no masks read
        self.unreadable = torch.zeros(len(self.rows), dtype=torch.uint8).share_memory_()  # 1: row found unreadable

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def has_masks(self) -> bool:
        """Whether items carry object masks (``"grounding"``, from the data's grounding column)."""
        return self.groundings is not None

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.rows)):
            position = (index + offset) % len(self.rows)
            if self.unreadable[position]:
                continue
            row = self.rows[position]
            name = self.images.describe(row)
            try:
                source, name = self.images.get(row)
                pixels = preprocess_image(_open_image(source, name), self.resolution, self.random_crop,
                                          self.random_flip)
            except Exception as error:  # any failure to decode one user file is that file's fault
                if not self.skip_bad_images:
                    raise ValueError(f"Cannot read image {name}: {error}. Fix or remove the file, or pass "
                                     "--skip_bad_images to skip unreadable images.") from error
                self.unreadable[position] = 1
                logger.warning("Skipping unreadable image %s (--skip_bad_images): %s", name, error)
                continue
            item = {"pixel_values": pixels, "caption": self.captions[row], "index": index}
            if self.groundings is not None:
                item["grounding"] = row_grounding(self.captions[row], self.groundings[row], self.resolution, name)
            return item
        raise ValueError(f"None of the {len(self.rows)} images is readable (the first is "
                         f"{self._name(self.rows[0])}); check the image files.")

    @property
    def skipped_images(self) -> int:
        """How many distinct rows' images were found unreadable and replaced so far."""
        return int(self.unreadable.sum())

    def skipped_image_names(self) -> list[str]:
        return [self._name(self.rows[position]) for position in self.unreadable.nonzero().flatten().tolist()]

    def _name(self, row: int) -> str:
        try:
            return self.images.get(row)[1]
        except ValueError:
            return self.images.describe(row)

    def skipped_summary(self) -> str | None:
        """One line on what --skip_bad_images left out (None when nothing was), for the end of a run."""
        parts = []
        if self.skipped_images:
            names = self.skipped_image_names()
            parts.append(f"{len(names)} unreadable image(s) replaced by the next readable row: "
                         f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
        if self.uncaptioned_rows:
            rows = self.uncaptioned_rows
            parts.append(f"{len(rows)} row(s) without a caption left out: "
                         f"{', '.join(rows[:5])}{' ...' if len(rows) > 5 else ''}")
        return f"Skipped (--skip_bad_images) {'; '.join(parts)}." if parts else None


class _FolderImages:
    """Image files of an imagefolder, by row; ``locations[row]`` is its metadata line ("DIR/metadata.jsonl line 3")."""

    def __init__(self, paths: list[str], locations: list[str]):
        self.paths, self.locations = paths, locations

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, row: int) -> str:
        return self.locations[row]

    def get(self, row: int):
        return self.paths[row], f"{self.paths[row]} ({self.locations[row]})"


class _ColumnImages:
    """The image column of a `datasets.Dataset` (undecoded), by row."""

    def __init__(self, dataset, column: str, base_dir: Path | None, where: str):
        import datasets

        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset = dataset.select_columns([column])
        self.column, self.base_dir, self.where = column, base_dir, where

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self, row: int) -> str:
        return f"{self.where}, row {row}"

    def get(self, row: int):
        source, name = _image_source(self.dataset[row][self.column], self.base_dir)
        return source, f"{name} ({self.describe(row)})"


def _open_image(source, name: str = "image") -> Image.Image:
    """A PIL image from a `_image_source` source (a path, bytes or an image), fully decoded.

    Files larger than ``PIL.Image.MAX_IMAGE_PIXELS`` (Pillow's decompression-bomb guard) are a ValueError, also
    between one and two times the limit, where Pillow only warns.
    """
    if isinstance(source, Image.Image):
        return source
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise ValueError(f"{name} has more pixels than PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} "
                             f"(a guard against decompression bombs: {error}); downscale it") from None
    image.load()
    return image


def _image_source(value, base_dir: Path | None):
    """A column value (PIL image, {"bytes", "path"} dict, raw bytes or a path) -> (source, display name)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"], value.get("path") or "<bytes>"
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, Image.Image)):
        return value, "<in-memory image>"
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return str(path), str(path)
    raise ValueError(f"Unsupported image value of type {type(value).__name__}; expected an image, bytes or a path.")


def _check_columns(columns: list[str], image_column: str, caption_column: str, where: str) -> None:
    for role, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise ValueError(f"Column {column!r} ({role}) not found in {where}; its columns are {sorted(columns)}. "
                             f"Pass {role} with one of them.")


def _caption(value, where: str) -> str | None:
    """A caption cell -> str, None when missing or null (left to the dataset: error or --skip_bad_images)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: the caption is a {type(value).__name__} ({str(value)[:60]}); a caption must be "
                     "one string. Keep one caption per row.")


def _read_text(path: Path) -> str:
    """The text of a UTF-8 file (a byte-order mark, as Excel writes, is dropped); other encodings: ValueError."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line} is not UTF-8 (byte 0x{data[error.start]:02x}): save it as UTF-8 "
                         "(in Excel: Save As 'CSV UTF-8'), e.g. iconv -f latin1 -t utf-8.") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    records = []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not valid JSON ({error.msg} at column {error.colno}): each "
                             'line must be one JSON object, e.g. {"file_name": "a.png", "text": "a cat"}.') from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} is a JSON {type(record).__name__}, not an object: each line "
                             'must be one JSON object, e.g. {"file_name": "a.png", "text": "a cat"}.')
        records.append((number, record))
    return records


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    records = []
    try:
        for record in reader:
            if None in record:
                raise ValueError(f"{path} line {reader.line_num} has {len(reader.fieldnames) + len(record[None])} "
                                 f"fields but the header has {len(reader.fieldnames)}: put values that contain "
                                 'commas in double quotes ("a cat, a dog").')
            records.append((reader.line_num, record))
    except csv.Error as error:
        raise ValueError(f"{path} line {reader.line_num} is not valid CSV ({error}).") from None
    return records


def _read_metadata(folder: Path) -> tuple[Path, list[tuple[int, dict]]]:
    """(metadata path, [(line number, row)]) of an imagefolder; a row that cannot be read: ValueError naming it."""
    if all((folder / name).is_file() for name in METADATA_FILES):
        raise ValueError(f"{folder} has both {' and '.join(METADATA_FILES)}; only one of them would be read. Keep one "
                         "(with every row in it) and delete the other.")
    for name in METADATA_FILES:
        path = folder / name
        if path.is_file():
            records = _read_jsonl(path) if name.endswith(".jsonl") else _read_csv(path)
            if not records:
                raise ValueError(f"{path} has no rows: add one per image with its 'file_name' and caption.")
            return path, records
    raise FileNotFoundError(f"No metadata.jsonl or metadata.csv in {folder}: an imagefolder needs one with a "
                            "'file_name' column and a caption column.")


def _imagefolder_records(folder: Path, image_column: str, caption_column: str):
    """(`_FolderImages`, captions) of an imagefolder. Its image column is ``file_name`` (called "image", as in
    ``datasets``' imagefolder), or ``image_column`` when the metadata has a column of that name. A caption is
    None where the row has none (missing or null); a row without a file name is a ValueError naming its line."""
    path, records = _read_metadata(folder)
    columns = list(dict.fromkeys(key for _, record in records for key in record))
    path_column = image_column if image_column in columns else "file_name"
    visible = columns + (["image"] if "file_name" in columns else [])
    _check_columns(visible, image_column, caption_column, str(path))
    paths, captions, locations = [], [], []
    for number, record in records:
        where = f"{path} line {number}"
        file_name = record.get(path_column)
        if not isinstance(file_name, str) or not file_name.strip():
            raise ValueError(f"{where} has no {path_column!r} (the image file, relative to {folder}): add it or "
                             "delete the line.")
        check_inside(folder, file_name, where)
        paths.append(str(folder / file_name))
        captions.append(_caption(record.get(caption_column), where))
        locations.append(where)
    return _FolderImages(paths, locations), captions


def _split_folders(root: Path) -> dict[str, Path]:
    """``{"train": root}`` or, when ``root`` has split sub-folders with metadata, one folder per split."""
    splits = {}
    for split in ("train",) + VALIDATION_SPLITS:
        sub = root / split
        if sub.is_dir() and any((sub / name).is_file() for name in METADATA_FILES):
            splits.setdefault("validation" if split in VALIDATION_SPLITS else "train", sub)
    if "train" not in splits:
        return {"train": root}
    return splits


def _is_saved_dataset(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def _load_hf_dataset(data: DataConfig):
    """The user's data as a ``datasets.DatasetDict`` (hub name, save_to_disk folder, Parquet or Arrow files)."""
    import datasets

    if data.dataset_name is not None:
        loaded = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
    else:
        root = Path(data.train_data_dir)
        if _is_saved_dataset(root):
            loaded = datasets.load_from_disk(str(root))
        else:
            for builder, extension in (("parquet", ".parquet"), ("arrow", ".arrow")):
                if any(root.rglob(f"*{extension}")):
                    loaded = load_local_dataset(builder, [p for p in root.rglob("*") if p.is_file()],
                                                data_dir=str(root))
                    break
            else:
                raise FileNotFoundError(f"{root} is not a dataset folder: expected metadata.jsonl/metadata.csv "
                                        "(imagefolder), a save_to_disk folder, or Parquet/Arrow files.")
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _column_records(dataset, image_column: str, caption_column: str, where: str, base_dir: Path | None):
    _check_columns(dataset.column_names, image_column, caption_column, where)
    captions = [_caption(value, f"{where}, row {row}") for row, value in enumerate(dataset[caption_column])]
    return _ColumnImages(dataset, image_column, base_dir, where), captions


def _is_imagefolder(root: Path) -> bool:
    return any((root / name).is_file() for name in METADATA_FILES) or any(
        (root / sub / name).is_file() for sub in ("train",) + VALIDATION_SPLITS for name in METADATA_FILES)


def _user_records(data: DataConfig, split: str):
    """(images, captions, held_out) of ``split``; held_out is True when the data has no validation split
    of its own, so that ``split`` is to be cut from the single split by `_held_out`."""
    image_column, caption_column = data.image_column, data.caption_column
    root = Path(data.train_data_dir) if data.dataset_name is None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--train_data_dir {root} is not a directory.")
    if root is not None:
        check_one_layout(root, _all_tar_shards(root), METADATA_FILES, ("train",) + VALIDATION_SPLITS)
    if root is not None and _is_tar_folder(root):
        images, captions = _shard_records(data, split)
        return images, captions, False
    if root is not None and _is_imagefolder(root):
        folders = _split_folders(root)
        held_out = "validation" not in folders
        folder = folders["train" if held_out else split]
        images, captions = _imagefolder_records(folder, image_column, caption_column)
        return images, captions, held_out
    loaded = _load_hf_dataset(data)
    own_validation = next((name for name in VALIDATION_SPLITS if name in loaded), None)
    train_name = "train" if "train" in loaded else next(name for name in loaded if name not in VALIDATION_SPLITS)
    name = own_validation if split == "validation" and own_validation else train_name
    where = f"dataset {data.dataset_name or root} split {name!r}"
    images, captions = _column_records(loaded[name], image_column, caption_column, where, root)
    return images, captions, own_validation is None


# --------------------------------------------------------------------------------------------- tar shards, streams

TAR_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
LOCAL_STREAM_BUILDERS = (("parquet", ".parquet"), ("arrow", ".arrow"))


def tar_shards(folder: Path) -> list[Path]:
    """The ``*.tar`` files directly in ``folder``, in name order."""
    return sorted(path for path in folder.glob("*.tar") if path.is_file()) if folder.is_dir() else []


def _all_tar_shards(root: Path) -> list[Path]:
    folders = [root] + [root / split for split in ("train",) + VALIDATION_SPLITS]
    return [path for folder in folders for path in tar_shards(folder)]


def _is_tar_folder(root: Path) -> bool:
    return bool(_all_tar_shards(root))


def _hold_out_files(files: list[str], num_validation: int, where: str) -> dict[str, list[str]]:
    """``{"train": files[:-k], "validation": files[-k:]}`` with ``k = num_validation`` (name order)."""
    if len(files) <= num_validation:
        raise ValueError(f"{where} has {len(files)} shard(s) and no validation split: holding out "
                         f"--num_validation_shards {num_validation} for validation needs at least "
                         f"{num_validation + 1}. "
                         "Write more shards, or put the validation shards in a validation/ folder beside train/.")
    return {"train": files[:-num_validation], "validation": files[-num_validation:]}


def _local_split_files(root: Path, list_files, num_validation: int) -> dict[str, list[str]]:
    """``train/`` and ``validation/`` (or ``test/``) sub-folders when both have files, else the held-out shards."""
    train = list_files(root / "train")
    validation = next((found for split in VALIDATION_SPLITS if (found := list_files(root / split))), [])
    if train and validation:
        return {"train": [str(p) for p in train], "validation": [str(p) for p in validation]}
    files = [str(p) for p in (list_files(root) or train)]
    if not files:
        raise FileNotFoundError(f"{root} holds no data files.")
    return _hold_out_files(files, num_validation, str(root))


def stream_source(data: DataConfig) -> tuple[str, str | None, dict[str, list[str]]]:
    """``(path, config name, {"train": files, "validation": files})`` for ``datasets.load_dataset``: tar shards
    (``"webdataset"``), with --streaming also Parquet/Arrow folders and Hub datasets (their resolved data files).

    A source that cannot stream (the built-in shapes, an imagefolder with metadata, a save_to_disk folder, a
    dataset without data files) is a ValueError saying what to do.
    """
    import datasets

    if data.dataset_name is not None:
        try:
            builder = datasets.load_dataset_builder(data.dataset_name, data.dataset_config_name)
        except Exception as error:  # any failure to resolve a user-named dataset
            raise ValueError(f"--streaming: cannot open dataset {data.dataset_name!r} ({error}).") from error
        found = {split: [str(f) for f in files] for split, files in (builder.config.data_files or {}).items()}
        if not found:
            raise ValueError(f"--streaming: dataset {data.dataset_name!r} has no data files to stream (it is built "
                             "by a script): drop --streaming.")
        own_validation = next((split for split in VALIDATION_SPLITS if split in found), None)
        train = found.get("train") or next(files for split, files in found.items() if split not in VALIDATION_SPLITS)
        files = ({"train": train, "validation": found[own_validation]} if own_validation else
                 _hold_out_files(train, data.num_validation_shards, f"dataset {data.dataset_name}"))
        return data.dataset_name, data.dataset_config_name, files
    if data.train_data_dir is None:
        raise ValueError("--streaming needs --train_data_dir (tar shards, Parquet or Arrow files) or --dataset_name; "
                         "the built-in shapes data is generated on access and does not stream: drop --streaming.")
    root = Path(data.train_data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--train_data_dir {root} is not a directory.")
    check_one_layout(root, _all_tar_shards(root), METADATA_FILES, ("train",) + VALIDATION_SPLITS)
    if _is_tar_folder(root):
        files = _local_split_files(root, tar_shards, data.num_validation_shards)
        check_tar_shards(files, data.source)
        return "webdataset", None, files
    if _is_saved_dataset(root) or _is_imagefolder(root):
        kind = "a save_to_disk folder" if _is_saved_dataset(root) else "an imagefolder"
        raise ValueError(f"--streaming: {root} is {kind}, which is read on access without streaming: drop "
                         "--streaming, or write the data as tar shards (ldm-export-shapes --format webdataset shows "
                         "the layout).")
    for builder, extension in LOCAL_STREAM_BUILDERS:
        def list_files(folder: Path, extension=extension) -> list[Path]:
            return sorted(folder.glob(f"*{extension}")) if folder.is_dir() else []

        if list_files(root) or list_files(root / "train"):
            return builder, None, _local_split_files(root, list_files, data.num_validation_shards)
    raise FileNotFoundError(f"--streaming: {root} holds no tar shards, Parquet or Arrow files to stream.")


def _load_split(data: DataConfig, split: str, streaming: bool):
    """``(dataset, files)``: the ``split`` of `stream_source`'s files loaded by ``datasets`` (an IterableDataset
    when ``streaming``), its image columns left undecoded (decoded per item, where a bad file can be named)."""
    import datasets

    path, config_name, files = stream_source(data)
    local = not streaming and all(os.path.isfile(f) for f in files[split])
    try:
        if local:  # its Arrow copy is made again when a file changed (`load_local_dataset`)
            dataset = load_local_dataset(path, [Path(f) for f in files[split]], name=config_name,
                                         data_files={split: files[split]}, split=split)
        else:
            dataset = datasets.load_dataset(path, config_name, data_files={split: files[split]}, split=split,
                                            streaming=streaming)
    except ValueError as error:
        raise ValueError(f"Cannot read the shards of {data.source} (the first is {files[split][0]}): {error} The "
                         "first samples of a shard must all have the same members: an image (.jpg, .png, .webp) "
                         "and a caption (.txt or .json).") from error
    for column, feature in (dataset.features or {}).items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset, files[split]


def _image_field(columns, image_column: str, where: str) -> str:
    """``image_column`` when the data has it, else a tar sample's image member (jpg, jpeg, png or webp)."""
    if image_column in columns:
        return image_column
    found = next((field for field in TAR_IMAGE_FIELDS if field in columns), None)
    if found is None:
        raise ValueError(f"No image column in {where}: no {image_column!r} (--image_column) and no "
                         f".{'/.'.join(TAR_IMAGE_FIELDS)} member; its columns are {sorted(columns)}.")
    return found


def _row_caption(row: dict, caption_column: str, where: str) -> str | None:
    """The caption of a row: its ``caption_column``, or a tar sample's ``KEY.txt``, or ``caption_column`` of its
    ``KEY.json``; None when it has none."""
    if caption_column in row:
        return _caption(row[caption_column], where)
    if row.get("txt") is not None:
        return _caption(row["txt"], where)
    if isinstance(row.get("json"), dict):
        return _caption(row["json"].get(caption_column), where)
    return None


def _describe_row(row: dict, fallback: str) -> str:
    if "__key__" in row:
        return f"shard {row.get('__url__')} sample {row['__key__']!r}"
    return fallback


class _ShardImages(_ColumnImages):
    """The images of tar-shard samples (``datasets``' webdataset builder), described by shard and sample key."""

    def __init__(self, dataset, column: str):
        super().__init__(dataset, column, None, "")
        self.keys = dataset.select_columns(["__url__", "__key__"])

    def describe(self, row: int) -> str:
        return _describe_row(self.keys[row], f"row {row}")


def _shard_records(data: DataConfig, split: str):
    """(`_ShardImages`, captions) of the ``split`` shards of a tar folder, read as a map-style dataset."""
    dataset, files = _load_split(data, split, streaming=False)
    column = _image_field(dataset.column_names, data.image_column, f"shard {files[0]}")
    keys = dataset.select_columns(["__url__", "__key__"])
    captions = [_row_caption(row, data.caption_column, _describe_row(keys[index], f"row {index}"))
                for index, row in enumerate(dataset.remove_columns([column]))]
    return _ShardImages(dataset, column), captions


def sample_id(row: dict, position: int) -> int:
    """A stable id of a streamed sample: 56 bits of ``sha256(shard, key)``, or its stream position without a key."""
    if "__key__" not in row:
        return position
    digest = hashlib.sha256(f"{row.get('__url__')}\0{row['__key__']}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


class StreamingImageCaptionDataset(torch.utils.data.IterableDataset):
    """A streamed split (``datasets.IterableDataset``) as training items, decoded and preprocessed as they come.

    ``for_training(seed, buffer_size, rank, world_size)`` gives the stream one process trains on:
    ``IterableDataset.shuffle(seed, buffer_size)`` (shard order and a buffer of ``buffer_size`` items), then
    ``datasets.distributed.split_dataset_by_node``: whole shards per process when ``n_shards % world_size == 0``,
    else every ``world_size``-th item. DataLoader workers of a process read distinct shards (``datasets`` gives
    worker ``w`` of ``W`` shards ``w, w + W, ...``; workers beyond ``n_shards`` stay idle). ``set_epoch(e)``
    reshuffles with ``seed + e``. The order of an epoch is thus a function of (seed, epoch, shard list, buffer size,
    processes, workers); random crops and flips of an item depend on (seed, epoch, shard, key) alone.

    Items are ``{"pixel_values", "caption", "index"}`` with ``index = sample_id(row)``. A sample whose image cannot
    be decoded, or that has no caption, stops the run with a ValueError naming its shard and key; with
    ``skip_bad_images`` it is left out and counted (``skipped_images``, shared with DataLoader workers).
    """

    def __init__(self, stream, files: list[str], image_column: str, caption_column: str, resolution: int,
                 random_crop: bool = False, random_flip: bool = False, skip_bad_images: bool = False,
                 where: str = "the stream"):
        self.stream, self.source, self.files, self.where = stream, stream, files, where
        self.image_column = _image_field(stream.features, image_column, where) if stream.features else image_column
        self.caption_column = caption_column
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip
        self.skip_bad_images = skip_bad_images
        self.seed, self.epoch = 0, 0
        self.skipped = torch.zeros(2, dtype=torch.int64).share_memory_()  # [unreadable images, samples w/o caption]
        self.split_strategy = None

    def for_training(self, seed: int, buffer_size: int, rank: int = 0,
                     world_size: int = 1) -> "StreamingImageCaptionDataset":
        """This dataset shuffled and split for process ``rank`` of ``world_size`` (it shares the skip counts)."""
        from datasets.distributed import split_dataset_by_node

        shuffled = self.source.shuffle(seed=seed, buffer_size=buffer_size)
        share = copy.copy(self)
        share.seed = seed
        share.split_strategy = "shards" if shuffled.num_shards % world_size == 0 else "examples"
        share.stream = split_dataset_by_node(shuffled, rank, world_size) if world_size > 1 else shuffled
        return share

    @property
    def shard_ids(self) -> list[str]:
        """The training files as processes compare them: ``name:size`` for local files, else the URL."""
        return [f"{Path(f).name}:{os.path.getsize(f)}" if os.path.isfile(f) else f for f in self.files]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.stream.set_epoch(epoch)

    def __iter__(self):
        for position, row in enumerate(self.stream):
            item = self.item(row, position)
            if item is not None:
                yield item

    def item(self, row: dict, position: int = 0) -> dict | None:
        """The training item of one streamed row; None when it is skipped (``skip_bad_images``)."""
        name = _describe_row(row, f"{self.where}, item {position}")
        caption = _row_caption(row, self.caption_column, name)
        if caption is None:
            return self._bad(1, f"{name} has no caption (no KEY.txt, and no {self.caption_column!r} in KEY.json or "
                                "in its columns): add it or remove the sample, or pass --skip_bad_images to skip such "
                                "samples.")
        try:
            if row.get(self.image_column) is None:
                raise ValueError(f"it has no image (.{'/.'.join(TAR_IMAGE_FIELDS)} member or {self.image_column!r})")
            source, _ = _image_source(row[self.image_column], None)
            with self._sample_random_state(row, position):
                pixels = preprocess_image(_open_image(source, name), self.resolution, self.random_crop,
                                          self.random_flip)
        except Exception as error:  # any failure to decode one user sample is that sample's fault
            return self._bad(0, f"Cannot read image of {name}: {error}. Fix or remove the sample, or pass "
                                "--skip_bad_images to skip unreadable images.", error)
        return {"pixel_values": pixels, "caption": caption, "index": sample_id(row, position)}

    def _bad(self, kind: int, message: str, error: Exception | None = None) -> None:
        if not self.skip_bad_images:
            raise ValueError(message) from error
        self.skipped[kind] += 1
        logger.warning("Skipping (--skip_bad_images): %s", message)
        return None

    @contextlib.contextmanager
    def _sample_random_state(self, row: dict, position: int):
        """Random crops/flips drawn from ``sha256(seed, epoch, sample)``: the same in any worker or resumed run."""
        if not (self.random_crop or self.random_flip):
            yield
            return
        digest = hashlib.sha256(f"{self.seed}:{self.epoch}:{sample_id(row, position)}".encode()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            yield

    @property
    def skipped_images(self) -> int:
        """How many samples were left out so far (unreadable images and missing captions)."""
        return int(self.skipped.sum())

    def skipped_summary(self) -> str | None:
        """One line on what --skip_bad_images left out (None when nothing was), for the end of a run."""
        unreadable, uncaptioned = self.skipped.tolist()
        if not (unreadable or uncaptioned):
            return None
        return (f"Skipped (--skip_bad_images) {unreadable} sample(s) with an unreadable image and {uncaptioned} "
                f"without a caption in the stream (each time the stream met them; the log names them).")

    def captions(self) -> list[str]:
        """Every caption of the (unshuffled) split, read without decoding an image; uncaptioned rows are left out."""
        found = []
        for position, row in enumerate(self.source.remove_columns([self.image_column])
                                       if self.image_column in (self.source.features or {}) else self.source):
            caption = _row_caption(row, self.caption_column, _describe_row(row, f"{self.where}, item {position}"))
            if caption is not None:
                found.append(caption)
        return found


def _streaming_dataset(data: DataConfig, split: str):
    """The streamed ``split``: training a `StreamingImageCaptionDataset`, validation the first
    ``num_validation_samples`` items of the validation files read into memory (an `ImageCaptionDataset`)."""
    stream, files = _load_split(data, split, streaming=True)
    where = f"{data.source} ({split})"
    dataset = StreamingImageCaptionDataset(stream, files, data.image_column, data.caption_column, data.resolution,
                                           data.random_crop, data.random_flip, data.skip_bad_images, where)
    if split == "train":
        return dataset
    rows = list(stream.take(data.num_validation_samples))
    if not rows:
        raise ValueError(f"The validation files of {data.source} have no samples: {files}.")
    images = _RowImages([row.get(dataset.image_column) for row in rows],
                        [_describe_row(row, f"{where}, item {i}") for i, row in enumerate(rows)])
    captions = [_row_caption(row, data.caption_column, images.describe(i)) for i, row in enumerate(rows)]
    return ImageCaptionDataset(images, captions, list(range(len(rows))), data.resolution, data.random_crop,
                               data.random_flip, skip_bad_images=data.skip_bad_images)


class _RowImages:
    """Images held in memory (a streamed validation split), by row."""

    def __init__(self, values: list, names: list[str]):
        self.values, self.names = values, names

    def __len__(self) -> int:
        return len(self.values)

    def describe(self, row: int) -> str:
        return self.names[row]

    def get(self, row: int):
        if self.values[row] is None:
            raise ValueError(f"{self.names[row]} has no image")
        return _image_source(self.values[row], None)[0], self.names[row]


def build_dataset(data: DataConfig, split: str = "train", grounding: bool = False) -> torch.utils.data.Dataset:
    """The ``split`` ("train" or "validation") of the data ``data`` selects (see the module docstring). With
    ``grounding`` its items also carry each object word's span and mask (``"grounding"``, for the U-Net's
    grounding loss)."""
    _check_split(split)
    if data.resolution is None:
        raise ValueError("resolution is not set: pass --resolution or set 'resolution' in the config's data section.")
    max_train = data.max_train_samples
    if data.streaming and data.dataset_name is None and data.train_data_dir is None:
        stream_source(data)  # the error that says why the built-in data does not stream
    if data.dataset_name is None and data.train_data_dir is None:
        count = data.num_train_samples if split == "train" else data.num_validation_samples
        if count is None:
            raise ValueError("num_train_samples is not set: pass --num_train_samples (the size of the built-in "
                             "shapes data) or --train_data_dir / --dataset_name for your own data.")
        if split == "train" and max_train is not None:
            count = min(count, max_train)
        categories, held_out_orders = (data.shapes_categories, data.shapes_held_out_orders) if split == "train" else (None, 0.0)
        return ShapesTrainingDataset(count, data.resolution, data.data_seed, split, data.random_flip, categories,
                                     held_out_orders, grounding)

    if data.streaming:
        return _streaming_dataset(data, split)
    images, captions, held_out = _user_records(data, split)
    groundings = _user_groundings(data, split) if grounding else None
    rows = list(range(len(images)))
    if held_out:
        held = held_out_rows(len(rows), data.num_held_out_samples, data.data_seed, data.source).tolist()
        rows = (sorted(held[:data.num_validation_samples]) if split == "validation" else
                sorted(set(rows) - set(held)))
    if split == "train" and max_train is not None:
        rows = rows[:max_train]
    if not rows:
        raise ValueError(f"The {split} split of {data.source} has no images.")
    return ImageCaptionDataset(images, captions, rows, data.resolution, data.random_crop, data.random_flip,
                               skip_bad_images=data.skip_bad_images, groundings=groundings)


def _user_groundings(data: DataConfig, split: str) -> list[dict[str, str] | None] | None:
    """Per row of `_user_records`' imagefolder (the same folder, the same row order), its ``grounding_column``;
    None for data without masks (no such column, or not an imagefolder)."""
    root = Path(data.train_data_dir) if data.train_data_dir else None
    if root is None or data.streaming or _is_tar_folder(root) or not _is_imagefolder(root):
        return None
    folders = _split_folders(root)
    folder = folders["train" if "validation" not in folders else split]
    path, records = _read_metadata(folder)
    groundings = read_grounding_column(records, folder, data.grounding_column, path)
    if groundings is not None and (data.random_crop or data.random_flip):
        raise ValueError("--random_crop / --random_flip would move the image but not its grounding masks: drop them "
                         "or train without --grounding_token_weight / --grounding_pixel_weight.")
    return groundings


def _holds_out_files(data: DataConfig) -> bool:
    """Whether the data is read as files, of which whole ones are held out (tar shards, --streaming)."""
    return data.streaming or (data.dataset_name is None and _is_tar_folder(Path(data.train_data_dir)))


def data_split_record(data: DataConfig) -> dict:
    """What ``data`` holds out (``ldm_pipeline.data.split.split_record``), read from the metadata, the file list or
    the dataset's splits, without opening an image."""
    if data.dataset_name is None and data.train_data_dir is None:
        return split_record(data, SHAPES, num_held_out=data.num_validation_samples)
    if _holds_out_files(data):
        files = stream_source(data)[2]["validation"]
        return split_record(data, HELD_OUT_FILES, held_out_ids=[Path(f).name if os.path.isfile(f) else f
                                                                for f in files])
    images, _, held_out = _user_records(data, "train")
    if not held_out:
        return split_record(data, OWN_SPLIT)
    rows = held_out_rows(len(images), data.num_held_out_samples, data.data_seed, data.source)
    return split_record(data, HELD_OUT_SLICE, num_items=len(images), held_out_ids=rows.tolist())


# --------------------------------------------------------------------------------------------- fingerprint

def dataset_fingerprint(data: DataConfig, split: str = "train") -> str:
    """A stable hash of what defines ``build_dataset(data, split)``: change any of it and the hash changes.

    Shapes: generator version and source, seed, split, size, resolution. User data: the files' names, sizes,
    modification and status-change times (local folders, tar shards included: an edit that keeps a file's size and
    modification time still changes its status-change time), the resolved data files of a streamed Hub dataset
    (its name, config and file URLs, which carry the revision), or the Hugging Face dataset fingerprint (hub).
    Both include the preprocessing flags and, for streams and shards, the streaming settings. Random crop/flip
    make items random, but the hash only describes the data.
    """
    _check_split(split)
    payload = {
        "split": split,
        "resolution": data.resolution,
        "random_crop": data.random_crop,
        "random_flip": data.random_flip,
        "data_seed": data.data_seed,
        "max_train_samples": data.max_train_samples if split == "train" else None,
    }
    if data.dataset_name is None and data.train_data_dir is None:
        payload.update(source="shapes", version=shapes.GENERATOR_VERSION, code=_file_digest(shapes.__file__),
                       num_samples=data.num_train_samples if split == "train" else data.num_validation_samples)
        if split == "train" and data.shapes_categories is not None:
            payload["categories"] = list(data.shapes_categories)
        if split == "train" and data.shapes_held_out_orders:
            payload["held_out_orders"] = data.shapes_held_out_orders
        return config_hash(payload)
    payload.update(preprocessing=PREPROCESSING_VERSION, image_column=data.image_column,
                   caption_column=data.caption_column, num_held_out_samples=data.num_held_out_samples,
                   num_validation_samples=data.num_validation_samples if split == "validation" else None,
                   skip_bad_images=data.skip_bad_images)
    if _holds_out_files(data):
        payload.update(streaming=data.streaming, num_validation_shards=data.num_validation_shards,
                       shuffle_buffer_size=data.shuffle_buffer_size if data.streaming else None)
    if data.dataset_name is None:
        root = Path(data.train_data_dir)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        payload.update(source=str(root.resolve()), files=[(str(p.relative_to(root)), *file_identity(p)) for p in files])
    elif data.streaming:
        payload.update(source=data.dataset_name, config=data.dataset_config_name, files=stream_source(data)[2])
    else:
        loaded = _load_hf_dataset(data)
        payload.update(source=data.dataset_name, config=data.dataset_config_name,
                       fingerprints={name: ds._fingerprint for name, ds in loaded.items()})
    return config_hash(payload)


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def dataset_captions(dataset) -> list[str]:
    """The captions of a dataset's items, in item order, read without decoding any image when possible."""
    if isinstance(dataset, ShapesTrainingDataset):
        return [dataset.shapes.scene(index).caption for index in range(len(dataset))]
    if isinstance(dataset, ImageCaptionDataset):
        return [dataset.captions[row] for row in dataset.rows]
    if isinstance(dataset, StreamingImageCaptionDataset):
        return dataset.captions()
    return [dataset[index]["caption"] for index in range(len(dataset))]
