"""Training data for every stage: the built-in `shapes` data or a user dataset, preprocessed to [-1, 1] tensors.

Sources (first that applies):

- ``--dataset_name NAME [--dataset_config_name CFG]``: ``datasets.load_dataset(NAME, CFG)``.
- ``--train_data_dir DIR``: an ``imagefolder`` (images + ``metadata.jsonl`` or ``metadata.csv`` with a
  ``file_name`` column, optionally in ``train/`` and ``validation/``/``test/`` sub-folders), a folder written
  by ``Dataset.save_to_disk``, or a folder of Parquet / Arrow files.
- neither: the built-in `shapes` data (`ldm_pipeline.data.shapes`); validation is a disjoint random stream.

The validation split of user data is the dataset's own "validation" (else "test") split, else a held-out slice
of ``num_validation_samples`` items chosen with ``data_seed`` (the training split is the rest).

Items are ``{"pixel_values": FloatTensor[3, H, W] in [-1, 1], "caption": str, "index": int}``; images are resized
so that the shorter side is ``resolution`` (bicubic) and then centre-cropped (or randomly with --random_crop).
Images of user data are checked (opened and verified) up front in the main process, so an unreadable file is a
clear error naming it (or, with --skip_bad_images, skipped and counted) rather than a crash inside a worker.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_pipeline.config import DataConfig, add_dataclass_arguments, config_hash

from . import shapes

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
VALIDATION_SPLITS = ("validation", "test")


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one flag per ``DataConfig`` field, with its default, to a command's parser; the parsed namespace
    becomes a ``DataConfig`` with ``ldm_pipeline.config.data_config_from_args``."""
    add_dataclass_arguments(parser, DataConfig, "data", with_defaults=True)
    return parser


def _check_split(split: str) -> None:
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation' (got {split!r}).")


# --------------------------------------------------------------------------------------------- preprocessing

def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> FloatTensor[3, H, W] with ``x / 127.5 - 1`` in [-1, 1]."""
    array = np.array(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def preprocess_image(image: Image.Image, resolution: int, random_crop: bool = False,
                     random_flip: bool = False) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` (bicubic), crop a square (centre or random), optionally flip.

    Randomness (crop offset, flip) comes from torch's global generator, seeded per DataLoader worker.
    Flipping is off by default because the mirror image of "a cat left of a tree" is "a cat right of a tree".
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if min(width, height) != resolution:
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        width, height = size
    if (width, height) != (resolution, resolution):
        if random_crop:
            left = int(torch.randint(0, width - resolution + 1, ()).item())
            top = int(torch.randint(0, height - resolution + 1, ()).item())
        else:
            left, top = (width - resolution) // 2, (height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    pixels = image_to_tensor(image)
    if random_flip and torch.rand(()) < 0.5:
        pixels = pixels.flip(-1)
    return pixels


def collate_examples(items: list[dict]) -> dict:
    """Stack items into ``{"pixel_values": [B, 3, H, W], "captions": list[str], "index": LongTensor[B]}``."""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in items]).contiguous(),
        "captions": [item["caption"] for item in items],
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }


# --------------------------------------------------------------------------------------------- datasets

class ShapesTrainingDataset(torch.utils.data.Dataset):
    """The built-in shapes data as training items; each image is rendered on access (no cache needed)."""

    def __init__(self, num_samples: int, resolution: int, seed: int, split: str, random_flip: bool = False):
        self.shapes = shapes.ShapesDataset(num_samples, resolution, seed=seed, split=split)
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> dict:
        scene = self.shapes.scene(index)
        image, _ = shapes.render_scene(scene, self.shapes.resolution)
        pixels = image_to_tensor(image)
        if self.random_flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return {"pixel_values": pixels, "caption": scene.caption, "index": index}


class ImageCaptionDataset(torch.utils.data.Dataset):
    """User data: item ``i`` is the image ``images.get(rows[i])`` captioned ``captions[rows[i]]``.

    ``images`` is a `_FolderImages` or `_ColumnImages`: images are read on access, nothing is held in memory.
    """

    def __init__(self, images, captions: list[str], rows: list[int], resolution: int,
                 random_crop: bool = False, random_flip: bool = False):
        self.images, self.captions, self.rows = images, captions, rows
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        source, name = self.images.get(row)
        try:
            image = _open_image(source)
            image.load()
        except Exception as error:
            raise ValueError(f"Cannot read image {name}: {error}. Fix or remove the file, or pass "
                             "--skip_bad_images.") from error
        pixels = preprocess_image(image, self.resolution, self.random_crop, self.random_flip)
        return {"pixel_values": pixels, "caption": self.captions[row], "index": index}


class _FolderImages:
    """Image files of an imagefolder, by row."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, row: int):
        return self.paths[row], self.paths[row]


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

    def get(self, row: int):
        source, name = _image_source(self.dataset[row][self.column], self.base_dir)
        return source, f"{name} ({self.where}, row {row})"


