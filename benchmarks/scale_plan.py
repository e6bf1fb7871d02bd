"""A scale plan from counted FLOPs: what each config costs per training image, and GPU-hours at 1M and 10M images.

    python benchmarks/scale_plan.py [--sizes demo gpu] [--measured bench_utilisation.json]
        [--gpu_tflops 989] [--mfu 0.35] [--usd_per_gpu_hour 2.5] [--out plan.json]

For every stage of ``configs/<size>`` it counts the floating-point operations of one training step per image with
``torch.utils.flop_counter.FlopCounterMode`` (forward, backward and AdamW on random weights of the config's
architecture; matrix products and convolutions, which are nearly all of the work), the U-Net both on cached latents
and with the frozen stages run every step, and the one-off cache pass (VAE encoder + text encoder, forward only).
From the counts it estimates the GPU-hours of one epoch over 1M and 10M images and of each config's own run
(``max_train_steps x train_batch_size`` images):

    GPU-hours = FLOPs per image x images / (gpu_tflops x 10^12 x mfu) / 3600

``gpu_tflops`` is the accelerator's dense peak for the run's precision (989 for an H100 SXM in bf16) and ``mfu``
the share of it the training step reaches (model FLOPs utilisation); both are assumptions the command line states,
not measurements. ``--measured`` adds this machine's measured images/s (``bench_utilisation.py --out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_utilisation import count_flops, stage_steps  # noqa: E402

DATASET_SIZES = (1_000_000, 10_000_000)
CONFIG_STAGES = {"text encoder (contrastive)": "text_encoder", "VAE (L1 + KL)": "vae",
                 "U-Net, cached latents": "unet", "U-Net, reference loop": "unet"}


def gpu_hours(flops_per_image: float, images: float, gpu_tflops: float, mfu: float) -> float:
    """FLOPs per image x images / (gpu_tflops x 10^12 x mfu) / 3600."""
    return flops_per_image * images / (gpu_tflops * 1e12 * mfu) / 3600


def cache_pass_flops(size: str, batch: int) -> float:
    """FLOPs per image of the cache pass: the VAE posterior of one image and the text states of one caption."""
    from ldm_pipeline.data.shapes import ShapesDataset
    from ldm_pipeline.prompt_encoding import encode_prompts, tokenize_prompts
    from ldm_pipeline.text_encoder import build_text_encoder, train_tokenizer
    from ldm_pipeline.vae import build_vae

    configs = {name: json.loads((REPO / "configs" / size / f"{name}.json").read_text())
               for name in ("text_encoder", "vae", "unet")}
    resolution = configs["unet"]["data"]["resolution"]
    captions = [ShapesDataset(batch, 16, seed=0)[i]["caption"] for i in range(batch)]
    tokenizer_config = configs["text_encoder"]["model"].get("tokenizer", {})
    tokenizer = train_tokenizer(captions * 8, tokenizer_config.get("vocab_size", 512),
                                tokenizer_config.get("model_max_length", 32))
    text_encoder = build_text_encoder(configs["text_encoder"]["model"], tokenizer).eval()
    vae = build_vae(configs["vae"]["model"], resolution).eval()
    tokens = tokenize_prompts(tokenizer, captions)
    pixels = torch.rand(batch, 3, resolution, resolution) * 2 - 1

    @torch.no_grad()
    def encode():
        vae.encode(pixels).latent_dist.mean
        encode_prompts(text_encoder, tokens.input_ids, tokens.attention_mask)

    return count_flops(encode) / batch


def plan(size: str, batch: int, gpu_tflops: float, mfu: float, measured: dict) -> list[dict]:
    configs = {name: json.loads((REPO / "configs" / size / f"{name}.json").read_text())
               for name in ("text_encoder", "vae", "unet")}
    rows = []
    for name, step, step_batch in stage_steps(size, batch=batch):
        if name not in CONFIG_STAGES:
            continue
        flops = count_flops(step) / step_batch
        training = configs[CONFIG_STAGES[name]]["training"]
        run_images = training["max_train_steps"] * training["train_batch_size"]
        rows.append({"size": size, "stage": name, "gflop_per_image": flops / 1e9, "run_images": run_images,
                     "gpu_hours_run": gpu_hours(flops, run_images, gpu_tflops, mfu),
                     **{f"gpu_hours_epoch_{n // 1_000_000}M": gpu_hours(flops, n, gpu_tflops, mfu)
                        for n in DATASET_SIZES},
                     "measured_images_per_second": measured.get(name)})
    flops = cache_pass_flops(size, batch)
    rows.append({"size": size, "stage": "cache pass (VAE + text, forward)", "gflop_per_image": flops / 1e9,
                 "run_images": None, "gpu_hours_run": None,
                 **{f"gpu_hours_epoch_{n // 1_000_000}M": gpu_hours(flops, n, gpu_tflops, mfu) for n in DATASET_SIZES},
                 "measured_images_per_second": None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["demo", "gpu"])
    parser.add_argument("--batch", type=int, default=4, help="Batch the FLOPs are counted at (per image they do not "
                                                             "depend on it).")
    parser.add_argument("--gpu_tflops", type=float, default=989.0, help="Dense peak TFLOP/s of the GPU (assumed).")
    parser.add_argument("--mfu", type=float, default=0.35, help="Share of that peak the step reaches (assumed).")
    parser.add_argument("--usd_per_gpu_hour", type=float, default=2.5, help="Price of one GPU-hour (assumed).")
    parser.add_argument("--measured", default=None, help="bench_utilisation.py --out JSON of this machine (demo).")
    parser.add_argument("--out", default=None, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    measured = {}
    if args.measured:
        measured = {row["stage"]: row["images_per_second"]
                    for row in json.loads(Path(args.measured).read_text())["rows"]}
    rows = []
    for size in args.sizes:
        rows += plan(size, args.batch, args.gpu_tflops, args.mfu, measured if size == "demo" else {})
    print(f"GPU assumed: {args.gpu_tflops:.0f} TFLOP/s peak x MFU {args.mfu:.2f}, {args.usd_per_gpu_hour} USD/GPU-hour")
    print(f"{'size':<6}{'stage':<36}{'GFLOP/img':>10}{'here img/s':>11}{'run GPU-h':>10}{'1M ep GPU-h':>12}"
          f"{'10M ep GPU-h':>13}{'10M ep USD':>11}")
    for row in rows:
        here = row["measured_images_per_second"]
        run = row["gpu_hours_run"]
        print(f"{row['size']:<6}{row['stage']:<36}{row['gflop_per_image']:>10.3f}"
              f"{(f'{here:.1f}' if here else '-'):>11}{(f'{run:.3g}' if run is not None else '-'):>10}"
              f"{row['gpu_hours_epoch_1M']:>12.3g}{row['gpu_hours_epoch_10M']:>13.3g}"
              f"{row['gpu_hours_epoch_10M'] * args.usd_per_gpu_hour:>11.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu_tflops": args.gpu_tflops, "mfu": args.mfu,
                                              "usd_per_gpu_hour": args.usd_per_gpu_hour, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
