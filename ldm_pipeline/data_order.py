"""The order of a training run's data and random draws, recomputable after a restart (exact resume): the sampler's
epoch order, the micro-batches from a given step, and each micro-batch's random generator."""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from accelerate import Accelerator


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


def step_generator(seed: int, process_index: int, micro_step: int) -> torch.Generator:
    """The random draws of micro-batch ``micro_step`` depend only on (seed, process, micro_step): exact resume."""
    digest = hashlib.sha256(f"{seed}:{process_index}:{micro_step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
