"""Stage 3: train a cross-attention U-Net denoiser in the VAE's latent space with the DDPM objective.

    accelerate launch -q --config_file configs/accelerate/single_process.yaml \\
        training/train_unet.py --config configs/demo/unet.json --output_dir OUT \\
        --text_encoder TEXT_STAGE_OUT --vae VAE_STAGE_OUT [data args] [--use_ema] [--resume_from_checkpoint latest]

Per step (``ldm_pipeline.unet.DenoisingObjective``; DDPM's training algorithm on latents):

    z_0 = (mean + std · ε_z - shift) · scaling_factor        fresh draw from the (cached) VAE posterior
    c   = text_encoder(caption), or text_encoder("") with probability caption_dropout_prob
    t ~ U{0..T-1},  ε ~ N(0, I) (+ offset noise),  z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε
    loss = w(t) · || target - unet(z_t, t, c) ||²,  target = ε or v,  w = 1 or Min-SNR-γ
         + λ L_token + β L_pixel    with --grounding_token_weight λ / --grounding_pixel_weight β: each object word's
                                    cross-attention pulled onto its object's mask (``ldm_pipeline.grounding``)

The frozen VAE and text encoder run once over the data and their outputs are cached on disk in shards that all
processes build together (``--cache_dir``, default OUT/../cache; ``training/cache_latents.py`` builds it ahead),
unless ``--no_cache`` (the reference loop of Diffusers' train_text_to_image.py: both run on every step). Writes
the whole pipeline to OUT (model_index.json, unet/, vae/, text_encoder/, tokenizer/, and scheduler/: DPM-Solver++
on the training noise schedule, ``ldm_pipeline.schedulers.SAMPLING_DEFAULTS``),
OUT/train_log.jsonl ({step, loss, lr, elapsed_s}), OUT/unet_metrics.json, OUT/data_split.json (what is held out; a
frozen stage that trained on some of it is an error), validation grids in
OUT/validation/step-N.png, tensorboard logs in OUT/logs and resumable states in OUT/checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ldm_pipeline.attention import enable_memory_efficient_attention
from ldm_pipeline.caching import collate_gathered, open_or_build_cache, sample_latents, training_cache
from ldm_pipeline.config import load_stage_config
from ldm_pipeline.data import build_dataset, collate_examples
from ldm_pipeline.data.split import record_stage_split
from ldm_pipeline.diffusion import build_noise_scheduler, caption_dropout_mask
from ldm_pipeline.errors import run_cli
from ldm_pipeline.grounding import grounding_encoder, record_cross_attention
from ldm_pipeline.pipeline_latent_diffusion import LatentDiffusionPipeline
from ldm_pipeline.prompt_encoding import encode_prompts, tokenize_prompts
from ldm_pipeline.stage_dirs import check_stage_dirs
from ldm_pipeline.text_encoder import load_pretrained_text_encoder
from ldm_pipeline.trainer import StageTrainer
from ldm_pipeline.unet import (
    DenoisingObjective,
    build_unet,
    frozen_stage_fingerprints,
    sample_validation_images,
    sampling_scheduler,
    save_unet_snapshot,
)
from ldm_pipeline.vae import load_vae


def main(argv: list[str] | None = None) -> dict:
    config = load_stage_config("unet", argv, __doc__)
    args, data = config.training, config.data
    check_stage_dirs({"--text_encoder": ("text_encoder", args.text_encoder), "--vae": ("vae", args.vae)})
    trainer = StageTrainer(config)
    device = trainer.device

    # 1. Frozen stages: tokenizer + text encoder, VAE.
    tokenizer, text_encoder = load_pretrained_text_encoder(args.text_encoder, "--text_encoder")
    vae = load_vae(args.vae)
    for frozen in (text_encoder, vae):
        frozen.requires_grad_(False).eval().to(device)
    frozen_fingerprints = frozen_stage_fingerprints(vae, text_encoder, tokenizer)

    # 2. Noise schedule, the U-Net and its loss.
    noise_scheduler = build_noise_scheduler(config.model.get("noise_scheduler"), args.prediction_type)
    unet = build_unet(config.model, vae, text_encoder, data.resolution)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    objective = DenoisingObjective(noise_scheduler, args.snr_gamma, args.noise_offset,
                                   token_weight=args.grounding_token_weight, pixel_weight=args.grounding_pixel_weight)
    grounding = grounding_encoder(args, tokenizer, vae, data.resolution)  # None unless a grounding weight is set
    if grounding is not None and args.torch_compile != "no":
        raise ValueError("--grounding_token_weight / --grounding_pixel_weight read the cross-attention maps out of "
                         "the U-Net's forward pass: train them with --torch_compile no.")
    trainer.print(f"U-Net: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, latents "
                  f"{unet.config.in_channels}x{unet.config.sample_size}x{unet.config.sample_size}, "
                  f"{objective.prediction_type} prediction, {noise_scheduler.config.beta_schedule} schedule")

    # 3. Data: cached VAE posteriors + text embeddings, or raw images and captions (--no_cache).
    train_dataset = build_dataset(data, split="train", grounding=grounding is not None)
    if grounding is not None and not getattr(train_dataset, "has_masks", False):
        trainer.print(f"{data.source} has no object masks (a {data.grounding_column!r} column of an imagefolder's "
                      "metadata.jsonl, see docs/data.md): the grounding loss is off for this run.")
        grounding = None
    record_stage_split(data, trainer.output_dir, trainer.is_main_process, who="train_unet.py",
                       frozen_runs={"--text_encoder": args.text_encoder, "--vae": args.vae})
    use_cache = not args.no_cache
    if use_cache and (data.random_flip or data.random_crop):
        trainer.print("Random flips/crops change the latents every epoch: latent caching is off for this run.")
        use_cache = False
    if use_cache and data.streaming:
        trainer.print("--streaming: the latent cache needs random access; training uncached (the VAE and text "
                      "encoder run every step, as with --no_cache).")
        use_cache = False
    if use_cache:
        shards = open_or_build_cache(config, trainer.accelerator, train_dataset, vae, text_encoder, tokenizer,
                                     frozen_fingerprints, trainer.data_fingerprint, grounding=grounding)
        cache = training_cache(shards, device, args.cache_on_device)
        held = cache is not shards  # on the device: the loader gives indices only, no worker needed
        if held:
            trainer.print(f"Latent/text cache held in {device} memory ({shards.size_in_memory() / 2**20:.0f} MiB).")
        empty_embeds = cache.empty_embeds().to(device)
        loader_dataset, collate_fn, loader_workers = cache, collate_gathered, 0 if held else None
    else:
        loader_dataset, collate_fn, loader_workers = train_dataset, collate_examples, None

    # 4. Optimizer, learning-rate schedule, data loader, EMA.
    optimizer = trainer.adamw(unet.parameters())
    lr_scheduler = trainer.lr_schedule(optimizer)
    train_dataloader, sampler = trainer.dataloader(loader_dataset, collate_fn, loader_workers)
    unet, optimizer, train_dataloader, lr_scheduler = trainer.prepare(unet, optimizer, train_dataloader, lr_scheduler)
    model = trainer.accelerator.unwrap_model(unet)
    if args.enable_xformers_memory_efficient_attention:
        enable_memory_efficient_attention(model, trainer.print)
    if grounding is not None:
        objective.recorder = record_cross_attention(model)
        trainer.print(f"Grounding loss on the cross-attention maps: token weight {args.grounding_token_weight}, "
                      f"pixel weight {args.grounding_pixel_weight}.")
    trainer.track_ema(model, UNet2DConditionModel, "unet_ema")

    def pipeline(scheduler) -> LatentDiffusionPipeline:
        return LatentDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=model,
                                       scheduler=scheduler)

    def validate() -> None:
        if args.validation_prompts:
            with trainer.ema_weights(model):
                images = sample_validation_images(pipeline(sampling_scheduler(noise_scheduler,
                                                                              args.validation_scheduler)), args)
            trainer.log_images("validation", images)

    def snapshot() -> None:
        if trainer.is_main_process:
            path = trainer.output_dir / "snapshots" / f"step-{trainer.global_step}"
            save_unet_snapshot(model, trainer.ema, path)
            trainer.progress.write(f"step {trainer.global_step}: U-Net snapshot written to {path}")

    # 5. Training loop (a resume first writes its step's snapshot when a kill left it out).
    trainer.start(frozen_fingerprints, dataset=train_dataset)
    if (trainer.global_step and trainer.every(args.snapshot_steps)
            and not (trainer.output_dir / "snapshots" / f"step-{trainer.global_step}").is_dir()):
        snapshot()
    unet.train()
    for batch in trainer.batches(train_dataloader, sampler):
        generator = trainer.generator()
        with trainer.accelerator.accumulate(unet):
            if use_cache:
                batch = cache.fetch(batch)
                mean, std = batch["latent_mean"], batch["latent_std"]
            else:
                posterior = vae.encode(batch["pixel_values"].to(device)).latent_dist
                mean, std = posterior.mean, posterior.std
            global_batch, rows = trainer.global_rows(mean.shape[0])
            latent_noise = trainer.global_randn(mean.shape, generator)
            latents = sample_latents(mean, std, latent_noise.to(device), vae.config.scaling_factor,
                                     getattr(vae.config, "shift_factor", None))
            dropped = caption_dropout_mask(global_batch, args.caption_dropout_prob, generator)[rows].to(device)
            if use_cache:
                prompt_embeds = torch.where(dropped[:, None, None], empty_embeds, batch["prompt_embeds"])
            else:
                tokens = tokenize_prompts(tokenizer, ["" if drop else caption for caption, drop
                                                      in zip(batch["captions"], dropped.tolist())])
                prompt_embeds = encode_prompts(text_encoder, tokens.input_ids, tokens.attention_mask)
            targets = None
            if grounding is not None:
                targets = batch if use_cache else grounding(batch["captions"], batch.get("groundings") or
                                                            [None] * len(batch["captions"]))
                targets = {"grounding_tokens": torch.where(dropped[:, None], -1, targets["grounding_tokens"].to(device)),
                           "grounding_masks": targets["grounding_masks"]}
            loss = objective(unet, latents, prompt_embeds, generator, global_batch, rows, targets)
            trainer.backward(loss, unet)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if trainer.end_micro_step(loss=loss, lr=lr_scheduler.get_last_lr()[0], **objective.grounding_terms):
            if trainer.save_due(args.snapshot_steps):
                snapshot()
            if trainer.validation_due():
                trainer.on_main_process(validate)

    # 6. Save the whole pipeline (EMA weights when --use_ema, the default sampler) and a last validation grid.
    def save() -> dict:
        model.eval()
        pipeline(sampling_scheduler(noise_scheduler)).save_pretrained(trainer.output_dir, safe_serialization=True)
        validate()
        images_per_second = trainer.images_per_second()
        trainer.print(f"Saved pipeline to {trainer.output_dir} ({images_per_second:.1f} images/s).")
        return {"images_per_second": round(images_per_second, 2), "cached": use_cache,
                "prediction_type": objective.prediction_type,
                "num_parameters": sum(p.numel() for p in model.parameters())}

    stage_dirs = {name: path for name, path in (("text_encoder", args.text_encoder), ("vae", args.vae))
                  if Path(path).is_dir()}
    return trainer.finish(save, card_stage_dirs=stage_dirs)


if __name__ == "__main__":
    run_cli(main, prog="train_unet.py")
