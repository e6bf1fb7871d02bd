"""``ldm-generate``: images from a trained pipeline directory.

    ldm-generate --model runs/demo/pipeline --prompt "a red circle" --prompt "two blue squares" \\
        --num_images 4 --seed 0 --out samples/    # [--scheduler dpm++ --steps 20 --guidance_scale 5]

samples with ``ldm_pipeline.schedulers.SAMPLING_DEFAULTS`` unless the flags say otherwise, writes
``OUT/<prompt>_<image>_<slug>.png`` for every image, ``OUT/grid.png`` (one row per prompt, one column per image,
upscaled ``--grid_scale`` times) and prints their paths. The noise is drawn on the CPU from ``--seed``, so a seed
gives the same images on every device.

Every value is checked before any image is made: sizes, counts and steps must be positive, the guidance scale and
eta finite, the device present and ``--out`` writable (it is created first). A failure is one line,
``ldm-generate: error: ...`` (``--verbose`` for the traceback).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image

from ldm_pipeline.config import CommandParser
from ldm_pipeline.errors import run_cli
from ldm_pipeline.pipeline_latent_diffusion import LatentDiffusionPipeline, check_guidance_interval
from ldm_pipeline.schedulers import SAMPLING_DEFAULTS, SCHEDULERS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a float that is neither infinite nor NaN (those make every image black)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_finite_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def noise_level(text: str) -> float:
    """argparse type: a noise level σ >= 0 (``inf`` allowed, NaN not)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a noise level >= 0 (inf allowed), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="ldm-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Pipeline directory (LatentDiffusionPipeline.save_pretrained).")
    parser.add_argument("--prompt", action="append", required=True, help="A prompt; repeat for several.")
    parser.add_argument("--negative_prompt", default=None, help="Negative prompt used for every prompt.")
    parser.add_argument("--num_images", type=positive_int, default=1, help="Images per prompt.")
    add_sampling_args(parser)
    parser.add_argument("--eta", type=non_negative_finite_float, default=0.0, help="DDIM eta (0: deterministic).")
    parser.add_argument("--height", type=positive_int, default=None,
                        help="Image height (default: the U-Net's sample size).")
    parser.add_argument("--width", type=positive_int, default=None, help="Image width (default: the U-Net's sample size).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the initial noise (drawn on the CPU).")
    parser.add_argument("--grid_scale", type=positive_int, default=1,
                        help="Upscale factor (nearest neighbour) of grid.png, for small images; the images stay as made.")
    parser.add_argument("--out", required=True, help="Output directory (created if needed).")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: cuda if available).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Weights and sampling dtype.")
    parser.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Use xFormers on CUDA if installed."
    )
    return parser


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """``--scheduler``, ``--steps``, ``--guidance_scale`` and ``--guidance_interval``, defaulting to
    ``SAMPLING_DEFAULTS`` (ldm-generate and ldm-eval)."""
    parser.add_argument("--scheduler", default=SAMPLING_DEFAULTS.scheduler,
                        help=f"Sampler, on the pipeline's noise schedule: {', '.join(SCHEDULERS)} (or an alias such as "
                             "dpm++_2m).")
    parser.add_argument("--steps", type=positive_int, default=SAMPLING_DEFAULTS.num_inference_steps,
                        help="Number of inference steps.")
    parser.add_argument("--guidance_scale", type=finite_float, default=SAMPLING_DEFAULTS.guidance_scale,
                        help="Classifier-free guidance scale (<= 1: off).")
    parser.add_argument("--guidance_interval", type=noise_level, nargs=2, default=SAMPLING_DEFAULTS.guidance_interval,
                        metavar=("SIGMA_LO", "SIGMA_HI"),
                        help="Guide only the steps whose noise level sigma lies in (SIGMA_LO, SIGMA_HI]; the others "
                             "run the U-Net once instead of twice (default: every step).")


def slugify(text: str, max_length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_length] or "empty"


def resolve_device(name: str | None) -> torch.device:
    """``--device`` as a ``torch.device`` that exists on this machine (default: cuda if available, else cpu)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device: use cpu, cuda, cuda:1 or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (PyTorch {torch.__version__}, "
                             "CUDA build: " + ("yes" if torch.version.cuda else "no") + "); use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu.")
    return device


def prepare_output_dir(out: str) -> Path:
    """Create ``out`` and check that a file can be written in it (before any image is made)."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory: choose a directory.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        raise PermissionError(f"--out {out} is not writable ({error.strerror or error}): choose a writable "
                              "directory.") from error
    return out_dir


def generate(args: argparse.Namespace) -> list[Path]:
    """Write the images and the grid for parsed ``args``; returns their paths (the grid last)."""
    device = resolve_device(args.device)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype])
    pipe.set_scheduler(args.scheduler)
    check_guidance_interval(args.guidance_interval, pipe.scheduler)
    pipe = pipe.to(device)  # the dtype is set by loading: Diffusers warns about every cast with to(dtype)
    if args.enable_xformers_memory_efficient_attention:
        pipe.enable_xformers_memory_efficient_attention()
    out_dir = prepare_output_dir(args.out)

    images = pipe(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=args.guidance_interval,
        eta=args.eta,
        height=args.height,
        width=args.width,
        generator=torch.Generator("cpu").manual_seed(args.seed),
    ).images

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


def generate_main(argv: list[str] | None = None) -> None:
    """Parse ``argv``, generate and print the paths; errors are ordinary exceptions."""
    for path in generate(build_parser().parse_args(argv)):
        print(path)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: `generate_main` through `ldm_pipeline.errors.run_cli` (returns None: console scripts
    exit with ``main()``'s return value)."""
    run_cli(generate_main, argv, prog="ldm-generate")


if __name__ == "__main__":
    main(sys.argv[1:])
