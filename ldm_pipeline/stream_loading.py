"""Training batches of a stream (``--streaming``): each process reads its own share, and its position in the
stream is saved with every checkpoint so that a resumed run sees exactly the batches an uninterrupted one would.

    loader = StreamLoader(share, batch_size, collate_fn, num_workers, seed)   # share: this process's stream
    register_stream_for_checkpointing(accelerator, loader)                    # stream_state_{process}.json
    for batch in stream_train_batches(loader, start_step, max_train_steps, accumulation, device): ...
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator

from ldm_pipeline.durable import write_json_atomic

STREAM_STATE_FILE = "stream_state_{}.json"


class StreamLoader:
    """The training batches of one process's stream (`ldm_pipeline.data.StreamingImageCaptionDataset`).

    Not a ``DataLoader``, so ``accelerator.prepare`` hands it back unchanged: the stream is already split across
    processes (``split_dataset_by_node``) and needs no Accelerate sharding or dispatching. ``(epoch, position)``
    counts the batches this process has used of the current epoch; it is saved with every checkpoint
    (``stream_state_{process}.json``) and restored on resume (`stream_train_batches`).
    """

    def __init__(self, dataset, batch_size: int, collate_fn, num_workers: int, seed: int, pin_memory: bool = False):
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.epoch, self.position = 0, 0

    def epoch_batches(self, epoch: int) -> Iterator[dict]:
        """The full batches of ``epoch``, in the order a function of (seed, epoch, shards, buffer, workers) gives."""
        self.dataset.set_epoch(epoch)
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, collate_fn=self.collate_fn, drop_last=True,
            num_workers=self.num_workers, pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def stream_train_batches(loader: StreamLoader, start_step: int, max_train_steps: int,
                         gradient_accumulation_steps: int = 1, device=None, non_blocking: bool = False
                         ) -> Iterator[dict]:
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
            yield send_to_device(batch, device, non_blocking=non_blocking) if device is not None else batch
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
