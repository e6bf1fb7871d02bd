"""Stage 2: train the AutoencoderKL that defines the latent space, with the LDM autoencoder objective.

    accelerate launch -q --config_file configs/accelerate/single_process.yaml \\
        training/train_vae.py --config configs/demo/vae.json --output_dir OUT
        [--train_data_dir DIR | --dataset_name NAME] [--lpips_weights FILE] [--use_ema]

Loss (``ldm_pipeline.vae.AutoencoderLoss``): L1 reconstruction (+ LPIPS when --lpips_weights names a local file)
+ kl_weight · KL, plus from step disc_start a PatchGAN hinge loss with LDM's adaptive weight; the discriminator has
its own optimizer. The posterior noise is drawn for the global batch (every process keeps its rows), the PatchGAN's
batch norms and the adaptive weight are global, so n processes of batch B train as one process of batch n·B;
validation and the final save run on the main process, over the whole held-out split. At the end the training set
is encoded and scaling_factor = 1 / std(latents) is stored in the VAE config, so the U-Net stage sees unit-variance
latents.

Writes OUT/vae (AutoencoderKL, safetensors), OUT/vae_metrics.json (held-out PSNR/SSIM, scaling_factor, ...),
OUT/reconstructions.png (held-out originals above, reconstructions below), OUT/data_split.json (what is held out,
``ldm_pipeline.data.split``), OUT/train_log.jsonl, tensorboard logs
in OUT/logs and resumable states in OUT/checkpoints.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from ldm_pipeline.config import load_stage_config
from ldm_pipeline.data import build_dataset, collate_examples
from ldm_pipeline.data.split import record_stage_split
from ldm_pipeline.errors import run_cli
from ldm_pipeline.trainer import StageTrainer
from ldm_pipeline.vae import (
    AutoencoderLoss,
    AutoencoderWithPosterior,
    build_discriminator,
    build_vae,
    decoder_last_layer,
    image_grid,
    latent_statistics,
    load_lpips,
    pixel_batches,
    reconstruct,
    reconstruction_metrics,
    vae_scale_factor,
    validate_vae_config,
)


def main(argv: list[str] | None = None) -> dict:
    config = load_stage_config("vae", argv, __doc__)
    args, data = config.training, config.data
    validate_vae_config(config.model, data.resolution)
    trainer = StageTrainer(config)
    device = trainer.device

    # 1. Data: images in [-1, 1]; the held-out split is only read by the main process.
    train_dataset = build_dataset(data, split="train")
    record_stage_split(data, trainer.output_dir, trainer.is_main_process)
    validation_dataset = build_dataset(data, split="validation") if trainer.is_main_process else None

    # 2. Models and loss: the autoencoder, the PatchGAN discriminator, LPIPS if its weights are on disk.
    vae = build_vae(config.model, data.resolution)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    discriminator = build_discriminator(config.model)
    lpips = load_lpips(args.lpips_weights) if args.perceptual_weight > 0 else None
    if lpips is not None:
        lpips.to(device)
    factor = vae_scale_factor(vae)
    latent_shape = [vae.config.latent_channels, data.resolution // factor, data.resolution // factor]
    trainer.print(f"AutoencoderKL: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, f = {factor}, "
                  f"{data.resolution} px -> latents {latent_shape}; discriminator "
                  f"{sum(p.numel() for p in discriminator.parameters()) / 1e6:.2f} M parameters from step "
                  f"{args.disc_start}")

    # 3. Two optimizers (autoencoder, discriminator), schedules, data loader; all prepared for exact resume.
    ae_optimizer = trainer.adamw(vae.parameters())
    disc_optimizer = trainer.adamw(discriminator.parameters(), args.disc_learning_rate)
    ae_lr_scheduler = trainer.lr_schedule(ae_optimizer)
    disc_lr_scheduler = trainer.lr_schedule(disc_optimizer, "constant")
    train_dataloader, sampler = trainer.dataloader(train_dataset, collate_examples)
    model, discriminator, ae_optimizer, disc_optimizer, train_dataloader, ae_lr_scheduler, disc_lr_scheduler = (
        trainer.prepare(AutoencoderWithPosterior(vae), discriminator, ae_optimizer, disc_optimizer,
                        train_dataloader, ae_lr_scheduler, disc_lr_scheduler))
    vae = trainer.accelerator.unwrap_model(model).vae
    last_layer = decoder_last_layer(vae)
    objective = AutoencoderLoss(trainer.accelerator.unwrap_model(discriminator), args.kl_weight, args.disc_start,
                                args.disc_weight, lpips, args.perceptual_weight)
    trainer.track_ema(vae, AutoencoderKL, "vae_ema")

    def validate() -> dict:
        batches = (x.to(device) for x in pixel_batches(validation_dataset, args.validation_batch_size))
        metrics = reconstruction_metrics(vae, batches)
        trainer.log_metrics(metrics)
        return metrics

    # 4. Training loop: per micro-batch an autoencoder update, then (from disc_start) a discriminator update. The
    #    posterior noise is this process's rows of the global batch's draw.
    trainer.start(dataset=train_dataset)
    model.train()
    discriminator.train()
    for batch in trainer.batches(train_dataloader, sampler):
        pixel_values, step = batch["pixel_values"], trainer.global_step
        latent_noise = trainer.global_randn((pixel_values.shape[0], *latent_shape), trainer.generator()).to(device)
        with trainer.accelerator.accumulate(model, discriminator):
            reconstruction, posterior = model(pixel_values, latent_noise)
            loss, parts = objective.autoencoder_loss(pixel_values, reconstruction, posterior, last_layer, step)
            trainer.backward(loss, model)
            ae_optimizer.step()
            ae_lr_scheduler.step()
            ae_optimizer.zero_grad(set_to_none=True)
            if objective.gan_on(step):
                d_loss, d_parts = objective.discriminator_loss(discriminator, pixel_values, reconstruction, step)
                trainer.backward(d_loss, discriminator)
                disc_optimizer.step()
                disc_lr_scheduler.step()
                disc_optimizer.zero_grad(set_to_none=True)
                parts.update(d_parts)
        if trainer.end_micro_step(loss=loss, lr=ae_lr_scheduler.get_last_lr()[0], **parts) and trainer.validation_due():
            metrics = trainer.on_main_process(validate)
            if metrics:
                trainer.progress.write(f"step {trainer.global_step}: held-out PSNR {metrics['psnr']:.2f} dB "
                                       f"SSIM {metrics['ssim']:.4f}")

    # 5. Scaling factor from the training latents, held-out PSNR/SSIM, reconstruction grid, save.
    def save() -> dict:
        vae.eval()
        latents = (x.to(device) for x in pixel_batches(train_dataset, args.validation_batch_size,
                                                        args.scaling_factor_max_samples))
        stats = latent_statistics(vae, latents, sample=True, generator=torch.Generator(device).manual_seed(args.seed))
        vae.register_to_config(scaling_factor=1.0 / stats["std"])
        held_out = validate()
        originals = next(pixel_batches(validation_dataset, args.num_reconstructions)).to(device)
        image_grid([originals, reconstruct(vae, originals)]).save(trainer.output_dir / "reconstructions.png")
        vae.save_pretrained(trainer.output_dir / "vae", safe_serialization=True)
        print(f"held-out PSNR {held_out['psnr']:.2f} dB, SSIM {held_out['ssim']:.4f} ({held_out['num_images']} "
              f"images); scaling_factor {vae.config.scaling_factor:.4f} (latent std {stats['std']:.4f}); saved "
              f"{trainer.output_dir / 'vae'}", flush=True)
        return {"psnr": held_out["psnr"], "ssim": held_out["ssim"], "num_validation_images": held_out["num_images"],
                "scaling_factor": vae.config.scaling_factor, "latent_std": stats["std"],
                "latent_mean": stats["mean"], "latent_shape": latent_shape, "downsampling_factor": factor,
                "resolution": data.resolution, "ema": args.use_ema, "perceptual": lpips is not None,
                "disc_start": args.disc_start}

    return trainer.finish(save)


if __name__ == "__main__":
    run_cli(main, prog="train_vae.py")
