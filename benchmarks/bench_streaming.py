"""Training throughput from streamed WebDataset tar shards against the same data as an imagefolder.

    python benchmarks/bench_streaming.py [--size demo] [--num_samples 2048] [--shard_size 256] [--steps 40]
        [--batch_size 8] [--num_workers 0] [--check]

The built-in shapes data is exported twice (``ldm-export-shapes``): as an imagefolder and as tar shards (plus one
held-out shard). The VAE stage (``configs/<size>/vae.json``) then trains ``--steps`` steps on each, the same model
and batch size: ``imagefolder`` (map-style, ``EpochShuffleSampler``) and ``streaming`` (``--streaming``, shuffled
stream). Throughput is images/s = (steps - 1) x batch / seconds between the first and the last logged step of
OUT/train_log.jsonl (the first step is warm-up); the config's ``scaling_factor_max_samples`` is dropped, so both
runs end by encoding their whole training data, outside the timed loop. With --check the exit status is 1 when
streaming is below 90% of the imagefolder's throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_unet_training import steady_seconds_per_step  # noqa: E402
from ldm_pipeline.data.export import export_shapes, export_shapes_shards  # noqa: E402
from ldm_pipeline.trainer import run_in_process  # noqa: E402
from training import train_vae  # noqa: E402

REQUIRED_RATIO = 0.9


def train(config: Path, data_args: list[str], output_dir: Path, args) -> float:
    argv = ["--config", str(config), "--output_dir", str(output_dir), "--max_train_steps", str(args.steps),
            "--checkpointing_steps", str(args.steps + 1), "--train_batch_size", str(args.batch_size),
            "--dataloader_num_workers", str(args.num_workers), "--report_to", "none",
            "--num_validation_samples", str(args.shard_size), "--validation_steps", str(args.steps + 1), *data_args]
    with contextlib.redirect_stderr(io.StringIO()):
        run_in_process(train_vae.main, argv)
    return args.batch_size / steady_seconds_per_step(output_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="demo", help="configs/<size>/vae.json")
    parser.add_argument("--num_samples", type=int, default=2048, help="training samples (a multiple of --shard_size)")
    parser.add_argument("--shard_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--check", action="store_true", help=f"exit 1 when the ratio is below {REQUIRED_RATIO}")
    args = parser.parse_args()
    settings = json.loads((REPO / "configs" / args.size / "vae.json").read_text())
    settings["training"].pop("scaling_factor_max_samples", None)  # both runs encode their training data at the end
    resolution = settings["data"]["resolution"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "vae.json"
        config.write_text(json.dumps(settings))
        total = args.num_samples + args.shard_size
        export_shapes(root / "folder", total, resolution)
        export_shapes_shards(root / "shards", total, resolution, args.shard_size)
        folder = train(config, ["--train_data_dir", str(root / "folder")], root / "out_folder", args)
        stream = train(config, ["--train_data_dir", str(root / "shards"), "--streaming"], root / "out_stream", args)
    ratio = stream / folder
    print(f"VAE stage ({args.size}, batch {args.batch_size}, {args.steps} steps, {args.num_workers} workers, "
          f"{resolution} px): imagefolder {folder:.1f} images/s, streaming tar shards {stream:.1f} images/s, "
          f"ratio {ratio:.3f} (target >= {REQUIRED_RATIO})")
    return 1 if args.check and ratio < REQUIRED_RATIO else 0


if __name__ == "__main__":
    sys.exit(main())
