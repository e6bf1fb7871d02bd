"""Sampling latency per image: ``LatentDiffusionPipeline`` beside Diffusers' ``StableDiffusionPipeline`` on the
same components, scheduler, prompts and seed, in the same process.

    python benchmarks/bench_pipeline.py [--model runs/demo/pipeline] [--steps 25] [--repeats 7] [--threads 1]
        [--scheduler dpm++] [--guidance_interval 1.0 inf]

Without ``--model`` the components are random with the demo's shapes (32 px images, VAE factor 4, 8x8x8
latents, CLIP text encoder). The two pipelines run alternately (``repeats`` rounds, order swapped every round,
after one warm-up call each) and the median seconds per image are compared; the outputs are checked to agree.
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

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast  # noqa: E402

from ldm_pipeline import LatentDiffusionPipeline, scheduler_from_name  # noqa: E402
from ldm_pipeline.prompt_encoding import is_clip_text_model  # noqa: E402
from ldm_pipeline.schedulers import in_guidance_interval  # noqa: E402

PROMPTS = ["a red cat left of a blue house", "two green stars", "a yellow ball above a pink box", "three trees"]
WORDS = ("a an and of left right above below one two three four red orange yellow green blue purple pink brown "
         "cat house tree car star heart ball box cats houses trees cars stars hearts balls boxes").split()


def random_components(resolution: int, seed: int = 0) -> dict:
    """Demo-sized random tokenizer, CLIP text encoder, VAE (factor 4) and U-Net."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=16,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    ))
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[32, 64, 64], latent_channels=8, norm_num_groups=16, sample_size=resolution,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 4, in_channels=8, out_channels=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=128, attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = scheduler_from_name("ddim", dict(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        set_alpha_to_one=False,
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
    parser.add_argument("--model", default=None, help="A pipeline directory (default: random demo-sized components).")
    parser.add_argument("--resolution", type=int, default=32, help="Image size of the random components.")
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
        components = random_components(args.resolution)
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
