"""The skeleton every training stage shares: set-up, step bookkeeping, logging, checkpoints, validation cadence,
final save (its files, checkpoints, data order and streams live in ``ldm_pipeline.durable``,
``ldm_pipeline.checkpoints``, ``ldm_pipeline.data_order`` and ``ldm_pipeline.stream_loading``). Each
``training/train_<stage>.py`` builds its models, data and loss, and leaves the rest to :class:`StageTrainer`:

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
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from ldm_pipeline.checkpoints import (
    CHECKPOINT_PATTERN,
    check_checkpoint,
    checkpoints_dir,
    list_checkpoints,
    load_checkpoint,
    register_ema_for_checkpointing,
    resolve_resume_path,
    save_checkpoint,
)
from ldm_pipeline.config import StageConfig
from ldm_pipeline.data_order import EpochShuffleSampler, step_generator, train_batches, without_worker_traceback
from ldm_pipeline.durable import JsonlLogger, check_writable, write_json_atomic
from ldm_pipeline.fast_path import (
    adamw_options,
    dynamo_plugin,
    resolve_fast_path,
    set_tf32,
    to_channels_last,
)
from ldm_pipeline.logs import configure_training_logs, loss_line
from ldm_pipeline.run_lock import (
    acquire_run_lock,
    check_launch,
    held_run_locks,
    release_run_locks,
    stop_with_launcher,
)
from ldm_pipeline.stream_loading import (
    StreamLoader,
    check_same_shards,
    register_stream_for_checkpointing,
    stream_train_batches,
)
from ldm_pipeline.threads import ThreadGovernor

logger = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite."""


NON_FINITE_ADVICE = ("Checkpoints saved so far are intact; lower --learning_rate or check the data, then resume "
                     "with --resume_from_checkpoint latest.")


def check_finite_loss(loss: torch.Tensor, global_step: int) -> None:
    """Stop training on a NaN or infinite loss, before the bad update is applied or saved (reads the loss: a host
    sync on a GPU)."""
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(f"Loss is {loss.item()} at step {global_step}: training stopped before applying this "
                                 f"update. {NON_FINITE_ADVICE}")


def first_non_finite_step(first: torch.Tensor, loss: torch.Tensor, global_step: int) -> torch.Tensor:
    """``first`` (a 0-d int64 tensor, -1 while every loss was finite) updated with ``loss`` of ``global_step``: the
    first step whose loss was NaN or infinite, recorded on the loss's device without reading it."""
    return torch.where((first < 0) & ~torch.isfinite(loss.detach()).all(), global_step, first)


# --------------------------------------------------------------------------------------------------- EMA


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


# --------------------------------------------------------------------------------------------------- the skeleton


