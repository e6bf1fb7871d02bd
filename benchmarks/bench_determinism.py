"""What makes two U-Net training runs differ: repeat, thread count, CPU instruction set.

    python benchmarks/bench_determinism.py [--size demo] [--steps 20]

Runs ``training/train_unet.py`` (configs/<size>/unet.json, random config-sized text encoder and VAE, the same
seed and data) several times, each in a fresh process with one setting changed, and compares the saved U-Net
weights and final loss with the first run's:

- the same command again;
- ``--num_threads 1`` instead of 2 (a reduction split over a different number of threads adds in another order);
- ``ATEN_CPU_CAPABILITY=default`` / ``avx2``: PyTorch's own kernels for an older instruction set, as on a CPU
  without AVX-512 (https://pytorch.org/docs/stable/notes/numerical_accuracy.html);
- ``ONEDNN_MAX_CPU_ISA=AVX2`` / ``SSE41``: oneDNN's convolutions and matrix products for an older instruction
  set only.

A setting at or above this CPU's own capability (printed first) runs the same kernels as the reference.

Each row prints whether the weights are bitwise equal to the reference, the largest weight difference relative to
the weights' scale, and the last loss. Float32 sums depend on their order, so every setting that changes an
order changes the weights a little on the first step, and training amplifies it: runs are bitwise reproducible
only with the same thread count on the same instruction set and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_unet_training import build_random_stages  # noqa: E402
from ldm_pipeline.durable import read_jsonl  # noqa: E402
from ldm_pipeline.trainer import TRAIN_LOG  # noqa: E402

SETTINGS = [
    ("reference: --num_threads 2", {}, ["--num_threads", "2"]),
    ("the same command again", {}, ["--num_threads", "2"]),
    ("--num_threads 1", {}, ["--num_threads", "1"]),
    ("ATEN_CPU_CAPABILITY=default", {"ATEN_CPU_CAPABILITY": "default"}, ["--num_threads", "2"]),
    ("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, ["--num_threads", "2"]),
    ("ONEDNN_MAX_CPU_ISA=AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, ["--num_threads", "2"]),
    ("ONEDNN_MAX_CPU_ISA=SSE41", {"ONEDNN_MAX_CPU_ISA": "SSE41"}, ["--num_threads", "2"]),
]


def train(common: list[str], output_dir: Path, env: dict, extra: list[str]) -> tuple[dict, float]:
    """Run the U-Net stage in a fresh process; returns (U-Net weights, last logged loss)."""
    command = [sys.executable, str(REPO / "training" / "train_unet.py"), *common, *extra,
               "--output_dir", str(output_dir), "--cache_dir", str(output_dir / "cache")]
    subprocess.run(command, check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    losses = [record["loss"] for record in read_jsonl(output_dir / TRAIN_LOG) if "loss" in record]
    return load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors"), losses[-1]


def relative_difference(weights: dict, reference: dict) -> float:
    """max over tensors of max|w - w_ref| / max|w_ref|."""
    return max(((weights[name] - tensor).abs().max() / tensor.abs().max().clamp_min(1e-12)).item()
               for name, tensor in reference.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="demo", help="configs/<size>/unet.json (and its text/vae configs).")
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per run.")
    options = parser.parse_args()

    config_path = REPO / "configs" / options.size / "unet.json"
    config = json.loads(config_path.read_text())
    batch_size, resolution = config["training"]["train_batch_size"], config["data"]["resolution"]
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} cores; configs/{options.size}/unet.json, {options.steps} steps of {batch_size}")
    print(f"{'setting':<32}{'bitwise equal':>15}{'max rel. weight diff':>22}{'last loss':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text_dir, vae_dir = build_random_stages(options.size, root, resolution)
        common = ["--config", str(config_path), "--text_encoder", str(text_dir), "--vae", str(vae_dir),
                  "--max_train_steps", str(options.steps), "--num_train_samples", str(options.steps * batch_size),
                  "--checkpointing_steps", str(10**9), "--validation_steps", str(10**9), "--report_to", "none",
                  "--mixed_precision", "no"]
        reference = None
        for index, (name, env, extra) in enumerate(SETTINGS):
            weights, loss = train(common, root / f"run{index}", env, extra)
            if reference is None:
                reference = weights
            equal = all(torch.equal(weights[key], tensor) for key, tensor in reference.items())
            print(f"{name:<32}{'yes' if equal else 'no':>15}{relative_difference(weights, reference):>22.2e}"
                  f"{loss:>12.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
