"""What every training step costs besides the model: each stage's real loop with the model's compute made trivial.

    python benchmarks/bench_host_overhead.py [--stages text_encoder vae unet] [--steps 120] [--workers 2]
        [--profile] [--out FILE]

For each stage of ``configs/demo`` at its batch size (text encoder 256, VAE 8, U-Net 64 from the latent cache),
``training/train_<stage>.py`` runs in this process with the stage's real model whose forward is replaced by a
trivial function of one of its parameters (same inputs, outputs of the same shapes, a loss and a gradient). So
everything around the model runs as in a real run: the DataLoader (in the loop, or in worker processes), the shapes
rendering or cache reads, tokenizing, the noise, timestep and caption-dropout draws, backward and AdamW (of one
parameter), the EMA (of all weights), the loss bookkeeping and logs (train_log.jsonl, tensorboard, progress bar),
thread checks and checkpoint bookkeeping (checkpoints themselves are not due in so few steps).

Two rows per stage: ``as before`` (the batches made in the loop, the losses read every step: what a GPU run did
until now) and ``fast path`` (the batches made in ``--workers`` DataLoader workers, the losses read every 50 steps,
the EMA with foreach kernels: the GPU defaults, ``ldm_pipeline.fast_path``). Per row: the main thread's CPU
milliseconds per step (the host's own work, which a GPU cannot hide; torch uses one thread so that nothing is done
off the main thread), of which the EMA's weight arithmetic (device work on a GPU), the wall time per step and the
share of it spent waiting for data. The median over the steps after ``--warmup``. Target from the GPU work: at most
3 ms per step of main-process time, EMA arithmetic aside, with the data made in workers.

``--profile`` adds where the main thread's time goes in the fast-path row (cProfile over the measured steps:
cumulative milliseconds per step of the loop's parts, then the functions with the most time of their own).
On a shared machine the figures vary from run to run: compare rows of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_unet_training import build_random_stages  # noqa: E402
from bench_utilisation import stage_config_path  # noqa: E402
from ldm_pipeline.trainer import StageTrainer, run_in_process  # noqa: E402

TARGET_MS = 3.0
STAGES = ("text_encoder", "vae", "unet")
AS_BEFORE = ["--dataloader_num_workers", "0", "--loss_read_steps", "1", "--ema_foreach", "false"]
# ------------------------------------------------------------------------------------------------ trivial models


def trivial_contrastive_forward(self, input_ids, attention_mask, pixel_values):
    """Unit text/image embeddings from the token ids and the image index; the learned logit scale gets the
    gradient (``TextImageContrastiveModel.forward``'s outputs)."""
    from ldm_pipeline.text_encoder import clamped_logit_scale

    size = self.text_projection.out_features
    text = F.one_hot(input_ids[:, 1] % size, size).float()  # [T, P]
    images = F.one_hot(torch.arange(len(pixel_values), device=pixel_values.device) % size, size).float()
    return text, images, clamped_logit_scale(self.log_logit_scale)


def trivial_autoencoder_forward(self, pixel_values, latent_noise):
    """A posterior N(0, I) of the latent shape and the images shifted by the decoder's output bias
    (``AutoencoderWithPosterior.forward``'s outputs)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    bias = self.vae.decoder.conv_out.bias  # [3]
    posterior = DiagonalGaussianDistribution(torch.cat([latent_noise * 0, latent_noise * 0], dim=1))
    return pixel_values + bias.view(1, -1, 1, 1), posterior


def trivial_unet_forward(self, sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
    """The noisy latents scaled per channel by the output convolution's bias (``UNet2DConditionModel``'s output)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    output = sample * self.conv_out.bias.view(1, -1, 1, 1)
    return UNet2DConditionOutput(sample=output) if return_dict else (output,)


@contextlib.contextmanager
def trivial_model(stage: str):
    """The stage's model class with its forward replaced by the trivial one, for the duration of the block."""
    from diffusers import UNet2DConditionModel

    from ldm_pipeline.text_encoder import TextImageContrastiveModel
    from ldm_pipeline.vae import AutoencoderWithPosterior

    cls, forward = {"text_encoder": (TextImageContrastiveModel, trivial_contrastive_forward),
                    "vae": (AutoencoderWithPosterior, trivial_autoencoder_forward),
                    "unet": (UNet2DConditionModel, trivial_unet_forward)}[stage]
    original = cls.forward
    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


