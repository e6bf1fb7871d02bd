"""Checkpoints of a training run: saved whole or not at all, pruned, checked before a resume.

``OUTPUT_DIR/checkpoints/checkpoint-{step}`` holds ``accelerator.save_state``'s files (models, optimizers,
schedulers, RNG states, registered objects: the EMA, a stream's position), the run's fingerprint
(``run_fingerprint.json``: config, data, frozen stages and the number of processes) and, written last,
``checksums.sha256`` (``sha256sum`` format: ``sha256sum -c checksums.sha256`` checks it by hand). A resume checks
every file against its checksum and the fingerprint against the current run, and refuses otherwise with one line
that names the file or setting and says how to proceed.

A checkpoint resumes under another number of processes when the global batch (processes x batch x accumulation)
stays the same: the data order and the random draws are functions of the global batch (``trainer.train_batches``,
``StageTrainer.global_randn``), the learning-rate schedule's counter is rescaled (Accelerate steps it once per
process) and a process the checkpoint has no random state for continues from process 0's (``set_seed`` gives every
process one state and the stages draw alike in all of them). Another global batch is refused with the arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from ldm_pipeline.durable import fsync_directory, fsync_tree, raise_if_disk_full, write_text_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
FINGERPRINT_FILE = "run_fingerprint.json"
CHECKSUMS_FILE = "checksums.sha256"
PROCESSES_KEY = "num_processes"  # in run_fingerprint.json beside the fingerprint; not compared as part of it
BATCH_LAYOUT = ("train_batch_size", "gradient_accumulation_steps")  # compared as the global batch they make


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
            (partial / FINGERPRINT_FILE).write_text(json.dumps(
                {**fingerprint, PROCESSES_KEY: accelerator.num_processes}, indent=2, default=str))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_checksums(partial)
    except Exception as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise_if_disk_full(error, root, f"checkpoint-{global_step}")
        raise
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """``directory/checksums.sha256``: the SHA-256 of every other file under ``directory`` (``sha256sum`` format),
    written atomically once they are all written."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE)
    write_text_atomic(directory / CHECKSUMS_FILE,
                      "".join(f"{file_sha256(p)}  {p.relative_to(directory).as_posix()}\n" for p in files))


def earlier_checkpoint_advice(path: Path) -> str:
    """What to do about a damaged checkpoint: resume from the newest one before it, or start over."""
    earlier = [p for p in list_checkpoints(path.parent.parent) if p.name != path.name
               and int(CHECKPOINT_PATTERN.match(p.name).group(1)) < int(CHECKPOINT_PATTERN.match(path.name).group(1))]
    if earlier:
        return f"resume from an earlier checkpoint with --resume_from_checkpoint {earlier[-1]}"
    return "no earlier checkpoint is left: start over with --overwrite_output_dir"


def verify_checksums(path: Path) -> None:
    """Every file of checkpoint ``path`` must match ``checksums.sha256``; otherwise a ValueError naming the file."""
    manifest = path / CHECKSUMS_FILE
    if not manifest.is_file():
        raise ValueError(f"{manifest} is missing, so checkpoint {path.name} cannot be checked (it was saved by an "
                         f"older version, or damaged): {earlier_checkpoint_advice(path)}.")
    for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if not name:
            raise ValueError(f"{manifest} is damaged (line {line[:40]!r}): {earlier_checkpoint_advice(path)}.")
        file = path / name
        if not file.is_file():
            raise ValueError(f"{file} is missing: checkpoint {path.name} is incomplete; "
                             f"{earlier_checkpoint_advice(path)}.")
        if file_sha256(file) != digest:
            raise ValueError(f"{file} is damaged (its SHA-256 does not match {CHECKSUMS_FILE}: it was changed or cut "
                             f"short after the checkpoint was saved); {earlier_checkpoint_advice(path)}.")


def _without_batch_layout(fingerprint: dict) -> dict:
    training = {k: v for k, v in fingerprint.get("training", {}).items() if k not in BATCH_LAYOUT}
    return {**{k: v for k, v in fingerprint.items() if k != PROCESSES_KEY}, "training": training}


def batch_layout(num_processes: int, training: dict) -> tuple[int, int, int]:
    """``(processes, batch per process, accumulation)`` of a run; their product is its global batch."""
    return (num_processes, *(int(training.get(key, 1)) for key in BATCH_LAYOUT))


