"""Stage 3: train a cross-attention U-Net denoiser in the VAE's latent space with the DDPM objective.

    accelerate launch training/train_unet.py --config configs/demo/unet.json --output_dir OUT \
        --text_encoder TEXT_STAGE_OUT --vae VAE_STAGE_OUT [data args] [--use_ema] [--resume_from_checkpoint latest]

Per step (DDPM's training algorithm on latents, see ldm_pipeline/diffusion.py):

    z_0 = (mean + std · ε_z - shift) · scaling_factor        fresh draw from the (cached) VAE posterior
    c   = text_encoder(caption), or text_encoder("") with probability caption_dropout_prob
    t ~ U{0..T-1},  ε ~ N(0, I) (+ offset noise),  z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε
    loss = w(t) · || target - unet(z_t, t, c) ||²,  target = ε or v,  w = 1 or Min-SNR-γ

The frozen VAE and text encoder run once over the data and their outputs are cached on disk (``--cache_dir``,
default OUT/../cache), unless ``--no_cache`` (the reference loop of Diffusers' train_text_to_image.py: both run
on every step). Writes the whole pipeline to OUT (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/), OUT/train_log.jsonl ({step, loss, lr, elapsed_s}), OUT/unet_metrics.json, validation grids in
OUT/validation/step-N.png, tensorboard logs in OUT/logs and resumable states in OUT/checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import is_xformers_available, make_image_grid
from tqdm.auto import tqdm

from ldm_pipeline.caching import (
    CachedLatentDataset,
    cache_key,
    compute_cache,
    data_fingerprint,
    load_or_compute_cache,
    sample_latents,
)
from ldm_pipeline.data import add_data_args, build_dataset, collate_examples
from ldm_pipeline.diffusion import (
    add_noise,
    build_noise_scheduler,
    caption_dropout_mask,
    diffusion_loss,
    sample_noise,
    sample_timesteps,
    training_target,
)
from ldm_pipeline.pipeline_latent_diffusion import LatentDiffusionPipeline
from ldm_pipeline.prompt_encoding import encode_prompts, tokenize_prompts
from ldm_pipeline.schedulers import scheduler_from_name
from ldm_pipeline.text_encoder import load_pretrained_text_encoder, text_hidden_size
from ldm_pipeline.training_utils import (
    EpochShuffleSampler,
    JsonlLogger,
    add_training_args,
    check_finite_loss,
    init_trackers,
    make_accelerator,
    parse_args,
    register_ema_for_checkpointing,
    resume_from_checkpoint,
    save_checkpoint,
    train_batches,
)
from ldm_pipeline.vae import load_vae

UNET_DEFAULTS = {
    "snr_gamma": None,
    "noise_offset": 0.0,
    "caption_dropout_prob": 0.1,
    "validation_prompts": None,
    "validation_num_inference_steps": 20,
    "validation_guidance_scale": 3.0,
    "validation_scheduler": "ddim",
    "cache_batch_size": 64,
    "snapshot_steps": None,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser)
    add_data_args(parser)
    group = parser.add_argument_group("unet")
    group.add_argument("--text_encoder", type=str, required=True,
                       help="Text stage output (with text_encoder/ and tokenizer/), a pipeline dir, or a Hub name.")
    group.add_argument("--vae", type=str, required=True, help="VAE stage output (with vae/), a vae dir, or a Hub name.")
    group.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction"])
    group.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR-γ loss weighting (5.0 is typical).")
    group.add_argument("--noise_offset", type=float, default=None, help="Offset-noise scale (0 disables).")
    group.add_argument("--caption_dropout_prob", type=float, default=None,
                       help="Probability of training on the empty prompt (for classifier-free guidance).")
    group.add_argument("--validation_prompts", type=str, nargs="+", default=None)
    group.add_argument("--validation_num_inference_steps", type=int, default=None)
    group.add_argument("--validation_guidance_scale", type=float, default=None)
    group.add_argument("--validation_scheduler", type=str, default=None, help="Sampler name for validation grids.")
    group.add_argument("--enable_xformers_memory_efficient_attention", action="store_const", const=True, default=None,
                       help="xFormers attention on CUDA; elsewhere PyTorch's SDPA is kept (with a message).")
    group.add_argument("--no_cache", action="store_const", const=True, default=None,
                       help="Run VAE and text encoder on every step (the reference loop) instead of caching.")
    group.add_argument("--cache_dir", type=str, default=None, help="Latent/text cache directory (default OUT/../cache).")
    group.add_argument("--cache_batch_size", type=int, default=None)
    group.add_argument("--snapshot_steps", type=int, default=None,
                       help="Every N steps also save the (EMA) U-Net alone to OUT/snapshots/step-N (safetensors), "
                            "for benchmarks/time_to_quality.py. Unlike checkpoints these are never pruned.")
    return parser


def load_text_stage(name_or_path: str):
    """``(tokenizer, text_encoder)`` of a text stage output dir, a pipeline dir, or a Hub name (CLIP or T5)."""
    root = Path(name_or_path)
    if not root.exists() and (root.is_absolute() or name_or_path.startswith(".")):
        raise FileNotFoundError(f"--text_encoder {name_or_path}: no such directory. Pass the text stage's output dir "
                                "(with text_encoder/ and tokenizer/).")
    return load_pretrained_text_encoder(name_or_path)


def build_unet(model_config: dict, vae: AutoencoderKL, text_encoder, resolution: int) -> UNet2DConditionModel:
    """``UNet2DConditionModel(**model.unet)`` fitted to the frozen stages: latent channels in and out,
    sample_size = resolution / f (f = the VAE's downsampling factor), cross_attention_dim = text width."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}.")
    kwargs = dict(model_config.get("unet", {}))
    kwargs.update(sample_size=resolution // factor, in_channels=vae.config.latent_channels,
                  out_channels=vae.config.latent_channels, cross_attention_dim=text_hidden_size(text_encoder))
    return UNet2DConditionModel(**kwargs)


def step_generator(seed: int, process_index: int, micro_step: int) -> torch.Generator:
    """The random draws of micro-batch ``micro_step`` depend only on (seed, process, micro_step): exact resume."""
    digest = hashlib.sha256(f"{seed}:{process_index}:{micro_step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def save_unet_snapshot(unet: UNet2DConditionModel, ema_unet: EMAModel | None, path: Path) -> None:
    """Save the U-Net weights sampling would use now (the EMA average when there is one) to ``path``."""
    if ema_unet is None:
        unet.save_pretrained(path, safe_serialization=True)
        return
    ema_unet.store(unet.parameters())
    ema_unet.copy_to(unet.parameters())
    unet.save_pretrained(path, safe_serialization=True)
    ema_unet.restore(unet.parameters())


def enable_xformers(unet: UNet2DConditionModel, print_fn) -> None:
    if not torch.cuda.is_available():
        print_fn("--enable_xformers_memory_efficient_attention: CUDA is not available; keeping PyTorch's "
                 "scaled_dot_product_attention (also memory-efficient).")
    elif not is_xformers_available():
        print_fn("--enable_xformers_memory_efficient_attention: xformers is not installed (pip install xformers); "
                 "keeping PyTorch's scaled_dot_product_attention.")
    else:
        unet.enable_xformers_memory_efficient_attention()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), argv)
    for key, value in UNET_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    accelerator = make_accelerator(args)
    output_dir = Path(args.output_dir)
    device = accelerator.device

    # 1. Frozen stages: tokenizer + text encoder, VAE.
    tokenizer, text_encoder = load_text_stage(args.text_encoder)
    vae = load_vae(args.vae)
    for frozen in (text_encoder, vae):
        frozen.requires_grad_(False).eval().to(device)
    scaling_factor = vae.config.scaling_factor
    shift_factor = getattr(vae.config, "shift_factor", None)

    # 2. Noise schedule and the U-Net.
    noise_scheduler = build_noise_scheduler(args.model_config.get("noise_scheduler"), args.prediction_type)
    prediction_type = noise_scheduler.config.prediction_type
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    unet = build_unet(args.model_config, vae, text_encoder, args.resolution)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        enable_xformers(unet, accelerator.print)
    accelerator.print(f"U-Net: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, latents "
                      f"{unet.config.in_channels}x{unet.config.sample_size}x{unet.config.sample_size}, "
                      f"{prediction_type} prediction, {noise_scheduler.config.beta_schedule} schedule")

    # 3. Data: cached VAE posteriors + text embeddings, or raw images and captions (--no_cache).
    train_dataset = build_dataset(args, split="train")
    use_cache = not args.no_cache
    if use_cache and (getattr(args, "random_flip", False) or getattr(args, "random_crop", False)):
        accelerator.print("Random flips/crops change the latents every epoch: latent caching is off for this run.")
        use_cache = False
    empty_embeds = None
    if use_cache:
        cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir.resolve().parent / "cache"
        key = cache_key(vae, text_encoder, tokenizer, data_fingerprint(args, "train", train_dataset))

        def compute():
            return compute_cache(train_dataset, collate_examples, vae, text_encoder, tokenizer, args.cache_batch_size)

        if accelerator.is_main_process:
            cache, _ = load_or_compute_cache(cache_dir, "train", key, compute, accelerator.print)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            cache, _ = load_or_compute_cache(cache_dir, "train", key, compute, accelerator.print)
        empty_embeds = cache.empty_embeds.to(device)
        loader_dataset, collate_fn = CachedLatentDataset(cache), None
    else:
        loader_dataset, collate_fn = train_dataset, collate_examples

    # 4. Optimizer, learning-rate schedule, data loader, EMA.
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    sampler = EpochShuffleSampler(len(loader_dataset), args.seed)
    train_dataloader = torch.utils.data.DataLoader(loader_dataset, batch_size=args.train_batch_size, sampler=sampler,
                                                   collate_fn=collate_fn, drop_last=True,
                                                   num_workers=args.dataloader_num_workers,
                                                   generator=torch.Generator().manual_seed(args.seed))
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader, lr_scheduler)
    ema_unet = None
    if args.use_ema:
        ema_unet = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=args.ema_decay,
                            model_cls=UNet2DConditionModel, model_config=accelerator.unwrap_model(unet).config)
        ema_unet.to(device)
        register_ema_for_checkpointing(accelerator, ema_unet, UNet2DConditionModel, "unet_ema")

    # 5. Resume, trackers, log.
    global_step = resume_from_checkpoint(accelerator, args)
    init_trackers(accelerator, args, "unet")
    log_path = output_dir / "train_log.jsonl"
    elapsed_before = 0.0
    if global_step and log_path.exists():
        previous = [json.loads(line) for line in log_path.read_text().splitlines() if line]
        elapsed_before = max((r.get("elapsed_s", 0.0) for r in previous if r.get("step", 0) <= global_step), default=0.0)
    history = JsonlLogger(log_path, accelerator, start_step=global_step)

    def validate(step: int) -> None:
        if not args.validation_prompts:
            return
        model = accelerator.unwrap_model(unet)
        if ema_unet is not None:
            ema_unet.store(model.parameters())
            ema_unet.copy_to(model.parameters())
        model.eval()
        pipe = LatentDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=model,
                                       scheduler=scheduler_from_name(args.validation_scheduler, noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        images = pipe(list(args.validation_prompts), num_inference_steps=args.validation_num_inference_steps,
                      guidance_scale=args.validation_guidance_scale,
                      generator=torch.Generator().manual_seed(args.seed)).images
        model.train()
        if ema_unet is not None:
            ema_unet.restore(model.parameters())
        grid = make_image_grid(images, rows=1, cols=len(images))
        (output_dir / "validation").mkdir(parents=True, exist_ok=True)
        grid.save(output_dir / "validation" / f"step-{step}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step,
                                          dataformats="NHWC")

    # 6. Training loop.
    accelerator.print(f"Training {args.max_train_steps} steps from step {global_step}: {len(loader_dataset)} samples, "
                      f"batch {args.train_batch_size} x {accelerator.num_processes} processes x "
                      f"{args.gradient_accumulation_steps} accumulation, {'cached latents' if use_cache else 'no cache'}")
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="unet",
                    disable=not accelerator.is_local_main_process)
    unet.train()
    start_time = time.perf_counter()
    start_step = global_step
    micro_step = global_step * args.gradient_accumulation_steps
    accumulated_loss = 0.0
    for step, batch in train_batches(accelerator, train_dataloader, sampler, global_step, args.max_train_steps,
                                     args.gradient_accumulation_steps):
        generator = step_generator(args.seed, accelerator.process_index, micro_step)
        micro_step += 1
        with accelerator.accumulate(unet):
            if use_cache:
                mean, std = batch["latent_mean"], batch["latent_std"]
            else:
                posterior = vae.encode(batch["pixel_values"].to(device)).latent_dist
                mean, std = posterior.mean, posterior.std
            latents = sample_latents(mean, std, torch.randn(mean.shape, generator=generator).to(device),
                                     scaling_factor, shift_factor)
            batch_size = latents.shape[0]
            dropped = caption_dropout_mask(batch_size, args.caption_dropout_prob, generator).to(device)
            if use_cache:
                prompt_embeds = torch.where(dropped[:, None, None], empty_embeds, batch["prompt_embeds"])
            else:
                captions = ["" if drop else c for c, drop in zip(batch["captions"], dropped.tolist())]
                tokens = tokenize_prompts(tokenizer, captions)
                prompt_embeds = encode_prompts(text_encoder, tokens.input_ids, tokens.attention_mask)
            noise = sample_noise(latents.shape, generator, args.noise_offset, device=device)
            timesteps = sample_timesteps(batch_size, num_train_timesteps, generator).to(device)
            noisy_latents = add_noise(latents, noise, timesteps, alphas_cumprod)
            target = training_target(latents, noise, timesteps, alphas_cumprod, prediction_type)
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            loss = diffusion_loss(model_pred, target, timesteps, alphas_cumprod, prediction_type, args.snr_gamma)
            check_finite_loss(loss, step)
            accumulated_loss += accelerator.reduce(loss.detach(), "mean").item() / args.gradient_accumulation_steps
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        if accelerator.sync_gradients:
            if ema_unet is not None:
                ema_unet.step(accelerator.unwrap_model(unet).parameters())
            global_step += 1
            progress.update(1)
            lr = lr_scheduler.get_last_lr()[0]
            elapsed = elapsed_before + time.perf_counter() - start_time
            progress.set_postfix(loss=f"{accumulated_loss:.4f}")
            accelerator.log({"train/loss": accumulated_loss, "train/lr": lr}, step=global_step)
            history.log(step=global_step, loss=accumulated_loss, lr=lr, elapsed_s=round(elapsed, 3))
            accumulated_loss = 0.0
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, global_step)
            if args.snapshot_steps and global_step % args.snapshot_steps == 0 and accelerator.is_main_process:
                save_unet_snapshot(accelerator.unwrap_model(unet), ema_unet, output_dir / "snapshots" / f"step-{global_step}")
            if args.validation_steps and global_step % args.validation_steps == 0:
                if accelerator.is_main_process:
                    validate(global_step)
                accelerator.wait_for_everyone()
    progress.close()
    train_seconds = time.perf_counter() - start_time

    # 7. Save the whole pipeline (EMA weights when --use_ema).
    accelerator.wait_for_everyone()
    metrics = {}
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(unet)
        if ema_unet is not None:
            ema_unet.copy_to(trained.parameters())
        trained.eval()
        pipeline = LatentDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=trained,
                                           scheduler=noise_scheduler)
        pipeline.save_pretrained(output_dir, safe_serialization=True)
        steps_this_run = global_step - start_step
        images_per_second = (steps_this_run * args.train_batch_size * args.gradient_accumulation_steps
                             * accelerator.num_processes / train_seconds) if steps_this_run else 0.0
        metrics = {"train_steps": global_step, "train_seconds_this_run": round(train_seconds, 2),
                   "images_per_second": round(images_per_second, 2), "cached": use_cache,
                   "prediction_type": prediction_type, "num_parameters": sum(p.numel() for p in trained.parameters())}
        (output_dir / "unet_metrics.json").write_text(json.dumps(metrics, indent=2))
        accelerator.print(f"Saved pipeline to {output_dir} ({images_per_second:.1f} images/s).")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
