"""``ldm-eval``: scores for a trained pipeline, on the built-in ``shapes`` grammar or on the user's own data.

    ldm-eval --model runs/demo/pipeline --num_images 20 --seed 0 --out runs/demo/eval \\
        [--scheduler dpm++ --steps 20 --guidance_scale 5 --batch_size 16 --inception_weights PATH]
    ldm-eval --real --resolution 64 --num_images 20 --out runs/real_eval     # the dataset's own renders
    ldm-eval --vae runs/demo/vae_stage --num_images 20 --out runs/vae_eval   # the VAE's reconstructions of them
    ldm-eval --model runs/mine/pipeline --text_stage runs/mine/text_encoder_stage --train_data_dir my_folder \\
        --out runs/mine/eval                                                 # the user's own data

With ``--text_stage``, the images are generated for the held-out captions of the data selected by the training
data flags and judged by the stage-1 towers (``ldm_pipeline.evaluation.user_data``): prompt alignment with its
ceiling and floor, FID and precision/recall in the image tower's features, and memorization against the
training split. The held-out items are those every stage held out (``ldm_pipeline.data.split``); when the
``data_split.json`` of ``--model`` or ``--text_stage`` shows that run trained on some of them (other
``--data_seed`` or ``--num_held_out_samples``, or changed data), the evaluation stops with an error naming it.
Otherwise:

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
import dataclasses
import json
import sys
import time
from pathlib import Path

from PIL import Image

from ldm_pipeline.cli_generate import add_sampling_args
from ldm_pipeline.config import CommandParser, data_config_from_args
from ldm_pipeline.data import add_data_args, build_dataset
from ldm_pipeline.data.datasets import data_split_record
from ldm_pipeline.data.shapes import CATEGORIES
from ldm_pipeline.data.split import HELD_OUT_SLICE, check_not_trained_on, describe_split
from ldm_pipeline.errors import run_cli
from ldm_pipeline.evaluation.classifier import WEIGHTS_DIR, load_object_classifier
from ldm_pipeline.evaluation.feature_metrics import DEFAULT_K
from ldm_pipeline.evaluation.fid import (
    INCEPTION_FID_NOT_REQUESTED,
    frechet_distance_of_features,
    inception_fid,
    load_fid_inception,
)
from ldm_pipeline.evaluation.images import labelled_grid, sample_images, to_pil_images
from ldm_pipeline.evaluation.memorization import DEFAULT_PERCENTILE
from ldm_pipeline.evaluation.scoring import (
    WORD_ORDERS,
    GenEvalScorer,
    classifier_accuracy,
    make_prompt_set,
    render_prompt_set,
)

SHAPES_NUM_IMAGES = 20
DATA_SOURCE_FLAGS = ("train_data_dir", "dataset_name")
SAMPLING_KEYS = ("scheduler", "steps", "guidance_scale")


def sampling_flags(eval_config: dict) -> list[str]:
    """The ``--scheduler``/``--steps``/``--guidance_scale`` flags for the keys a ``configs/<size>/eval.json`` sets;
    what it leaves out takes ``SAMPLING_DEFAULTS`` (the ldm-eval and ldm-generate defaults)."""
    return [arg for key in SAMPLING_KEYS if key in eval_config for arg in (f"--{key}", str(eval_config[key]))]


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="ldm-eval", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Pipeline directory (LatentDiffusionPipeline.save_pretrained).")
    source.add_argument("--real", action="store_true", help="Score the dataset's own renders (sanity check).")
    source.add_argument("--vae", help="VAE stage output (or vae) directory: score its reconstructions of the renders.")
    parser.add_argument("--num_images", type=int, default=None,
                        help=f"Images per category (six categories; default {SHAPES_NUM_IMAGES}); with --text_stage: "
                             "held-out captions to generate for (default: all).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the prompt set and the initial noise.")
    parser.add_argument("--out", required=True, help="Output directory.")
    parser.add_argument("--unet", default=None,
                        help="A U-Net directory to use instead of MODEL/unet (e.g. MODEL/snapshots/step-300).")
    add_sampling_args(parser)
    parser.add_argument("--batch_size", type=int, default=16, help="Images generated per pipeline call.")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available).")
    parser.add_argument("--classifier", default=None, help=f"Object classifier directory (default: {WEIGHTS_DIR}).")
    parser.add_argument("--inception_weights", default=None,
                        help="Local FID Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a "
                             "safetensors copy) for the standard Inception FID; never downloaded.")
    parser.add_argument("--grid_images", type=int, default=16, help="Images per category shown in each grid.")
    parser.add_argument("--categories", nargs="+", default=None, choices=CATEGORIES, metavar="CATEGORY",
                        help=f"Score only these categories of the shapes grammar (default: all: {', '.join(CATEGORIES)}).")
    parser.add_argument("--word_orders", default="all", choices=WORD_ORDERS,
                        help="held_out: only the relation and colour-binding orders that training left out "
                             "(--shapes_held_out_orders and --data_seed of the training data); trained: only the "
                             "others (default: all).")
    user = parser.add_argument_group("evaluation on your own data (with --model)")
    user.add_argument("--text_stage", default=None,
                      help="Text-stage output dir (text_encoder/, tokenizer/, image_tower/): its towers judge the "
                           "images generated for the held-out captions of the data flags below.")
    user.add_argument("--max_train_images", type=int, default=None,
                      help="Search only the first N training images for nearest neighbours (default: all).")
    user.add_argument("--memorization_percentile", type=float, default=DEFAULT_PERCENTILE,
                      help="Flag a generation closer to a training image than this percentile of held-out images.")
    user.add_argument("--knn_k", type=int, default=DEFAULT_K, help="k of the k-NN precision/recall manifolds.")
    add_data_args(parser)
    parser.set_defaults(resolution=None)
    return parser


def load_pipeline(args: argparse.Namespace):
    """``args.model`` (with ``--unet`` and ``--scheduler`` applied) on ``args.device``."""
    import torch

    from ldm_pipeline.pipeline_latent_diffusion import LatentDiffusionPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    if args.unet:
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(args.unet)
    pipe.set_scheduler(args.scheduler)
    return pipe.to(device)


def generate_images(args: argparse.Namespace, prompts: list[str]) -> tuple[list[Image.Image], dict]:
    """Sample one image per prompt with the pipeline in ``args.model``; returns (images, settings)."""
    pipe = load_pipeline(args)
    start = time.time()
    images = sample_images(pipe, prompts, args.seed, args.steps, args.guidance_scale, args.batch_size, args.resolution,
                           guidance_interval=args.guidance_interval)
    settings = {"scheduler": pipe.scheduler.__class__.__name__, "steps": args.steps,
                "guidance_scale": args.guidance_scale, "guidance_interval": args.guidance_interval,
                "batch_size": args.batch_size, "device": str(pipe.device),
                "resolution": images[0].width, "generation_seconds": round(time.time() - start, 2)}
    return images, settings


def reconstruct_images(args: argparse.Namespace, prompt_set) -> tuple[list[Image.Image], dict]:
    """The prompt set's renders through ``args.vae`` (decode of the posterior mean); returns (images, settings)."""
    import torch

    from ldm_pipeline.data.datasets import image_to_tensor
    from ldm_pipeline.vae import load_vae, reconstruct, to_unit_range, vae_scale_factor

    vae = load_vae(args.vae).eval()
    resolution = args.resolution or vae.config.sample_size
    factor = vae_scale_factor(vae)
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} is not divisible by the VAE's factor {factor}: pass a multiple "
                         f"of {factor}.")
    renders = render_prompt_set(prompt_set, resolution)
    images = []
    for first in range(0, len(renders), args.batch_size):
        pixel_values = torch.stack([image_to_tensor(image) for image in renders[first : first + args.batch_size]])
        images += to_pil_images(to_unit_range(reconstruct(vae, pixel_values)).permute(0, 2, 3, 1).numpy())
    return images, {"resolution": resolution, "vae": str(args.vae)}