class StageTrainer:
    """Everything around a stage's training step (see the module docstring)."""

    def __init__(self, config: StageConfig):
        self.config = config
        self.args = args = config.training
        self.stage = config.stage
        self.output_dir = Path(args.output_dir)
        stop_with_launcher()
        config.check_output_outside_data()
        report_to = None if args.report_to == "none" else args.report_to
        # The device, which the fast path's switches depend on (ldm_pipeline.fast_path), as the Accelerator sees it.
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        if state.device.type == "cpu" and args.mixed_precision not in ("auto", "no"):
            raise ValueError(f"--mixed_precision {args.mixed_precision} was asked for on a CPU: train in fp32 "
                             "(--mixed_precision no).")
        local_processes = min(state.num_processes, max(1, torch.cuda.device_count()))
        self.fast = fast = resolve_fast_path(args, state.device, local_processes)
        args.mixed_precision = fast.mixed_precision  # the fingerprint records the precision used, not "auto"
        compile_plugin = dynamo_plugin(fast.torch_compile)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=fast.mixed_precision,
            log_with=report_to,
            project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.logging_dir),
            dataloader_config=DataLoaderConfiguration(non_blocking=fast.pin_memory),
            **({"dynamo_plugin": compile_plugin} if compile_plugin is not None else {}),
        )
        check_launch(self.accelerator)
        if fast.cuda:
            set_tf32(fast.allow_tf32)
        configure_training_logs()
        set_seed(args.seed)
        # Every process checks (none is left waiting for one that stopped with an error), then holds the run's lock.
        check_writable(self.output_dir, "--output_dir")
        self.run_lock = acquire_run_lock(self.output_dir, self.accelerator)
        self._check_fresh_run()
        self.accelerator.wait_for_everyone()
        self.global_step = 0
        self.start_step = 0
        self.micro_step = 0
        self.ema = None
        self.fingerprint: dict | None = None
        self._device_sums: dict[str, torch.Tensor] = {}  # logged values since the last read, summed on the device
        self._host_sums: dict[str, float] = {}           # logged Python numbers since the last read
        self._steps_since_read = 0
        self._line_loss_sum, self._line_steps = 0.0, 0   # the losses of the next --logging_steps line
        self._parameters: dict[int, list[torch.nn.Parameter]] = {}
        self._first_non_finite: torch.Tensor | None = None  # the first step with a NaN/inf loss (-1: none)
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
        """``accelerator.prepare``; with ``--channels_last`` the models' 4-D weights are first stored NHWC."""
        if self.fast.channels_last:
            objects = tuple(to_channels_last(o) if isinstance(o, torch.nn.Module) else o for o in objects)
        return self.accelerator.prepare(*objects)

    def adamw(self, parameters, learning_rate: float | None = None) -> torch.optim.AdamW:
        """AdamW with the configured betas and weight decay (``learning_rate`` defaults to the configured one), in
        the ``--adamw_implementation`` of the fast path (fused on CUDA)."""
        return torch.optim.AdamW(parameters, lr=learning_rate or self.args.learning_rate,
                                 betas=(self.args.adam_beta1, self.args.adam_beta2),
                                 weight_decay=self.args.adam_weight_decay,
                                 **adamw_options(self.fast.adamw_implementation))

    def lr_schedule(self, optimizer: torch.optim.Optimizer, name: str | None = None):
        """The configured ``diffusers.optimization`` schedule over ``max_train_steps`` (counted per process, as
        the prepared scheduler steps once per process)."""
        from diffusers.optimization import get_scheduler

        num_processes = self.accelerator.num_processes
        return get_scheduler(name or self.args.lr_scheduler, optimizer=optimizer,
                             num_warmup_steps=self.args.lr_warmup_steps * num_processes,
                             num_training_steps=self.args.max_train_steps * num_processes)

    def dataloader(self, dataset, collate_fn=None, num_workers: int | None = None
                   ) -> tuple[torch.utils.data.DataLoader, EpochShuffleSampler]:
        """A training loader over ``dataset`` in the order of an ``EpochShuffleSampler`` (exact resume), full
        batches only; its workers (``num_workers``, default the fast path's; kept for the whole run) draw their
        seeds from a generator of their own, not from the global RNG; batches are pinned on CUDA.

        A stream (``ldm_pipeline.data.StreamingImageCaptionDataset``, --streaming) gives ``(StreamLoader, None)``
        instead: the processes first check that they see the same shards (`check_same_shards`), then each one
        reads its shuffled share (``for_training``), and its position is saved with every checkpoint."""
        if hasattr(dataset, "for_training"):
            return self._stream_loader(dataset, collate_fn), None
        sampler = EpochShuffleSampler(len(dataset), self.args.seed)
        workers = self.fast.dataloader_num_workers if num_workers is None else num_workers
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.args.train_batch_size, sampler=sampler, collate_fn=collate_fn, drop_last=True,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=self.fast.pin_memory,
            generator=torch.Generator().manual_seed(self.args.seed))
        return loader, sampler

    def _stream_loader(self, dataset, collate_fn) -> StreamLoader:
        check_same_shards(self.accelerator, dataset.shard_ids)
        share = dataset.for_training(self.args.seed, self.config.data.shuffle_buffer_size,
                                     self.accelerator.process_index, self.accelerator.num_processes)
        if self.accelerator.num_processes > 1:
            self.print(f"Streaming {len(dataset.files)} shard(s) split across {self.accelerator.num_processes} "
                       f"processes by {share.split_strategy}.")
        loader = StreamLoader(share, self.args.train_batch_size, collate_fn, self.fast.dataloader_num_workers,
                              self.args.seed, self.fast.pin_memory)
        register_stream_for_checkpointing(self.accelerator, loader)
        return loader

    def track_ema(self, model: torch.nn.Module, model_cls, subfolder: str):
        """Keep an EMA of ``model``'s weights when ``--use_ema``; it is checkpointed and stepped after every update."""
        if not self.args.use_ema:
            return None
        from diffusers.training_utils import EMAModel

        self.ema = EMAModel(model.parameters(), decay=self.args.ema_decay, foreach=self.fast.ema_foreach,
                            model_cls=model_cls, model_config=model.config)
        self.ema.to(self.device)
        self._ema_target = model
        self._ema_parameters = list(model.parameters())  # listed once: walking the modules costs every step
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
            saved_processes = check_checkpoint(path, self.accelerator.num_processes, self.fingerprint,
                                               self.config.option_defaults(), self.print)
            self.print(f"Resuming from {path}")
            load_checkpoint(self.accelerator, path, saved_processes)
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
                                          self.args.gradient_accumulation_steps, self.device, self.fast.pin_memory)
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
            if self.fast.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the graphs' outputs of the last step may be reused
            yield batch
            self.micro_step += 1

    def generator(self) -> torch.Generator:
        """The generator of the current micro-batch's random draws (``step_generator``), the same in every process:
        draws are made for the global batch and each process keeps its rows (``global_rows``). On the CPU, or with
        ``--device_random_draws`` on the GPU, seeded with the same number."""
        generator = step_generator(self.args.seed, 0, self.micro_step)
        if not self.fast.device_random_draws:
            return generator
        return torch.Generator(self.device).manual_seed(generator.initial_seed())

    def global_rows(self, local_batch: int) -> tuple[int, slice]:
        """``(global_batch, rows)``: the size of the batch over all processes and this process's rows of it.

        Accelerate hands process ``p`` of ``n`` the ``p``-th of every ``n`` consecutive batches, so the global batch
        of a step is the batch of ``n · local_batch`` that one process would see. Drawing the noise for that global
        batch and keeping ``rows`` makes ``n`` processes of batch ``B`` compute what one process of batch ``n · B``
        computes (DDP averages their gradients to the same mean)."""
        index, count = self.accelerator.process_index, self.accelerator.num_processes
        return local_batch * count, slice(index * local_batch, (index + 1) * local_batch)

    def global_randn(self, local_shape: Sequence[int], generator: torch.Generator, draw=torch.randn) -> torch.Tensor:
        """ε ~ N(0, I) for this process's rows: ``randn([n·B, *local_shape[1:]], generator)[rows]`` (``global_rows``);
        ``draw=torch.rand`` gives U(0, 1) draws the same way.

        A sample's draw does not depend on how the global batch is split over processes, and an exact resume
        redraws it (``generator`` is the step's, ``self.generator()``)."""
        global_batch, rows = self.global_rows(local_shape[0])
        return draw((global_batch, *local_shape[1:]), generator=generator, device=generator.device)[rows]

    def backward(self, loss: torch.Tensor, model: torch.nn.Module) -> None:
        """Stop on a non-finite loss; backpropagate; clip the gradient norm to ``max_grad_norm`` on an update.

        With ``loss_read_steps`` 1 (a CPU's default) the loss is checked here, before its update is applied. Otherwise
        the first step with a non-finite loss is only recorded on the device, and the run stops when the losses are
        next read (``read_losses``: every ``loss_read_steps``, before every checkpoint and the final save)."""
        if self.fast.loss_read_steps == 1:
            check_finite_loss(loss, self.global_step)
        else:
            if self._first_non_finite is None:
                self._first_non_finite = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self._first_non_finite = first_non_finite_step(self._first_non_finite, loss, self.global_step)
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients and self.args.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.parameters_of(model), self.args.max_grad_norm)

    def parameters_of(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """``list(model.parameters())``, listed once per model (a walk over a U-Net's modules costs a millisecond)."""
        if id(model) not in self._parameters:
            self._parameters[id(model)] = list(model.parameters())
        return self._parameters[id(model)]

    def end_micro_step(self, **values: torch.Tensor | float) -> bool:
        """Add ``values`` (tensors on the device, numbers on the host: nothing is read) to the sums of the steps
        since the last read; after an optimizer update (True) advance the step, update the EMA, and when due read
        and log the losses (``read_losses``) and save a checkpoint. The loop's time is split three ways
        (``loop_seconds``, in the stage's metrics): waiting for the batch, the step itself (from the batch to this
        call) and the work around the step (from this call to the next batch request: EMA, logs, checkpoints,
        snapshots, validation)."""
        self._step_done_at = time.perf_counter()
        if self._batch_ready_at is not None:
            self.loop_seconds["step"] += self._step_done_at - self._batch_ready_at
        if self.threads is not None:
            self.threads.maybe_adjust()
        accumulation = self.args.gradient_accumulation_steps
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().reshape(()) / accumulation
                self._device_sums[name] = value if name not in self._device_sums else self._device_sums[name] + value
            else:
                self._host_sums[name] = self._host_sums.get(name, 0.0) + value / accumulation
        if not self.accelerator.sync_gradients:
            return False
        self.global_step += 1
        self._steps_since_read += 1
        if self.ema is not None:
            self.ema.step(self._ema_parameters)
        self.progress.update(1)
        checkpoint_due = self.global_step % self.args.checkpointing_steps == 0
        if checkpoint_due or self.every(self.fast.loss_read_steps) or self.every(self.args.logging_steps):
            self.read_losses()
        if checkpoint_due:
            save_checkpoint(self.accelerator, self.output_dir, self.global_step, self.args.checkpoints_total_limit,
                            self.fingerprint)
        return True

    def read_losses(self) -> dict[str, float]:
        """Read the summed values of the steps since the last read (one host sync), average them over those steps
        and over processes, stop on a non-finite loss (``NonFiniteLossError``, naming the step it first appeared),
        and log the means at the current step (progress bar, trackers, ``train_log.jsonl``, and every
        ``--logging_steps`` a line with the mean loss since the last line). Called every ``loss_read_steps`` and
        ``logging_steps``, before every checkpoint and before the final save."""
        steps, self._steps_since_read = self._steps_since_read, 0
        if not steps:
            return {}
        names = sorted(self._device_sums)
        means = {}
        if names:
            stacked = torch.stack([self._device_sums[name] for name in names])
            reduced = self.accelerator.reduce(stacked, "mean")
            first = self._first_non_finite if self._first_non_finite is not None else torch.full_like(reduced[0], -1)
            *sums, first_step = torch.cat([reduced, first.to(reduced.dtype).reshape(1)]).tolist()
            means = {name: total / steps for name, total in zip(names, sums)}
            if first_step >= 0 or not math.isfinite(means.get("loss", 0.0)):
                where = f"at step {int(first_step)}" if first_step >= 0 else "in another process"
                raise NonFiniteLossError(f"Loss is not finite {where} (found when the losses were read at step "
                                         f"{self.global_step}): training stopped before saving. {NON_FINITE_ADVICE}")
        means.update({name: total / steps for name, total in self._host_sums.items()})
        self._device_sums, self._host_sums = {}, {}
        elapsed = self._elapsed_before + time.perf_counter() - self.start_time
        self.progress.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}")
        self.accelerator.log({f"train/{k}": v for k, v in means.items()}, step=self.global_step)
        self.history.log(step=self.global_step, **means, elapsed_s=round(elapsed, 3))
        if math.isfinite(means.get("loss", math.nan)):
            self._line_loss_sum += means["loss"] * steps
            self._line_steps += steps
        if self.every(self.args.logging_steps):
            if self.accelerator.is_local_main_process and self._line_steps:
                self.progress.write(loss_line(self.global_step, self.args.max_train_steps,
                                              self._line_loss_sum / self._line_steps, self._line_steps, means.get("lr")))
            self._line_loss_sum, self._line_steps = 0.0, 0
        return means

    def every(self, steps: int | None) -> bool:
        """True when ``steps`` is set and the current step is a multiple of it."""
        return bool(steps) and self.global_step % steps == 0

    def save_due(self, steps: int | None) -> bool:
        """``every(steps)`` for a save of weights (a snapshot): when due, the losses are read first, so a
        non-finite loss stops the run before it is saved."""
        due = self.every(steps)
        if due:
            self.read_losses()
        return due

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
        self.read_losses()  # the steps since the last read: checked before anything is saved
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
            if self.fast.cuda:
                metrics["fast_path"] = self.fast.summary()
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
        self.run_lock.release()
        return metrics

    def write_model_card(self, stage_dirs: dict | None = None, base_models: dict | None = None) -> None:
        """``OUTPUT_DIR/README.md`` in the Hub's model-card format; uploaded with ``--push_to_hub``, after the Hub
        repo is created (its full id ``user/name`` is what the card's snippet loads)."""
        from ldm_pipeline.model_card import create_hub_repo, push_to_hub, write_model_card

        repo_id = self.args.hub_model_id
        if self.args.push_to_hub:
            repo_id = create_hub_repo(repo_id or self.output_dir.resolve().name, token=self.args.hub_token)
        data = self.config.data
        write_model_card(self.output_dir, {**(stage_dirs or {}), self.stage: self.output_dir},
                         base_models=base_models, configs={self.stage: self.config.path} if self.config.path else None,
                         dataset_name=data.dataset_name, train_data_dir=data.train_data_dir, hub_model_id=repo_id)
        if self.args.push_to_hub:
            url = push_to_hub(self.output_dir, repo_id, token=self.args.hub_token)
            self.print(f"Pushed {self.output_dir} to the Hub: {url}")

    def images_per_second(self) -> float:
        """Training images per second of this run's loop (all processes), once ``finish`` has begun."""
        steps = self.global_step - self.start_step
        images = steps * self.args.train_batch_size * self.args.gradient_accumulation_steps * self.accelerator.num_processes
        return images / self.train_seconds if steps and self.train_seconds > 0 else 0.0


def run_in_process(main: Callable[[list[str]], dict], argv: list[str]) -> dict:
    """Call a stage script's ``main(argv)`` inside this Python process (tests, benchmarks), each time on a fresh
    Accelerate state: every script creates its own ``Accelerator``, whose state is otherwise process-wide. The
    caller's torch thread count is restored afterwards, and the run's output-directory lock released, also when
    the stage fails."""
    from accelerate.state import AcceleratorState

    threads, held = torch.get_num_threads(), held_run_locks()
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return main(argv)
    finally:
        release_run_locks(keep=held)
        AcceleratorState._reset_state(reset_partial_state=True)
        torch.set_num_threads(threads)