# ------------------------------------------------------------------------------------------------ timing


@contextlib.contextmanager
def batches_marked(mark, end):
    """``StageTrainer.batches`` calling ``mark(trainer)`` at every batch it hands the loop and once after the last,
    then ``end()``, for the duration of the block."""
    batches = StageTrainer.batches

    def marked_batches(trainer, *args, **kwargs):
        for batch in batches(trainer, *args, **kwargs):
            mark(trainer)
            yield batch
        mark(trainer)
        end()

    StageTrainer.batches = marked_batches
    try:
        yield
    finally:
        StageTrainer.batches = batches


def timed_parts() -> list[tuple[str, object, str]]:
    """``(label, owner, attribute)`` of the functions whose main-thread CPU time is measured; ``  `` marks a part
    of the one above."""
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler
    from diffusers.training_utils import EMAModel

    import ldm_pipeline.trainer as trainer_module
    from ldm_pipeline.unet import DenoisingObjective

    return [
        ("data: next batch (made, or received from a worker; moved)", trainer_module, "without_worker_traceback"),
        ("the step's random draws (generator, posterior noise)", StageTrainer, "generator"),
        ("  posterior noise", StageTrainer, "global_randn"),
        ("U-Net objective (noise, timesteps, trivial model, loss)", DenoisingObjective, "__call__"),
        ("backward (finite check, autograd, clipping)", StageTrainer, "backward"),
        ("optimizer step", AcceleratedOptimizer, "step"),
        ("zero_grad", AcceleratedOptimizer, "zero_grad"),
        ("learning-rate schedule step", AcceleratedScheduler, "step"),
        ("end_micro_step: bookkeeping", StageTrainer, "end_micro_step"),
        ("  EMA (weight arithmetic: device work on a GPU)", EMAModel, "step"),
        ("  read losses and log (a host sync on a GPU)", StageTrainer, "read_losses"),
    ]


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators run (on a GPU, each is a kernel launch that costs the host microseconds)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class StepClock:
    """Marks, at every batch the loop receives, the main thread's CPU time, the wall time and the loop's data wait,
    and sums the main thread's CPU time inside each of ``timed_parts``; the steps after ``warmup`` are measured (and
    profiled, when ``profiler`` is given)."""

    def __init__(self, warmup: int, profiler: cProfile.Profile | None = None):
        self.warmup, self.profiler = warmup, profiler
        self.ops = OpCounter() if profiler is not None else None
        self.marks: list[tuple[float, float, float]] = []
        self.parts = timed_parts()
        self.cpu = {label: 0.0 for label, _, _ in self.parts}
        self.cpu_at_warmup: dict[str, float] = {}

    def timed(self, label: str, function):
        clock = self
        if label.startswith("data"):
            def generator_timed(*args, **kwargs):
                source = function(*args, **kwargs)
                while True:
                    start = time.thread_time()
                    batch = next(source, None)
                    clock.cpu[label] += time.thread_time() - start
                    if batch is None:
                        return
                    yield batch
            return generator_timed

        def function_timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                clock.cpu[label] += time.thread_time() - start
        return function_timed

    @contextlib.contextmanager
    def installed(self):
        originals = [(owner, name, getattr(owner, name)) for _, owner, name in self.parts]
        for (label, owner, name), (_, _, original) in zip(self.parts, originals):
            setattr(owner, name, self.timed(label, original))
        try:
            with batches_marked(self.mark, self.end):
                yield self
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)

    def end(self) -> None:
        if self.profiler is not None:
            self.profiler.disable()
            self.ops.__exit__(None, None, None)

    def mark(self, trainer) -> None:
        self.marks.append((time.thread_time(), time.perf_counter(), trainer.loop_seconds["data"]))
        if len(self.marks) == self.warmup + 1:
            self.cpu_at_warmup = dict(self.cpu)
            if self.profiler is not None:
                self.ops.__enter__()
                self.profiler.enable()

    def steps(self) -> int:
        return len(self.marks) - 1 - self.warmup

    def per_step_ms(self) -> dict:
        """Median milliseconds per measured step (main-thread CPU, wall, data wait), and each timed part's mean."""
        measured = self.marks[self.warmup:]
        deltas = [[(b - a) * 1e3 for a, b in zip(first, second)] for first, second in zip(measured, measured[1:])]
        cpu, wall, data = (statistics.median(column) for column in zip(*deltas))
        parts = {label: (self.cpu[label] - self.cpu_at_warmup.get(label, 0.0)) * 1e3 / self.steps()
                 for label in self.cpu}
        return {"main_thread_cpu_ms": cpu, "ema_cpu_ms": parts["  EMA (weight arithmetic: device work on a GPU)"],
                "wall_ms": wall, "data_wait_ms": data, "parts_ms": {k: v for k, v in parts.items() if v > 0}}


