"""Sampling schedulers by name, built from any Diffusers scheduler config.

    scheduler = scheduler_from_name("dpm++", pipe.scheduler.config)
    pipe.scheduler = scheduler              # or pipe.set_scheduler("dpm++")

Every scheduler shares the training noise schedule (``num_train_timesteps``, ``beta_*``, ``prediction_type``)
recorded in the config; only the sampling rule changes. This is the same as
``SchedulerClass.from_config(pipe.scheduler.config)`` plus the few overrides a name implies (DPM-Solver++'s
``algorithm_type``). Latents are not confined to [-1, 1], so ``clip_sample`` is False unless the config says
otherwise (Diffusers' DDPM/DDIM default is pixel-space True).

``SAMPLING_DEFAULTS`` is the one set of sampling settings used wherever none are given: the scheduler a trained
pipeline is saved with, ``LatentDiffusionPipeline.__call__``, ``ldm-generate``, ``ldm-eval`` and the web page.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
    "kdpm2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm++_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "dpm_singlestep": (DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver++"}),
    "deis": (DEISMultistepScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
ALIASES = {
    "dpmsolver++": "dpm++",
    "dpm_solver++": "dpm++",
    "dpm++_2m": "dpm++",
    "dpmsolver++_sde": "dpm++_sde",
    "dpm++_2m_sde": "dpm++_sde",
    "euler_ancestral": "euler_a",
    "k_lms": "lms",
    "kdpm2_ancestral": "kdpm2_a",
}
SCHEDULER_NAMES = tuple(SCHEDULERS) + tuple(ALIASES)


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampler, steps and guidance used when none are given. DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) with
    20 steps and guidance 5 scored best on the demo pipeline, within 0.011 of 250 DDPM steps
    (docs/sampling.md); ``guidance_interval`` None guides every step."""

    scheduler: str = "dpm++"
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    guidance_interval: tuple[float, float] | None = None


SAMPLING_DEFAULTS = SamplingDefaults()


def scheduler_from_name(name: str, config: Mapping[str, Any] | SchedulerMixin | None = None) -> SchedulerMixin:
    """The scheduler called ``name`` (case-insensitive, ``-`` same as ``_``) on the noise schedule of ``config``.

    ``config`` is a scheduler config (``pipe.scheduler.config``), a scheduler, or None for Diffusers' defaults.
    Unknown names raise ``ValueError`` listing the valid ones.
    """
    key = str(name).strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}: choose one of {', '.join(SCHEDULER_NAMES)}.")
    scheduler_class, overrides = SCHEDULERS[key]
    if isinstance(config, SchedulerMixin):
        config = config.config
    config = dict(config or {})
    overrides = dict(overrides)
    if "clip_sample" in inspect.signature(scheduler_class.__init__).parameters and "clip_sample" not in config:
        overrides["clip_sample"] = False
    return scheduler_class.from_config(config, **overrides)


def timestep_sigma(scheduler: SchedulerMixin, timestep: float | torch.Tensor) -> float:
    """The noise level ``σ_t = sqrt((1 - ᾱ_t) / ᾱ_t)`` of training timestep ``t`` on ``scheduler``'s schedule.

    ``σ`` is the standard deviation of the noise in ``z_t / sqrt(ᾱ_t) = z_0 + σ_t ε``, the variance-exploding
    view of the variance-preserving process (Karras et al. 2022, arXiv:2206.00364, Table 1). Fractional timesteps
    (Euler-type samplers with ``timestep_spacing="linspace"``) are interpolated linearly in ``t``, as those
    schedulers do. Raises ``ValueError`` for a scheduler without ``alphas_cumprod``.
    """
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(f"{type(scheduler).__name__} has no `alphas_cumprod`, so its timesteps have no noise level "
                         "σ: use a DDPM-family scheduler (ddpm, ddim, dpm++, euler, unipc, ...).")
    alphas_cumprod = np.asarray(torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu())
    sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    return float(np.interp(float(timestep), np.arange(len(sigmas)), sigmas))


def in_guidance_interval(scheduler: SchedulerMixin, timestep: float | torch.Tensor,
                         guidance_interval: tuple[float, float] | None) -> bool:
    """Whether ``σ_lo < σ_t <= σ_hi`` for ``guidance_interval = (σ_lo, σ_hi)`` (always True for None).

    The interval of noise levels in which Kynkäänniemi et al. 2024 (arXiv:2404.07724) apply classifier-free
    guidance; ``σ_t`` as in ``timestep_sigma``.
    """
    if guidance_interval is None:
        return True
    low, high = guidance_interval
    return low < timestep_sigma(scheduler, timestep) <= high
