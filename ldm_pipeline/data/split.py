"""The held-out split: the items of a dataset that no stage trains on, the same for every stage and ``ldm-eval``.

Which items are held out depends on the data and ``--data_seed`` only, never on a stage's
``--num_validation_samples`` (how many of the held-out items that stage validates on):

- ``shapes``: the built-in data's validation items are a random stream of their own (``shapes.scene_rng`` keyed by
  split), disjoint from the training stream whatever the sizes.
- ``validation split``: user data with a validation (or test) split or folder of its own: that split.
- ``held-out files``: tar shards, and every source read with --streaming, without such a split: the last
  ``--num_validation_shards`` data files in name order (or the validation folder's files).
- ``held-out slice``: any other user data of ``N`` items: the first ``H`` items of
  ``numpy.random.default_rng(data_seed).permutation(N)``, ``H = --num_held_out_samples`` or by default
  ``round(N / 10)`` clipped to ``[1, 200]``. A stage validates on the first ``--num_validation_samples`` of them
  (in that order); ``ldm-eval --text_stage`` evaluates on all of them.

Every stage writes its split to ``OUTPUT_DIR/data_split.json`` (`split_record`: data source, kind, seed, sizes,
held-out ids and their hash). `check_not_trained_on` compares a split with those of other runs: ``ldm-eval``
evaluating on items that a stage trained on (or the U-Net stage holding out items its frozen VAE or text
encoder trained on) is an error naming both runs and what differs.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

SPLIT_FILE = "data_split.json"
SHAPES, OWN_SPLIT, HELD_OUT_FILES, HELD_OUT_SLICE = "shapes", "validation split", "held-out files", "held-out slice"
DEFAULT_HELD_OUT_FRACTION = 0.1
DEFAULT_HELD_OUT_MAX = 200
HELD_OUT_FLAG = "--num_held_out_samples"


def held_out_size(num_items: int, requested: int | None, source: str) -> int:
    """``H``, the number of items held out of ``num_items``: ``requested``, or by default
    ``round(N · 0.1)`` clipped to ``[1, 200]``.

    Fewer than 2 items, or a request that leaves a training set smaller than the held-out set (``H > N / 2``), is a
    ValueError naming the sizes and the flag; a request above ``N / 4`` is allowed with a warning."""
    if num_items < 2:
        raise ValueError(f"{source} has {num_items} usable item(s); at least 2 are needed: one to train on and one to "
                         "hold out.")
    if requested is None:
        return int(min(DEFAULT_HELD_OUT_MAX, max(1, round(num_items * DEFAULT_HELD_OUT_FRACTION))))
    suggestion = max(1, round(num_items * DEFAULT_HELD_OUT_FRACTION))
    if 2 * requested > num_items:
        raise ValueError(f"{HELD_OUT_FLAG} {requested} holds out more than half of the {num_items} items of {source}, "
                         f"leaving {max(0, num_items - requested)} to train on: lower {HELD_OUT_FLAG} (e.g. "
                         f"{suggestion}), or leave it out for the default.")
    if 4 * requested > num_items:
        warnings.warn(f"{HELD_OUT_FLAG} {requested} holds out {requested} of the {num_items} items of {source}: every "
                      f"stage trains on the other {num_items - requested} only (lower {HELD_OUT_FLAG}, e.g. to "
                      f"{suggestion}, to train on more).", stacklevel=2)
    return requested


def held_out_rows(num_items: int, requested: int | None, seed: int, source: str) -> np.ndarray:
    """The held-out rows of a ``held-out slice``: ``permutation(N)[:H]`` of ``default_rng(seed)`` (in that order, so
    that the first ``n`` of them are the same for every ``n``)."""
    count = held_out_size(num_items, requested, source)
    return np.random.default_rng(seed).permutation(num_items)[:count]


def ids_digest(ids) -> str:
    """SHA-256 (hex, 16 characters) of the sorted held-out ids."""
    return hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()[:16]


def split_record(data, kind: str, num_items: int | None = None, held_out_ids: list | None = None,
                 num_held_out: int | None = None) -> dict:
    """What ``data_split.json`` holds: the source (and its resolved folder), the kind of split, the seed and sizes,
    the held-out ids (rows of a slice, file names of held-out files) and their hash."""
    folder = str(Path(data.train_data_dir).resolve()) if data.dataset_name is None and data.train_data_dir else None
    ids = sorted(held_out_ids) if held_out_ids is not None else None
    return {"source": data.source, "folder": folder, "dataset_config_name": data.dataset_config_name, "kind": kind,
            "data_seed": data.data_seed, "num_items": num_items,
            "num_held_out": len(ids) if ids is not None else num_held_out,
            "num_held_out_samples": data.num_held_out_samples, "num_validation_shards": data.num_validation_shards,
            "held_out_sha256": ids_digest(ids) if ids is not None else None, "held_out_ids": ids}


def describe_split(record: dict) -> str:
    """One line: ``held-out slice: 30 of 300 items of my_folder (--data_seed 0, --num_held_out_samples default)``."""
    if record["kind"] == SHAPES:
        return (f"shapes: the validation items are a stream of their own (--data_seed {record['data_seed']}), "
                "disjoint from the training items")
    if record["kind"] == OWN_SPLIT:
        return f"validation split: the validation split of {record['source']}"
    if record["kind"] == HELD_OUT_FILES:
        return (f"held-out files: {record['num_held_out']} data file(s) of {record['source']} "
                f"(--num_validation_shards {record['num_validation_shards']})")
    requested = record["num_held_out_samples"]
    return (f"held-out slice: {record['num_held_out']} of {record['num_items']} items of {record['source']} "
            f"(--data_seed {record['data_seed']}, {HELD_OUT_FLAG} {requested if requested is not None else 'default'})")


def write_split_record(output_dir: str | Path, record: dict) -> Path:
    """Write ``record`` to ``OUTPUT_DIR/data_split.json`` (atomically); returns the path."""
    from ldm_pipeline.trainer import write_json_atomic

    path = Path(output_dir) / SPLIT_FILE
    write_json_atomic(path, record)
    return path


def read_split_record(directory: str | Path) -> dict | None:
    """The ``data_split.json`` of a stage output, or None when it has none (a run from before it was written, or
    a pretrained component)."""
    path = Path(directory) / SPLIT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _same_source(a: dict, b: dict) -> bool:
    return (a["folder"] or a["source"], a["dataset_config_name"]) == (b["folder"] or b["source"], b["dataset_config_name"])


def trained_on_held_out(held_out: dict, trained: dict) -> str | None:
    """Why some items that ``held_out``'s run holds out were training items of ``trained``'s run, or None when
    none were (or the runs read different data)."""
    if not _same_source(held_out, trained):
        return None
    if held_out["kind"] == trained["kind"] and held_out["kind"] in (SHAPES, OWN_SPLIT):
        return None  # disjoint from the training items by construction
    if held_out["kind"] != trained["kind"]:
        return f"the split kinds differ ({trained['kind']} vs {held_out['kind']}): the data changed between the runs"
    if held_out["kind"] == HELD_OUT_SLICE and held_out["num_items"] != trained["num_items"]:
        return (f"the data had {trained['num_items']} items when one run read it and {held_out['num_items']} when the "
                "other did, so the random held-out slices differ")
    leaked = set(held_out["held_out_ids"]) - set(trained["held_out_ids"])
    if not leaked:
        return None
    what = "data file(s)" if held_out["kind"] == HELD_OUT_FILES else "item(s)"
    return f"{len(leaked)} of its {held_out['num_held_out']} held-out {what} were training data there"


def check_not_trained_on(record: dict, runs: dict[str, str | Path | None], who: str) -> None:
    """Raise a ValueError when some of the items ``record`` holds out were training items of one of ``runs``
    (``{"--text_stage": directory}``; runs without ``data_split.json`` are not checked). The message names both
    runs, both splits and the flags that make them agree."""
    for flag, directory in runs.items():
        if directory is None or not Path(directory).is_dir():
            continue
        trained = read_split_record(directory)
        if trained is None:
            continue
        reason = trained_on_held_out(record, trained)
        if reason is not None:
            raise ValueError(f"{who} would hold out items that {flag} {directory} trained on: {reason}. {directory}: "
                             f"{describe_split(trained)}; {who}: {describe_split(record)}. Pass {who} the same "
                             f"data flags (--data_seed, {HELD_OUT_FLAG}, --num_validation_shards) as that run.")


def record_stage_split(data, output_dir: str | Path, write: bool, frozen_runs: dict | None = None,
                       who: str = "this run") -> dict:
    """A training stage's split: checked against the ``frozen_runs`` it builds on (``{"--vae": directory}``) and
    written to ``OUTPUT_DIR/data_split.json`` when ``write`` (the main process). Returns the record."""
    from .datasets import data_split_record

    record = data_split_record(data)
    check_not_trained_on(record, frozen_runs or {}, who)
    if write:
        write_split_record(output_dir, record)
    return record