# ------------------------------------------------------------------------------------------------ the stages


def stage_argv(stage: str, root: Path, steps: int, text_dir: Path | None, vae_dir: Path | None,
               size: str = "demo", shards_like_the_config: bool = True) -> list[str]:
    """The ``configs/<size>`` config of ``stage`` for ``steps`` steps, nothing saved or validated inside the loop,
    a small end (held-out sets of a few items, one sampling step). The U-Net trains on 20 batches of samples, in a
    cache of as many shards as the config's data would fill (``shards_like_the_config``) or of the default size."""
    config = stage_config_path(size, stage)
    argv = ["--config", str(config), "--output_dir", str(root / size / stage), "--max_train_steps", str(steps),
            "--checkpointing_steps", str(10**9), "--overwrite_output_dir", "--report_to", "tensorboard"]
    settings = json.loads(config.read_text())
    batch = settings["training"]["train_batch_size"]
    if stage == "text_encoder":
        samples = min(settings["data"].get("num_train_samples", 20000), 20000)  # the tokenizer learns from them
        argv += ["--num_validation_samples", str(min(batch, 256)), "--num_train_samples", str(samples)]
    elif stage == "vae":
        argv += ["--num_validation_samples", "8", "--scaling_factor_max_samples", "8", "--validation_batch_size", "8",
                 "--num_reconstructions", "2"]
    else:
        samples = 20 * batch
        argv += ["--text_encoder", str(text_dir), "--vae", str(vae_dir), "--num_train_samples", str(samples),
                 "--cache_dir", str(root / size / "cache"), "--validation_num_inference_steps", "1",
                 "--num_validation_samples", "8"]
        if shards_like_the_config:  # a batch then touches as many shards as in a run on the config's data
            argv += ["--cache_shard_size", str(max(1, samples * 1024 // settings["data"]["num_train_samples"]))]
    return argv


def stage_main(stage: str):
    from training import train_text_encoder, train_unet, train_vae

    return {"text_encoder": train_text_encoder, "vae": train_vae, "unet": train_unet}[stage].main


def measure(stage: str, argv: list[str], warmup: int, profile: bool) -> tuple[dict, pstats.Stats | None]:
    profiler = cProfile.Profile(time.thread_time) if profile else None  # CPU time: waiting for a worker is free
    clock = StepClock(warmup, profiler)
    with trivial_model(stage), clock.installed(), contextlib.redirect_stderr(io.StringIO()), \
            contextlib.redirect_stdout(io.StringIO()):
        run_in_process(stage_main(stage), argv)
    if clock.steps() < 2:
        raise SystemExit(f"{stage}: only {clock.steps()} measured steps; raise --steps above --warmup + 2.")
    stats = pstats.Stats(profiler) if profiler is not None else None
    figures = {**clock.per_step_ms(), "steps": clock.steps()}
    if clock.ops is not None:
        figures["aten_ops_per_step"] = clock.ops.count / clock.steps()
    return figures, stats


def own_time_rows(stats: pstats.Stats, steps: int, count: int = 15) -> list[tuple[str, float]]:
    """The ``count`` functions with the most own CPU time, in ms per step (cProfile: small calls look dearer)."""
    return sorted(((f"{Path(function[0]).name}:{function[1]} {function[2]}", entry[2] * 1e3 / steps)
                   for function, entry in stats.stats.items()), key=lambda row: -row[1])[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--steps", type=int, default=120, help="Optimizer steps per run (below the demo's first "
                                                               "validation step, 200).")
    parser.add_argument("--warmup", type=int, default=20, help="First steps left out (worker start, first reads).")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the fast-path row.")
    parser.add_argument("--profile", action="store_true", help="Also break the fast-path row down (cProfile).")
    parser.add_argument("--out", default=None, help="Also write the figures as JSON here.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fast_path = ["--dataloader_num_workers", str(args.workers), "--loss_read_steps", "50", "--ema_foreach", "true",
                 "--adamw_implementation", "fused"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text_dir = vae_dir = None
        if "unet" in args.stages:
            with contextlib.redirect_stdout(io.StringIO()):
                text_dir, vae_dir = build_random_stages("demo", root / "stages", 32)
        for stage in args.stages:
            argv = stage_argv(stage, root, args.steps, text_dir, vae_dir) + ["--num_threads", "1"]
            fast_row = ("fast path (cache held)", fast_path + ["--cache_on_device", "true"]) if stage == "unet" else \
                (f"fast path ({args.workers} workers)", fast_path)
            for row, flags in (("as before", AS_BEFORE + (["--cache_on_device", "false"] if stage == "unet" else [])),
                               fast_row):
                figures, _ = measure(stage, argv + flags, args.warmup, profile=False)
                results.setdefault(stage, {})[row] = figures
                stats = None
                if args.profile and row != "as before":  # a run of its own: cProfile slows what it watches
                    profiled, stats = measure(stage, argv + flags, args.warmup, profile=True)
                    figures["profiled_steps"] = profiled["steps"]
                    figures["aten_ops_per_step"] = profiled["aten_ops_per_step"]
                print_parts(stage, row, figures)
                if stats is not None:
                    own = own_time_rows(stats, figures["profiled_steps"])
                    results[stage][row]["own_time_ms"] = dict(own)
                    print(f"  ATen operators per step (each a kernel launch on a GPU): "
                          f"{figures['aten_ops_per_step']:.0f}")
                    print("  functions with the most own time (cProfile, ms per step; it magnifies small calls):")
                    for name, ms in own:
                        print(f"    {name:<64}{ms:8.3f}")
                print(flush=True)

    batches = {stage: json.loads((REPO / "configs" / "demo" / f"{stage}.json").read_text())["training"]
               ["train_batch_size"] for stage in results}
    print(f"\nHost work per training step, configs/demo batch sizes, trivial models, 1 torch thread; median over "
          f"{args.steps - args.warmup} steps (target: <= {TARGET_MS:g} ms of main-thread time, EMA arithmetic "
          "aside, with data in workers)")
    print(f"{'stage':<14}{'batch':>6}  {'loop':<26}{'main ms':>9}{'EMA ms':>8}{'rest ms':>9}{'wall ms':>9}"
          f"{'data wait':>10}  target")
    for stage, rows in results.items():
        for row, f in rows.items():
            rest = f["main_thread_cpu_ms"] - f["ema_cpu_ms"]
            verdict = ("met" if rest <= TARGET_MS else "missed") if row.startswith("fast") else ""
            print(f"{stage:<14}{batches[stage]:>6}  {row:<26}{f['main_thread_cpu_ms']:>9.2f}{f['ema_cpu_ms']:>8.2f}"
                  f"{rest:>9.2f}{f['wall_ms']:>9.2f}{f['data_wait_ms']:>10.2f}  {verdict}")
    if args.out:
        Path(args.out).write_text(json.dumps({"target_ms": TARGET_MS, "results": results}, indent=2))


def print_parts(stage: str, row: str, figures: dict) -> None:
    """The row's figures and where its main thread's time went (mean CPU ms per step; indented parts are inside the
    part above; "rest" is the script's own code: the trivial forward, the loss, tokenizing negatives, ...)."""
    print(f"{stage} | {row}: main thread {figures['main_thread_cpu_ms']:.2f} ms/step, wall {figures['wall_ms']:.2f} "
          f"ms/step, waiting for data {figures['data_wait_ms']:.2f} ms/step")
    parts = figures["parts_ms"]
    for label, ms in parts.items():
        print(f"    {label:<64}{ms:8.3f}")
    top_level = sum(ms for label, ms in parts.items() if not label.startswith("  "))
    print(f"    {'rest of the step':<64}{figures['main_thread_cpu_ms'] - top_level:8.3f}")


if __name__ == "__main__":
    main()