def markdown_report(report: dict) -> str:
    scores, counts = report["scores"], report["num_images_per_category"]
    lines = [f"# ldm-eval: {report['model']}", "", "| category | score | images |", "|---|---:|---:|"]
    for category in counts:
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


def check_args(args: argparse.Namespace) -> None:
    """Reject values and flag combinations that cannot work, naming the flag and what to pass instead."""
    for flag in ("num_images", "batch_size", "max_train_images", "knn_k"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag} must be positive, got {value}.")
    if not 0 < args.memorization_percentile < 100:
        raise ValueError(f"--memorization_percentile must be in (0, 100), got {args.memorization_percentile}.")
    data_flags = [f"--{flag}" for flag in DATA_SOURCE_FLAGS if getattr(args, flag) is not None]
    if args.text_stage is None and data_flags:
        raise ValueError(f"{data_flags[0]} needs --text_stage TEXT_STAGE_DIR (the text stage trained on that data: "
                         "its towers judge the images).")
    if args.text_stage is not None and args.model is None:
        raise ValueError("--text_stage evaluates a pipeline: pass --model PIPELINE (not --real or --vae).")
    if args.streaming:
        raise ValueError("--streaming: ldm-eval reads the training split by index (nearest neighbours, the towers' "
                         "fit), which a stream does not allow: drop --streaming (tar shards, Parquet and Arrow files "
                         "are read without it too).")


