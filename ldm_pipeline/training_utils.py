"""Machinery shared by the three training stages: configs, Accelerate set-up, exact resume, checkpoints.

Every stage script reads top to bottom like a recipe and calls into this module for the parts that are the
same in all of them. The contract of exact resume: a run interrupted after optimizer step ``S`` and resumed
with ``--resume_from_checkpoint latest`` sees the same micro-batches, in the same order, with the same random
draws, as a run that was never interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

TRAINING_DEFAULTS = {
    "output_dir": "outputs/run",
    "seed": 0,
    "train_batch_size": 16,
    "max_train_steps": 1000,
    "learning_rate": 1e-4,
    "lr_scheduler": "constant_with_warmup",
    "lr_warmup_steps": 0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 0.0,
    "gradient_accumulation_steps": 1,
    "mixed_precision": "no",
    "max_grad_norm": 1.0,
    "checkpointing_steps": 500,
    "checkpoints_total_limit": 2,
    "resume_from_checkpoint": None,
    "dataloader_num_workers": 0,
    "report_to": "tensorboard",
    "logging_dir": None,
    "use_ema": False,
    "ema_decay": 0.999,
    "gradient_checkpointing": False,
    "validation_steps": None,
}


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite."""


def load_config(path: str | os.PathLike) -> dict:
    """Read a stage config: a JSON object with ``model``, ``training`` and ``data`` sections."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}. Pass --config configs/<size>/<stage>.json.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"Config {path} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"Config {path} must be a JSON object with a 'model' section (and 'training', 'data').")
    for section in ("training", "data"):
        config.setdefault(section, {})
    return config


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags every stage shares. All default to None so that the config can fill them."""
    group = parser.add_argument_group("training")
    group.add_argument("--config", type=str, required=True, help="Stage config JSON (configs/<size>/<stage>.json).")
    group.add_argument("--output_dir", type=str, default=None, help="Where weights, logs and checkpoints go.")
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--train_batch_size", type=int, default=None, help="Batch size per process.")
    group.add_argument("--max_train_steps", type=int, default=None, help="Number of optimizer updates.")
    group.add_argument("--learning_rate", type=float, default=None)
    group.add_argument("--lr_scheduler", type=str, default=None,
                       help='"constant", "constant_with_warmup", "cosine", "linear", ... (diffusers.optimization).')
    group.add_argument("--lr_warmup_steps", type=int, default=None)
    group.add_argument("--adam_weight_decay", type=float, default=None)
    group.add_argument("--gradient_accumulation_steps", type=int, default=None)
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="fp16/bf16 are for GPUs; on a CPU train in fp32 ('no').")
    group.add_argument("--max_grad_norm", type=float, default=None)
    group.add_argument("--checkpointing_steps", type=int, default=None, help="Save a resumable state every N steps.")
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    group.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help='A checkpoint directory, or "latest" for the newest one in OUTPUT_DIR/checkpoints.')
    group.add_argument("--dataloader_num_workers", type=int, default=None)
    group.add_argument("--report_to", type=str, default=None, help='"tensorboard" (default), "all" or "none".')
    group.add_argument("--logging_dir", type=str, default=None, help="Default: OUTPUT_DIR/logs.")
    group.add_argument("--use_ema", action="store_const", const=True, default=None,
                       help="Keep an exponential moving average of the weights and save it as the final model.")
    group.add_argument("--ema_decay", type=float, default=None)
    group.add_argument("--gradient_checkpointing", action="store_const", const=True, default=None)
    group.add_argument("--validation_steps", type=int, default=None, help="Run validation every N steps.")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line, then fill every flag left unset from the config, then from the defaults.

    Precedence: command line > config ``training`` > config ``data`` > ``TRAINING_DEFAULTS``. Keys of the
    config's ``training``/``data`` sections that have no flag are set on the namespace as well.
    """
    args = parser.parse_args(argv)
    args.config_path = args.config
    config = load_config(args.config)
    for section in ("training", "data"):
        for key, value in config[section].items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    for key, value in TRAINING_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.logging_dir is None:
        args.logging_dir = os.path.join(args.output_dir, "logs")
    args.model_config = config["model"]
    args.config = config
    return args


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """An Accelerator with tensorboard logging under ``args.logging_dir`` and the global seed set."""
    report_to = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.logging_dir),
    )
    if accelerator.device.type == "cpu" and args.mixed_precision != "no":
        raise ValueError(
            f"--mixed_precision {args.mixed_precision} was asked for on a CPU: train in fp32 (--mixed_precision no)."
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def init_trackers(accelerator: Accelerator, args: argparse.Namespace, project_name: str) -> None:
    """Start the trackers with the flat, scalar part of the arguments as hyper-parameters."""
    if accelerator.log_with or accelerator.trackers:
        hparams = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(project_name, config=hparams)


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
        raise ValueError("The training dataloader is empty: the dataset is smaller than one batch.")
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


def num_epochs(max_train_steps: int, gradient_accumulation_steps: int, batches_per_epoch: int) -> int:
    """Epochs needed for ``max_train_steps`` optimizer updates."""
    return math.ceil(max_train_steps * gradient_accumulation_steps / batches_per_epoch)


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``OUTPUT_DIR/checkpoints``, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, global_step: int) -> Path:
    """Save the full training state (models, optimizers, schedulers, RNGs, registered objects).

    The state is written to a temporary directory that is renamed to ``checkpoint-{global_step}`` only once
    complete, so an interrupted save never leaves a checkpoint that ``latest`` would pick. Older checkpoints
    beyond ``checkpoints_total_limit`` are removed afterwards.
    """
    root = checkpoints_dir(args.output_dir)
    final = root / f"checkpoint-{global_step}"
    partial = root / f".partial-checkpoint-{global_step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        limit = args.checkpoints_total_limit
        if limit is not None and limit > 0:
            for old in list_checkpoints(args.output_dir)[:-limit]:
                shutil.rmtree(old)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def resume_from_checkpoint(accelerator: Accelerator, args: argparse.Namespace) -> int:
    """Restore the state named by ``--resume_from_checkpoint`` and return the optimizer step it was saved at.

    ``None`` -> 0 (fresh start). ``"latest"`` -> the newest checkpoint in ``OUTPUT_DIR/checkpoints``, or a fresh
    start with a message when there is none. A path that does not exist is an error.
    """
    if not args.resume_from_checkpoint:
        return 0
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args.output_dir)
        if not found:
            accelerator.print(f"No checkpoint in {checkpoints_dir(args.output_dir)}: starting a new training run.")
            return 0
        path = found[-1]
    else:
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(
                f"--resume_from_checkpoint {path}: no such checkpoint directory. Use 'latest' or one of: "
                f"{[p.name for p in list_checkpoints(args.output_dir)] or 'none saved yet'}."
            )
    match = CHECKPOINT_PATTERN.match(path.name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint directory (expected a name like checkpoint-500).")
    accelerator.print(f"Resuming from {path}")
    accelerator.load_state(str(path))
    return int(match.group(1))


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


def check_finite_loss(loss: torch.Tensor, global_step: int) -> None:
    """Stop training on a NaN or infinite loss, before the bad update is applied or saved."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"Loss is {loss.item()} at step {global_step}: training stopped before applying this update. "
            "Checkpoints saved so far are intact; lower --learning_rate or check the data, then resume with "
            "--resume_from_checkpoint latest."
        )


class JsonlLogger:
    """Append one JSON object per line to a file (main process only); the file survives resumes."""

    def __init__(self, path: str | os.PathLike, accelerator: Accelerator, start_step: int = 0):
        self.path = Path(path)
        self.enabled = accelerator.is_main_process
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(start_step)

    def _truncate_after(self, step: int) -> None:
        """Drop records of steps > ``step`` left by an interrupted run, so a resume does not duplicate them."""
        if not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
