"""Local data files as they are now, or a clear stop: what ``ldm_pipeline.data.datasets`` checks before it reads.

- `file_identity`: a file's size, modification and status-change times. A rewrite can restore the modification
  time (``os.utime``, ``rsync -t``, ``cp -p``) but not the status-change time, which the kernel sets on every
  write, so a rewritten file always gets a new identity.
- `load_local_dataset`: ``datasets.load_dataset`` over local files whose Arrow copy in the ``datasets`` cache is
  re-made when a file's identity changed (``datasets`` keys that copy by modification time alone).
- `check_tar_shards`: every tar shard is read header by header (not its data): one that is not a tar archive, holds
  no sample, or is cut short (a member runs past the end of the file, or the end-of-archive blocks are missing) is
  a ValueError naming it; so is a sample with an image or caption member that the first sample of its split does
  not have (``datasets``' reader takes the columns from the first samples and would drop that member). The sample
  count of each shard is recorded in the ``datasets`` cache, and a shard whose count changed since it was last read
  is named in a warning.
- `check_one_layout`: tar shards beside an imagefolder's metadata (one of them would be ignored) are refused.
- `check_inside`: an imagefolder's ``file_name`` must stay inside the folder (no absolute path, no ``..``).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ldm_pipeline.durable import write_json_atomic

logger = logging.getLogger(__name__)

SHARD_RECORD = "ldm_pipeline_shards.json"  # in the datasets cache: {shard path: {identity, samples}}
IDENTITY_RECORD = "ldm_pipeline_files.json"  # beside a prepared Arrow copy: the identities of the files it was made of
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("txt", "json")
TAR_BLOCK = 512


def file_identity(path: Path) -> tuple[int, int, int]:
    """``(size, st_mtime_ns, st_ctime_ns)``: changes whenever the file is written, also when its modification time
    is set back afterwards."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


# --------------------------------------------------------------------------------------------- folder layout


def check_one_layout(root: Path, shards: list[Path], metadata_files: tuple[str, ...], splits: tuple[str, ...]) -> None:
    """Tar ``shards`` and an imagefolder's metadata in one data folder: a ValueError naming both."""
    metadata = [folder / name for folder in [root] + [root / split for split in splits] for name in metadata_files
                if (folder / name).is_file()]
    if shards and metadata:
        more = f" and {len(shards) - 1} more" if len(shards) > 1 else ""
        raise ValueError(f"--train_data_dir {root} holds both tar shards ({shards[0]}{more}) and an imagefolder "
                         f"({metadata[0]}); only one of them would be read. Move one of them to a folder of its own.")


def check_inside(folder: Path, file_name: str, where: str) -> None:
    """``file_name`` (a metadata row's image) must be a relative path inside ``folder``."""
    if os.path.isabs(file_name) or os.path.normpath(file_name).split(os.sep)[0] == os.pardir:
        raise ValueError(f"{where}: file_name {file_name!r} points outside {folder}: image paths must be relative to "
                         "the data folder and stay inside it (no absolute path, no '..'). Move the image into the "
                         "folder and name it relative to it.")


# --------------------------------------------------------------------------------------------- tar shards


@dataclass(frozen=True)
class ShardScan:
    """What a shard's headers say: its sample count and its distinct member sets, each with the first sample that
    has it (``((fields, key), ...)``, fields sorted)."""

    samples: int
    member_sets: tuple[tuple[tuple[str, ...], str], ...]


