"""Sampling latency per image: ``LatentDiffusionPipeline`` beside Diffusers' ``StableDiffusionPipeline`` on the
same components, scheduler, prompts and seed, in the same process.

    python benchmarks/bench_pipeline.py [--model PIPELINE | --size demo] [--steps 25] [--repeats 7] [--threads 1]
        [--scheduler dpm++] [--guidance_interval 1.0 inf]

Without ``--model`` the components are random with the shapes of ``configs/<size>`` (its VAE and U-Net, and a
CLIP text encoder of its text encoder's width and depth: ``StableDiffusionPipeline`` needs a CLIP one). The two
pipelines run alternately (``repeats`` rounds, order swapped every round, after one warm-up call each) and the
median seconds per image are compared; the outputs are checked to agree.
ratio = ours / StableDiffusionPipeline (target <= 1.0), on this process's CPU time (with one thread it is the work
done, unlike wall-clock time, which other jobs on a shared machine inflate); the wall-clock ratio is printed too.
With ``--guidance_interval LO HI`` a third row runs our pipeline with guidance only where σ_t is in (LO, HI], in
the same interleaved rounds, and its time is compared with ours guided at every step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast  # noqa: E402

from ldm_pipeline import LatentDiffusionPipeline, scheduler_from_name  # noqa: E402
from ldm_pipeline.config import read_config_file  # noqa: E402
from ldm_pipeline.prompt_encoding import is_clip_text_model  # noqa: E402
from ldm_pipeline.schedulers import in_guidance_interval  # noqa: E402
from ldm_pipeline.unet import build_unet  # noqa: E402
from ldm_pipeline.vae import build_vae  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat left of a blue house", "two green stars", "a yellow ball above a pink box", "three trees"]
WORDS = ("a an and of left right above below one two three four red orange yellow green blue purple pink brown "
         "cat house tree car star heart ball box cats houses trees cars stars hearts balls boxes").split()

T5_TO_CLIP_SIZES = {"hidden_size": "d_model", "intermediate_size": "d_ff", "num_hidden_layers": "num_layers",
                    "num_attention_heads": "num_heads"}


def random_components(size: str, seed: int = 0) -> dict:
    """Random components with the shapes of ``configs/<size>``: its VAE and U-Net, a CLIP text encoder as wide and
    deep as its text encoder (``StableDiffusionPipeline`` encodes prompts the CLIP way), a word-level tokenizer and
    a DDIM scheduler with Stable Diffusion's step settings on the config's noise schedule."""
    configs = {name: read_config_file(REPO / "configs" / size / f"{name}.json")
               for name in ("text_encoder", "vae", "unet")}
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    text_model = configs["text_encoder"]["model"]
    max_length = text_model.get("tokenizer", {}).get("model_max_length", 16)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=max_length,
    )
    sizes = dict(text_model["text_encoder"])
    if text_model.get("architecture") == "t5":
        sizes = {clip_key: sizes[t5_key] for clip_key, t5_key in T5_TO_CLIP_SIZES.items()}
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=sizes["hidden_size"], intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"], num_attention_heads=sizes["num_attention_heads"],
        max_position_embeddings=max_length, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    ))
    resolution = configs["unet"]["data"]["resolution"]
    vae = build_vae(configs["vae"]["model"], resolution)
    unet = build_unet(configs["unet"]["model"], vae, text_encoder, resolution)
    noise_schedule = configs["unet"]["model"].get("noise_scheduler", {})
    scheduler = scheduler_from_name("ddim", dict(
        num_train_timesteps=noise_schedule.get("num_train_timesteps", 1000),
        beta_schedule=noise_schedule.get("beta_schedule", "scaled_linear"),
        prediction_type=noise_schedule.get("prediction_type", "epsilon"), steps_offset=1, set_alpha_to_one=False,
    ))
    return dict(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(), unet=unet.eval(),
                scheduler=scheduler)


def seconds(pipe, args, **extra) -> tuple[float, float, np.ndarray]:
    """(wall-clock seconds, CPU seconds of this process, images) of one call; ``extra`` goes to the call."""
    start, start_cpu = time.perf_counter(), time.process_time()
    images = pipe(
        PROMPTS[: args.num_prompts], num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        num_images_per_prompt=args.num_images, generator=torch.Generator().manual_seed(0), output_type="np", **extra,
    ).images
    return time.perf_counter() - start, time.process_time() - start_cpu, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="A pipeline directory (default: random components, see --size).")
    parser.add_argument("--size", default="demo", help="configs/<size> gives the random components' shapes.")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--num_prompts", type=int, default=4, choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--num_images", type=int, default=1, help="Images per prompt.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scheduler", default=None, help="Sampler name for both pipelines (default: the saved one).")
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=None, metavar=("SIGMA_LO", "SIGMA_HI"),
                        help="Also time our pipeline guided only for sigma in (SIGMA_LO, SIGMA_HI].")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.model:
        ours = LatentDiffusionPipeline.from_pretrained(args.model)
        if not is_clip_text_model(ours.text_encoder):
            raise SystemExit(f"--model {args.model}: its text encoder is a {type(ours.text_encoder).__name__}, and "
                             "StableDiffusionPipeline encodes prompts the CLIP way (no attention mask), so the two "
                             "would not compute the same images; give a pipeline with a CLIP text encoder, or leave "
                             "out --model to time random demo-sized components.")
        components = dict(ours.components)
    else:
        components = random_components(args.size)
        ours = LatentDiffusionPipeline(**components)
    if args.scheduler:
        ours.set_scheduler(args.scheduler)
        components["scheduler"] = ours.scheduler
    reference = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipelines = {"LatentDiffusionPipeline": ours, "StableDiffusionPipeline": reference}
    extras = {name: {} for name in pipelines}
    interval_name = "ours, guidance_interval"
    if args.guidance_interval:
        pipelines[interval_name], extras[interval_name] = ours, {"guidance_interval": tuple(args.guidance_interval)}
    for pipe in pipelines.values():
        pipe.set_progress_bar_config(disable=True)

    outputs = {name: seconds(pipe, args, **extras[name])[2] for name, pipe in pipelines.items()}  # warm-up
    max_difference = float(np.abs(outputs["LatentDiffusionPipeline"] - outputs["StableDiffusionPipeline"]).max())
    wall, cpu = {name: [] for name in pipelines}, {name: [] for name in pipelines}
    for round_index in range(args.repeats):
        order = list(pipelines) if round_index % 2 == 0 else list(reversed(pipelines))
        for name in order:
            wall_seconds, cpu_seconds, _ = seconds(pipelines[name], args, **extras[name])
            wall[name].append(wall_seconds)
            cpu[name].append(cpu_seconds)

    num_images = args.num_prompts * args.num_images
    print(f"{num_images} images per call, {args.steps} steps, guidance {args.guidance_scale}, "
          f"{args.repeats} interleaved repeats, {args.threads} thread(s), max |difference| {max_difference:.2e}")
    ratios, interval_ratios = {}, {}
    for clock, times in (("cpu", cpu), ("wall", wall)):
        per_image = {name: statistics.median(values) / num_images for name, values in times.items()}
        ratios[clock] = per_image["LatentDiffusionPipeline"] / per_image["StableDiffusionPipeline"]
        if interval_name in per_image:
            interval_ratios[clock] = per_image[interval_name] / per_image["LatentDiffusionPipeline"]
        for name, value in per_image.items():
            spread = ", ".join(f"{t / num_images * 1000:.0f}" for t in times[name])
            print(f"{name:<24} {clock:>4} {value * 1000:8.1f} ms/image (median; all: {spread})")
    print(f"ratio (ours / StableDiffusionPipeline): {ratios['cpu']:.3f} CPU time, {ratios['wall']:.3f} wall-clock")
    if interval_ratios:
        scheduler = ours.scheduler
        scheduler.set_timesteps(args.steps)
        guided = sum(in_guidance_interval(scheduler, t, tuple(args.guidance_interval)) for t in scheduler.timesteps)
        print(f"guidance_interval {tuple(args.guidance_interval)}: {guided} of {len(scheduler.timesteps)} steps guided "
              f"(U-Net work {(len(scheduler.timesteps) + guided) / (2 * len(scheduler.timesteps)):.3f} of guiding "
              f"every step); time / every step guided: {interval_ratios['cpu']:.3f} CPU time, "
              f"{interval_ratios['wall']:.3f} wall-clock")


if __name__ == "__main__":
    main()
