"""U-Net training throughput: cached latents/text embeddings vs the reference loop, same model, data and run.

    python benchmarks/bench_unet_training.py [--size demo] [--steps 8] [--batch_size 64]
        [--text_encoder DIR --vae DIR] [--check]

Both rows run ``training/train_unet.py`` with the same config, stage models, data and random draws:
``cached`` trains from the on-disk cache (the VAE and text encoder ran once, beforehand: the build time is shown
separately); ``reference`` is ``--no_cache``, the loop of Diffusers' ``examples/text_to_image/train_text_to_image.py``
(``vae.encode(pixel_values).latent_dist.sample()`` and ``text_encoder(input_ids)`` on every step). Throughput is
measured over the training loop after its first (warm-up) step: images/s = (steps - 1) x batch / seconds,
from the ``elapsed_s`` of OUT/train_log.jsonl. A breakdown shows what one batch costs in each part the cache
removes (data loading, VAE encode, text encode), next to the whole reference step: the speed-up can only be
(U-Net step + removed parts) / U-Net step, so it is large when the VAE is expensive relative to the U-Net. Without --text_encoder/--vae, random
stage models are built from configs/<size>/text_encoder.json and configs/<size>/vae.json (their sizes are what
count for speed). With --check the exit status is 1 when caching is less than 1.5 times faster.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ldm_pipeline.trainer import TRAIN_LOG, read_jsonl, run_in_process  # noqa: E402
from training import train_unet  # noqa: E402

REQUIRED_SPEEDUP = 1.5


def build_random_stages(size: str, root: Path, resolution: int) -> tuple[Path, Path]:
    """Random text encoder + tokenizer and VAE with the architecture of configs/<size>/, saved like the stages."""
    from ldm_pipeline.data.shapes import ShapesDataset
    from ldm_pipeline.text_encoder import build_text_encoder, train_tokenizer
    from ldm_pipeline.vae import build_vae

    text_config = json.loads((REPO / "configs" / size / "text_encoder.json").read_text())["model"]
    captions = [ShapesDataset(400, 16, seed=0)[i]["caption"] for i in range(400)]
    tokenizer_config = text_config.get("tokenizer", {})
    tokenizer = train_tokenizer(captions, tokenizer_config.get("vocab_size", 512), tokenizer_config.get("model_max_length", 32))
    torch.manual_seed(0)
    text_encoder = build_text_encoder(text_config, tokenizer)
    text_encoder.save_pretrained(root / "text" / "text_encoder")
    tokenizer.save_pretrained(root / "text" / "tokenizer")

    vae_config_path = REPO / "configs" / size / "vae.json"
    if vae_config_path.is_file():
        vae = build_vae(json.loads(vae_config_path.read_text())["model"], resolution)
    else:
        from diffusers import AutoencoderKL

        print(f"{vae_config_path} not found: using a f=4 AutoencoderKL with block_out_channels (32, 64, 64).")
        vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                            block_out_channels=[32, 64, 64], latent_channels=4, norm_num_groups=32,
                            sample_size=resolution)
    vae.save_pretrained(root / "vae_stage" / "vae")
    return root / "text", root / "vae_stage"


def run(argv: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        metrics = run_in_process(train_unet.main, argv)
    return metrics, time.perf_counter() - start


def steady_seconds_per_step(output_dir: Path) -> float:
    """Seconds per optimizer step after the first one (which includes one-time warm-up), from the step records of
    OUT/train_log.jsonl (validation records carry no ``elapsed_s``)."""
    elapsed = [record["elapsed_s"] for record in read_jsonl(output_dir / TRAIN_LOG) if "elapsed_s" in record]
    if len(elapsed) < 2:
        return elapsed[0]
    return (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)


@torch.no_grad()
def removed_work_seconds(text_dir, vae_dir, argv: list[str], repeats: int = 3) -> dict:
    """Median seconds per batch of the parts the cache removes: data loading, VAE encode, text encode."""
    from ldm_pipeline.config import load_stage_config
    from ldm_pipeline.data import build_dataset, collate_examples
    from ldm_pipeline.prompt_encoding import encode_prompts, tokenize_prompts
    from ldm_pipeline.text_encoder import load_pretrained_text_encoder
    from ldm_pipeline.vae import load_vae

    config = load_stage_config("unet", argv)
    args = config.training
    tokenizer, text_encoder = load_pretrained_text_encoder(text_dir)
    vae = load_vae(str(vae_dir)).eval()
    dataset = build_dataset(config.data, split="train")
    timings = {"data": [], "vae_encode": [], "text_encode": []}
    for r in range(repeats):
        start = time.perf_counter()
        batch = collate_examples([dataset[(r * args.train_batch_size + i) % len(dataset)]
                                  for i in range(args.train_batch_size)])
        timings["data"].append(time.perf_counter() - start)
        start = time.perf_counter()
        vae.encode(batch["pixel_values"]).latent_dist.sample()
        timings["vae_encode"].append(time.perf_counter() - start)
        start = time.perf_counter()
        tokens = tokenize_prompts(tokenizer, batch["captions"])
        encode_prompts(text_encoder, tokens.input_ids, tokens.attention_mask)
        timings["text_encode"].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="demo", help="configs/<size>/unet.json (and its text/vae configs).")
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per loop (the first is warm-up).")
    parser.add_argument("--batch_size", type=int, default=None, help="Default: the config's train_batch_size.")
    parser.add_argument("--text_encoder", default=None, help="Text stage output dir (default: random, config-sized).")
    parser.add_argument("--vae", default=None, help="VAE stage output dir (default: random, config-sized).")
    parser.add_argument("--check", action="store_true", help=f"Exit 1 when the speed-up is below {REQUIRED_SPEEDUP}.")
    options = parser.parse_args()

    config_path = REPO / "configs" / options.size / "unet.json"
    config = json.loads(config_path.read_text())
    batch_size = options.batch_size or config["training"]["train_batch_size"]
    resolution = config["data"]["resolution"]
    num_samples = options.steps * batch_size  # one epoch: the cache covers exactly what the run trains on

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if options.text_encoder and options.vae:
            text_dir, vae_dir = options.text_encoder, options.vae
        else:
            text_dir, vae_dir = build_random_stages(options.size, root, resolution)
        common = ["--config", str(config_path), "--text_encoder", str(text_dir), "--vae", str(vae_dir),
                  "--max_train_steps", str(options.steps), "--train_batch_size", str(batch_size),
                  "--num_train_samples", str(num_samples), "--checkpointing_steps", str(10**9),
                  "--report_to", "none", "--cache_dir", str(root / "cache")]
        if not torch.cuda.is_available():
            common += ["--mixed_precision", "no"]
        build_metrics, build_seconds = run(common + ["--output_dir", str(root / "build")])
        cached, _ = run(common + ["--output_dir", str(root / "cached")])
        reference, _ = run(common + ["--output_dir", str(root / "reference"), "--no_cache"])
        cache_build_seconds = build_seconds - build_metrics["train_seconds_this_run"]
        cached["seconds_per_step"] = steady_seconds_per_step(root / "cached")
        reference["seconds_per_step"] = steady_seconds_per_step(root / "reference")
        removed = removed_work_seconds(text_dir, vae_dir, common + ["--output_dir", str(root / "cached")])

    for metrics in (cached, reference):
        metrics["images_per_second"] = batch_size / metrics["seconds_per_step"]
    speedup = cached["images_per_second"] / reference["images_per_second"]
    print(f"\nU-Net training throughput, configs/{options.size}/unet.json, {options.steps} steps x batch {batch_size}, "
          f"{resolution} px, torch threads {torch.get_num_threads()}, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'loop':<44}{'images/s':>10}{'s/step':>10}")
    for name, metrics in (("cached (latents + text embeddings on disk)", cached),
                          ("reference (VAE + text encoder every step)", reference)):
        print(f"{name:<44}{metrics['images_per_second']:>10.1f}{batch_size / metrics['images_per_second']:>10.3f}")
    shares = cached.get("loop_shares")
    if shares:
        print(f"cached loop's time: the step {shares['step']:.1%}, waiting for data {shares['data']:.1%}, work around "
              f"the step (EMA, logs, checkpoints) {shares['around_the_step']:.1%} (target <= 5%)")
    print("work the cache removes, seconds per batch: " + ", ".join(f"{k} {v:.3f}" for k, v in removed.items())
          + f" (sum {sum(removed.values()):.3f}; cached step {cached['seconds_per_step']:.3f})")
    print(f"speed-up: {speedup:.2f}x (required >= {REQUIRED_SPEEDUP}x); one-time cache build for {num_samples} "
          f"images: {cache_build_seconds:.1f} s (incl. model loading), reused by later epochs and runs")
    if options.check and speedup < REQUIRED_SPEEDUP:
        print(f"FAIL: caching is only {speedup:.2f}x faster.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