def _open_image(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    return Image.open(source)


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


def _verify_images(images, rows: list[int], skip_bad_images: bool) -> list[int]:
    """The rows whose image opens and verifies. Unreadable: ValueError naming it, or skipped with a warning."""
    good, bad = [], []
    for i in rows:
        source, name = images.get(i)
        try:
            if isinstance(source, Image.Image):
                good.append(i)
                continue
            with _open_image(source) as image:
                image.verify()
        except Exception as error:
            if not skip_bad_images:
                raise ValueError(f"Cannot read image {name}: {error}. Fix or remove the file, or pass "
                                 "--skip_bad_images to skip unreadable images.") from error
            bad.append(name)
            continue
        good.append(i)
    if bad:
        message = f"Skipped {len(bad)} unreadable image(s) (--skip_bad_images): {', '.join(bad[:5])}"
        warnings.warn(message + (" ..." if len(bad) > 5 else ""), stacklevel=3)
        logger.warning(message)
    return good


def _check_columns(columns: list[str], image_column: str, caption_column: str, where: str) -> None:
    for role, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise ValueError(f"Column {column!r} ({role}) not found in {where}; its columns are {sorted(columns)}. "
                             f"Pass {role} with one of them.")


def _read_metadata(folder: Path) -> list[dict]:
    for name in METADATA_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".jsonl"):
                with open(path, encoding="utf-8") as f:
                    return [json.loads(line) for line in f if line.strip()]
            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
    raise FileNotFoundError(f"No metadata.jsonl or metadata.csv in {folder}: an imagefolder needs one with a "
                            "'file_name' column and a caption column.")


def _imagefolder_records(folder: Path, image_column: str, caption_column: str):
    """(paths, captions) of an imagefolder. Its image column is ``file_name`` (called "image", as in
    ``datasets``' imagefolder), or ``image_column`` when the metadata has a column of that name."""
    rows = _read_metadata(folder)
    columns = list(rows[0].keys()) if rows else []
    path_column = image_column if image_column in columns else "file_name"
    visible = columns + (["image"] if "file_name" in columns else [])
    _check_columns(visible, image_column, caption_column, f"{folder}/metadata")
    paths = [str(folder / row[path_column]) for row in rows]
    captions = [str(row[caption_column]) for row in rows]
    return paths, captions


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
                    loaded = datasets.load_dataset(builder, data_dir=str(root))
                    break
            else:
                raise FileNotFoundError(f"{root} is not a dataset folder: expected metadata.jsonl/metadata.csv "
                                        "(imagefolder), a save_to_disk folder, or Parquet/Arrow files.")
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _column_records(dataset, image_column: str, caption_column: str, where: str, base_dir: Path | None):
    _check_columns(dataset.column_names, image_column, caption_column, where)
    return _ColumnImages(dataset, image_column, base_dir, where), [str(c) for c in dataset[caption_column]]


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
    if root is not None and _is_imagefolder(root):
        folders = _split_folders(root)
        held_out = "validation" not in folders
        folder = folders["train" if held_out else split]
        paths, captions = _imagefolder_records(folder, image_column, caption_column)
        return _FolderImages(paths), captions, held_out
    loaded = _load_hf_dataset(data)
    own_validation = next((name for name in VALIDATION_SPLITS if name in loaded), None)
    train_name = "train" if "train" in loaded else next(name for name in loaded if name not in VALIDATION_SPLITS)
    name = own_validation if split == "validation" and own_validation else train_name
    where = f"dataset {data.dataset_name or root} split {name!r}"
    images, captions = _column_records(loaded[name], image_column, caption_column, where, root)
    return images, captions, own_validation is None


