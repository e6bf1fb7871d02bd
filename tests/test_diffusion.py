"""ldm_pipeline.diffusion against DDPM's equations (Ho et al. 2020, arXiv:2006.11239: eq. 4, x_t = sqrt(ᾱ_t) x_0 +
sqrt(1 - ᾱ_t) ε with α_t = 1 - β_t, ᾱ_t = ∏ α_i; eq. 14, L_simple = ||ε - ε_θ||²) and against Diffusers'
implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ldm_pipeline.diffusion import (
    add_noise,
    build_noise_scheduler,
    caption_dropout_mask,
    diffusion_loss,
    min_snr_weights,
    sample_noise,
    snr,
    training_target,
    velocity,
)

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def notes_alpha_bar(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = α_1 α_2 ... α_t with α_t = 1 - β_t, written as the product loop of the notes (float64)."""
    alpha_bar, running = [], 1.0
    for beta in betas.double().tolist():
        running *= 1.0 - beta
        alpha_bar.append(running)
    return torch.tensor(alpha_bar, dtype=torch.float64)


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_add_noise_is_the_notes_closed_form_and_matches_diffusers(beta_schedule):
    scheduler = build_noise_scheduler({"beta_schedule": beta_schedule})
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 3, 3, generator=generator, dtype=torch.float64)
    noise = torch.randn(5, 4, 3, 3, generator=generator, dtype=torch.float64)
    timesteps = torch.tensor([0, 1, 250, 600, 999])

    alpha_bar = notes_alpha_bar(scheduler.betas)
    expected = torch.stack([math.sqrt(alpha_bar[t]) * x0[i] + math.sqrt(1 - alpha_bar[t]) * noise[i]
                            for i, t in enumerate(timesteps.tolist())])
    ours = add_noise(x0, noise, timesteps, alpha_bar)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)

    ours_float = add_noise(x0.float(), noise.float(), timesteps, scheduler.alphas_cumprod)
    diffusers_float = scheduler.add_noise(x0.float(), noise.float(), timesteps)
    torch.testing.assert_close(ours_float, diffusers_float, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_float.double(), expected, rtol=1e-4, atol=1e-5)


def test_q_xt_given_x0_has_the_notes_mean_and_variance():
    """q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I), estimated from 200k draws."""
    scheduler = build_noise_scheduler({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02})
    t = 300
    alpha_bar = notes_alpha_bar(scheduler.betas)[t].item()
    x0 = torch.full((200_000,), 1.5)
    noise = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    xt = add_noise(x0, noise, torch.full((200_000,), t), scheduler.alphas_cumprod)
    assert xt.mean().item() == pytest.approx(math.sqrt(alpha_bar) * 1.5, abs=0.01)
    assert xt.var().item() == pytest.approx(1 - alpha_bar, rel=0.02)


def test_velocity_target_matches_diffusers_and_definition():
    scheduler = build_noise_scheduler({"beta_schedule": "scaled_linear", "prediction_type": "v_prediction"})
    generator = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    timesteps = torch.tensor([5, 500, 990])
    v = velocity(x0, noise, timesteps, scheduler.alphas_cumprod)
    torch.testing.assert_close(v, scheduler.get_velocity(x0, noise, timesteps))
    abar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(v, abar.sqrt() * noise - (1 - abar).sqrt() * x0)
    torch.testing.assert_close(training_target(x0, noise, timesteps, scheduler.alphas_cumprod, "v_prediction"), v)
    assert training_target(x0, noise, timesteps, scheduler.alphas_cumprod, "epsilon") is noise
    with pytest.raises(ValueError, match="prediction_type"):
        training_target(x0, noise, timesteps, scheduler.alphas_cumprod, "sample")


