"""The skeleton every training stage shares: set-up, step bookkeeping, logging, checkpoints, validation cadence,
final save. Each ``training/train_<stage>.py`` builds its models, data and loss, and leaves the rest to
:class:`StageTrainer`:

    trainer = StageTrainer(config)                       # Accelerator, seed, checked output dir
    model, optimizer, loader, lr_scheduler = trainer.prepare(model, optimizer, loader, lr_scheduler)
    trainer.start(fingerprint={...})                     # resume (exact), trackers, train_log.jsonl, progress bar
    for batch in trainer.batches(loader, sampler):
        with trainer.accelerator.accumulate(model):
            loss = ...
            trainer.backward(loss, model)                # finite check, backward, gradient clipping
            optimizer.step(); lr_scheduler.step(); optimizer.zero_grad(set_to_none=True)
        if trainer.end_micro_step(loss=loss):            # True after an optimizer update: logged, checkpointed
            if trainer.validation_due(): ...
    trainer.finish(save)                                 # main process saves; <stage>_metrics.json; model card

The contract of exact resume: a run interrupted after optimizer step ``S`` and resumed with
``--resume_from_checkpoint latest`` sees the same micro-batches, in the same order, with the same random draws, as
a run that was never interrupted. Every checkpoint carries the run's fingerprint (config, data, frozen stages);
resuming a different run, or starting a fresh run over one, is refused with a message that says how to proceed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from ldm_pipeline.config import StageConfig
from ldm_pipeline.errors import is_disk_full
from ldm_pipeline.logs import configure_training_logs, loss_line
from ldm_pipeline.threads import ThreadGovernor

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
FINGERPRINT_FILE = "run_fingerprint.json"
TRAIN_LOG = "train_log.jsonl"
MIN_FREE_BYTES = 64 << 20


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite."""


# --------------------------------------------------------------------------------------------------- files


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (and the directories themselves) to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_file(path: Path, writer: str | int) -> Path:
    """The temporary name ``atomic_file`` writes ``path`` under: ``.NAME.partial-WRITER`` (WRITER: the process id)."""
    return path.with_name(f".{path.name}.partial-{writer}")


