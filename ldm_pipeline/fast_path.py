"""The GPU fast path: what a training run does differently on a CUDA device, each part a switch of its own.

On a GPU a step is a queue of kernels that the host fills while the device runs the previous ones. Anything that
makes the host wait for the device (reading a loss, copying a tensor from pageable memory) or keeps the host busy
(making the batch, drawing noise on the CPU) puts a floor under every step, whatever the model. So on CUDA, unless
a switch says otherwise:

    dataloader_num_workers  batches made in worker processes (shape rendering, cache reads), not in the loop
    pin_memory              batches in pinned memory, copied to the GPU without blocking the host
    loss_read_steps         losses summed on the device and read (and checked for NaN/inf) every N steps, not each
    device_random_draws     the step's noise, timesteps and caption dropout drawn on the GPU from a generator seeded
                            per step (the same seed as on a CPU, so resume stays exact; other numbers than a CPU's)
    allow_tf32              TF32 matrix products and convolutions for what runs in fp32
    mixed_precision         bf16 autocast (``auto``: when the GPU supports it)
    adamw_implementation    the fused AdamW kernel
    ema_foreach             the EMA updated with multi-tensor kernels
and, off by default everywhere, to be measured (``benchmarks/bench_step_options.py``, ``benchmarks/bench_gpu.py``):
    channels_last           NHWC weights and activations for the convolutional models
    torch_compile           ``torch.compile`` of the trained models; ``reduce-overhead`` replays CUDA graphs

On a CPU every ``auto`` resolves to what a CPU run always did, so its arithmetic is unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ldm_pipeline.config import TrainingConfig
from ldm_pipeline.threads import available_cores

GPU_LOSS_READ_STEPS = 50
MAX_GPU_WORKERS = 8


@dataclass(frozen=True)
class FastPath:
    """The resolved switches of one run (module docstring); ``summary()`` goes into the stage's metrics."""

    cuda: bool
    mixed_precision: str
    dataloader_num_workers: int
    pin_memory: bool
    loss_read_steps: int
    device_random_draws: bool
    allow_tf32: bool
    adamw_implementation: str
    ema_foreach: bool
    channels_last: bool
    torch_compile: str

    @property
    def cuda_graphs(self) -> bool:
        """``torch.compile(mode="reduce-overhead")`` records CUDA graphs; every step must then mark its start."""
        return self.torch_compile == "reduce-overhead"

    def summary(self) -> dict:
        return dataclasses.asdict(self)


def auto(value, on_cuda, on_cpu, cuda: bool):
    """``value`` when it is set, else the device's default."""
    if value is not None and value != "auto":
        return value
    return on_cuda if cuda else on_cpu


def gpu_workers(local_processes: int = 1, cores: int | None = None) -> int:
    """DataLoader workers per process on a GPU machine: half of the process's share of the cores, 1 to 8."""
    share = (cores or available_cores()) // max(1, local_processes)
    return max(1, min(MAX_GPU_WORKERS, share // 2))


def supports_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_fast_path(args: TrainingConfig, device: torch.device, local_processes: int = 1) -> FastPath:
    """Every switch of ``args`` resolved for ``device`` (None or ``auto``: on with CUDA, as before on a CPU)."""
    cuda = device.type == "cuda"
    return FastPath(
        cuda=cuda,
        mixed_precision=auto(args.mixed_precision, "bf16" if supports_bf16(device) else "no", "no", cuda),
        dataloader_num_workers=auto(args.dataloader_num_workers, gpu_workers(local_processes), 0, cuda),
        pin_memory=auto(args.pin_memory, True, False, cuda),
        loss_read_steps=auto(args.loss_read_steps, GPU_LOSS_READ_STEPS, 1, cuda),
        device_random_draws=auto(args.device_random_draws, True, False, cuda),
        allow_tf32=auto(args.allow_tf32, True, False, cuda),
        adamw_implementation=auto(args.adamw_implementation, "fused", "default", cuda),
        ema_foreach=auto(args.ema_foreach, True, False, cuda),
        channels_last=args.channels_last,
        torch_compile=args.torch_compile,
    )


def set_tf32(enabled: bool) -> None:
    """TF32 (10-bit mantissa, fp32 range) for fp32 matrix products and cuDNN convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


ADAMW_OPTIONS = {"default": {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def adamw_options(implementation: str) -> dict:
    """``torch.optim.AdamW`` keyword arguments of an implementation: ``default`` leaves PyTorch's choice (the
    for-loop on CPU tensors, foreach on CUDA tensors)."""
    return dict(ADAMW_OPTIONS[implementation])


def dynamo_plugin(torch_compile: str):
    """The ``accelerate`` plugin that compiles every prepared model with ``torch.compile(mode=...)``, or None."""
    if torch_compile == "no":
        return None
    from accelerate.utils import TorchDynamoPlugin

    return TorchDynamoPlugin(backend="inductor", mode=torch_compile)


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Store the 4-D weights (convolutions) of ``module`` in NHWC order; other tensors are unchanged."""
    return module.to(memory_format=torch.channels_last)
