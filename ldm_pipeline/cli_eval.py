"""``ldm-eval``: GenEval-style prompt-following scores and a classifier FID for a trained pipeline.

    ldm-eval --model runs/demo/pipeline --num_images 20 --seed 0 --out runs/demo/eval \\
        [--scheduler ddim --steps 50 --guidance_scale 4 --batch_size 16 --inception_weights PATH]
    ldm-eval --real --resolution 64 --num_images 20 --out runs/real_eval     # the dataset's own renders
    ldm-eval --vae runs/demo/vae_stage --num_images 20 --out runs/vae_eval   # the VAE's reconstructions of them

Generates ``--num_images`` images per category for the fixed prompt set ``make_prompt_set(num_images, seed)``
(image ``k`` from noise seeded ``seed * 1_000_003 + k``), scores them from their pixels
(``ldm_pipeline.evaluation.scoring``) and computes the FID in the object classifier's feature space against
real renders of the same prompts' scenes (``--real``: against renders of the prompt set of ``seed + 1``, i.e.
the FID floor at this sample size; ``--vae``: the renders passed through the VAE's encoder (posterior mean) and
decoder, i.e. the ceiling that any U-Net on this VAE can reach). Writes ``OUT/report.json``, ``OUT/report.md`` (also printed),
``OUT/grid_<category>.png`` (each image labelled with its prompt and a green tick or red cross),
``OUT/judgements.json`` (per image: verdict, reason, objects seen) and ``OUT/samples/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ldm_pipeline.data.shapes import CATEGORIES
from ldm_pipeline.evaluation.classifier import WEIGHTS_DIR, load_object_classifier
from ldm_pipeline.evaluation.fid import (
    INCEPTION_FID_NOT_REQUESTED,
    frechet_distance_of_features,
    inception_fid,
    load_fid_inception,
)
from ldm_pipeline.evaluation.scoring import (
    GenEvalScorer,
    Judgement,
    classifier_accuracy,
    make_prompt_set,
    render_prompt_set,
)

NOISE_SEED_STRIDE = 1_000_003
CELL = 128
LABEL_HEIGHT = 40


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm-eval", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Pipeline directory (LatentDiffusionPipeline.save_pretrained).")
    source.add_argument("--real", action="store_true", help="Score the dataset's own renders (sanity check).")
    source.add_argument("--vae", help="VAE stage output (or vae) directory: score its reconstructions of the renders.")
    parser.add_argument("--num_images", type=int, default=20, help="Images per category (six categories).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the prompt set and the initial noise.")
    parser.add_argument("--out", required=True, help="Output directory.")
    parser.add_argument("--unet", default=None,
                        help="A U-Net directory to use instead of MODEL/unet (e.g. MODEL/snapshots/step-300).")
    parser.add_argument("--scheduler", default=None, help="Sampler name (default: the pipeline's own).")
    parser.add_argument("--steps", type=int, default=50, help="Number of inference steps.")
    parser.add_argument("--guidance_scale", type=float, default=4.0, help="Classifier-free guidance scale.")
    parser.add_argument("--batch_size", type=int, default=16, help="Images generated per pipeline call.")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Image size (default: the pipeline's or VAE's; 64 with --real).")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available).")
    parser.add_argument("--classifier", default=None, help=f"Object classifier directory (default: {WEIGHTS_DIR}).")
    parser.add_argument("--inception_weights", default=None,
                        help="Local FID Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a "
                             "safetensors copy) for the standard Inception FID; never downloaded.")
    parser.add_argument("--grid_images", type=int, default=16, help="Images per category shown in each grid.")
    return parser


def to_pil_images(arrays: np.ndarray) -> list[Image.Image]:
    """[N, H, W, 3] floats in [0, 1] -> uint8 RGB PIL images."""
    return [Image.fromarray((array * 255).round().clip(0, 255).astype(np.uint8)) for array in arrays]


def generate_images(args: argparse.Namespace, prompts: list[str]) -> tuple[list[Image.Image], dict]:
    """Sample one image per prompt with the pipeline in ``args.model``; returns (images, settings)."""
    import torch

    from ldm_pipeline.pipeline_latent_diffusion import LatentDiffusionPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = LatentDiffusionPipeline.from_pretrained(args.model)
        if args.unet:
            from diffusers import UNet2DConditionModel

            pipe.unet = UNet2DConditionModel.from_pretrained(args.unet)
        if args.scheduler:
            pipe.set_scheduler(args.scheduler)
    except (OSError, ValueError) as error:
        raise SystemExit(f"ldm-eval: {error}") from error
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    size = args.resolution
    images = []
    start = time.time()
    for first in range(0, len(prompts), args.batch_size):
        batch = prompts[first : first + args.batch_size]
        generators = [torch.Generator("cpu").manual_seed(args.seed * NOISE_SEED_STRIDE + k)
                      for k in range(first, first + len(batch))]
        try:
            output = pipe(prompt=batch, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                          height=size, width=size, generator=generators, output_type="np").images
        except ValueError as error:
            raise SystemExit(f"ldm-eval: {error}") from error
        images += to_pil_images(output)
    settings = {"scheduler": pipe.scheduler.__class__.__name__, "steps": args.steps,
                "guidance_scale": args.guidance_scale, "batch_size": args.batch_size, "device": device,
                "resolution": images[0].width, "generation_seconds": round(time.time() - start, 2)}
    return images, settings


def _draw_verdict(draw: ImageDraw.ImageDraw, x: int, y: int, correct: bool) -> None:
    """A green tick or a red cross in a 14 x 14 square at (x, y) (drawn, not a font glyph)."""
    if correct:
        draw.line([(x + 1, y + 7), (x + 5, y + 12), (x + 13, y + 2)], fill=(20, 150, 40), width=3)
    else:
        draw.line([(x + 2, y + 2), (x + 12, y + 12)], fill=(210, 30, 30), width=3)
        draw.line([(x + 12, y + 2), (x + 2, y + 12)], fill=(210, 30, 30), width=3)


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def labelled_grid(images: list[Image.Image], judgements: list[Judgement], columns: int = 4) -> Image.Image:
    """Images (upscaled to ``CELL`` px) in rows of ``columns``, each over its prompt and verdict mark."""
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * CELL, rows * (CELL + LABEL_HEIGHT)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    for index, (image, judgement) in enumerate(zip(images, judgements)):
        x, y = (index % columns) * CELL, (index // columns) * (CELL + LABEL_HEIGHT)
        grid.paste(image.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST), (x, y))
        _draw_verdict(draw, x + 3, y + CELL + 4, judgement.correct)
        for line_index, line in enumerate(_wrap(judgement.prompt, font, CELL - 22, draw)[:2]):
            draw.text((x + 20, y + CELL + 3 + 16 * line_index), line, fill=(0, 0, 0), font=font)
    return grid


def reconstruct_images(args: argparse.Namespace, prompt_set) -> tuple[list[Image.Image], dict]:
    """The prompt set's renders through ``args.vae`` (decode of the posterior mean); returns (images, settings)."""
    import torch

    from ldm_pipeline.data.datasets import image_to_tensor
    from ldm_pipeline.vae import load_vae, reconstruct, to_unit_range

    try:
        vae = load_vae(args.vae).eval()
    except OSError as error:
        raise SystemExit(f"ldm-eval: {error}") from error
    resolution = args.resolution or vae.config.sample_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise SystemExit(f"ldm-eval: --resolution {resolution} is not divisible by the VAE's factor {factor}.")
    renders = render_prompt_set(prompt_set, resolution)
    images = []
    for first in range(0, len(renders), args.batch_size):
        pixel_values = torch.stack([image_to_tensor(image) for image in renders[first : first + args.batch_size]])
        images += to_pil_images(to_unit_range(reconstruct(vae, pixel_values)).permute(0, 2, 3, 1).numpy())
    return images, {"resolution": resolution, "vae": str(args.vae)}