def held_out_and_training_data(args: argparse.Namespace) -> tuple:
    """``(held-out dataset, training dataset, split record)`` of the data that the training data flags in ``args``
    select, read deterministically (centre crop, no flip) at ``args.resolution``. The held-out dataset is every
    held-out item of a held-out slice (else the first ``--num_validation_samples`` of the validation split); a
    held-out item that ``--model`` or ``--text_stage`` trained on is an error (``check_not_trained_on``)."""
    data = dataclasses.replace(data_config_from_args(args), random_crop=False, random_flip=False, center_crop=True)
    record = data_split_record(data)
    check_not_trained_on(record, {"--model": args.model, "--text_stage": args.text_stage}, "ldm-eval")
    if record["kind"] == HELD_OUT_SLICE:
        data = dataclasses.replace(data, num_validation_samples=record["num_held_out"])
    return build_dataset(data, split="validation"), build_dataset(data, split="train"), record


def evaluate_user_data(args: argparse.Namespace) -> dict:
    """``--text_stage`` mode: ``evaluate_on_user_data`` on the held-out and training splits of the data flags."""
    from ldm_pipeline.evaluation.alignment import load_stage_one_towers
    from ldm_pipeline.evaluation.user_data import evaluate_on_user_data

    pipe = load_pipeline(args)
    if args.resolution is None:
        args.resolution = pipe.default_height_width()[0]
    heldout_dataset, train_dataset, split = held_out_and_training_data(args)
    towers = load_stage_one_towers(args.text_stage, fit_dataset=train_dataset)
    return evaluate_on_user_data(
        pipe, towers, heldout_dataset, train_dataset, out=args.out, num_images=args.num_images, seed=args.seed,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, guidance_interval=args.guidance_interval,
        batch_size=args.batch_size, k=args.knn_k, percentile=args.memorization_percentile, max_train_images=args.max_train_images,
        grid_images=args.grid_images, model_name=str(args.model), report_fields={
            "unet": args.unet, "text_stage": str(args.text_stage),
            "data": args.train_data_dir or args.dataset_name or "built-in shapes",
            "held_out": describe_split(split), "held_out_sha256": split["held_out_sha256"],
            "inception_fid_note": f"FID Inception-v3 pool features, {args.inception_weights}"
            if args.inception_weights else INCEPTION_FID_NOT_REQUESTED},
        inception=load_fid_inception(args.inception_weights, args.device) if args.inception_weights else None,
    )


def evaluate(args: argparse.Namespace) -> dict:
    """Evaluate as the flags say (on user data with ``--text_stage``, else on the shapes grammar) and write
    the outputs; returns the report."""
    check_args(args)
    if args.text_stage is not None:
        return evaluate_user_data(args)
    return evaluate_shapes(args)


def evaluate_shapes(args: argparse.Namespace) -> dict:
    """Generate (or render), score, measure FID and write the outputs; returns the report."""
    if args.num_images is None:
        args.num_images = SHAPES_NUM_IMAGES
    inception = load_fid_inception(args.inception_weights, args.device) if args.inception_weights else None
    scorer = GenEvalScorer(load_object_classifier(args.classifier))
    prompt_set = make_prompt_set(args.num_images, args.seed, args.categories, args.word_orders,
                                 args.shapes_held_out_orders, args.data_seed)
    captions = [p.prompt for p in prompt_set]
    categories = list(dict.fromkeys(p.category for p in prompt_set))

    if args.real:
        resolution = args.resolution or 64
        images = render_prompt_set(prompt_set, resolution)
        reference = render_prompt_set(make_prompt_set(args.num_images, args.seed + 1, args.categories,
                                                      args.word_orders, args.shapes_held_out_orders, args.data_seed),
                                      resolution)
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
    if args.word_orders != "all":
        settings.update(word_orders=args.word_orders, shapes_held_out_orders=args.shapes_held_out_orders,
                        data_seed=args.data_seed)

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
        "num_images_per_category": {c: sum(p.category == c for p in prompt_set) for c in categories},
        "model": ("real renders (--real)" if args.real
                  else f"VAE reconstructions ({args.vae})" if args.vae else str(args.model)),
        "unet": getattr(args, "unet", None),
        "settings": settings,
    }

    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for prompt, image in zip(prompt_set, images):
        image.save(out / "samples" / f"{prompt.category}_{prompt.index:04d}.png")
    for category in categories:
        chosen = [i for i, p in enumerate(prompt_set) if p.category == category][: args.grid_images]
        labelled_grid([images[i] for i in chosen], [judgements[i].prompt for i in chosen],
                      [judgements[i].correct for i in chosen]).save(out / f"grid_{category}.png")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "judgements.json").write_text(json.dumps([j.to_dict() for j in judgements], indent=1) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    return report


def evaluate_command(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, evaluate, print ``report.md``; returns the report (errors propagate)."""
    args = build_parser().parse_args(argv)
    report = evaluate(args)
    print((Path(args.out) / "report.md").read_text(), end="")
    return report


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``evaluate_command`` with one line per error (``--verbose``: the traceback)."""
    run_cli(evaluate_command, argv, prog="ldm-eval")


if __name__ == "__main__":
    main(sys.argv[1:])
