"""ldm_pipeline.schedulers: every name builds its Diffusers class on the same noise schedule, latents are not
clipped, unknown names list the known ones, and ``Scheduler.from_config`` swapping keeps the schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

from conftest import make_tiny_pipeline
from ldm_pipeline import scheduler_from_name
from ldm_pipeline.schedulers import ALIASES, SCHEDULER_NAMES, SCHEDULERS

TRAINING_SCHEDULE = dict(
    num_train_timesteps=500, beta_schedule="linear", beta_start=0.0002, beta_end=0.03, prediction_type="v_prediction"
)


@pytest.fixture(scope="module")
def training_scheduler():
    return DDPMScheduler(**TRAINING_SCHEDULE, clip_sample=False)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_name_keeps_the_training_noise_schedule(name, training_scheduler):
    scheduler = scheduler_from_name(name, training_scheduler.config)
    expected_class, overrides = SCHEDULERS[name]
    assert type(scheduler) is expected_class
    for key, value in {**TRAINING_SCHEDULE, **overrides}.items():
        assert scheduler.config[key] == value, key
    torch.testing.assert_close(scheduler.alphas_cumprod, training_scheduler.alphas_cumprod)
    assert not scheduler.config.get("clip_sample", False)
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) >= 4


def test_names_are_case_and_dash_insensitive_and_aliases_resolve(training_scheduler):
    assert isinstance(scheduler_from_name("DPM-Solver++", training_scheduler), DPMSolverMultistepScheduler)
    assert isinstance(scheduler_from_name(" Euler-A ", training_scheduler), EulerAncestralDiscreteScheduler)
    for alias, target in ALIASES.items():
        assert type(scheduler_from_name(alias, training_scheduler)) is SCHEDULERS[target][0]
    assert scheduler_from_name("dpm++_sde").config.algorithm_type == "sde-dpmsolver++"


def test_without_a_config_diffusers_defaults_but_no_clipping():
    ddpm = scheduler_from_name("ddpm")
    assert ddpm.config.num_train_timesteps == 1000 and ddpm.config.clip_sample is False
    assert scheduler_from_name("ddim", {"clip_sample": True}).config.clip_sample is True  # an explicit choice stays


def test_unknown_name_lists_every_known_name():
    with pytest.raises(ValueError) as error:
        scheduler_from_name("ddpn")
    message = str(error.value)
    assert message.startswith("Unknown scheduler 'ddpn': choose one of")
    assert all(name in message for name in SCHEDULER_NAMES)


def test_from_config_swapping_in_the_pipeline_keeps_the_schedule():
    pipe = make_tiny_pipeline("clip", scheduler=DDPMScheduler(**TRAINING_SCHEDULE, clip_sample=False))
    reference = pipe.scheduler.alphas_cumprod
    for scheduler_class in (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler):
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
        assert type(pipe.scheduler) is scheduler_class
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        torch.testing.assert_close(pipe.scheduler.alphas_cumprod, reference)
        images = pipe("a red cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
        assert images.images.shape == (1, 16, 16, 3) and np.isfinite(images.images).all()
    pipe.set_scheduler("euler_a")
    assert type(pipe.scheduler) is EulerAncestralDiscreteScheduler
    assert pipe.scheduler.config.num_train_timesteps == 500