def remove_partial_files(path: Path) -> None:
    """Delete what killed writers of ``path`` left behind (``atomic_file``'s temporary files)."""
    for partial in path.parent.glob(partial_file(path, "*").name):
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` to write; on success it is fsynced and renamed over ``path``, so
    readers see the old file or the whole new one, never a torn one. On failure the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_file(path, os.getpid())
    try:
        yield partial
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    _fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as partial:
        partial.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a temporary sibling directory; on success it is fsynced and renamed to ``final`` (replacing it)."""
    partial = final.with_name(f".partial-{final.name}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        fsync_tree(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    _fsync_dir(final.parent)


def check_writable(directory: str | os.PathLike, what: str) -> Path:
    """Create ``directory`` and prove it writable before any work is done (not after an hour of it)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(errno.EACCES, f"{what} {directory} is not writable ({error.strerror}): choose a "
                                            "writable location") from None
    return directory


def raise_if_disk_full(error: BaseException, directory: Path, what: str) -> None:
    """Turn a failed write into "No space left on device" when that is what happened (PyTorch's serializer
    reports a full disk only as ``unexpected pos``)."""
    free = shutil.disk_usage(directory).free if directory.exists() else MIN_FREE_BYTES
    if is_disk_full(error) or "unexpected pos" in str(error) or free < MIN_FREE_BYTES:
        raise OSError(errno.ENOSPC, f"No space left on device while writing {what} ({free >> 20} MiB free): free "
                                    "disk space, then resume with --resume_from_checkpoint latest (earlier "
                                    "checkpoints are intact)", str(directory)) from error


# --------------------------------------------------------------------------------------------------- data order


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """Indices in a random order that depends only on ``(seed, epoch)``.

    Unlike a ``RandomSampler`` driven by the global RNG, the order of epoch ``e`` can be recomputed after a
    restart, which is what exact resume needs.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def train_batches(
    accelerator: Accelerator,
    dataloader: torch.utils.data.DataLoader,
    sampler: EpochShuffleSampler,
    start_step: int,
    max_train_steps: int,
    gradient_accumulation_steps: int = 1,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(global_step, batch)`` micro-batches from optimizer step ``start_step`` to ``max_train_steps``.

    Micro-batch ``m`` belongs to optimizer step ``m // gradient_accumulation_steps``, epoch
    ``m // len(dataloader)`` and position ``m % len(dataloader)`` in that epoch. A resumed run starts at
    ``m = start_step * gradient_accumulation_steps``: it re-seeds the sampler for that epoch and skips the
    batches already seen with ``accelerator.skip_first_batches``, so it continues exactly where it stopped.
    ``dataloader`` must already be prepared by ``accelerator``.
    """
    batches_per_epoch = len(dataloader)
    if batches_per_epoch == 0:
        raise ValueError("The training dataloader is empty: the dataset is smaller than one batch. Lower "
                         "--train_batch_size or add data.")
    micro_step = start_step * gradient_accumulation_steps
    last_micro_step = max_train_steps * gradient_accumulation_steps
    while micro_step < last_micro_step:
        epoch, position = divmod(micro_step, batches_per_epoch)
        sampler.set_epoch(epoch)
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(dataloader, position) if position else dataloader
        for batch in loader:
            yield micro_step // gradient_accumulation_steps, batch
            micro_step += 1
            if micro_step >= last_micro_step:
                return


# --------------------------------------------------------------------------------------------------- streamed data

STREAM_STATE_FILE = "stream_state_{}.json"


class StreamLoader:
    """The training batches of one process's stream (`ldm_pipeline.data.StreamingImageCaptionDataset`).

    Not a ``DataLoader``, so ``accelerator.prepare`` hands it back unchanged: the stream is already split across
    processes (``split_dataset_by_node``) and needs no Accelerate sharding or dispatching. ``(epoch, position)``
    counts the batches this process has used of the current epoch; it is saved with every checkpoint
    (``stream_state_{process}.json``) and restored on resume (`stream_train_batches`).
    """

    def __init__(self, dataset, batch_size: int, collate_fn, num_workers: int, seed: int):
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn
        self.num_workers, self.seed = num_workers, seed
        self.epoch, self.position = 0, 0

    def epoch_batches(self, epoch: int) -> Iterator[dict]:
        """The full batches of ``epoch``, in the order a function of (seed, epoch, shards, buffer, workers) gives."""
        self.dataset.set_epoch(epoch)
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, collate_fn=self.collate_fn, drop_last=True,
            num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def without_worker_traceback(batches: Iterator[dict]) -> Iterator[dict]:
    """Re-raise an error of a DataLoader worker as the same type with the worker's own one-line message (PyTorch
    puts the worker's whole traceback into the message)."""
    try:
        yield from batches
    except Exception as error:
        message = str(error)
        if "DataLoader worker" not in message or "Original Traceback" not in message:
            raise
        own_message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        try:
            replacement = type(error)(own_message)
        except Exception:
            raise error from None
        raise replacement from error


def stream_train_batches(loader: StreamLoader, start_step: int, max_train_steps: int,
                         gradient_accumulation_steps: int = 1, device=None) -> Iterator[dict]:
    """The micro-batches of a stream from optimizer step ``start_step`` to ``max_train_steps``.

    Epoch ``e`` is the stream reshuffled with ``seed + e``, read to its end; then ``e + 1`` begins (processes may
    change epoch at different steps when their shares differ). A resumed run restores ``(epoch, position)`` from
    its checkpoint and reads and discards the ``position`` batches of that epoch it had already used, so it goes
    on with exactly the batches an uninterrupted run would see. (``IterableDataset.state_dict`` would skip the
    reading, but it does not keep the shuffle buffer, so the order after a resume would differ.)
    """
    from accelerate.utils import send_to_device

    micro_step = start_step * gradient_accumulation_steps
    last_micro_step = max_train_steps * gradient_accumulation_steps
    while micro_step < last_micro_step:
        batches = loader.epoch_batches(loader.epoch)
        for used in range(loader.position):
            if next(batches, None) is None:
                raise ValueError(f"The stream's epoch {loader.epoch} ended after {used} batches, but the checkpoint "
                                 f"had used {loader.position}: the data changed since it was saved. Resume with the "
                                 "same shards, or start over with --overwrite_output_dir.")
        for batch in batches:
            loader.position += 1
            yield send_to_device(batch, device) if device is not None else batch
            micro_step += 1
            if micro_step >= last_micro_step:
                return
        if loader.position == 0:
            raise ValueError("The training stream gave no full batch in an epoch: this process's share of the data "
                             "is smaller than one batch. Lower --train_batch_size, or add samples or shards.")
        loader.epoch, loader.position = loader.epoch + 1, 0


def register_stream_for_checkpointing(accelerator: Accelerator, loader: StreamLoader) -> None:
    """Save ``loader``'s position in every checkpoint, one small JSON file per process (each process reads its own
    stream), and restore it when a checkpoint is loaded."""

    def save_hook(models, weights, output_dir):
        write_json_atomic(Path(output_dir) / STREAM_STATE_FILE.format(accelerator.process_index), loader.state_dict())

    def load_hook(models, input_dir):
        path = Path(input_dir) / STREAM_STATE_FILE.format(accelerator.process_index)
        if not path.is_file():
            raise ValueError(f"{path} is missing: the checkpoint does not hold this process's stream position, so it "
                             "cannot resume a --streaming run exactly. Resume from another checkpoint, or start over "
                             "with --overwrite_output_dir.")
        loader.load_state_dict(json.loads(path.read_text()))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def check_same_shards(accelerator: Accelerator, shard_ids: list[str]) -> None:
    """Every process must stream the same shard list: its hash is gathered from all processes before training, and
    a difference is an error on every process (instead of a hang, or duplicated and missing samples)."""
    digest = int.from_bytes(hashlib.sha256("\n".join(shard_ids).encode()).digest()[:7], "little")
    local = torch.tensor([[digest, len(shard_ids)]], dtype=torch.int64, device=accelerator.device)
    everyone = accelerator.gather(local).reshape(-1, 2).cpu()  # [processes, 2]
    if (everyone != everyone[0]).any():
        seen = ", ".join(f"process {index}: {count} shard(s), list hash {value:014x}"
                         for index, (value, count) in enumerate(everyone.tolist()))
        raise ValueError(f"The processes do not see the same training shards ({seen}); this is process "
                         f"{accelerator.process_index}. Give every process the same --train_data_dir contents "
                         "(or --dataset_name) on every machine.")


def step_generator(seed: int, process_index: int, micro_step: int) -> torch.Generator:
    """The random draws of micro-batch ``micro_step`` depend only on (seed, process, micro_step): exact resume."""
    digest = hashlib.sha256(f"{seed}:{process_index}:{micro_step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def check_finite_loss(loss: torch.Tensor, global_step: int) -> None:
    """Stop training on a NaN or infinite loss, before the bad update is applied or saved."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"Loss is {loss.item()} at step {global_step}: training stopped before applying this update. "
            "Checkpoints saved so far are intact; lower --learning_rate or check the data, then resume with "
            "--resume_from_checkpoint latest."
        )


# --------------------------------------------------------------------------------------------------- checkpoints


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
        _fsync_dir(root)
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


@contextlib.contextmanager
def ema_weights(ema_model, model: torch.nn.Module):
    """Inside the block ``model`` holds the EMA average of its weights; afterwards its own weights again.
    A no-op when ``ema_model`` is None."""
    if ema_model is None:
        yield model
        return
    ema_model.store(model.parameters())
    ema_model.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema_model.restore(model.parameters())


# --------------------------------------------------------------------------------------------------- logs


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log. A torn last line (a kill or a full disk during an append) is dropped
    with a warning; a damaged line before it is an error naming the line."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("Dropping the torn last line %d of %s (an interrupted write).", number, path)
                continue
            raise ValueError(f"{path} line {number} is not JSON: delete that line (the log is only a record; "
                             "checkpoints do not depend on it) and resume again.") from None
    return records


class JsonlLogger:
    """Append one JSON object per line to a file (main process only); the file survives resumes."""

    def __init__(self, path: str | os.PathLike, accelerator: Accelerator, start_step: int = 0):
        self.path = Path(path)
        self.enabled = accelerator.is_main_process
        self.previous: list[dict] = []
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(start_step)

    def _truncate_after(self, step: int) -> None:
        """Drop records of steps > ``step`` left by an interrupted run, so a resume does not duplicate them."""
        if step == 0:
            self.path.unlink(missing_ok=True)
            return
        self.previous = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.previous))

    def log(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------------- the skeleton


class StageTrainer:
    """Everything around a stage's training step (see the module docstring)."""

    def __init__(self, config: StageConfig):
        self.config = config
        self.args = args = config.training
        self.stage = config.stage
        self.output_dir = Path(args.output_dir)
        report_to = None if args.report_to == "none" else args.report_to
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=report_to,
            project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.logging_dir),
        )
        if self.accelerator.device.type == "cpu" and args.mixed_precision != "no":
            raise ValueError(f"--mixed_precision {args.mixed_precision} was asked for on a CPU: train in fp32 "
                             "(--mixed_precision no).")
        configure_training_logs()
        set_seed(args.seed)
        check_writable(self.output_dir, "--output_dir")  # every process checks: none is left waiting for one
        self._check_fresh_run()                          # that stopped with an error
        self.accelerator.wait_for_everyone()
        self.global_step = 0
        self.start_step = 0
        self.micro_step = 0
        self.ema = None
        self.fingerprint: dict | None = None
        self._running: dict[str, float] = {}
        self._losses_since_line: list[float] = []  # the losses of the next --logging_steps line
        self._elapsed_before = 0.0
        self._data_fingerprint: str | None = None
        self.dataset = None
        self.train_seconds = 0.0
        # CPU only: the intra-op thread count follows the load of other processes (ldm_pipeline.threads).
        self.threads = ThreadGovernor(args.num_threads) if self.device.type == "cpu" else None
        self.loop_seconds = {"step": 0.0, "data": 0.0, "around_the_step": 0.0}
        self._batch_ready_at = self._step_done_at = None

    # -- set-up

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *values) -> None:
        self.accelerator.print(*values)

    def _check_fresh_run(self) -> None:
        """A fresh run (no --resume_from_checkpoint) must not mix its checkpoints with another run's."""
        existing = list_checkpoints(self.output_dir)
        if self.args.resume_from_checkpoint or not existing:
            return
        if self.args.overwrite_output_dir:
            self.print(f"--overwrite_output_dir: deleting {len(existing)} checkpoint(s) of an earlier run in "
                       f"{checkpoints_dir(self.output_dir)}.")
            if self.is_main_process:
                shutil.rmtree(checkpoints_dir(self.output_dir))
            return
        raise FileExistsError(f"{checkpoints_dir(self.output_dir)} holds checkpoints of an earlier run "
                              f"({existing[-1].name}): pass --resume_from_checkpoint latest to continue it, a new "
                              "--output_dir to keep it, or --overwrite_output_dir to discard it.")

    def prepare(self, *objects):
        return self.accelerator.prepare(*objects)

    def adamw(self, parameters, learning_rate: float | None = None) -> torch.optim.AdamW:
        """AdamW with the configured betas and weight decay (``learning_rate`` defaults to the configured one)."""
        return torch.optim.AdamW(parameters, lr=learning_rate or self.args.learning_rate,
                                 betas=(self.args.adam_beta1, self.args.adam_beta2),
                                 weight_decay=self.args.adam_weight_decay)

    def lr_schedule(self, optimizer: torch.optim.Optimizer, name: str | None = None):
        """The configured ``diffusers.optimization`` schedule over ``max_train_steps`` (counted per process, as
        the prepared scheduler steps once per process)."""
        from diffusers.optimization import get_scheduler

        num_processes = self.accelerator.num_processes
        return get_scheduler(name or self.args.lr_scheduler, optimizer=optimizer,
                             num_warmup_steps=self.args.lr_warmup_steps * num_processes,
                             num_training_steps=self.args.max_train_steps * num_processes)

    def dataloader(self, dataset, collate_fn=None) -> tuple[torch.utils.data.DataLoader, EpochShuffleSampler]:
        """A training loader over ``dataset`` in the order of an ``EpochShuffleSampler`` (exact resume), full
        batches only; its workers draw their seeds from a generator of their own, not from the global RNG.

        A stream (``ldm_pipeline.data.StreamingImageCaptionDataset``, --streaming) gives ``(StreamLoader, None)``
        instead: the processes first check that they see the same shards (`check_same_shards`), then each one
        reads its shuffled share (``for_training``), and its position is saved with every checkpoint."""
        if hasattr(dataset, "for_training"):
            return self._stream_loader(dataset, collate_fn), None
        sampler = EpochShuffleSampler(len(dataset), self.args.seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.args.train_batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=True,
            num_workers=self.args.dataloader_num_workers, generator=torch.Generator().manual_seed(self.args.seed))
        return loader, sampler

    def _stream_loader(self, dataset, collate_fn) -> StreamLoader:
        check_same_shards(self.accelerator, dataset.shard_ids)
        share = dataset.for_training(self.args.seed, self.config.data.shuffle_buffer_size,
                                     self.accelerator.process_index, self.accelerator.num_processes)
        if self.accelerator.num_processes > 1:
            self.print(f"Streaming {len(dataset.files)} shard(s) split across {self.accelerator.num_processes} "
                       f"processes by {share.split_strategy}.")
        loader = StreamLoader(share, self.args.train_batch_size, collate_fn, self.args.dataloader_num_workers,
                              self.args.seed)
        register_stream_for_checkpointing(self.accelerator, loader)
        return loader

    def track_ema(self, model: torch.nn.Module, model_cls, subfolder: str):
        """Keep an EMA of ``model``'s weights when ``--use_ema``; it is checkpointed and stepped after every update."""
        if not self.args.use_ema:
            return None
        from diffusers.training_utils import EMAModel

        self.ema = EMAModel(model.parameters(), decay=self.args.ema_decay, model_cls=model_cls,
                            model_config=model.config)
        self.ema.to(self.device)
        self._ema_target = model
        register_ema_for_checkpointing(self.accelerator, self.ema, model_cls, subfolder)
        return self.ema

    def ema_weights(self, model: torch.nn.Module):
        """Context manager: ``model`` holds the EMA weights inside the block (no-op without ``--use_ema``)."""
        return ema_weights(self.ema, model)

    def start(self, fingerprint: dict | None = None, num_samples: int | None = None, dataset=None) -> int:
        """Resume if asked (checking the checkpoint and the run fingerprint), start the trackers, the log and the
        progress bar. ``fingerprint`` adds what the config does not show (frozen stages); ``dataset`` is the
        training data, whose skipped images (``--skip_bad_images``) are reported at the end; ``num_samples``
        defaults to its length (a stream has none)."""
        self.dataset = dataset
        if num_samples is None and hasattr(dataset, "__len__"):
            num_samples = len(dataset)
        self.fingerprint = {**self.config.fingerprint(), "data_files": self.data_fingerprint, **(fingerprint or {})}
        path = resolve_resume_path(self.args.resume_from_checkpoint, self.output_dir, self.print)
        if path is not None:
            check_checkpoint(path, self.accelerator.num_processes, self.fingerprint, self.config.option_defaults())
            self.print(f"Resuming from {path}")
            self.accelerator.load_state(str(path))
            self.global_step = int(CHECKPOINT_PATTERN.match(path.name).group(1))
        self.start_step = self.global_step
        self.micro_step = self.global_step * self.args.gradient_accumulation_steps
        if self.accelerator.log_with or self.accelerator.trackers:
            hparams = {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool))}
            self.accelerator.init_trackers(self.stage, config=hparams)
        self.history = JsonlLogger(self.output_dir / TRAIN_LOG, self.accelerator, start_step=self.global_step)
        self._elapsed_before = max((r.get("elapsed_s", 0.0) for r in self.history.previous), default=0.0)
        samples = f"{num_samples} samples, " if num_samples is not None else ""
        self.print(f"Training {self.args.max_train_steps} steps from step {self.global_step}: {samples}batch "
                   f"{self.args.train_batch_size} x {self.accelerator.num_processes} processes x "
                   f"{self.args.gradient_accumulation_steps} accumulation")
        self.progress = tqdm(total=self.args.max_train_steps, initial=self.global_step, desc=self.stage,
                             disable=not self.accelerator.is_local_main_process)
        self.start_time = time.perf_counter()
        return self.global_step

    # -- the loop

    def batches(self, dataloader, sampler: EpochShuffleSampler) -> Iterator[dict]:
        """The micro-batches from the current step to ``max_train_steps`` (see ``train_batches``, and
        ``stream_train_batches`` for a `StreamLoader`)."""
        if isinstance(dataloader, StreamLoader):
            source = stream_train_batches(dataloader, self.global_step, self.args.max_train_steps,
                                          self.args.gradient_accumulation_steps, self.device)
        else:
            source = (batch for _, batch in train_batches(self.accelerator, dataloader, sampler, self.global_step,
                                                          self.args.max_train_steps,
                                                          self.args.gradient_accumulation_steps))
        source = without_worker_traceback(source)
        while True:
            requested_at = time.perf_counter()
            if self._step_done_at is not None:
                self.loop_seconds["around_the_step"] += requested_at - self._step_done_at
            batch = next(source, None)
            if batch is None:
                return
            self._batch_ready_at = time.perf_counter()
            self.loop_seconds["data"] += self._batch_ready_at - requested_at
            yield batch
            self.micro_step += 1

    def generator(self) -> torch.Generator:
        """The CPU generator of the current micro-batch's random draws (``step_generator``), the same in every
        process: draws are made for the global batch and each process keeps its rows (``global_rows``)."""
        return step_generator(self.args.seed, 0, self.micro_step)

    def global_rows(self, local_batch: int) -> tuple[int, slice]:
        """``(global_batch, rows)``: the size of the batch over all processes and this process's rows of it.

        Accelerate hands process ``p`` of ``n`` the ``p``-th of every ``n`` consecutive batches, so the global batch
        of a step is the batch of ``n · local_batch`` that one process would see. Drawing the noise for that global
        batch and keeping ``rows`` makes ``n`` processes of batch ``B`` compute what one process of batch ``n · B``
        computes (DDP averages their gradients to the same mean)."""
        index, count = self.accelerator.process_index, self.accelerator.num_processes
        return local_batch * count, slice(index * local_batch, (index + 1) * local_batch)

    def global_randn(self, local_shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """ε ~ N(0, I) for this process's rows: ``randn([n·B, *local_shape[1:]], generator)[rows]`` (``global_rows``).

        A sample's draw does not depend on how the global batch is split over processes, and an exact resume
        redraws it (``generator`` is the step's, ``self.generator()``)."""
        global_batch, rows = self.global_rows(local_shape[0])
        return torch.randn((global_batch, *local_shape[1:]), generator=generator)[rows]

    def backward(self, loss: torch.Tensor, model: torch.nn.Module) -> None:
        """Stop on a non-finite loss; backpropagate; clip the gradient norm to ``max_grad_norm`` on an update."""
        check_finite_loss(loss, self.global_step)
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients and self.args.max_grad_norm:
            self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)

    def end_micro_step(self, **values: torch.Tensor | float) -> bool:
        """Average ``values`` over processes and accumulation steps; after an optimizer update (True) advance the
        step, update the EMA, log, and save a checkpoint when one is due. The loop's time is split three ways
        (``loop_seconds``, in the stage's metrics): waiting for the batch, the step itself (from the batch to this
        call) and the work around the step (from this call to the next batch request: EMA, logs, checkpoints,
        snapshots, validation)."""
        self._step_done_at = time.perf_counter()
        if self._batch_ready_at is not None:
            self.loop_seconds["step"] += self._step_done_at - self._batch_ready_at
        if self.threads is not None:
            self.threads.maybe_adjust()
        names = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[n], device=self.device).detach().float().reshape(())
                               for n in names])
        for name, value in zip(names, self.accelerator.reduce(stacked, "mean").tolist()):
            self._running[name] = self._running.get(name, 0.0) + value / self.args.gradient_accumulation_steps
        if not self.accelerator.sync_gradients:
            return False
        self.global_step += 1
        if self.ema is not None:
            self.ema.step(self._ema_target.parameters())
        elapsed = self._elapsed_before + time.perf_counter() - self.start_time
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{self._running.get('loss', float('nan')):.4f}")
        self.accelerator.log({f"train/{k}": v for k, v in self._running.items()}, step=self.global_step)
        self.history.log(step=self.global_step, **self._running, elapsed_s=round(elapsed, 3))
        self._losses_since_line.append(self._running.get("loss", float("nan")))
        if self.every(self.args.logging_steps):
            if self.accelerator.is_local_main_process:
                self.progress.write(loss_line(self.global_step, self.args.max_train_steps, self._losses_since_line,
                                              self._running.get("lr")))
            self._losses_since_line = []
        self._running = {}
        if self.global_step % self.args.checkpointing_steps == 0:
            save_checkpoint(self.accelerator, self.output_dir, self.global_step, self.args.checkpoints_total_limit,
                            self.fingerprint)
        return True

    def every(self, steps: int | None) -> bool:
        """True when ``steps`` is set and the current step is a multiple of it."""
        return bool(steps) and self.global_step % steps == 0

    def validation_due(self) -> bool:
        """Every ``validation_steps``, except the last step: the final save validates."""
        return self.every(self.args.validation_steps) and self.global_step < self.args.max_train_steps

    def on_main_process(self, function: Callable, *args):
        """Run ``function(*args)`` on the main process while the others wait; returns its result there."""
        result = function(*args) if self.is_main_process else None
        self.accelerator.wait_for_everyone()
        return result

    @property
    def data_fingerprint(self) -> str:
        """``dataset_fingerprint`` of the training split (computed once)."""
        if self._data_fingerprint is None:
            from ldm_pipeline.data import dataset_fingerprint

            self._data_fingerprint = dataset_fingerprint(self.config.data, "train")
        return self._data_fingerprint

    def log_images(self, name: str, images: list) -> None:
        """Save ``images`` as one row in ``OUTPUT_DIR/{name}/step-N.png`` and send them to tensorboard."""
        import numpy as np
        from diffusers.utils import make_image_grid

        folder = self.output_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{self.global_step}.png"
        make_image_grid(images, rows=1, cols=len(images)).save(path)
        self.progress.write(f"step {self.global_step}: {name} images written to {path}")
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images(name, np.stack([np.asarray(i) for i in images]), self.global_step,
                                          dataformats="NHWC")

    def log_metrics(self, metrics: dict, prefix: str = "validation") -> None:
        self.accelerator.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=self.global_step)
        self.history.log(step=self.global_step, **{f"{prefix}_{k}": v for k, v in metrics.items()})

    # -- the end

    def finish(self, save: Callable[[], dict], card_stage_dirs: dict | None = None,
               base_models: dict | None = None) -> dict:
        """On the main process, with the EMA weights in the model: ``save()`` writes the stage's outputs and returns
        its metrics, which are completed with the step count and time and written to
        ``OUTPUT_DIR/<stage>_metrics.json``; a model card (``README.md``) describes the output, and
        ``--push_to_hub`` uploads it. Then the trackers stop. ``card_stage_dirs`` names the outputs of the other
        stages the card describes (the U-Net stage's pipeline holds all three)."""
        self.progress.close()
        self.train_seconds = train_seconds = time.perf_counter() - self.start_time
        self.accelerator.wait_for_everyone()
        metrics = {}
        if self.is_main_process:
            if self.ema is not None:
                self.ema.copy_to(self._ema_target.parameters())
            metrics = {**save(), "train_steps": self.global_step, "train_seconds_this_run": round(train_seconds, 2)}
            skipped = getattr(self.dataset, "skipped_summary", lambda: None)()
            if skipped:
                metrics["skipped_images"] = getattr(self.dataset, "skipped_images", None)
                self.print(skipped)
            if self.threads is not None:
                metrics["threads"] = self.threads.summary()
            total = sum(self.loop_seconds.values())
            if total > 0:
                metrics["loop_seconds"] = {name: round(seconds, 2) for name, seconds in self.loop_seconds.items()}
                metrics["loop_shares"] = {name: round(seconds / total, 4) for name, seconds in self.loop_seconds.items()}
            write_json_atomic(self.output_dir / f"{self.stage}_metrics.json", metrics)
            self.write_model_card(card_stage_dirs, base_models)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if self.threads is not None:
            self.threads.close()
        return metrics

    def write_model_card(self, stage_dirs: dict | None = None, base_models: dict | None = None) -> None:
        """``OUTPUT_DIR/README.md`` in the Hub's model-card format; uploaded with ``--push_to_hub``."""
        from ldm_pipeline.model_card import push_to_hub, write_model_card

        write_model_card(self.output_dir, {**(stage_dirs or {}), self.stage: self.output_dir},
                         base_models=base_models, configs={self.stage: self.config.path} if self.config.path else None,
                         dataset_name=self.config.data.source, hub_model_id=self.args.hub_model_id)
        if self.args.push_to_hub:
            url = push_to_hub(self.output_dir, self.args.hub_model_id or self.output_dir.resolve().name,
                              token=self.args.hub_token)
            self.print(f"Pushed {self.output_dir} to the Hub: {url}")

    def images_per_second(self) -> float:
        """Training images per second of this run's loop (all processes), once ``finish`` has begun."""
        steps = self.global_step - self.start_step
        images = steps * self.args.train_batch_size * self.args.gradient_accumulation_steps * self.accelerator.num_processes
        return images / self.train_seconds if steps and self.train_seconds > 0 else 0.0


def run_in_process(main: Callable[[list[str]], dict], argv: list[str]) -> dict:
    """Call a stage script's ``main(argv)`` inside this Python process (tests, benchmarks), each time on a fresh
    Accelerate state: every script creates its own ``Accelerator``, whose state is otherwise process-wide. The
    caller's torch thread count is restored afterwards, also when the stage fails."""
    from accelerate.state import AcceleratorState

    threads = torch.get_num_threads()
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        torch.set_num_threads(threads)
