"""Checkpoints of a training run: saved whole or not at all, pruned, checked before a resume.

``OUTPUT_DIR/checkpoints/checkpoint-{step}`` holds ``accelerator.save_state``'s files (models, optimizers,
schedulers, RNG states, registered objects: the EMA, a stream's position) and the run's fingerprint
(``run_fingerprint.json``: config, data and frozen stages). A resume checks that the random-state files are intact
and that the fingerprint matches the current run, and refuses otherwise with a message that says how to proceed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch
from accelerate import Accelerator

from ldm_pipeline.durable import fsync_directory, fsync_tree, raise_if_disk_full

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
FINGERPRINT_FILE = "run_fingerprint.json"


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``OUTPUT_DIR/checkpoints``, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def save_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike, global_step: int,
                    total_limit: int | None = None, fingerprint: dict | None = None) -> Path:
    """Save the full training state (models, optimizers, schedulers, RNGs, registered objects) and the run
    fingerprint.

    The state is written to a temporary directory, fsynced, and renamed to ``checkpoint-{global_step}`` only once
    complete, so an interrupted save never leaves a checkpoint that ``latest`` would pick; a full disk is reported
    as such and the earlier checkpoints stay. Older checkpoints beyond ``total_limit`` are removed afterwards.
    """
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{global_step}"
    partial = root / f".partial-checkpoint-{global_step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial), safe_serialization=True)
        if accelerator.is_main_process and fingerprint is not None:
            (partial / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2, default=str))
    except Exception as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise_if_disk_full(error, root, f"checkpoint-{global_step}")
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        fsync_directory(root)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.debug("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def fingerprint_differences(saved: dict, current: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """``["training.learning_rate: 0.001 -> 0.002", ...]`` for every leaf where two fingerprints differ. A key the
    saved fingerprint lacks (an option added since it was written) is no difference when the current value is the
    option's default in ``defaults`` (same nesting)."""
    differences = []
    defaults = defaults or {}
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            nested = defaults.get(key) if isinstance(defaults.get(key), dict) else None
            differences += fingerprint_differences(a, b, name + ".", nested)
        elif key not in saved and key in defaults and _same_json(defaults[key], b):
            continue
        elif not _same_json(a, b):
            differences.append(f"{name}: {a!r} -> {b!r}")
    return differences


def _same_json(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def archive_is_intact(path: Path) -> bool:
    """True when ``path`` is a complete ``torch.save`` archive whose every member matches its CRC-32 (checked
    without unpickling anything)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def check_checkpoint(path: Path, num_processes: int, fingerprint: dict | None, defaults: dict | None = None) -> None:
    """Refuse a checkpoint that is damaged (a random-state file missing or unreadable, which would silently
    break exact resume) or that was saved by a different run."""
    for index in range(num_processes):
        states = path / f"random_states_{index}.pkl"
        if not states.is_file():
            raise ValueError(f"{states} is missing: checkpoint {path.name} is incomplete and cannot resume exactly. "
                             "Resume from an earlier checkpoint (--resume_from_checkpoint PATH) or start over with "
                             "--overwrite_output_dir.")
        if not archive_is_intact(states):
            raise ValueError(f"{states} is damaged: resume from an earlier checkpoint (--resume_from_checkpoint "
                             "PATH) or start over with --overwrite_output_dir.")
    saved_file = path / FINGERPRINT_FILE
    if fingerprint is None or not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text())
    current = json.loads(json.dumps(fingerprint, default=str))
    differences = fingerprint_differences(saved, current, defaults=json.loads(json.dumps(defaults or {}, default=str)))
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise ValueError(f"{path} belongs to a different run ({shown}). Resume with the same config, data and "
                         "frozen stages, or train into a new --output_dir, or pass --overwrite_output_dir to "
                         "discard the old checkpoints.")


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str | os.PathLike, print_fn=print) -> Path | None:
    """The checkpoint named by ``--resume_from_checkpoint``: ``None`` -> fresh start; ``"latest"`` -> the newest in
    ``OUTPUT_DIR/checkpoints`` (a fresh start with a message when there is none); a path must exist."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            print_fn(f"No checkpoint in {checkpoints_dir(output_dir)}: starting a new training run.")
            return None
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path}: no such checkpoint directory. Use 'latest' or one of: "
            f"{[p.name for p in list_checkpoints(output_dir)] or 'none saved yet'}."
        )
    if not CHECKPOINT_PATTERN.match(path.name):
        raise ValueError(f"{path} is not a checkpoint directory (expected a name like checkpoint-500).")
    return path


def register_ema_for_checkpointing(accelerator: Accelerator, ema_model, model_cls, subfolder: str) -> None:
    """Save and restore ``ema_model`` (a Diffusers ``EMAModel``) in every checkpoint as ``{checkpoint}/{subfolder}``:
    the averaged weights as safetensors, the EMA counters in its config.json (no pickle, unlike
    ``accelerator.register_for_checkpointing``). Neither hook touches the global RNG, so resume stays exact."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            with torch.random.fork_rng(devices=[]):  # building the model to save draws random initial weights
                ema_model.save_pretrained(os.path.join(output_dir, subfolder))

    def load_hook(models, input_dir):
        with torch.random.fork_rng(devices=[]):
            loaded = type(ema_model).from_pretrained(os.path.join(input_dir, subfolder), model_cls)
        ema_model.load_state_dict(loaded.state_dict())
        ema_model.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
