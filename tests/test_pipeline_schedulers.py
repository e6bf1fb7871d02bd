"""ldm_pipeline.schedulers: every name builds its Diffusers class on the same noise schedule, latents are not
clipped, unknown names list the known ones, and ``Scheduler.from_config`` swapping keeps the schedule; one set of
sampling defaults, and the scheduler a trained pipeline is saved with."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

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
from ldm_pipeline import LatentDiffusionPipeline, scheduler_from_name
from ldm_pipeline.diffusion import build_noise_scheduler
from ldm_pipeline.schedulers import ALIASES, SAMPLING_DEFAULTS, SCHEDULER_NAMES, SCHEDULERS
from ldm_pipeline.unet import sampling_scheduler

REPO = Path(__file__).resolve().parent.parent
DEMO_SCHEDULE = json.loads((REPO / "configs" / "demo" / "unet.json").read_text())["model"]["noise_scheduler"]

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


# ------------------------------------------------------------------------------------------------ sampling defaults


def test_one_set_of_sampling_defaults_everywhere():
    """``SAMPLING_DEFAULTS`` is what ``__call__``, ldm-generate, ldm-eval and the training validation grids use when
    nothing is given, what both ``--help`` texts show, and what the demo evaluates with."""
    from ldm_pipeline.cli_eval import build_parser as eval_parser
    from ldm_pipeline.cli_eval import sampling_flags
    from ldm_pipeline.cli_generate import build_parser as generate_parser
    from ldm_pipeline.config import UNetTrainingConfig

    assert dataclasses.asdict(SAMPLING_DEFAULTS) == {"scheduler": "dpm++", "num_inference_steps": 20,
                                                     "guidance_scale": 5.0, "guidance_interval": None}
    call = inspect.signature(LatentDiffusionPipeline.__call__).parameters
    assert (call["num_inference_steps"].default, call["guidance_scale"].default, call["guidance_interval"].default) \
        == (20, 5.0, None)
    for parser, argv in ((generate_parser(), ["--model", "m", "--prompt", "p", "--out", "o"]),
                         (eval_parser(), ["--model", "m", "--out", "o"])):
        args = parser.parse_args(argv)
        assert (args.scheduler, args.steps, args.guidance_scale, args.guidance_interval) == ("dpm++", 20, 5.0, None)
        help_text = " ".join(parser.format_help().split())
        assert all(f"(default: {value})." in help_text for value in ("dpm++", 20, 5.0)), parser.prog
    fields = {f.name: f.default for f in dataclasses.fields(UNetTrainingConfig)}
    assert (fields["validation_scheduler"], fields["validation_num_inference_steps"],
            fields["validation_guidance_scale"]) == ("dpm++", 20, 5.0)
    demo_eval = json.loads((REPO / "configs" / "demo" / "eval.json").read_text())
    assert sampling_flags(demo_eval) == [] and sampling_flags({"steps": 2, "scheduler": "ddim"}) == [
        "--scheduler", "ddim", "--steps", "2"]


def test_call_without_arguments_samples_with_the_defaults():
    pipe = make_tiny_pipeline("clip", scheduler=sampling_scheduler(build_noise_scheduler(DEMO_SCHEDULE)))
    default = pipe("a red cat", output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert pipe.num_timesteps == 20 and pipe.guidance_scale == 5.0
    explicit = pipe("a red cat", num_inference_steps=20, guidance_scale=5.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(default, explicit)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_saved_scheduler_is_the_measured_dpm_solver_on_the_training_schedule(prediction_type, tmp_path):
    """``train_unet.py`` saves DPM-Solver++ built from the training DDPMScheduler exactly as ``set_scheduler("dpm++")``
    builds it on a pipeline saved with that DDPMScheduler (how the defaults were measured): same config, same
    timesteps, no clipping; loading it back and applying the CLIs' default ``--scheduler dpm++`` changes nothing."""
    training = build_noise_scheduler(DEMO_SCHEDULE, prediction_type)
    saved = sampling_scheduler(training)
    assert type(saved) is DPMSolverMultistepScheduler and saved.config.algorithm_type == "dpmsolver++"
    assert saved.config.prediction_type == prediction_type and saved.config.clip_sample is False
    torch.testing.assert_close(saved.alphas_cumprod, training.alphas_cumprod)

    training.save_pretrained(tmp_path / "ddpm")
    measured = scheduler_from_name("dpm++", DDPMScheduler.from_pretrained(tmp_path / "ddpm"))
    saved.save_pretrained(tmp_path / "dpm")
    reloaded = DPMSolverMultistepScheduler.from_pretrained(tmp_path / "dpm")
    for scheduler in (saved, reloaded, scheduler_from_name("dpm++", reloaded)):
        assert {k: v for k, v in scheduler.config.items() if k != "_use_default_values"} == \
            {k: v for k, v in measured.config.items() if k != "_use_default_values"}
        scheduler.set_timesteps(SAMPLING_DEFAULTS.num_inference_steps)
    measured.set_timesteps(SAMPLING_DEFAULTS.num_inference_steps)
    assert measured.timesteps.tolist() == list(range(940, 0, -47))  # "leading" spacing: 1000 // 21 = 47
    for scheduler in (saved, reloaded):
        assert scheduler.timesteps.tolist() == measured.timesteps.tolist()
