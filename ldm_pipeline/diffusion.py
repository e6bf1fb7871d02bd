"""The DDPM training objective in latent space, as small exact functions.

Notation of DDPM (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239):

    α_t = 1 - β_t,   ᾱ_t = ∏_{i=1}^t α_i
    x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε,   ε ~ N(0, I)      q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I)   (eq. 4)
    L_simple = E_{t, x_0, ε} || ε - ε_θ(x_t, t, c) ||²                                                (eq. 14)

In a latent diffusion model (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", arXiv:2112.10752, eq. 2) x_0 is the scaled VAE latent z_0 and c the text encoder's hidden states.
Besides ε-prediction the U-Net can predict the velocity v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho
2022, "Progressive Distillation for Fast Sampling of Diffusion Models", arXiv:2202.00512, sec. 4). Min-SNR-γ
weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", arXiv:2303.09556)
uses SNR(t) = ᾱ_t / (1 - ᾱ_t).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ldm_pipeline.config import closest

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SCHEDULE_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
}


def build_noise_scheduler(config: dict | None = None, prediction_type: str | None = None) -> DDPMScheduler:
    """A ``DDPMScheduler`` for the noise schedule in ``config`` (the ``model.noise_scheduler`` section).

    Keys: ``num_train_timesteps``, ``beta_schedule`` (``linear``: β linear in [beta_start, beta_end];
    ``scaled_linear``: sqrt(β) linear, as Stable Diffusion; ``squaredcos_cap_v2``: the cosine schedule of
    Nichol & Dhariwal, ᾱ_t = cos²((t/T + s)/(1 + s) · π/2)), ``beta_start``, ``beta_end``, ``prediction_type``
    (overridden by the ``prediction_type`` argument when given). ``clip_sample`` is always False: latents are
    not confined to [-1, 1].
    """
    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    unknown = sorted(set(config or {}) - accepted)
    if unknown:
        raise ValueError(f"model.noise_scheduler.{unknown[0]} is not a DDPMScheduler argument.{closest(unknown[0], accepted)}")
    kwargs = {**SCHEDULE_DEFAULTS, **(config or {})}
    if prediction_type is not None:
        kwargs["prediction_type"] = prediction_type
    if kwargs["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule {kwargs['beta_schedule']!r} is not supported: use one of {list(BETA_SCHEDULES)}.")
    if kwargs["prediction_type"] not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {kwargs['prediction_type']!r} is not supported: use one of {list(PREDICTION_TYPES)}."
        )
    kwargs["clip_sample"] = False
    return DDPMScheduler(**kwargs)


def _at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t for every sample, shaped ``[B, 1, 1, ...]`` to broadcast against ``like``."""
    abar = alphas_cumprod.to(device=timesteps.device)[timesteps].to(like.dtype)
    return abar.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε  (DDPM's forward process in closed form, Ho et al. 2020, eq. 4)."""
    abar = _at(alphas_cumprod, timesteps, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0  (the v-prediction target of Salimans & Ho 2022)."""
    abar = _at(alphas_cumprod, timesteps, x0)
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """ε for ``epsilon`` prediction, v for ``v_prediction``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, timesteps, alphas_cumprod)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported: use one of {list(PREDICTION_TYPES)}.")


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 - ᾱ_t)  (signal-to-noise ratio of x_t; ``diffusers.training_utils.compute_snr``)."""
    abar = alphas_cumprod.to(device=timesteps.device)[timesteps].float()
    return abar / (1 - abar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023), expressed for the chosen target.

    The x_0-loss weight min(SNR, γ) becomes min(SNR, γ) / SNR on the ε-loss and min(SNR, γ) / (SNR + 1) on
    the v-loss, since ||ε - ε̂||² = SNR ||x_0 - x̂_0||² and ||v - v̂||² = (SNR + 1) ||x_0 - x̂_0||².
    """
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_values
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported: use one of {list(PREDICTION_TYPES)}.")


def draw_device(generator: torch.Generator | None) -> torch.device:
    """Where a draw from ``generator`` is made: its own device (a CPU one, or a GPU one on the fast path)."""
    return generator.device if generator is not None else torch.device("cpu")


def sample_noise(
    shape: Sequence[int], generator: torch.Generator | None = None, noise_offset: float = 0.0,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ε ~ N(0, I), plus offset noise ``noise_offset · N(0, 1)`` shared by all pixels of a channel (shape
    ``[B, C, 1, 1]``; Guttenberg 2023) which lets the model change the mean brightness of an image. Drawn on the
    generator's device (`draw_device`), then moved to ``device``."""
    noise = torch.randn(shape, generator=generator, dtype=dtype, device=draw_device(generator)).to(device)
    if noise_offset:
        offset = torch.randn((shape[0], shape[1], *([1] * (len(shape) - 2))), generator=generator, dtype=dtype,
                             device=draw_device(generator))
        noise = noise + noise_offset * offset.to(device)
    return noise


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ Uniform{0, ..., T-1} (Diffusers' 0-based index of DDPM's t ∈ {1, ..., T}), on the generator's device."""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=draw_device(generator))


def caption_dropout_mask(batch_size: int, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """BoolTensor[B], True where the caption is replaced by the empty prompt (probability ``probability``).

    Training on c = "" a fraction p of the time teaches the same network the unconditional ε_θ(x_t, t, ∅) that
    classifier-free guidance needs (Ho & Salimans 2022).
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"caption_dropout_prob must be in [0, 1], got {probability}.")
    return torch.rand(batch_size, generator=generator, device=draw_device(generator)) < probability


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error between prediction and target: L_simple = mean ||target - pred||², or with
    ``snr_gamma`` the Min-SNR-γ weighted mean  (1/B) Σ_b w_b · mean_pixels (target_b - pred_b)²."""
    if not snr_gamma:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.ndim)))
    weights = min_snr_weights(snr(timesteps, alphas_cumprod), snr_gamma, prediction_type).to(per_sample.device)
    return (per_sample * weights).mean()
