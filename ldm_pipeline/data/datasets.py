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

from . import shapes

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
VALIDATION_SPLITS = ("validation", "test")


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the data flags. Defaults are None where a config's ``data`` section may fill them."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", type=str, default=None,
                       help="A Hugging Face dataset (name or path) for datasets.load_dataset. Default: built-in shapes.")
    group.add_argument("--dataset_config_name", type=str, default=None)
    group.add_argument("--train_data_dir", type=str, default=None,
                       help="A local folder: imagefolder with metadata.jsonl/metadata.csv, save_to_disk, or Parquet/Arrow.")
    group.add_argument("--image_column", type=str, default=None, help="Column of the images (default 'image').")
    group.add_argument("--caption_column", type=str, default=None, help="Column of the captions (default 'text').")
    group.add_argument("--resolution", type=int, default=None, help="Side of the square training images.")
    crop = group.add_mutually_exclusive_group()
    crop.add_argument("--center_crop", action="store_const", const=True, default=None,
                      help="Centre-crop after resizing (the default).")
    crop.add_argument("--random_crop", action="store_const", const=True, default=None,
                      help="Random crop after resizing instead of a centre crop.")
    group.add_argument("--random_flip", action="store_const", const=True, default=None,
                       help="Flip images horizontally at random. Off by default: it contradicts 'left of'/'right of' captions.")
    group.add_argument("--skip_bad_images", action="store_const", const=True, default=None,
                       help="Skip (and count) unreadable images instead of stopping with an error naming the file.")
    group.add_argument("--num_train_samples", type=int, default=None, help="Size of the built-in shapes training set.")
    group.add_argument("--num_validation_samples", type=int, default=None,
                       help="Size of the shapes validation set, or of the held-out slice of user data.")
    group.add_argument("--data_seed", type=int, default=None, help="Seed of the shapes data and of held-out slices (default 0).")
    group.add_argument("--max_train_samples", type=int, default=None, help="Keep only this many training items.")
    return parser


def _arg(args, name: str, default=None):
    value = getattr(args, name, None)
    return default if value is None else value


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


def _load_hf_dataset(args):
    """The user's data as a ``datasets.DatasetDict`` (hub name, save_to_disk folder, Parquet or Arrow files)."""
    import datasets

    if _arg(args, "dataset_name") is not None:
        loaded = datasets.load_dataset(_arg(args, "dataset_name"), _arg(args, "dataset_config_name"))
    else:
        root = Path(_arg(args, "train_data_dir"))
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


def _user_records(args, split: str):
    """(images, captions, held_out) of ``split``; held_out is True when the data has no validation split
    of its own, so that ``split`` is to be cut from the single split by `_held_out`."""
    image_column, caption_column = _arg(args, "image_column", "image"), _arg(args, "caption_column", "text")
    root = Path(_arg(args, "train_data_dir")) if _arg(args, "dataset_name") is None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--train_data_dir {root} is not a directory.")
    if root is not None and _is_imagefolder(root):
        folders = _split_folders(root)
        held_out = "validation" not in folders
        folder = folders["train" if held_out else split]
        paths, captions = _imagefolder_records(folder, image_column, caption_column)
        return _FolderImages(paths), captions, held_out
    loaded = _load_hf_dataset(args)
    own_validation = next((name for name in VALIDATION_SPLITS if name in loaded), None)
    train_name = "train" if "train" in loaded else next(name for name in loaded if name not in VALIDATION_SPLITS)
    name = own_validation if split == "validation" and own_validation else train_name
    where = f"dataset {_arg(args, 'dataset_name') or root} split {name!r}"
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


def build_dataset(args, split: str = "train") -> torch.utils.data.Dataset:
    """The ``split`` ("train" or "validation") of the data selected by ``args`` (see the module docstring)."""
    _check_split(split)
    resolution = _arg(args, "resolution")
    if resolution is None:
        raise ValueError("args.resolution is not set: pass --resolution or set 'resolution' in the config's data section.")
    if _arg(args, "random_crop") and _arg(args, "center_crop"):
        raise ValueError("--center_crop and --random_crop are exclusive; pass one of them.")
    random_crop, random_flip = bool(_arg(args, "random_crop", False)), bool(_arg(args, "random_flip", False))
    seed = int(_arg(args, "data_seed", 0))
    max_train = _arg(args, "max_train_samples")

    if _arg(args, "dataset_name") is None and _arg(args, "train_data_dir") is None:
        count = _arg(args, "num_train_samples" if split == "train" else "num_validation_samples")
        if count is None:
            raise ValueError(f"args.{'num_train_samples' if split == 'train' else 'num_validation_samples'} is not "
                             "set: pass it or set it in the config's data section.")
        if split == "train" and max_train is not None:
            count = min(count, max_train)
        return ShapesTrainingDataset(int(count), int(resolution), seed, split, random_flip)

    images, captions, held_out = _user_records(args, split)
    rows = list(range(len(images)))
    if held_out:
        validation = set(_held_out(len(rows), int(_arg(args, "num_validation_samples", 200)), seed).tolist())
        rows = [i for i in rows if (i in validation) == (split == "validation")]
    if split == "train" and max_train is not None:
        rows = rows[:max_train]
    rows = _verify_images(images, rows, bool(_arg(args, "skip_bad_images", False)))
    if not rows:
        raise ValueError(f"The {split} split of {_arg(args, 'dataset_name') or _arg(args, 'train_data_dir')} has no "
                         "readable images.")
    return ImageCaptionDataset(images, captions, rows, int(resolution), random_crop, random_flip)


# --------------------------------------------------------------------------------------------- fingerprint

def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_fingerprint(args, split: str = "train") -> str:
    """A stable hash of what defines ``build_dataset(args, split)``: change any of it and the hash changes.

    Shapes: generator version and source, seed, split, size, resolution. User data: the files' names, sizes and
    modification times (local folders) or the Hugging Face dataset fingerprint (hub). Both include the
    preprocessing flags. Random crop/flip make items random, but the hash only describes the data.
    """
    _check_split(split)
    payload = {
        "split": split,
        "resolution": _arg(args, "resolution"),
        "random_crop": bool(_arg(args, "random_crop", False)),
        "random_flip": bool(_arg(args, "random_flip", False)),
        "data_seed": int(_arg(args, "data_seed", 0)),
        "max_train_samples": _arg(args, "max_train_samples") if split == "train" else None,
    }
    dataset_name, train_data_dir = _arg(args, "dataset_name"), _arg(args, "train_data_dir")
    if dataset_name is None and train_data_dir is None:
        payload.update(source="shapes", version=shapes.GENERATOR_VERSION, code=_file_digest(shapes.__file__),
                       num_samples=_arg(args, "num_train_samples" if split == "train" else "num_validation_samples"))
        return _hash(payload)
    payload.update(image_column=_arg(args, "image_column", "image"), caption_column=_arg(args, "caption_column", "text"),
                   num_validation_samples=_arg(args, "num_validation_samples"),
                   skip_bad_images=bool(_arg(args, "skip_bad_images", False)))
    if train_data_dir is not None and dataset_name is None:
        root = Path(train_data_dir)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        payload.update(source=str(root.resolve()), files=[
            (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    else:
        loaded = _load_hf_dataset(argparse.Namespace(dataset_name=dataset_name, train_data_dir=None,
                                                     dataset_config_name=_arg(args, "dataset_config_name")))
        payload.update(source=dataset_name, config=_arg(args, "dataset_config_name"),
                       fingerprints={name: ds._fingerprint for name, ds in loaded.items()})
    return _hash(payload)


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]
