"""GPU figures from one command: every stage of a config trained for a short while on one CUDA device.

    python benchmarks/bench_gpu.py [--configs gpu_demo gpu] [--stages text_encoder vae unet] [--steps 100]
        [--out FILE] [-- EXTRA STAGE FLAGS, e.g. --torch_compile reduce-overhead]
    python benchmarks/bench_gpu.py --dry_run      # on a CPU: configs/tiny, a few steps, the same table

For each ``configs/<name>`` and stage, ``training/train_<stage>.py`` runs in this process with the config's model and
batch size (the U-Net on random frozen stages built from the config's text_encoder.json and vae.json, from a latent
cache of 20 batches), with the fast path's defaults (``ldm_pipeline/fast_path.py``) and nothing saved or validated
inside the loop: ``--warmup`` steps, then ``--steps`` timed steps, then ``--profile_steps`` steps under
``torch.profiler``. Printed per stage:

- images/s of the timed steps (the loop's wall time: data, step and the work around it);
- GFLOP per image of one training step (``torch.utils.flop_counter.FlopCounterMode``: matrix products,
  convolutions and attention, on the stage's step of ``bench_utilisation.py``), the TFLOP/s it makes and its share
  of the bf16 matrix-product peak measured in the same run (the best of 8192 x 8192 x 8192 products);
- ms per step: the loop's wall time, the GPU timeline between batches (CUDA events, queued by the loop without a
  wait), the GPU's busy time (the kernels' own time in the profiled steps) and the wait for data. A busy time well
  below the wall time means the host, not the GPU, sets the pace (see ``benchmarks/bench_host_overhead.py``).

Without CUDA it stops with one line, unless ``--dry_run``. Targets on one H200: the ``gpu`` U-Net at >= 35% of the
bf16 peak, the ``gpu_demo`` U-Net at >= 30,000 images/s, the text encoder at >= 20,000 images/s. It takes under 4
minutes for both configs on one GPU (most of it model building, tokenizer training and the latent caches).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_host_overhead import batches_marked, stage_argv, stage_main  # noqa: E402
from bench_unet_training import build_random_stages  # noqa: E402
from bench_utilisation import count_flops, matmul_peak_gflops, stage_config_path, stage_steps  # noqa: E402
from ldm_pipeline.trainer import run_in_process  # noqa: E402

STAGES = ("text_encoder", "vae", "unet")
FLOP_ROWS = {"text_encoder": "text encoder (contrastive)", "vae": "VAE (L1 + KL)", "unet": "U-Net, cached latents"}
PEAK_SIZE = 8192


class LoopClock:
    """Marks every batch the loop receives (wall time, the loop's data wait, and on CUDA an event queued on the
    current stream); runs ``torch.profiler`` over the last ``profile_steps`` steps."""

    def __init__(self, warmup: int, timed: int, profile_steps: int, cuda: bool):
        self.warmup, self.timed, self.profile_steps, self.cuda = warmup, timed, profile_steps, cuda
        self.marks: list[tuple[float, float]] = []
        self.events: list = []
        self.profiler = None
        self.busy_us = 0.0

    def mark(self, trainer) -> None:
        self.marks.append((time.perf_counter(), trainer.loop_seconds["data"]))
        if self.cuda and len(self.marks) <= self.warmup + self.timed + 1:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        if self.cuda and self.profile_steps and len(self.marks) == self.warmup + self.timed + 1:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CUDA])
            self.profiler.__enter__()

    def stop_profiler(self) -> None:
        if self.profiler is None:
            return
        torch.cuda.synchronize()
        self.profiler.__exit__(None, None, None)
        self.busy_us = sum(getattr(event, "self_device_time_total", 0.0) for event in
                           self.profiler.key_averages())
        self.profiler = None

    def figures(self, batch: int) -> dict:
        (start, data_start), (end, data_end) = self.marks[self.warmup], self.marks[self.warmup + self.timed]
        wall = (end - start) / self.timed
        figures = {"images_per_second": batch / wall, "wall_ms": wall * 1e3,
                   "data_wait_ms": (data_end - data_start) / self.timed * 1e3}
        if self.cuda:
            torch.cuda.synchronize()
            figures["gpu_timeline_ms"] = self.events[self.warmup].elapsed_time(self.events[-1]) / self.timed
            if self.profile_steps:
                figures["gpu_busy_ms"] = self.busy_us / 1e3 / self.profile_steps
        return figures


def flops_per_image(size: str, device: str, autocast: bool) -> dict[str, float]:
    """FLOPs of one training step per image, per stage (``bench_utilisation.stage_steps`` at batch 2)."""
    rows = {name: (step, batch) for name, step, batch in stage_steps(
        size, batch=2, device=device, autocast_dtype=torch.bfloat16 if autocast else None)}
    return {stage: count_flops(rows[row][0]) / rows[row][1] for stage, row in FLOP_ROWS.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["gpu_demo", "gpu"], help="configs/<name> directories.")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--steps", type=int, default=100, help="Timed steps per stage.")
    parser.add_argument("--warmup", type=int, default=20, help="Steps before the timed ones.")
    parser.add_argument("--profile_steps", type=int, default=5, help="Steps after them under torch.profiler.")
    parser.add_argument("--dry_run", action="store_true", help="On a CPU: configs/tiny, 3 + 2 steps, fp32 peak.")
    parser.add_argument("--out", default=None, help="Also write the figures as JSON here.")
    args, stage_flags = parser.parse_known_args(argv)
    stage_flags = [flag for flag in stage_flags if flag != "--"]
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("bench_gpu.py: error: no CUDA device here; run it on a GPU machine, or pass --dry_run to "
                         "check it on a CPU with configs/tiny.")
    if args.dry_run:
        args.configs, args.steps, args.warmup, args.profile_steps = ["tiny"], 3, 2, 0
    device = "cuda" if cuda else "cpu"
    peak = (matmul_peak_gflops(PEAK_SIZE, device="cuda", dtype=torch.bfloat16) if cuda
            else matmul_peak_gflops(512, repeats=3))
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
               "peak_tflops": peak / 1e3, "peak": "bf16 matmul" if cuda else "fp32 matmul", "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in args.configs:
            flops = flops_per_image(size, device, autocast=cuda)
            text_dir = vae_dir = None
            if "unet" in args.stages:
                resolution = json.loads(stage_config_path(size, "unet").read_text())["data"]["resolution"]
                with contextlib.redirect_stdout(io.StringIO()):
                    text_dir, vae_dir = build_random_stages(size, root / size / "stages", resolution)
            total = args.warmup + args.steps + args.profile_steps
            for stage in args.stages:
                batch = json.loads(stage_config_path(size, stage).read_text())["training"]["train_batch_size"]
                stage_args = stage_argv(stage, root, total, text_dir, vae_dir, size, shards_like_the_config=False)
                clock = LoopClock(args.warmup, args.steps, args.profile_steps, cuda)
                start = time.perf_counter()
                with batches_marked(clock.mark, clock.stop_profiler), contextlib.redirect_stderr(io.StringIO()), \
                        contextlib.redirect_stdout(io.StringIO()):
                    run_in_process(stage_main(stage), stage_args + stage_flags)
                figures = {**clock.figures(batch), "batch": batch, "gflop_per_image": flops[stage] / 1e9,
                           "run_seconds": time.perf_counter() - start}
                figures["tflops"] = flops[stage] * figures["images_per_second"] / 1e12
                figures["share_of_peak"] = figures["tflops"] * 1e3 / peak
                results["configs"].setdefault(size, {})[stage] = figures
                print(f"configs/{size} {stage}: {figures['images_per_second']:,.0f} images/s "
                      f"({figures['run_seconds']:.0f} s with set-up)", flush=True)
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


def print_table(results: dict) -> None:
    print(f"\n{results['device']}: {results['peak']} peak {results['peak_tflops']:.1f} TFLOP/s "
          f"(measured in this run)")
    print(f"{'config':<10}{'stage':<14}{'batch':>6}{'images/s':>11}{'GFLOP/img':>11}{'TFLOP/s':>9}{'of peak':>9}"
          f"{'wall ms':>9}{'GPU line':>9}{'GPU busy':>9}{'data ms':>9}")
    for size, stages in results["configs"].items():
        for stage, f in stages.items():
            line, busy = f.get("gpu_timeline_ms"), f.get("gpu_busy_ms")
            print(f"{size:<10}{stage:<14}{f['batch']:>6}{f['images_per_second']:>11,.0f}{f['gflop_per_image']:>11.3f}"
                  f"{f['tflops']:>9.2f}{f['share_of_peak']:>9.1%}{f['wall_ms']:>9.2f}"
                  f"{(f'{line:.2f}' if line is not None else '-'):>9}{(f'{busy:.2f}' if busy is not None else '-'):>9}"
                  f"{f['data_wait_ms']:>9.2f}")


if __name__ == "__main__":
    main()