def check_batch_layout(path: Path, saved: dict, saved_processes: int, current: dict, num_processes: int) -> str | None:
    """None when the run has the checkpoint's batch layout; a line to print when only the split of the same global
    batch changed; a ValueError with the arithmetic when the global batch differs, or when a --streaming run (whose
    shards are split by process) changes its number of processes."""
    old = batch_layout(saved_processes, saved.get("training", {}))
    new = batch_layout(num_processes, current.get("training", {}))
    if old == new:
        return None
    old_global, new_global = old[0] * old[1] * old[2], new[0] * new[1] * new[2]
    written = f"{old[0]} process(es) x batch {old[1]} x {old[2]} accumulation"
    if old_global != new_global:
        processes, batch, accumulation = new
        options = [f"--train_batch_size {old_global // (processes * accumulation)}"
                   if old_global % (processes * accumulation) == 0 else None,
                   f"--gradient_accumulation_steps {old_global // (processes * batch)}"
                   if old_global % (processes * batch) == 0 else None]
        fix = " or ".join(o for o in options if o) or (f"--train_batch_size B and --gradient_accumulation_steps A "
                                                        f"with {processes} x B x A = {old_global}")
        raise ValueError(f"{path} was written by {written} = global batch {old_global}; this run has "
                         f"{processes} x {batch} x {accumulation} = {new_global}: pass {fix} to continue it with the "
                         "same global batch.")
    if old[0] != new[0] and saved.get("data", {}).get("streaming"):
        raise ValueError(f"{path} belongs to a --streaming run of {old[0]} process(es), which split the shards "
                         f"between them: resume it with {old[0]} process(es).")
    note = (" With another accumulation the micro-batches and their random draws differ: the run goes on with the "
            "same global batch, not bit for bit as it would have." if old[2] != new[2] else "")
    return (f"Resuming {path.name}, written by {written}, with {new[0]} x {new[1]} x {new[2]}: the same global "
            f"batch of {new_global}.{note}")


def check_checkpoint(path: Path, num_processes: int, fingerprint: dict | None, defaults: dict | None = None,
                     print_fn=print) -> int:
    """Refuse a checkpoint that is damaged (a file missing, changed or cut short since it was saved), that has no
    fingerprint, that was saved by a different run, or whose global batch differs from this run's. Returns the
    number of processes that wrote it (for `load_checkpoint`)."""
    verify_checksums(path)
    saved_processes = len(list(path.glob("random_states_*.pkl"))) or 1
    if fingerprint is None:
        return saved_processes
    saved_file = path / FINGERPRINT_FILE
    if not saved_file.is_file():
        raise ValueError(f"{saved_file} is missing, so checkpoint {path.name} cannot be matched to this run: "
                         f"{earlier_checkpoint_advice(path)}.")
    saved = json.loads(saved_file.read_text())
    saved_processes = int(saved.get(PROCESSES_KEY, saved_processes))
    current = json.loads(json.dumps(fingerprint, default=str))
    differences = fingerprint_differences(_without_batch_layout(saved), _without_batch_layout(current),
                                          defaults=json.loads(json.dumps(defaults or {}, default=str)))
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise ValueError(f"{path} belongs to a different run ({shown}). Resume with the same config, data and "
                         "frozen stages, or train into a new --output_dir, or pass --overwrite_output_dir to "
                         "discard the old checkpoints.")
    change = check_batch_layout(path, saved, saved_processes, current, num_processes)
    if change:
        print_fn(change)
    return saved_processes


def restore_random_states(path: Path) -> None:
    """Set Python's, NumPy's and torch's generators from an Accelerate ``random_states_{i}.pkl`` (read without
    unpickling code: ``accelerate.utils.load``)."""
    from accelerate.utils import load

    states = load(path)
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])


def load_checkpoint(accelerator: Accelerator, path: Path, saved_processes: int) -> None:
    """``accelerator.load_state(path)``; when ``saved_processes`` differs from this run's process count, the
    learning-rate schedules' counters are rescaled (Accelerate steps a schedule once per process and update) and a
    process beyond the checkpoint's continues from process 0's random state."""
    accelerator.load_state(str(path))
    num_processes = accelerator.num_processes
    if saved_processes == num_processes:
        return
    if accelerator.process_index >= saved_processes:
        restore_random_states(path / "random_states_0.pkl")
    for prepared in accelerator._schedulers:
        schedule = prepared.scheduler
        steps, _ = divmod(schedule.last_epoch, saved_processes)
        schedule.last_epoch = steps * num_processes - 1
        with warnings.catch_warnings():  # it warns of a step before the optimizer's when its counter was 1
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            schedule.step()  # recomputes the learning rates at the rescaled counter


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
