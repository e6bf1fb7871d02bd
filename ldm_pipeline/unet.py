"""Stage 3: the cross-attention U-Net (``UNet2DConditionModel``) and its denoising objective.

DDPM's training algorithm (Ho et al. 2020, arXiv:2006.11239, Algorithm 1) in the latent space of the VAE
(Rombach et al. 2022, arXiv:2112.10752, eq. 2):

    z_0 = (mean + std · ε_z - shift) · scaling_factor        a fresh draw from the VAE posterior q(z | x)
    t ~ U{0..T-1},  ε ~ N(0, I) (+ offset noise),  z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε
    loss = w(t) · || target - ε_θ(z_t, t, c) ||²,  target = ε or v,  w = 1 or Min-SNR-γ

The formulas themselves are small functions in ``ldm_pipeline.diffusion``; this module fits the U-Net to the frozen
stages and assembles one training step's loss.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from ldm_pipeline.caching import fingerprint_model, fingerprint_tokenizer
from ldm_pipeline.config import UNetTrainingConfig, closest
from ldm_pipeline.diffusion import add_noise, diffusion_loss, sample_noise, sample_timesteps, training_target
from ldm_pipeline.durable import atomic_directory
from ldm_pipeline.grounding import MASK_LEVELS, grounding_losses
from ldm_pipeline.schedulers import SAMPLING_DEFAULTS, scheduler_from_name
from ldm_pipeline.trainer import ema_weights
from ldm_pipeline.text_encoder import text_hidden_size
from ldm_pipeline.vae import vae_scale_factor

FITTED_KEYS = ("sample_size", "in_channels", "out_channels", "cross_attention_dim")


def unet_kwargs_check(kwargs: dict) -> None:
    """Reject ``model.unet`` keys that ``UNet2DConditionModel`` does not take (naming the closest one), and the
    keys the stage sets itself from the frozen stages."""
    accepted = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    for key in kwargs:
        if key in FITTED_KEYS:
            raise ValueError(f"model.unet.{key} is set from the VAE and text encoder (sample_size = resolution / f, "
                             "channels = latent channels, cross_attention_dim = text width): remove it.")
        if key not in accepted:
            raise ValueError(f"model.unet.{key} is not a UNet2DConditionModel argument.{closest(key, sorted(accepted))}")


def build_unet(model_config: dict, vae: AutoencoderKL, text_encoder, resolution: int) -> UNet2DConditionModel:
    """``UNet2DConditionModel(**model.unet)`` fitted to the frozen stages: latent channels in and out,
    ``sample_size = resolution / f`` (f = the VAE's downsampling factor), ``cross_attention_dim`` = text width."""
    factor = vae_scale_factor(vae)
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}: "
                         f"use {max(factor, resolution // factor * factor)}.")
    kwargs = dict(model_config.get("unet", {}))
    unet_kwargs_check(kwargs)
    kwargs.update(sample_size=resolution // factor, in_channels=vae.config.latent_channels,
                  out_channels=vae.config.latent_channels, cross_attention_dim=text_hidden_size(text_encoder))
    return UNet2DConditionModel(**kwargs)


