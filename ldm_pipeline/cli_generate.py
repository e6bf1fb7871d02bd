"""``ldm-generate``: images from a trained pipeline directory.

    ldm-generate --model runs/demo/pipeline --prompt "a red circle" --prompt "two blue squares" \\
        --num_images 4 --scheduler ddim --steps 50 --guidance_scale 4 --seed 0 --out samples/

writes ``OUT/<prompt>_<image>_<slug>.png`` for every image, ``OUT/grid.png`` (one row per prompt, one column per
image, upscaled ``--grid_scale`` times) and prints their paths. The noise is drawn on the CPU from ``--seed``, so a
seed gives the same images on every device.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image

from ldm_pipeline.pipeline_latent_diffusion import LatentDiffusionPipeline
from ldm_pipeline.schedulers import SCHEDULER_NAMES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Pipeline directory (LatentDiffusionPipeline.save_pretrained).")
    parser.add_argument("--prompt", action="append", required=True, help="A prompt; repeat for several.")
    parser.add_argument("--negative_prompt", default=None, help="Negative prompt used for every prompt.")
    parser.add_argument("--num_images", type=int, default=1, help="Images per prompt.")
    parser.add_argument("--scheduler", default=None, help=f"Sampler: {', '.join(SCHEDULER_NAMES)} (default: saved one).")
    parser.add_argument("--steps", type=int, default=50, help="Number of inference steps.")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale (<= 1: off).")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic).")
    parser.add_argument("--height", type=int, default=None, help="Image height (default: the U-Net's sample size).")
    parser.add_argument("--width", type=int, default=None, help="Image width (default: the U-Net's sample size).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid_scale", type=int, default=1,
                        help="Upscale factor (nearest neighbour) of grid.png, for small images; the images stay as made.")
    parser.add_argument("--out", required=True, help="Output directory.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Use xFormers on CUDA if installed."
    )
    return parser


def slugify(text: str, max_length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_length] or "empty"


def generate(args: argparse.Namespace) -> list[Path]:
    """Write the images and the grid for parsed ``args``; returns their paths (the grid last)."""
    if args.num_images <= 0:
        raise SystemExit(f"ldm-generate: --num_images must be positive, got {args.num_images}.")
    if args.grid_scale <= 0:
        raise SystemExit(f"ldm-generate: --grid_scale must be positive, got {args.grid_scale}.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    try:
        pipe = LatentDiffusionPipeline.from_pretrained(args.model)
        if args.scheduler:
            pipe.set_scheduler(args.scheduler)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"ldm-generate: {error}") from error
    pipe = pipe.to(device, DTYPES[args.dtype])
    if args.enable_xformers_memory_efficient_attention:
        pipe.enable_xformers_memory_efficient_attention()

    try:
        images = pipe(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            num_images_per_prompt=args.num_images,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            eta=args.eta,
            height=args.height,
            width=args.width,
            generator=torch.Generator("cpu").manual_seed(args.seed),
        ).images
    except ValueError as error:
        raise SystemExit(f"ldm-generate: {error}") from error

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        prompt_index, image_index = divmod(index, args.num_images)
        path = out_dir / f"{prompt_index:03d}_{image_index:03d}_{slugify(args.prompt[prompt_index])}.png"
        image.save(path)
        paths.append(path)
    grid_path = out_dir / "grid.png"
    grid = make_image_grid(images, rows=len(args.prompt), cols=args.num_images)
    if args.grid_scale > 1:
        grid = grid.resize((grid.width * args.grid_scale, grid.height * args.grid_scale), Image.Resampling.NEAREST)
    grid.save(grid_path)
    paths.append(grid_path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Console entry point (returns None: console scripts exit with ``main()``'s return value)."""
    for path in generate(build_parser().parse_args(argv)):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