def sample_key_and_field(name: str) -> tuple[str | None, str | None]:
    """``("dir/0001", "seg.png")`` for ``dir/0001.seg.png``: the WebDataset split at the first dot of the base name
    (what ``datasets``' webdataset reader does)."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else (None, None)


@functools.lru_cache(maxsize=4096)
def _scan(path: str, identity: tuple[int, int, int]) -> ShardScan:
    shard = Path(path)
    size = identity[0]
    keys, member_sets, fields, last_end = 0, {}, [], 0
    current = None
    try:
        with tarfile.open(shard) as archive:
            uncompressed = isinstance(archive.fileobj, io.BufferedReader)
            for member in archive:
                if not member.isreg() or os.path.basename(member.name).startswith((".", "__")):
                    continue
                key, field = sample_key_and_field(member.name)
                if key is None:
                    continue
                if key != current:
                    if current is not None:
                        member_sets.setdefault(tuple(sorted(fields)), current)
                    current, fields, keys = key, [], keys + 1
                fields.append(field)
                last_end = member.offset_data + member.size
            end_of_members = archive.offset
    except (tarfile.TarError, OSError) as error:
        raise ValueError(f"Shard {shard} is not a readable tar archive ({error}): write it again or move it out of "
                         "the folder.") from None
    if current is None:
        raise ValueError(f"Shard {shard} is empty (no samples): write its samples again or move it out of the folder.")
    member_sets.setdefault(tuple(sorted(fields)), current)
    if uncompressed:
        with open(shard, "rb") as f:
            f.seek(end_of_members)
            end_marker = f.read(TAR_BLOCK)
        if last_end > size or len(end_marker) < TAR_BLOCK or end_marker.strip(b"\0"):
            raise ValueError(f"Shard {shard} is cut short (its last sample {current!r} or the end-of-archive blocks "
                             f"run past its {size} bytes): copy or write it again, or move it out of the folder.")
    return ShardScan(keys, tuple((fields, key) for fields, key in member_sets.items()))


def scan_tar_shard(shard: Path) -> ShardScan:
    """Read ``shard``'s headers (once per version of the file in a process): a ValueError when it is not a tar
    archive, holds no sample, or is cut short."""
    return _scan(str(shard), file_identity(shard))


def check_same_members(scans: dict[Path, ShardScan], where: str) -> None:
    """Every sample of one split must have only the image and caption members its first sample has."""
    reference, first_key = next(iter(scans.values())).member_sets[0]
    first_shard = next(iter(scans))
    for shard, scan in scans.items():
        for fields, key in scan.member_sets:
            extra = [field for field in fields if field not in reference
                     and field.rsplit(".", 1)[-1] in IMAGE_FIELDS + CAPTION_FIELDS]
            if extra:
                raise ValueError(
                    f"Cannot read the shards of {where}: shard {shard} sample {key!r} has the member(s) "
                    f"{', '.join('.' + f for f in extra)}, which the first sample ({first_shard} sample {first_key!r}: "
                    f"{', '.join('.' + f for f in reference)}) does not have, so they would be dropped: every sample "
                    "needs the same members (one image: .jpg, .jpeg, .png or .webp; a caption: .txt or .json). "
                    "Write it again with the first sample's member types.")


def record_sample_counts(scans: dict[Path, ShardScan]) -> None:
    """Warn about each shard whose sample count changed since it was last read, then record the counts (in the
    ``datasets`` cache; records of shards that no longer exist are dropped)."""
    import datasets

    path = Path(datasets.config.HF_DATASETS_CACHE) / SHARD_RECORD
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        record = {}
    for shard, scan in scans.items():
        name, identity = str(shard.resolve()), list(file_identity(shard))
        previous = record.get(name)
        if previous and previous.get("identity") != identity and previous.get("samples") != scan.samples:
            logger.warning("Shard %s now holds %d samples; it held %d when it was last read: it was rewritten since "
                           "(a resumed run will refuse its checkpoints, as its data changed).", shard, scan.samples,
                           previous.get("samples"))
        record[name] = {"identity": identity, "samples": scan.samples}
    record = {name: entry for name, entry in record.items() if Path(name).is_file()}
    try:
        write_json_atomic(path, record)
    except OSError as error:  # a read-only cache only loses the record
        logger.debug("Cannot record shard sample counts in %s: %s", path, error)


def check_tar_shards(splits: dict[str, list[str]], where: str) -> None:
    """`scan_tar_shard` each shard of each split, `check_same_members` per split, `record_sample_counts`."""
    scans = {}
    for files in splits.values():
        split_scans = {Path(f): scan_tar_shard(Path(f)) for f in files}
        if split_scans:
            check_same_members(split_scans, where)
        scans.update(split_scans)
    record_sample_counts(scans)


# --------------------------------------------------------------------------------------------- Arrow copies


def load_local_dataset(path: str, files: list[Path], **kwargs):
    """``datasets.load_dataset(path, **kwargs)`` over the local ``files``, its Arrow copy in the ``datasets`` cache
    made again when one of the files changed since the copy was made (``datasets`` keys the copy by the files'
    modification times, which a rewrite can restore). The identities of the files are kept beside the copy."""
    import datasets

    identities = {str(f): list(file_identity(f)) for f in sorted(files)}
    builder_kwargs = {k: v for k, v in kwargs.items() if k in ("data_files", "data_dir")}
    cache_dir = Path(datasets.load_dataset_builder(path, **builder_kwargs).cache_dir)
    record = cache_dir / IDENTITY_RECORD
    try:
        recorded = json.loads(record.read_text()) if record.is_file() else None
    except (OSError, ValueError):
        recorded = None
    if (cache_dir / "dataset_info.json").is_file() and recorded != identities:
        logger.info("The files of %s changed since their Arrow copy %s was made: making it again.", path, cache_dir)
        kwargs = {**kwargs, "download_mode": "force_redownload", "verification_mode": "no_checks"}
    dataset = datasets.load_dataset(path, **kwargs)
    try:
        write_json_atomic(record, identities)
    except OSError as error:
        logger.debug("Cannot record the file identities in %s: %s", record, error)
    return dataset
