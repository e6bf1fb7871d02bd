"""Stage 2: train the AutoencoderKL that defines the latent space, with the LDM autoencoder objective.

    accelerate launch training/train_vae.py --config configs/demo/vae.json --output_dir OUT
        [--train_data_dir DIR | --dataset_name NAME] [--lpips_weights FILE] [--use_ema]

Loss (ldm_pipeline/vae.py states the formulas): L1 reconstruction (+ LPIPS when --lpips_weights names a local
file) + kl_weight * KL, plus from step disc_start a PatchGAN hinge loss with LDM's adaptive weight; the
discriminator has its own optimizer. At the end the training set is encoded and scaling_factor = 1 / std(latents)
is stored in the VAE config, so the UNet stage sees unit-variance latents.

Writes OUT/vae (AutoencoderKL, safetensors), OUT/vae_metrics.json (held-out PSNR/SSIM, scaling_factor, ...),
OUT/reconstructions.png (held-out originals above, reconstructions below), tensorboard logs in OUT/logs and
resumable states in OUT/checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ldm_pipeline.data import add_data_args, build_dataset, collate_examples
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
from ldm_pipeline.vae import (
    AutoencoderWithPosterior,
    adaptive_weight,
    build_discriminator,
    build_vae,
    decoder_last_layer,
    discriminator_factor,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    image_grid,
    kl_loss,
    latent_statistics,
    load_lpips,
    reconstruct,
    reconstruction_metrics,
    validate_vae_config,
    vae_downsampling_factor,
)

VAE_DEFAULTS = {
    "kl_weight": 1e-6,
    "disc_start": 50001,
    "disc_weight": 0.5,
    "disc_learning_rate": None,
    "perceptual_weight": 1.0,
    "lpips_weights": None,
    "validation_batch_size": 64,
    "num_reconstructions": 8,
    "scaling_factor_max_samples": None,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser)
    add_data_args(parser)
    group = parser.add_argument_group("vae")
    group.add_argument("--kl_weight", type=float, default=None, help="Weight of the KL term (LDM: 1e-6).")
    group.add_argument("--disc_start", type=int, default=None, help="Optimizer step at which the PatchGAN loss starts.")
    group.add_argument("--disc_weight", type=float, default=None, help="Multiplier of the adaptive GAN weight.")
    group.add_argument("--disc_learning_rate", type=float, default=None, help="Discriminator LR (default: --learning_rate).")
    group.add_argument("--perceptual_weight", type=float, default=None, help="Weight of LPIPS, when --lpips_weights is given.")
    group.add_argument("--lpips_weights", type=str, default=None,
                       help="Local LPIPS-VGG16 weights (.safetensors/.pth); never downloaded. Without it: L1 only.")
    group.add_argument("--validation_batch_size", type=int, default=None)
    group.add_argument("--num_reconstructions", type=int, default=None, help="Held-out images in reconstructions.png.")
    group.add_argument("--scaling_factor_max_samples", type=int, default=None,
                       help="Encode at most this many training images for the latent std (default: all).")
    return parser


def pixel_batches(dataset, batch_size: int, max_samples: int | None = None):
    """The dataset's ``pixel_values`` in order, in batches (for the latent statistics and the metrics)."""
    if max_samples is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(max_samples, len(dataset))))
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_examples):
        yield batch["pixel_values"]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), argv)
    for key, value in VAE_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    validate_vae_config(args.model_config, args.resolution)
    accelerator = make_accelerator(args)
    output_dir = Path(args.output_dir)
    device = accelerator.device

    # 1. Data: images in [-1, 1]; the held-out split is only read by the main process.
    train_dataset = build_dataset(args, split="train")

    # 2. Models: the autoencoder, the PatchGAN discriminator, and LPIPS if its weights are on disk.
    vae = build_vae(args.model_config, args.resolution)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    discriminator = build_discriminator(args.model_config)
    lpips = load_lpips(args.lpips_weights) if args.perceptual_weight > 0 else None
    if lpips is not None:
        lpips.to(device)
    factor = vae_downsampling_factor(args.model_config)
    latent_shape = [vae.config.latent_channels, args.resolution // factor, args.resolution // factor]
    accelerator.print(f"AutoencoderKL: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, f = {factor}, "
                      f"{args.resolution} px -> latents {latent_shape}; discriminator "
                      f"{sum(p.numel() for p in discriminator.parameters()) / 1e6:.2f} M parameters from step {args.disc_start}")

    # 3. Two optimizers (autoencoder, discriminator), schedules, data loader; all prepared for exact resume.
    betas = (args.adam_beta1, args.adam_beta2)
    ae_optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, betas=betas,
                                     weight_decay=args.adam_weight_decay)
    disc_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=args.disc_learning_rate or args.learning_rate,
                                       betas=betas, weight_decay=args.adam_weight_decay)
    ae_lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=ae_optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    disc_lr_scheduler = get_scheduler("constant", optimizer=disc_optimizer)
    sampler = EpochShuffleSampler(len(train_dataset), args.seed)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate_examples,
        drop_last=True, num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),  # iterators draw their seed here, not from the global RNG
    )
    model = AutoencoderWithPosterior(vae)
    model, discriminator, ae_optimizer, disc_optimizer, train_dataloader, ae_lr_scheduler, disc_lr_scheduler = (
        accelerator.prepare(model, discriminator, ae_optimizer, disc_optimizer, train_dataloader, ae_lr_scheduler,
                            disc_lr_scheduler)
    )
    vae = accelerator.unwrap_model(model).vae
    discriminator_module = accelerator.unwrap_model(discriminator)
    last_layer = decoder_last_layer(vae)
    ema_vae = None
    if args.use_ema:
        ema_vae = EMAModel(vae.parameters(), decay=args.ema_decay, model_cls=AutoencoderKL, model_config=vae.config)
        ema_vae.to(device)
        register_ema_for_checkpointing(accelerator, ema_vae, AutoencoderKL, "vae_ema")
    if accelerator.is_main_process:
        validation_dataset = build_dataset(args, split="validation")

    # 4. Resume, trackers.
    global_step = resume_from_checkpoint(accelerator, args)
    init_trackers(accelerator, args, "vae")
    history = JsonlLogger(output_dir / "logs" / "vae_train.jsonl", accelerator, start_step=global_step)

    def validate(step: int) -> dict:
        batches = (x.to(device) for x in pixel_batches(validation_dataset, args.validation_batch_size))
        metrics = reconstruction_metrics(vae, batches)
        accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)
        history.log(step=step, **{f"validation_{k}": v for k, v in metrics.items()})
        return metrics

    # 5. Training loop: per micro-batch an autoencoder update, then (from disc_start) a discriminator update.
    accelerator.print(f"Training {args.max_train_steps} steps from step {global_step}: {len(train_dataset)} images, "
                      f"batch {args.train_batch_size} x {accelerator.num_processes} processes x "
                      f"{args.gradient_accumulation_steps} accumulation steps")
    progress = tqdm(total=args.max_train_steps, initial=global_step, desc="vae",
                    disable=not accelerator.is_local_main_process)
    model.train()
    discriminator.train()
    start_time = time.perf_counter()
    running = {}
    for step, batch in train_batches(accelerator, train_dataloader, sampler, global_step, args.max_train_steps,
                                     args.gradient_accumulation_steps):
        pixel_values = batch["pixel_values"]
        gan_on = discriminator_factor(step, args.disc_start)
        with accelerator.accumulate(model, discriminator):
            reconstruction, posterior = model(pixel_values)
            rec_loss = F.l1_loss(reconstruction, pixel_values)
            if lpips is not None:
                rec_loss = rec_loss + args.perceptual_weight * lpips(pixel_values, reconstruction).mean()
            kl = kl_loss(posterior, pixel_values[0].numel())
            loss = rec_loss + args.kl_weight * kl
            parts = {"rec_loss": rec_loss, "kl_loss": kl}
            if gan_on:
                discriminator_module.requires_grad_(False)
                g_loss = generator_adversarial_loss(discriminator_module(reconstruction))
                discriminator_module.requires_grad_(True)
                gan_weight = adaptive_weight(rec_loss, g_loss, last_layer, args.disc_weight)
                loss = loss + gan_on * gan_weight * g_loss
                parts.update(g_loss=g_loss, gan_weight=gan_weight)
            check_finite_loss(loss, step)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            ae_optimizer.step()
            ae_lr_scheduler.step()
            ae_optimizer.zero_grad(set_to_none=True)

            if gan_on:
                logits_real, logits_fake = discriminator(torch.cat([pixel_values, reconstruction.detach()])).chunk(2)
                d_loss = gan_on * hinge_discriminator_loss(logits_real, logits_fake)
                check_finite_loss(d_loss, step)
                accelerator.backward(d_loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(discriminator.parameters(), args.max_grad_norm)
                disc_optimizer.step()
                disc_lr_scheduler.step()
                disc_optimizer.zero_grad(set_to_none=True)
                parts.update(d_loss=d_loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean())
        parts["loss"] = loss
        names = sorted(parts)
        values = accelerator.reduce(torch.stack([parts[name].detach().float() for name in names]), "mean")
        for name, value in zip(names, values.tolist()):
            running[name] = running.get(name, 0.0) + value / args.gradient_accumulation_steps

        if accelerator.sync_gradients:
            global_step += 1
            progress.update(1)
            if ema_vae is not None:
                ema_vae.step(vae.parameters())
            progress.set_postfix(loss=f"{running['loss']:.4f}", rec=f"{running['rec_loss']:.4f}")
            accelerator.log({f"train/{k}": v for k, v in running.items()} | {"train/lr": ae_lr_scheduler.get_last_lr()[0]},
                            step=global_step)
            history.log(step=global_step, **running)
            running = {}
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, global_step)
            if args.validation_steps and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                if accelerator.is_main_process:
                    metrics = validate(global_step)
                    progress.write(f"step {global_step}: held-out PSNR {metrics['psnr']:.2f} dB SSIM {metrics['ssim']:.4f}")
                accelerator.wait_for_everyone()
    progress.close()
    train_seconds = time.perf_counter() - start_time

    # 6. Scaling factor from the training latents, held-out PSNR/SSIM, reconstruction grid, save.
    accelerator.wait_for_everyone()
    metrics = {}
    if accelerator.is_main_process:
        if ema_vae is not None:
            ema_vae.copy_to(vae.parameters())
        vae.eval()
        latent_batches = (x.to(device) for x in pixel_batches(train_dataset, args.validation_batch_size,
                                                               args.scaling_factor_max_samples))
        stats = latent_statistics(vae, latent_batches, sample=True,
                                  generator=torch.Generator(device).manual_seed(args.seed))
        vae.register_to_config(scaling_factor=1.0 / stats["std"])
        held_out = validate(global_step)
        originals = next(pixel_batches(validation_dataset, args.num_reconstructions)).to(device)
        image_grid([originals, reconstruct(vae, originals)]).save(output_dir / "reconstructions.png")
        vae.save_pretrained(output_dir / "vae", safe_serialization=True)
        metrics = {
            "psnr": held_out["psnr"], "ssim": held_out["ssim"], "num_validation_images": held_out["num_images"],
            "scaling_factor": vae.config.scaling_factor, "latent_std": stats["std"], "latent_mean": stats["mean"],
            "latent_shape": latent_shape, "downsampling_factor": factor, "resolution": args.resolution,
            "train_steps": global_step, "train_seconds_this_run": round(train_seconds, 1),
            "ema": bool(args.use_ema), "perceptual": lpips is not None, "disc_start": args.disc_start,
        }
        (output_dir / "vae_metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"held-out PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} ({metrics['num_validation_images']} "
              f"images); scaling_factor {metrics['scaling_factor']:.4f} (latent std {stats['std']:.4f}); "
              f"saved {output_dir / 'vae'}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