def _held_out(num_items: int, num_validation: int, seed: int) -> np.ndarray:
    """Indices of a seeded random validation slice of ``num_items`` (the same for both splits)."""
    if num_items < 2:
        raise ValueError(f"The dataset has {num_items} usable image(s); at least 2 are needed to hold out validation.")
    if num_validation >= num_items:
        capped = max(1, num_items // 10)
        warnings.warn(f"num_validation_samples={num_validation} >= the {num_items} images of the dataset; "
                      f"holding out {capped} instead.", stacklevel=3)
        num_validation = capped
    order = np.random.default_rng(seed).permutation(num_items)
    return np.sort(order[:num_validation])


def build_dataset(data: DataConfig, split: str = "train") -> torch.utils.data.Dataset:
    """The ``split`` ("train" or "validation") of the data ``data`` selects (see the module docstring)."""
    _check_split(split)
    if data.resolution is None:
        raise ValueError("resolution is not set: pass --resolution or set 'resolution' in the config's data section.")
    max_train = data.max_train_samples
    if data.dataset_name is None and data.train_data_dir is None:
        count = data.num_train_samples if split == "train" else data.num_validation_samples
        if count is None:
            raise ValueError("num_train_samples is not set: pass --num_train_samples (the size of the built-in "
                             "shapes data) or --train_data_dir / --dataset_name for your own data.")
        if split == "train" and max_train is not None:
            count = min(count, max_train)
        return ShapesTrainingDataset(count, data.resolution, data.data_seed, split, data.random_flip)

    images, captions, held_out = _user_records(data, split)
    rows = list(range(len(images)))
    if held_out:
        validation = set(_held_out(len(rows), data.num_validation_samples, data.data_seed).tolist())
        rows = [i for i in rows if (i in validation) == (split == "validation")]
    if split == "train" and max_train is not None:
        rows = rows[:max_train]
    rows = _verify_images(images, rows, data.skip_bad_images)
    if not rows:
        raise ValueError(f"The {split} split of {data.source} has no readable images.")
    return ImageCaptionDataset(images, captions, rows, data.resolution, data.random_crop, data.random_flip)


# --------------------------------------------------------------------------------------------- fingerprint

def dataset_fingerprint(data: DataConfig, split: str = "train") -> str:
    """A stable hash of what defines ``build_dataset(data, split)``: change any of it and the hash changes.

    Shapes: generator version and source, seed, split, size, resolution. User data: the files' names, sizes and
    modification times (local folders) or the Hugging Face dataset fingerprint (hub). Both include the
    preprocessing flags. Random crop/flip make items random, but the hash only describes the data.
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
        return config_hash(payload)
    payload.update(image_column=data.image_column, caption_column=data.caption_column,
                   num_validation_samples=data.num_validation_samples, skip_bad_images=data.skip_bad_images)
    if data.dataset_name is None:
        root = Path(data.train_data_dir)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        payload.update(source=str(root.resolve()), files=[
            (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
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
    return [dataset[index]["caption"] for index in range(len(dataset))]
