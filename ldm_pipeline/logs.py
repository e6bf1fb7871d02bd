"""What a training run prints beside its progress bar: the project's own lines, not the libraries' bookkeeping.

`configure_training_logs` (called by ``StageTrainer``):

- log records are printed as ``TIME LEVEL LOGGER: MESSAGE`` from INFO up (``logging.basicConfig``);
- Accelerate's bookkeeping of every checkpoint ("Saving current state to ...", "Model weights saved in ...": seven
  INFO lines of ``accelerate.accelerator`` and ``accelerate.checkpointing`` that break the progress bar) is
  printed from WARNING up only;
- Accelerate's "Removed shared tensor {...} while saving" warning is dropped: safetensors keeps one copy of weights
  that share their storage (T5's ``encoder.embed_tokens`` is its ``shared`` embedding) and
  ``safetensors.torch.load_model``, which ``Accelerator.load_state`` uses, ties them back, so a resume is exact.

Every other warning is kept. `loss_line` is the line a stage prints every ``--logging_steps`` (through
``tqdm.write``, above the bar).
"""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BOOKKEEPING_LOGGERS = ("accelerate.accelerator", "accelerate.checkpointing")
SHARED_TENSOR_LOGGER = "accelerate.utils.other"
SHARED_TENSOR_MESSAGE = "Removed shared tensor"


def _not_shared_tensor_notice(record: logging.LogRecord) -> bool:
    return SHARED_TENSOR_MESSAGE not in record.getMessage()


def configure_training_logs() -> None:
    """Set up the log output of a training process (module docstring); calling it again changes nothing."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
    for name in BOOKKEEPING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    shared_tensor_logger = logging.getLogger(SHARED_TENSOR_LOGGER)
    if _not_shared_tensor_notice not in shared_tensor_logger.filters:
        shared_tensor_logger.addFilter(_not_shared_tensor_notice)


def loss_line(step: int, max_steps: int, mean_loss: float, num_steps: int, lr: float | None = None) -> str:
    """``step 200/1000: loss 0.1234 (mean of the last 100 steps), lr 1.0e-04``."""
    span = "the last step" if num_steps == 1 else f"the last {num_steps} steps"
    rate = f", lr {lr:.1e}" if lr is not None else ""
    return f"step {step}/{max_steps}: loss {mean_loss:.4f} (mean of {span}){rate}"
