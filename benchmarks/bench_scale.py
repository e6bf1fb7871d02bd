"""Does U-Net training from the sharded cache scale with the dataset? Peak memory at two dataset sizes, the cache
on disk, the parallel cache build and the fp16 storage error.

    python benchmarks/bench_scale.py [--size demo] [--sizes 20000 200000] [--steps 30] [--build_samples 20000]
        [--text_encoder DIR --vae DIR]

1. For each size N of ``--sizes``: the cache of N ``shapes`` samples is built (``training/cache_latents.py`` on 2
   processes), then ``training/train_unet.py`` trains ``--steps`` steps from it in a fresh process, whose peak
   resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at its end) is reported with the cache's size on
   disk. Training reads only the rows of each batch, so the two peaks should differ by less than 15%.
2. The cache of ``--build_samples`` samples is built with 1 process and with 2 (``accelerate launch
   --config_file configs/accelerate/cpu_2_processes.yaml``), one thread per process (OMP_NUM_THREADS=1): build
   times (from the script's "ready in": after start-up and model loading, which are also shown), their ratio
   (target >= 1.7x) and whether the two caches are bitwise equal.
3. The error of storing the posterior in float16 (``caching.fp16_storage_error``: max and RMS of
   (fp16(x) - x) / std over the mean and std of the first shard), in units of the posterior std.

Without --text_encoder/--vae, random stage models are built from configs/<size>/ (as in bench_unet_training.py);
with the demo's trained stages the fp16 error is that of real latents.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_unet_training import build_random_stages  # noqa: E402

RSS_TOLERANCE = 0.15
REQUIRED_BUILD_SPEEDUP = 1.7


def child_env() -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": path}


def run_checked(command: list[str]) -> tuple[str, float]:
    """Run ``command`` from the repository root; ``(stdout, wall seconds)``; stops with its output on failure."""
    start = time.perf_counter()
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"bench_scale.py: error: {' '.join(command[:4])} ... failed:\n{result.stdout[-2000:]}"
                 f"{result.stderr[-3000:]}")
    return result.stdout, seconds


def build_cache(argv: list[str], processes: int) -> tuple[Path, float, float]:
    """``training/cache_latents.py argv`` on ``processes`` CPU processes: ``(cache directory, build seconds, wall
    seconds)``; the build seconds leave out start-up and model loading (the script's "ready in" time)."""
    script = str(REPO / "training" / "cache_latents.py")
    if processes == 1:
        command = [sys.executable, script, *argv]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "configs" / "accelerate" / "cpu_2_processes.yaml"), "--num_processes", str(processes),
                   script, *argv]
    stdout, wall_seconds = run_checked(command)
    summary = next(line for line in stdout.splitlines() if line.startswith("Cache "))
    build_seconds = float(summary.rsplit("ready in ", 1)[1].split()[0])
    return Path(summary.split()[1].rstrip(":")), build_seconds, wall_seconds


def directory_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        digest.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def size_on_disk(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir())


def train_child(argv: list[str]) -> None:
    """In a fresh process: train, then print this process's peak resident memory as JSON."""
    from ldm_pipeline.trainer import run_in_process
    from training import train_unet

    metrics = run_in_process(train_unet.main, argv)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_bytes": peak_kib * 1024, "cached": metrics.get("cached")}))


def peak_training_rss(argv: list[str]) -> int:
    stdout, _ = run_checked([sys.executable, __file__, "--_train_child", *argv])
    result = json.loads(stdout.strip().splitlines()[-1])
    if not result["cached"]:
        sys.exit("bench_scale.py: error: the training run did not use the cache.")
    return result["peak_rss_bytes"]


def first_shard_fp16_error(directory: Path) -> dict:
    from safetensors.torch import load_file

    from ldm_pipeline.caching import fp16_storage_error, shard_path

    shard = load_file(str(shard_path(directory, "samples", 0)))
    return fp16_storage_error(shard["latent_mean"], shard["latent_std"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="demo", help="configs/<size>/unet.json (and its text/vae configs).")
    parser.add_argument("--sizes", type=int, nargs=2, default=[20000, 200000], help="The two dataset sizes.")
    parser.add_argument("--steps", type=int, default=30, help="Training steps per size.")
    parser.add_argument("--batch_size", type=int, default=None, help="Default: the config's train_batch_size.")
    parser.add_argument("--build_samples", type=int, default=20000, help="Samples of the 1- vs 2-process build.")
    parser.add_argument("--text_encoder", default=None, help="Text stage output dir (default: random, config-sized).")
    parser.add_argument("--vae", default=None, help="VAE stage output dir (default: random, config-sized).")
    options = parser.parse_args()

    config_path = REPO / "configs" / options.size / "unet.json"
    config = json.loads(config_path.read_text())
    resolution = config["data"]["resolution"]
    batch_size = options.batch_size or config["training"]["train_batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if options.text_encoder and options.vae:
            text_dir, vae_dir, models = options.text_encoder, options.vae, "given stages"
        else:
            text_dir, vae_dir = build_random_stages(options.size, root, resolution)
            models = f"random configs/{options.size} stages"
        common = ["--config", str(config_path), "--text_encoder", str(text_dir), "--vae", str(vae_dir),
                  "--resolution", str(resolution)]
        print(f"configs/{options.size}, {resolution} px, {models}, batch {batch_size}, {options.steps} steps")

        peaks = {}
        for num_samples in options.sizes:
            data = ["--num_train_samples", str(num_samples), "--cache_dir", str(root / "scale")]
            directory, build_seconds, _ = build_cache(common + data, processes=2)
            peaks[num_samples] = peak_training_rss(
                common + data + ["--output_dir", str(root / f"train-{num_samples}"), "--max_train_steps",
                                 str(options.steps), "--train_batch_size", str(batch_size), "--report_to", "none",
                                 "--checkpointing_steps", str(10**9), "--validation_steps", str(10**9)])
            print(f"{num_samples:>8} samples: peak RSS of training {peaks[num_samples] / 2**20:.1f} MiB; cache "
                  f"{size_on_disk(directory) / 2**20:.1f} MiB on disk, built in {build_seconds:.1f} s (2 processes)")
        small, large = options.sizes
        ratio = peaks[large] / peaks[small]
        verdict = "ok" if abs(ratio - 1) < RSS_TOLERANCE else "FAIL"
        print(f"peak RSS ratio {large}/{small} samples: {ratio:.3f} (target: within {RSS_TOLERANCE:.0%}) {verdict}")

        data = ["--num_train_samples", str(options.build_samples)]
        one, one_seconds, one_wall = build_cache(common + data + ["--cache_dir", str(root / "build-1")], processes=1)
        two, two_seconds, two_wall = build_cache(common + data + ["--cache_dir", str(root / "build-2")], processes=2)
        speedup = one_seconds / two_seconds
        equal = directory_digest(one) == directory_digest(two)
        print(f"cache build of {options.build_samples} samples: 1 process {one_seconds:.1f} s, 2 processes "
              f"{two_seconds:.1f} s: {speedup:.2f}x (target >= {REQUIRED_BUILD_SPEEDUP}x; wall times with start-up "
              f"and model loading {one_wall:.1f} s and {two_wall:.1f} s); the 2-process cache is "
              f"{'bitwise equal to' if equal else 'DIFFERENT from'} the 1-process one")

        error = first_shard_fp16_error(one)
        print(f"fp16 storage error (first shard, relative to the posterior std): max {error['max']:.2e}, "
              f"RMS {error['rms']:.2e}")
    return 0 if equal else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_train_child":
        train_child(sys.argv[2:])
    else:
        sys.exit(main())