def test_build_noise_scheduler_schedules_and_clip_sample():
    linear = build_noise_scheduler({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                                    "num_train_timesteps": 100, "clip_sample": True})
    assert isinstance(linear, DDPMScheduler)
    assert linear.config.clip_sample is False
    torch.testing.assert_close(linear.betas, torch.linspace(1e-4, 0.02, 100))
    scaled = build_noise_scheduler({"beta_schedule": "scaled_linear", "num_train_timesteps": 100})
    torch.testing.assert_close(scaled.betas, torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 100) ** 2)
    cosine = build_noise_scheduler({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000})
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  Nichol & Dhariwal eq. 17
    assert cosine.alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-4)
    assert build_noise_scheduler({}, prediction_type="v_prediction").config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="beta_schedule"):
        build_noise_scheduler({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type"):
        build_noise_scheduler({}, prediction_type="sample")


def test_snr_and_min_snr_weights():
    scheduler = build_noise_scheduler({"beta_schedule": "squaredcos_cap_v2"})
    timesteps = torch.tensor([0, 100, 500, 999])
    torch.testing.assert_close(snr(timesteps, scheduler.alphas_cumprod), compute_snr(scheduler, timesteps))

    values = torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weights(values, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weights(values, 5.0, "v_prediction"),
                               torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 51.0]))
    with pytest.raises(ValueError, match="prediction_type"):
        min_snr_weights(values, 5.0, "sample")


def test_diffusion_loss_is_l_simple_or_min_snr_weighted():
    scheduler = build_noise_scheduler({"beta_schedule": "linear"})
    generator = torch.Generator().manual_seed(3)
    pred, target = torch.randn(4, 4, 2, 2, generator=generator), torch.randn(4, 4, 2, 2, generator=generator)
    timesteps = torch.tensor([1, 10, 400, 900])
    assert diffusion_loss(pred, target, timesteps, scheduler.alphas_cumprod).item() == pytest.approx(
        ((pred - target) ** 2).mean().item(), rel=1e-6)

    snr_t = scheduler.alphas_cumprod[timesteps] / (1 - scheduler.alphas_cumprod[timesteps])
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    for prediction_type, weights in (("epsilon", torch.clamp(snr_t, max=5.0) / snr_t),
                                     ("v_prediction", torch.clamp(snr_t, max=5.0) / (snr_t + 1))):
        expected = (weights * per_sample).mean()
        got = diffusion_loss(pred, target, timesteps, scheduler.alphas_cumprod, prediction_type, snr_gamma=5.0)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    reference = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))  # Diffusers' example, eps branch
    weights = torch.stack([snr_t, 5.0 * torch.ones_like(snr_t)], dim=1).min(dim=1)[0] / snr_t
    assert diffusion_loss(pred, target, timesteps, scheduler.alphas_cumprod, "epsilon", 5.0).item() == pytest.approx(
        (reference * weights).mean().item(), rel=1e-5)


def test_offset_noise_adds_one_constant_per_channel():
    shape = (3, 4, 5, 5)
    plain = sample_noise(shape, torch.Generator().manual_seed(4))
    offset = sample_noise(shape, torch.Generator().manual_seed(4), noise_offset=0.1)
    difference = offset - plain
    assert difference.abs().max() > 0
    torch.testing.assert_close(difference, difference[:, :, :1, :1].expand(shape))
    generator = torch.Generator().manual_seed(4)
    torch.randn(shape, generator=generator)
    torch.testing.assert_close(difference, 0.1 * torch.randn(3, 4, 1, 1, generator=generator).expand(shape))


def test_caption_dropout_rate_and_seeding():
    mask = caption_dropout_mask(40_000, 0.1, torch.Generator().manual_seed(5))
    rate = mask.float().mean().item()
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 40_000)
    torch.testing.assert_close(mask, caption_dropout_mask(40_000, 0.1, torch.Generator().manual_seed(5)))
    assert not torch.equal(mask, caption_dropout_mask(40_000, 0.1, torch.Generator().manual_seed(6)))
    assert not caption_dropout_mask(100, 0.0).any() and caption_dropout_mask(100, 1.0).all()
    with pytest.raises(ValueError, match="caption_dropout_prob"):
        caption_dropout_mask(4, 1.5)