class DenoisingObjective:
    """One step's DDPM loss for a batch of clean latents and text states (see the module docstring).

    ``noise_scheduler`` supplies ᾱ_t, T and the prediction type; ``snr_gamma`` turns on Min-SNR-γ weighting
    (Hang et al. 2023, arXiv:2303.09556); ``noise_offset`` adds offset noise. With a ``recorder`` (a
    ``grounding.CrossAttentionRecorder`` installed in the U-Net) and a batch's grounding targets, the loss gains
    TokenCompose's terms, ``token_weight · L_token + pixel_weight · L_pixel`` (``ldm_pipeline.grounding``); their
    values are kept in ``grounding_terms`` for the logs."""

    def __init__(self, noise_scheduler: DDPMScheduler, snr_gamma: float | None = None, noise_offset: float = 0.0,
                 recorder=None, token_weight: float = 0.0, pixel_weight: float = 0.0):
        self.alphas_cumprod = noise_scheduler.alphas_cumprod
        self._alphas_cumprod_on: dict[torch.device, torch.Tensor] = {}  # copied to a device once, not every step
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps
        self.prediction_type = noise_scheduler.config.prediction_type
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.recorder, self.token_weight, self.pixel_weight = recorder, token_weight, pixel_weight
        self.grounding_terms: dict[str, torch.Tensor] = {}

    def __call__(self, unet, latents: torch.Tensor, prompt_embeds: torch.Tensor, generator: torch.Generator,
                 global_batch: int | None = None, rows: slice | None = None,
                 grounding: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The loss of ``latents`` [B, C, h, w]. ε and t are drawn for a ``global_batch`` (default B) of which these
        latents are ``rows`` (see ``StageTrainer.global_rows``). ``grounding``: ``grounding_tokens`` [B, K] and
        ``grounding_masks`` [B, K, h, w] (uint8 coverage, ``grounding.encode_grounding``)."""
        device = latents.device
        if device not in self._alphas_cumprod_on:
            self._alphas_cumprod_on[device] = self.alphas_cumprod.to(device)
        alphas_cumprod = self._alphas_cumprod_on[device]
        global_batch = global_batch or latents.shape[0]
        rows = rows or slice(0, latents.shape[0])
        noise = sample_noise((global_batch, *latents.shape[1:]), generator, self.noise_offset, device=device)[rows]
        timesteps = sample_timesteps(global_batch, self.num_train_timesteps, generator)[rows].to(device)
        noisy_latents = add_noise(latents, noise, timesteps, alphas_cumprod)
        target = training_target(latents, noise, timesteps, alphas_cumprod, self.prediction_type)
        grounded = self.recorder is not None and grounding is not None
        if grounded:
            self.recorder.recording = True
        try:
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        finally:
            if grounded:
                self.recorder.recording = False
        loss = diffusion_loss(model_pred, target, timesteps, alphas_cumprod, self.prediction_type, self.snr_gamma)
        if grounded:
            masks = grounding["grounding_masks"].to(device).float() / MASK_LEVELS
            token_loss, pixel_loss = grounding_losses(self.recorder.take(), grounding["grounding_tokens"].to(device),
                                                      masks)
            self.grounding_terms = {"token_loss": token_loss.detach(), "pixel_loss": pixel_loss.detach()}
            loss = loss + self.token_weight * token_loss + self.pixel_weight * pixel_loss
        return loss



def sampling_scheduler(noise_scheduler: DDPMScheduler, name: str = SAMPLING_DEFAULTS.scheduler):
    """The sampler ``name`` on the training noise schedule, exactly as ``pipe.set_scheduler(name)`` builds it on a
    pipeline saved with ``noise_scheduler``: every value of its config carries over (betas, ``prediction_type``,
    ``clip_sample=False``, and the ones it took by default, ``timestep_spacing="leading"`` and ``steps_offset=0``,
    which Diffusers would otherwise replace by the new class's defaults). ``train_unet.py`` saves the pipeline with
    ``SAMPLING_DEFAULTS.scheduler`` (DPM-Solver++), the sampler the defaults were measured with."""
    config = {key: value for key, value in noise_scheduler.config.items() if key != "_use_default_values"}
    return scheduler_from_name(name, config)


def frozen_stage_fingerprints(vae, text_encoder, tokenizer) -> dict[str, str]:
    """Hashes of the frozen stages' weights and configs and of the tokenizer: part of the cache key and of the run
    fingerprint, so that neither a cache nor a checkpoint is reused with a different VAE or text encoder."""
    return {"vae": fingerprint_model(vae), "text_encoder": fingerprint_model(text_encoder),
            "tokenizer": fingerprint_tokenizer(tokenizer)}


def save_unet_snapshot(unet: UNet2DConditionModel, ema_model, path: Path) -> None:
    """Save the U-Net weights sampling would use now (the EMA average when there is one) to ``path``, atomically."""
    with ema_weights(ema_model, unet), atomic_directory(Path(path)) as partial:
        unet.save_pretrained(partial, safe_serialization=True)


def sample_validation_images(pipe, args: UNetTrainingConfig) -> list:
    """The validation prompts sampled with the configured scheduler, steps and guidance, seeded with ``args.seed``."""
    pipe.set_progress_bar_config(disable=True)
    was_training = pipe.unet.training
    pipe.unet.eval()
    images = pipe(list(args.validation_prompts), num_inference_steps=args.validation_num_inference_steps,
                  guidance_scale=args.validation_guidance_scale,
                  generator=torch.Generator().manual_seed(args.seed)).images
    pipe.unet.train(was_training)
    return images
