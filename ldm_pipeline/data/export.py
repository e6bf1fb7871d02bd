"""Export the built-in shapes data as an ``imagefolder`` or as WebDataset tar shards, both of which
``--train_data_dir`` (and ``datasets``) loads back.

    ldm-export-shapes --out DIR --num_samples 1000 --resolution 64 --seed 0 --split train
    ldm-export-shapes --out DIR --num_samples 1000 --resolution 64 --format webdataset --shard_size 250

The imagefolder is ``DIR/images/000000.png ...`` and ``DIR/metadata.jsonl``, one line per image:
``{"file_name": "images/000000.png", "text": caption, "category": ..., "relation": ...,
"objects": [{"kind", "color", "box": [x0, y0, x1, y1]}]}`` (boxes in pixels, right/bottom exclusive).
The shards are ``DIR/shard-000000.tar ...`` of ``shard_size`` samples each, sample ``000000`` being the members
``000000.png`` and ``000000.json`` (the metadata line above without ``file_name``).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import asdict
from pathlib import Path

from ..config import CommandParser
from ..errors import run_cli
from .shapes import CATEGORIES, SPLITS, ShapesDataset


def export_shapes(out: str | os.PathLike, num_samples: int, resolution: int, seed: int = 0, split: str = "train",
                  categories: tuple[str, ...] | None = None, overwrite: bool = False) -> Path:
    """Write ``num_samples`` shapes images and their ``metadata.jsonl`` to ``out``; return the metadata path."""
    out = Path(out)
    metadata_path = out / "metadata.jsonl"
    if metadata_path.exists() and not overwrite:
        raise FileExistsError(f"{metadata_path} already exists; pass --overwrite or choose another --out.")
    dataset = ShapesDataset(num_samples, resolution, seed=seed, split=split, categories=categories)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, item in enumerate(dataset):
        file_name = f"images/{index:06d}.png"
        item["image"].save(out / file_name, optimize=False, compress_level=1)
        lines.append(json.dumps({"file_name": file_name, **_record(item)}))
    tmp_path = metadata_path.with_suffix(".jsonl.tmp")
    tmp_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp_path.replace(metadata_path)
    return metadata_path


def _record(item: dict) -> dict:
    scene = item["scene"]
    return {"text": item["caption"], "category": scene.category, "relation": scene.relation,
            "objects": [{**asdict(obj), "box": list(obj.box)} for obj in item["objects"]]}


def export_shapes_shards(out: str | os.PathLike, num_samples: int, resolution: int, shard_size: int, seed: int = 0,
                         split: str = "train", categories: tuple[str, ...] | None = None,
                         overwrite: bool = False) -> list[Path]:
    """Write ``num_samples`` shapes samples as WebDataset tar shards of ``shard_size`` samples (``KEY.png`` +
    ``KEY.json`` with the caption under ``"text"``); each shard is written whole or not at all. Returns the shards."""
    from ..durable import atomic_file

    out = Path(out)
    if list(out.glob("shard-*.tar")) and not overwrite:
        raise FileExistsError(f"{out} already holds shards; pass --overwrite or choose another --out.")
    for old in out.glob("shard-*.tar"):
        old.unlink()
    dataset = ShapesDataset(num_samples, resolution, seed=seed, split=split, categories=categories)
    shards = []
    for start in range(0, num_samples, shard_size):
        path = out / f"shard-{start // shard_size:06d}.tar"
        with atomic_file(path) as partial, tarfile.open(partial, "w") as archive:
            for index in range(start, min(start + shard_size, num_samples)):
                item = dataset[index]
                image = io.BytesIO()
                item["image"].save(image, format="PNG", optimize=False, compress_level=1)
                for name, payload in ((f"{index:06d}.png", image.getvalue()),
                                      (f"{index:06d}.json", json.dumps(_record(item)).encode())):
                    member = tarfile.TarInfo(name)
                    member.size = len(payload)
                    archive.addfile(member, io.BytesIO(payload))
        shards.append(path)
    return shards


def export_main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` and export; errors are ordinary exceptions (`main` turns them into one line)."""
    parser = CommandParser(prog="ldm-export-shapes",
                           description="Export the built-in shapes dataset as an imagefolder or tar shards.")
    parser.add_argument("--out", required=True, help="Output folder (images/ and metadata.jsonl are written in it).")
    parser.add_argument("--num_samples", type=int, required=True, help="Number of image-caption pairs.")
    parser.add_argument("--resolution", type=int, default=64, help="Side of the square images in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the shapes data (as --data_seed in training).")
    parser.add_argument("--split", choices=tuple(SPLITS), default="train",
                        help="Which random stream of the seed: the same one build_dataset uses for that split.")
    parser.add_argument("--categories", nargs="+", choices=CATEGORIES, default=None,
                        help="Restrict to these caption categories (default: all).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing export in --out.")
    parser.add_argument("--format", choices=("imagefolder", "webdataset"), default="imagefolder",
                        help="imagefolder: images/ and metadata.jsonl; webdataset: tar shards of --shard_size samples.")
    parser.add_argument("--shard_size", type=int, default=1000, help="Samples per tar shard (--format webdataset).")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard_size must be >= 1 (got {args.shard_size}).")
    if args.num_samples < 1:
        parser.error(f"--num_samples must be >= 1 (got {args.num_samples}).")
    if args.resolution < 1:
        parser.error(f"--resolution must be >= 1 (got {args.resolution}).")
    if args.format == "webdataset":
        shards = export_shapes_shards(args.out, args.num_samples, args.resolution, args.shard_size, args.seed,
                                      args.split, args.categories, args.overwrite)
        print(f"Wrote {args.num_samples} samples in {len(shards)} tar shard(s) to {args.out}; train on them with "
              f"--train_data_dir {args.out} [--streaming]")
        return
    path = export_shapes(args.out, args.num_samples, args.resolution, args.seed, args.split, args.categories,
                         args.overwrite)
    print(f"Wrote {args.num_samples} images and {path}; train on it with --train_data_dir {args.out}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: `export_main` through `ldm_pipeline.errors.run_cli` (one line per error)."""
    run_cli(export_main, argv, prog="ldm-export-shapes")


if __name__ == "__main__":
    main()