def markdown_report(report: dict) -> str:
    scores, counts = report["scores"], report["num_images_per_category"]
    lines = [f"# ldm-eval: {report['model']}", "", "| category | score | images |", "|---|---:|---:|"]
    for category in CATEGORIES:
        lines.append(f"| {category} | {scores[category]:.3f} | {counts[category]} |")
    lines.append(f"| **overall** | **{scores['overall']:.3f}** | {report['num_images']} |")
    fid_note = report["settings"]["fid_reference"]
    inception = report["inception_fid"]
    lines += [
        "",
        f"- classifier FID: {report['fid']:.3f} ({fid_note})",
        f"- Inception FID: {inception:.3f}" if inception is not None else f"- {report['inception_fid_note']}",
        f"- object classifier accuracy: {report['classifier_accuracy']:.4f} on {report['classifier_num_objects']} "
        f"objects of real renders at {report['settings']['resolution']} px "
        f"(shipped held-out accuracy: {report['classifier_heldout_accuracy']})",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items() if k != "fid_reference"),
    ]
    return "\n".join(lines) + "\n"


def evaluate(args: argparse.Namespace) -> dict:
    """Generate (or render), score, measure FID and write the outputs; returns the report."""
    if args.num_images <= 0:
        raise SystemExit(f"ldm-eval: --num_images must be positive, got {args.num_images}.")
    if args.batch_size <= 0:
        raise SystemExit(f"ldm-eval: --batch_size must be positive, got {args.batch_size}.")
    try:
        inception = load_fid_inception(args.inception_weights, args.device) if args.inception_weights else None
    except (OSError, ValueError) as error:
        raise SystemExit(f"ldm-eval: {error}") from error
    try:
        classifier = load_object_classifier(args.classifier)
    except FileNotFoundError as error:
        raise SystemExit(f"ldm-eval: {error}") from error
    scorer = GenEvalScorer(classifier)
    prompt_set = make_prompt_set(args.num_images, args.seed)
    captions = [p.prompt for p in prompt_set]

    if args.real:
        resolution = args.resolution or 64
        images = render_prompt_set(prompt_set, resolution)
        reference = render_prompt_set(make_prompt_set(args.num_images, args.seed + 1), resolution)
        settings = {"resolution": resolution}
        fid_reference = f"vs real renders of the prompt set of seed {args.seed + 1}: the FID floor for this size"
    elif args.vae:
        images, settings = reconstruct_images(args, prompt_set)
        reference = render_prompt_set(prompt_set, settings["resolution"])
        fid_reference = "vs the real renders that were reconstructed"
    else:
        images, settings = generate_images(args, captions)
        reference = render_prompt_set(prompt_set, settings["resolution"])
        fid_reference = "vs real renders of the same prompts' scenes"
    settings = {"seed": args.seed, **settings, "fid_reference": fid_reference}

    scores, judgements = scorer.score(images, captions)
    accuracy, num_objects = classifier_accuracy(scorer, [p.scene for p in prompt_set], settings["resolution"])
    fid = frechet_distance_of_features(scorer.image_features(images), scorer.image_features(reference))
    heldout_path = Path(args.classifier or WEIGHTS_DIR) / "object_classifier_metrics.json"
    heldout = json.loads(heldout_path.read_text())["accuracy"] if heldout_path.is_file() else None

    report = {
        "scores": scores,
        "classifier_accuracy": accuracy,
        "classifier_num_objects": num_objects,
        "classifier_heldout_accuracy": heldout,
        "fid": fid,
        "inception_fid": inception_fid(inception, images, reference) if inception is not None else None,
        "inception_fid_note": f"FID Inception-v3 pool features, {args.inception_weights}" if inception is not None
        else INCEPTION_FID_NOT_REQUESTED,
        "num_images": len(images),
        "num_images_per_category": {c: sum(p.category == c for p in prompt_set) for c in CATEGORIES},
        "model": ("real renders (--real)" if args.real
                  else f"VAE reconstructions ({args.vae})" if args.vae else str(args.model)),
        "unet": getattr(args, "unet", None),
        "settings": settings,
    }

    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for prompt, image in zip(prompt_set, images):
        image.save(out / "samples" / f"{prompt.category}_{prompt.index:04d}.png")
    for category in CATEGORIES:
        chosen = [i for i, p in enumerate(prompt_set) if p.category == category][: args.grid_images]
        labelled_grid([images[i] for i in chosen], [judgements[i] for i in chosen]).save(out / f"grid_{category}.png")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "judgements.json").write_text(json.dumps([j.to_dict() for j in judgements], indent=1) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    return report


def main(argv: list[str] | None = None) -> None:
    """Console entry point: evaluates and prints ``report.md``."""
    args = build_parser().parse_args(argv)
    evaluate(args)
    print((Path(args.out) / "report.md").read_text(), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
