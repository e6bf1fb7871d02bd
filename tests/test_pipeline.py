"""LatentDiffusionPipeline on a tiny random pipeline: every __call__ argument, classifier-free guidance, the
reference check against Diffusers' StableDiffusionPipeline, DDPM/DDIM steps against the papers' formulas,
save/load, bad input, xFormers fallback and the ldm-generate CLI."""

from __future__ import annotations

import io
import math
import re
import json
import logging

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from transformers import CLIPTextModel, T5EncoderModel

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.pipeline_latent_diffusion import check_guidance_interval
from ldm_pipeline.schedulers import SAMPLING_DEFAULTS, timestep_sigma
from ldm_pipeline.cli_generate import main as generate_main
from ldm_pipeline.prompt_encoding import encode_prompts, tokenize_prompts

from conftest import (
    TINY_HIDDEN,
    TINY_SCHEDULE,
    make_tiny_clip,
    make_tiny_scheduler,
    make_tiny_t5,
    make_tiny_tokenizer,
    make_tiny_unet,
    make_tiny_vae,
)

MAX_LENGTH = 8
HIDDEN = TINY_HIDDEN
IMAGE_SIZE = 16  # unet sample_size 8 × vae_scale_factor 2
LATENT_SHAPE = (4, 8, 8)
PROMPTS = ["a red cat", "two blue squares left of a star"]
SCHEDULE = TINY_SCHEDULE
ddim_scheduler = make_tiny_scheduler


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer(MAX_LENGTH)


def make_clip(tokenizer) -> CLIPTextModel:
    return make_tiny_clip(tokenizer)


def make_t5(tokenizer) -> T5EncoderModel:
    return make_tiny_t5(tokenizer)


def make_vae() -> AutoencoderKL:
    return make_tiny_vae(IMAGE_SIZE)


def make_unet() -> UNet2DConditionModel:
    return make_tiny_unet(IMAGE_SIZE // 2)


@pytest.fixture(scope="module")
def components(tokenizer):
    return dict(vae=make_vae(), text_encoder=make_clip(tokenizer), tokenizer=tokenizer, unet=make_unet())


def make_pipeline(components, scheduler=None) -> LatentDiffusionPipeline:
    pipe = LatentDiffusionPipeline(**components, scheduler=scheduler or ddim_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def pipe(components):
    return make_pipeline(components)


@pytest.fixture(scope="module")
def pipeline_dir(components, tmp_path_factory):
    directory = tmp_path_factory.mktemp("pipeline")
    make_pipeline(components).save_pretrained(directory)
    return directory


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run(pipe, prompt=PROMPTS, steps=3, **kwargs):
    kwargs.setdefault("generator", seeded())
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("guidance_scale", 3.0)
    return pipe(prompt, num_inference_steps=steps, **kwargs).images


class UNetSpy(torch.nn.Module):
    """Records every U-Net call's inputs and output."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.calls = []

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False, **kwargs):
        output = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)
        self.calls.append({"sample": sample, "t": timestep, "context": encoder_hidden_states, "output": output[0]})
        return output


def spied_pipeline(components, scheduler) -> tuple[LatentDiffusionPipeline, UNetSpy]:
    pipe = make_pipeline(components, scheduler)
    spy = UNetSpy(components["unet"])
    pipe.unet = spy
    return pipe, spy


def embed(components, prompts):
    ids = tokenize_prompts(components["tokenizer"], prompts)
    return encode_prompts(components["text_encoder"], ids.input_ids, ids.attention_mask)


# ------------------------------------------------------------------------------------------------ save / load


def test_save_load_round_trip_gives_identical_images(pipe, pipeline_dir):
    model_index = json.loads((pipeline_dir / "model_index.json").read_text())
    assert model_index["_class_name"] == "LatentDiffusionPipeline"
    assert model_index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert model_index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert list(pipeline_dir.joinpath("unet").glob("*.safetensors"))
    assert not list(pipeline_dir.rglob("*.py"))  # a saved pipeline holds no code

    loaded = LatentDiffusionPipeline.from_pretrained(pipeline_dir)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is LatentDiffusionPipeline
    assert loaded.vae_scale_factor == 2
    np.testing.assert_array_equal(run(loaded), run(pipe))


def test_from_pretrained_on_a_directory_without_a_pipeline(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no pipeline.*model_index.json"):
        LatentDiffusionPipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a pipeline directory"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a pipeline directory"):
        LatentDiffusionPipeline.from_pretrained("runs/demo/missing_pipeline")
    with pytest.raises(FileNotFoundError, match="neither a local pipeline directory nor a Hub repo"):
        LatentDiffusionPipeline.from_pretrained("missing/pipeline", local_files_only=True)


def test_to_dtype_converts_every_component(tokenizer):
    """fp64 sampling from the same (fp32) noise agrees with fp32; fresh noise would differ (randn draws per dtype)."""
    pipe = make_pipeline(dict(vae=make_vae(), text_encoder=make_clip(tokenizer), tokenizer=tokenizer, unet=make_unet()))
    noise = torch.randn(2, *LATENT_SHAPE, generator=seeded(1))
    reference = run(pipe, output_type="pt", latents=noise)
    pipe = pipe.to("cpu", torch.float64)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float64
    images = run(pipe, output_type="pt", latents=noise)
    assert images.dtype == torch.float64
    torch.testing.assert_close(images.float(), reference, atol=1e-4, rtol=0)
    pipe = pipe.to(torch.float32)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    torch.testing.assert_close(run(pipe, output_type="pt", latents=noise), reference)


# ------------------------------------------------------------------------------------------------ __call__ arguments


def test_output_types_shapes_and_agreement(pipe):
    as_np = run(pipe, output_type="np")
    as_pt = run(pipe, output_type="pt")
    as_pil = run(pipe, output_type="pil")
    as_latent = run(pipe, output_type="latent")
    assert as_np.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and 0 <= as_np.min() and as_np.max() <= 1
    assert as_pt.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert as_latent.shape == (2, *LATENT_SHAPE)
    assert len(as_pil) == 2 and all(isinstance(im, Image.Image) and im.size == (IMAGE_SIZE,) * 2 for im in as_pil)
    np.testing.assert_allclose(as_pt.permute(0, 2, 3, 1).numpy(), as_np, atol=1e-6)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in as_pil]), (as_np * 255).round().astype(np.uint8))
    with torch.no_grad():
        decoded = pipe.vae.decode(as_latent / pipe.vae.config.scaling_factor).sample
    np.testing.assert_allclose((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), as_np, atol=1e-6)


def test_returned_tensors_are_ordinary_tensors(pipe):
    """Sampling runs in inference mode; what comes back may still be modified in place and used with autograd."""
    for output_type in ("pt", "latent"):
        images = run(pipe, steps=1, output_type=output_type)
        assert not images.is_inference()
        images.mul_(2)
        weight = torch.ones((), requires_grad=True)
        (images * weight).sum().backward()
        assert weight.grad is not None
    (latents,) = pipe(PROMPTS, num_inference_steps=1, output_type="latent", return_dict=False)
    assert not latents.is_inference()


def test_return_dict_false_returns_a_tuple(pipe):
    output = pipe(PROMPTS[0], num_inference_steps=2, output_type="np", return_dict=False, generator=seeded())
    assert isinstance(output, tuple) and len(output) == 1
    expected = run(pipe, PROMPTS[0], steps=2, guidance_scale=SAMPLING_DEFAULTS.guidance_scale)  # the default
    np.testing.assert_array_equal(output[0], expected)


def test_height_width_default_and_override(pipe):
    assert run(pipe, steps=1).shape[1:3] == (IMAGE_SIZE, IMAGE_SIZE)
    assert run(pipe, steps=1, height=8, width=24).shape[1:3] == (8, 24)


def test_num_images_per_prompt_groups_images_by_prompt(pipe):
    noise = torch.randn(4, *LATENT_SHAPE, generator=seeded(1))
    images = run(pipe, num_images_per_prompt=2, latents=noise)
    assert images.shape[0] == 4
    for index, prompt in enumerate(PROMPTS):
        alone = run(pipe, [prompt], num_images_per_prompt=2, latents=noise[2 * index : 2 * index + 2])
        np.testing.assert_allclose(images[2 * index : 2 * index + 2], alone, atol=1e-5)


def test_one_generator_per_image(pipe):
    generators = [seeded(seed) for seed in (4, 5)]
    images = run(pipe, generator=generators)
    for index, seed in enumerate((4, 5)):
        alone = run(pipe, [PROMPTS[index]], generator=seeded(seed))
        np.testing.assert_allclose(images[index : index + 1], alone, atol=1e-5)
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        run(pipe, generator=[seeded(seed) for seed in range(3)])


def test_given_latents_are_the_initial_noise(pipe):
    noise = torch.randn(2, *LATENT_SHAPE, generator=seeded(0))
    from_latents = run(pipe, latents=noise, generator=seeded(123))
    np.testing.assert_array_equal(from_latents, run(pipe, latents=noise, generator=seeded(7)))
    np.testing.assert_array_equal(from_latents, run(pipe, generator=seeded(0)))
    assert not np.allclose(from_latents, run(pipe, generator=seeded(1)))


def test_prompt_embeds_path_equals_prompt_path(pipe, components):
    expected = run(pipe, negative_prompt=["a dog", "a cat"])
    given = run(
        pipe,
        prompt=None,
        prompt_embeds=embed(components, PROMPTS),
        negative_prompt_embeds=embed(components, ["a dog", "a cat"]),
    )
    np.testing.assert_array_equal(given, expected)
    np.testing.assert_array_equal(run(pipe, prompt=None, prompt_embeds=embed(components, PROMPTS)), run(pipe))


def test_negative_prompt_changes_the_output_and_empty_is_the_default(pipe):
    default = run(pipe)
    np.testing.assert_array_equal(run(pipe, negative_prompt=""), default)
    assert np.abs(run(pipe, negative_prompt="green dog") - default).max() > 1e-4
    # a negative prompt only acts through guidance
    np.testing.assert_array_equal(run(pipe, guidance_scale=1.0, negative_prompt="green dog"), run(pipe, guidance_scale=1.0))


def test_callback_on_step_end_sees_every_step_and_can_replace_latents(pipe):
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, int(timestep), callback_kwargs["latents"].clone(), callback_kwargs["prompt_embeds"].shape))
        if step == len(pipeline.scheduler.timesteps) - 1:
            return {"latents": torch.full_like(callback_kwargs["latents"], 0.5)}
        return {}

    latents = run(
        pipe,
        steps=4,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert all(shape == (4, MAX_LENGTH, HIDDEN) for *_, shape in seen)  # [negative; positive] under guidance
    torch.testing.assert_close(latents, torch.full((2, *LATENT_SHAPE), 0.5))
    assert not torch.allclose(seen[0][2], seen[1][2])


def test_progress_bar_counts_the_steps(pipe):
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream, disable=False, ncols=80)
    run(pipe, steps=3)
    assert "3/3" in stream.getvalue()


# ------------------------------------------------------------------------------------------------ guidance


def manual_sampling_loop(components, scheduler, prompts, negative_prompts, noise, steps, guidance_scale,
                         guided_sigmas=None):
    """The sampling algorithm written out: eps = eps_u + w (eps_c - eps_u); z <- scheduler.step(eps, t, z).

    With ``guided_sigmas=(lo, hi)``, w applies only where lo < σ_t <= hi, σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) computed here
    from the betas with numpy (Kynkäänniemi et al. 2024); elsewhere eps = eps_c."""
    unet = components["unet"]
    cond = embed(components, prompts)
    uncond = embed(components, negative_prompts)
    scheduler.set_timesteps(steps)
    alpha_bar = np.cumprod(1 - scheduler.betas.double().numpy())
    sigma = np.sqrt((1 - alpha_bar) / alpha_bar)
    latents = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            eps_cond = unet(model_input, t, encoder_hidden_states=cond).sample
            sigma_t = np.interp(float(t), np.arange(len(sigma)), sigma)
            in_interval = guided_sigmas is None or guided_sigmas[0] < sigma_t <= guided_sigmas[1]
            if guidance_scale > 1 and in_interval:
                eps_uncond = unet(model_input, t, encoder_hidden_states=uncond).sample
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            else:
                eps = eps_cond
            latents = scheduler.step(eps, t, latents).prev_sample
    return latents


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_classifier_free_guidance_equals_the_formula_in_one_batched_unet_call(components, guidance_scale):
    noise = torch.randn(2, *LATENT_SHAPE, generator=seeded(3))
    pipe, spy = spied_pipeline(components, EulerDiscreteScheduler(**SCHEDULE))
    latents = run(pipe, guidance_scale=guidance_scale, latents=noise, steps=3, output_type="latent")

    guided = guidance_scale > 1
    assert len(spy.calls) == 3
    assert all(call["sample"].shape[0] == (4 if guided else 2) for call in spy.calls)
    if guided:
        first = spy.calls[0]
        torch.testing.assert_close(first["sample"][:2], first["sample"][2:])
        torch.testing.assert_close(first["context"][:2], embed(components, ["", ""]))
        torch.testing.assert_close(first["context"][2:], embed(components, PROMPTS))

    expected = manual_sampling_loop(
        components, EulerDiscreteScheduler(**SCHEDULE), PROMPTS, ["", ""], noise, 3, guidance_scale
    )
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)  # batched vs separate calls: float32 noise


def test_timestep_sigma_equals_the_euler_schedulers_own_sigmas():
    scheduler = EulerDiscreteScheduler(**SCHEDULE)
    scheduler.set_timesteps(7)
    assert any(float(t) != int(t) for t in scheduler.timesteps)  # fractional timesteps: interpolated
    ours = [timestep_sigma(scheduler, t) for t in scheduler.timesteps]
    np.testing.assert_allclose(ours, scheduler.sigmas[:-1].numpy(), rtol=1e-5)


def test_guidance_interval_guides_only_the_steps_inside_it(components):
    noise = torch.randn(2, *LATENT_SHAPE, generator=seeded(3))
    scheduler = EulerDiscreteScheduler(**SCHEDULE)
    scheduler.set_timesteps(4)
    sigmas = scheduler.sigmas[:-1].tolist()  # decreasing
    interval = ((sigmas[2] + sigmas[3]) / 2, (sigmas[0] + sigmas[1]) / 2)  # guides steps 1 and 2 only
    pipe, spy = spied_pipeline(components, EulerDiscreteScheduler(**SCHEDULE))
    latents = run(pipe, guidance_scale=4.0, guidance_interval=interval, latents=noise, steps=4, output_type="latent")

    assert [call["sample"].shape[0] for call in spy.calls] == [2, 4, 4, 2]
    torch.testing.assert_close(spy.calls[0]["context"], embed(components, PROMPTS))
    torch.testing.assert_close(spy.calls[1]["context"][:2], embed(components, ["", ""]))
    expected = manual_sampling_loop(
        components, EulerDiscreteScheduler(**SCHEDULE), PROMPTS, ["", ""], noise, 4, 4.0, guided_sigmas=interval
    )
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)
    unguided_everywhere = manual_sampling_loop(
        components, EulerDiscreteScheduler(**SCHEDULE), PROMPTS, ["", ""], noise, 4, 4.0
    )
    assert (latents - unguided_everywhere).abs().max() > 1e-3


def test_guidance_interval_covering_every_step_changes_nothing(pipe):
    np.testing.assert_array_equal(run(pipe, guidance_interval=(0.0, math.inf)), run(pipe))


@pytest.mark.parametrize("interval", [(5.0, 1.0), (-1.0, 2.0), (1.0, 1.0), (float("nan"), 1.0), (1.0,), "wide"])
def test_guidance_interval_rejects_what_is_not_an_interval(pipe, interval):
    with pytest.raises(ValueError, match="`guidance_interval`"):
        run(pipe, guidance_interval=interval)


def test_guidance_interval_needs_a_scheduler_with_a_noise_schedule():
    with pytest.raises(ValueError, match="`guidance_interval`: FlowMatchEulerDiscreteScheduler has no `alphas_cumprod`"):
        check_guidance_interval((0.5, 5.0), FlowMatchEulerDiscreteScheduler())


def test_cli_guidance_interval_flag(tiny_pipeline_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_pipeline_dir), "--prompt", "a red cat", "--steps", "3", "--guidance_scale", "3",
            "--guidance_interval", "1", "inf", "--out", str(tmp_path / "cli")]
    generate_main(argv)
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_scheduler(SAMPLING_DEFAULTS.scheduler)  # ldm-generate's default sampler
    expected = pipe("a red cat", num_inference_steps=3, guidance_scale=3.0, guidance_interval=(1.0, math.inf),
                    generator=seeded(0)).images[0]
    image = next((tmp_path / "cli").glob("000_000*.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(image)), np.asarray(expected))

    with pytest.raises(SystemExit):
        generate_main(argv[:-5] + ["--guidance_interval", "5", "1", "--out", str(tmp_path / "bad")])
    assert "`guidance_interval` (5.0, 1.0) must satisfy 0 <= σ_lo < σ_hi" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------ reference check


REFERENCE_SCHEDULERS = {
    "ddim": lambda: ddim_scheduler(),
    "ddim_eta": lambda: ddim_scheduler(),
    "ddpm": lambda: DDPMScheduler(**SCHEDULE, clip_sample=False, steps_offset=1),
    "euler": lambda: EulerDiscreteScheduler(**SCHEDULE, steps_offset=1),
    "euler_a": lambda: EulerAncestralDiscreteScheduler(**SCHEDULE, steps_offset=1),
    "dpm++": lambda: DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", steps_offset=1),
}


def make_reference_pipeline(components, scheduler) -> StableDiffusionPipeline:
    """Diffusers' own ``StableDiffusionPipeline`` on the same components (no safety checker), progress bar off."""
    reference = StableDiffusionPipeline(**components, scheduler=scheduler, safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.mark.parametrize("name", list(REFERENCE_SCHEDULERS))
def test_matches_stable_diffusion_pipeline(components, name):
    ours = make_pipeline(components, REFERENCE_SCHEDULERS[name]())
    reference = make_reference_pipeline(components, REFERENCE_SCHEDULERS[name]())
    kwargs = dict(
        negative_prompt=["a dog", ""],
        num_images_per_prompt=2,
        num_inference_steps=5,
        guidance_scale=4.0,
        eta=0.7 if name == "ddim_eta" else 0.0,
        output_type="np",
    )
    expected = reference(PROMPTS, generator=seeded(5), **kwargs).images
    images = ours(PROMPTS, generator=seeded(5), **kwargs).images
    assert images.shape == expected.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)
    latents = ours(PROMPTS, generator=seeded(5), **{**kwargs, "output_type": "latent"}).images
    expected_latents = reference(PROMPTS, generator=seeded(5), **{**kwargs, "output_type": "latent"}).images
    torch.testing.assert_close(latents, expected_latents, atol=1e-5, rtol=0)


def test_pooled_text_in_the_time_embedding_needs_no_extra_inputs(components):
    """A U-Net that also adds the attention-pooled text embedding to its time embedding (Imagen's global text
    conditioning, ``"addition_embed_type": "text"`` in configs/demo/unet.json) samples from ``encoder_hidden_states``
    alone: the pipeline still equals ``StableDiffusionPipeline``, and the pooled path changes the result."""
    unet = make_tiny_unet(IMAGE_SIZE // 2, addition_embed_type="text", addition_embed_type_num_heads=4)
    pooled = {**components, "unet": unet}
    ours = make_pipeline(pooled)
    reference = make_reference_pipeline(pooled, ddim_scheduler())
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, output_type="np")
    images = ours(PROMPTS, generator=seeded(3), **kwargs).images
    np.testing.assert_allclose(images, reference(PROMPTS, generator=seeded(3), **kwargs).images, atol=1e-5, rtol=0)
    with torch.no_grad():
        unet.add_embedding.proj.weight.mul_(3.0)
    assert np.abs(ours(PROMPTS, generator=seeded(3), **kwargs).images - images).max() > 1e-3


# ------------------------------------------------------------------------------------------------ DDPM / DDIM formulas


def replay_noise(seed, steps_with_noise):
    """The draws the pipeline makes from one generator: the initial latents, then one tensor per noisy step."""
    generator = seeded(seed)
    initial = torch.randn(2, *LATENT_SHAPE, generator=generator)
    return initial, [torch.randn(2, *LATENT_SHAPE, generator=generator) for _ in range(steps_with_noise)]


def record_latents(pipe, **kwargs):
    trajectory = []

    def callback(pipeline, step, timestep, callback_kwargs):
        trajectory.append(callback_kwargs["latents"].clone())
        return {}

    run(pipe, output_type="latent", callback_on_step_end=callback, **kwargs)
    return trajectory


def test_ddpm_with_fewer_steps_samples_the_skip_step_posterior(components):
    """x_{t-n} ~ q(x_{t-n} | x_t, x_0) with a = prod_{i=t-n+1..t} alpha_i, abar = alphas_cumprod (DDPM's
    posterior, Ho et al. 2020, arXiv:2006.11239, eqs. 6-7, for the n-step transition a = abar_t / abar_{t-n}):
    mean = [sqrt(a)/(1-a) x_t + sqrt(abar_{t-n})/(1-abar_{t-n}) x_0] · var,
    var  = (1 - abar_{t-n} - a + abar_t) / (1 - abar_t),   x_0 = (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t)."""
    scheduler = DDPMScheduler(**SCHEDULE, clip_sample=False)
    pipe, spy = spied_pipeline(components, scheduler)
    steps, seed = 4, 11
    trajectory = record_latents(pipe, steps=steps, guidance_scale=1.0, generator=seeded(seed))
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == [750, 500, 250, 0]

    alphas = (1 - scheduler.betas).double()
    abar = torch.cumprod(alphas, dim=0)
    initial, noises = replay_noise(seed, steps_with_noise=sum(t > 0 for t in timesteps))
    x_t = initial.double()
    n = 1000 // steps
    for index, t in enumerate(timesteps):
        eps = spy.calls[index]["output"].double()
        a = torch.prod(alphas[max(t - n + 1, 0) : t + 1])
        abar_t, abar_prev = abar[t], (abar[t - n] if t - n >= 0 else torch.tensor(1.0, dtype=torch.float64))
        x_0 = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
        variance = (1 - abar_prev - a + abar_t) / (1 - abar_t)
        mean = (a.sqrt() / (1 - a) * x_t + abar_prev.sqrt() / (1 - abar_prev) * x_0) * variance if t - n >= 0 else x_0
        expected = mean + variance.sqrt() * noises[index] if t > 0 else mean
        torch.testing.assert_close(trajectory[index].double(), expected, atol=2e-5, rtol=1e-4)
        assert torch.isclose(variance, (1 - abar_prev) / (1 - abar_t) * (1 - a))  # = (1-abar_{t-n})/(1-abar_t) · beta
        x_t = trajectory[index].double()


def ddim_expected_step(x_t, eps, abar_t, abar_prev, eta, noise):
    """DDIM: x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma(eta) = eta sqrt((1-abar_prev)/(1-abar_t)) sqrt(1 - abar_t/abar_prev)."""
    x_0 = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    sigma = eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()
    return abar_prev.sqrt() * x_0 + (1 - abar_prev - sigma**2).sqrt() * eps + sigma * noise


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_step_equals_the_ddim_formula(components, eta):
    scheduler = ddim_scheduler()
    pipe, spy = spied_pipeline(components, scheduler)
    steps, seed = 4, 13
    trajectory = record_latents(pipe, steps=steps, guidance_scale=1.0, eta=eta, generator=seeded(seed))
    timesteps = scheduler.timesteps.tolist()
    abar = scheduler.alphas_cumprod.double()
    initial, noises = replay_noise(seed, steps_with_noise=steps if eta > 0 else 0)
    x_t = initial.double()
    for index, t in enumerate(timesteps):
        prev = t - 1000 // steps
        abar_prev = abar[prev] if prev >= 0 else abar[0]  # set_alpha_to_one=False
        noise = noises[index] if eta > 0 else torch.zeros_like(x_t)
        expected = ddim_expected_step(x_t, spy.calls[index]["output"].double(), abar[t], abar_prev, eta, noise)
        torch.testing.assert_close(trajectory[index].double(), expected, atol=2e-5, rtol=1e-4)
        x_t = trajectory[index].double()


def test_euler_step_equals_the_euler_formula(components):
    """Euler (Karras et al. 2022, eps-prediction): input z / sqrt(sigma_i^2 + 1), z_{i+1} = z_i + (sigma_{i+1} - sigma_i) eps,
    sigma(t) = sqrt((1 - abar_t) / abar_t) interpolated at fractional t, z_0 = n sigma_max (Diffusers' choice for
    "linspace" spacing, ~ n sqrt(sigma_max^2 + 1) of the VP view)."""
    scheduler = EulerDiscreteScheduler(**SCHEDULE)
    pipe, spy = spied_pipeline(components, scheduler)
    steps, seed = 4, 17
    trajectory = record_latents(pipe, steps=steps, guidance_scale=1.0, generator=seeded(seed))
    abar = scheduler.alphas_cumprod.double().numpy()
    timesteps = np.linspace(0, 999, steps)[::-1]
    sigmas = [float(np.interp(t, np.arange(1000), ((1 - abar) / abar) ** 0.5)) for t in timesteps] + [0.0]
    initial, _ = replay_noise(seed, steps_with_noise=0)
    x = initial.double() * sigmas[0]
    for index in range(steps):
        call = spy.calls[index]
        torch.testing.assert_close(call["sample"].double(), x / (sigmas[index] ** 2 + 1) ** 0.5, atol=1e-5, rtol=1e-5)
        expected = x + (sigmas[index + 1] - sigmas[index]) * call["output"].double()
        torch.testing.assert_close(trajectory[index].double(), expected, atol=1e-4, rtol=1e-5)
        x = trajectory[index].double()


def test_dpm_solver_pp_step_equals_the_2m_formula(components):
    """DPM-Solver++(2M) (Lu et al. 2022), alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma),
    x0_i = (x - sigma_i eps) / alpha_i, h = lambda_next - lambda_i:
    first order   x_next = (sigma_next / sigma_i) x - alpha_next (e^-h - 1) x0_i
    second order  ... - 0.5 alpha_next (e^-h - 1) (x0_i - x0_{i-1}) h / (lambda_i - lambda_{i-1});
    first and last step first order (lower_order_final), the last lands on x0 (sigma = 0)."""
    scheduler = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++")
    pipe, spy = spied_pipeline(components, scheduler)
    steps, seed = 4, 19
    trajectory = record_latents(pipe, steps=steps, guidance_scale=1.0, generator=seeded(seed))
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == [999, 749, 500, 250]
    abar = scheduler.alphas_cumprod.double()
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = torch.log(alpha / sigma)
    x, _ = replay_noise(seed, steps_with_noise=0)
    x = x.double()
    previous_x0 = None
    for index, t in enumerate(timesteps):
        x0 = (x - sigma[t] * spy.calls[index]["output"].double()) / alpha[t]
        if index == steps - 1:
            expected = x0
        else:
            t_next = timesteps[index + 1]
            h = lam[t_next] - lam[t]
            expected = sigma[t_next] / sigma[t] * x - alpha[t_next] * torch.expm1(-h) * x0
            if index > 0:
                r = (lam[t] - lam[timesteps[index - 1]]) / h
                expected = expected - 0.5 * alpha[t_next] * torch.expm1(-h) * (x0 - previous_x0) / r
        torch.testing.assert_close(trajectory[index].double(), expected, atol=2e-5, rtol=1e-4)
        x, previous_x0 = trajectory[index].double(), x0


def test_ddim_eta_zero_is_deterministic_and_eta_positive_is_stochastic(pipe):
    noise = torch.randn(2, *LATENT_SHAPE, generator=seeded(0))
    deterministic = [run(pipe, latents=noise, eta=0.0, generator=seeded(seed)) for seed in (1, 2)]
    np.testing.assert_array_equal(*deterministic)
    stochastic = [run(pipe, latents=noise, eta=1.0, generator=seeded(seed)) for seed in (1, 2)]
    assert np.abs(stochastic[0] - stochastic[1]).max() > 1e-4
    np.testing.assert_array_equal(stochastic[0], run(pipe, latents=noise, eta=1.0, generator=seeded(1)))


def test_eta_is_ignored_with_a_warning_by_schedulers_without_it(components, caplog):
    pipe = make_pipeline(components, EulerDiscreteScheduler(**SCHEDULE))
    with caplog.at_level(logging.WARNING, logger="ldm_pipeline"):
        with_eta = run(pipe, eta=0.5)
    assert "eta=0.5 is ignored" in caplog.text
    np.testing.assert_array_equal(with_eta, run(pipe))


# ------------------------------------------------------------------------------------------------ T5 / prompts


def test_t5_text_encoder_path(tokenizer, tmp_path):
    t5 = make_t5(tokenizer)
    pipe = make_pipeline(dict(vae=make_vae(), text_encoder=t5, tokenizer=tokenizer, unet=make_unet()))
    ids = tokenize_prompts(tokenizer, PROMPTS)
    with_mask = t5(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    without_mask = t5(ids.input_ids).last_hidden_state
    embeds = encode_prompts(t5, ids.input_ids, ids.attention_mask)
    torch.testing.assert_close(embeds, with_mask)
    assert not torch.allclose(embeds, without_mask)

    seen = []
    callback = lambda p, i, t, kw: seen.append(kw["prompt_embeds"]) or {}  # noqa: E731
    images = run(pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()
    torch.testing.assert_close(seen[0][2:], with_mask)

    pipe.save_pretrained(tmp_path)
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.text_encoder, T5EncoderModel)
    np.testing.assert_array_equal(run(loaded), images)


def test_clip_is_encoded_without_the_padding_mask(components):
    ids = tokenize_prompts(components["tokenizer"], PROMPTS)
    assert ids.input_ids.shape == ids.attention_mask.shape == (2, MAX_LENGTH)
    expected = components["text_encoder"](ids.input_ids).last_hidden_state
    torch.testing.assert_close(encode_prompts(components["text_encoder"], ids.input_ids, ids.attention_mask), expected)


def test_too_long_prompt_is_truncated_with_a_warning_naming_the_removed_part(components, caplog):
    long_prompt = "a red cat left of a blue dog above two stars"
    with caplog.at_level(logging.WARNING, logger="ldm_pipeline"):
        ids = tokenize_prompts(components["tokenizer"], [long_prompt, "a cat"])
    assert ids.input_ids.shape == (2, MAX_LENGTH)
    assert ids.input_ids[0, -1] == components["tokenizer"].eos_token_id
    assert "'blue dog above two stars'" in caplog.text and f"up to {MAX_LENGTH} tokens" in caplog.text
    kept = tokenize_prompts(components["tokenizer"], ["a red cat left of a"])
    torch.testing.assert_close(ids.input_ids[:1], kept.input_ids)


# ------------------------------------------------------------------------------------------------ schedulers in the pipeline


def test_set_scheduler_and_from_config_swap(pipe):
    pipe.set_scheduler("dpm++")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.config.scheduler == ("diffusers", "DPMSolverMultistepScheduler")
    assert np.isfinite(run(pipe, steps=3)).all()
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    assert np.isfinite(run(pipe, steps=3)).all()
    with pytest.raises(ValueError, match="Unknown scheduler 'dpm\\+\\+3'.*ddim"):
        pipe.set_scheduler("dpm++3")


def test_a_scheduler_that_clips_latents_is_reported(pipe, caplog):
    pipe.scheduler = DDIMScheduler.from_config(EulerDiscreteScheduler(**SCHEDULE).config)  # DDIM's default: clip
    with caplog.at_level(logging.WARNING, logger="ldm_pipeline"):
        run(pipe, steps=1)
    assert "clip_sample=True" in caplog.text and "clip_sample=False" in caplog.text


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=15), "`height`=15 must be a positive multiple of 2"),
        (dict(width=9), "`width`=9 must be a positive multiple of 2"),
        (dict(prompt=[]), "empty list"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=-3), "num_inference_steps"),
        (dict(prompt=None), "Pass a `prompt`"),
        (dict(prompt_embeds=torch.zeros(2, MAX_LENGTH, HIDDEN)), "not both"),
        (dict(negative_prompt=["a", "b", "c"]), "3 entries but there are 2 prompts"),
        (dict(output_type="jpeg"), "Unknown `output_type` 'jpeg'"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(latents=torch.zeros(2, 4, 4, 4)), "latents have shape"),
        (dict(callback_on_step_end_tensor_inputs=["noise_pred"]), "not available"),
    ],
)
def test_bad_input_raises_a_clear_error(pipe, kwargs, message):
    call = dict(prompt=PROMPTS, num_inference_steps=2, output_type="np")
    call.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("[", "\\[").replace("(", "\\(")):
        pipe(**call)


def test_xformers_falls_back_to_sdpa_with_a_message(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm_pipeline"):
        enabled = pipe.enable_xformers_memory_efficient_attention()
    assert enabled is False
    assert "xFormers memory-efficient attention is not enabled" in caplog.text and "SDPA" in caplog.text
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert np.isfinite(run(pipe, steps=1)).all()


def test_xformers_installed_but_no_cuda_names_the_reason(pipe, caplog, monkeypatch):
    import ldm_pipeline.attention as module

    monkeypatch.setattr(module, "is_xformers_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="ldm_pipeline"):
        assert pipe.enable_xformers_memory_efficient_attention() is False
    assert "CUDA is not available" in caplog.text and "SDPA" in caplog.text
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_writes_every_image_and_a_grid(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "samples"
    argv = ["--model", str(pipeline_dir), "--prompt", "a red cat", "--prompt", "two blue dogs", "--num_images", "3"]
    argv += ["--scheduler", "ddim", "--steps", "2", "--guidance_scale", "4", "--seed", "0", "--out", str(out)]
    generate_main(argv + ["--device", "cpu"])
    printed = capsys.readouterr().out.split()
    images = sorted(out.glob("0*.png"))
    assert len(images) == 6 and len(printed) == 7
    assert printed[-1] == str(out / "grid.png")
    assert set(printed[:-1]) == {str(path) for path in images}
    assert Image.open(out / "grid.png").size == (3 * IMAGE_SIZE, 2 * IMAGE_SIZE)

    pipe = LatentDiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(["a red cat", "two blue dogs"], num_images_per_prompt=3, num_inference_steps=2,
                    guidance_scale=4.0, generator=seeded(0)).images
    np.testing.assert_array_equal(np.asarray(Image.open(images[4])), np.asarray(expected[4]))


def test_cli_size_negative_prompt_and_scheduler_flags(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "cli"
    argv = ["--model", str(tiny_pipeline_dir), "--prompt", "a red cat", "--num_images", "2", "--scheduler", "dpm++",
            "--steps", "2", "--guidance_scale", "3", "--seed", "1", "--height", "8", "--width", "24",
            "--negative_prompt", "a dog", "--grid_scale", "3", "--out", str(out)]
    generate_main(argv)
    assert Image.open(out / "grid.png").size == (3 * 2 * 24, 3 * 8)
    images = sorted(out.glob("000_00*.png"))
    assert len(images) == 2

    pipe = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_scheduler("dpm++")
    expected = pipe("a red cat", negative_prompt="a dog", num_images_per_prompt=2, num_inference_steps=2,
                    guidance_scale=3.0, height=8, width=24, generator=seeded(1)).images
    np.testing.assert_array_equal(np.asarray(Image.open(images[1])), np.asarray(expected[1]))


def test_cli_reports_bad_model_directory_and_scheduler(pipeline_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate_main(["--model", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "out")])
    assert "holds no pipeline" in capsys.readouterr().err
    argv = ["--model", str(pipeline_dir), "--prompt", "a cat", "--out", str(tmp_path / "o"), "--scheduler", "x"]
    with pytest.raises(SystemExit):
        generate_main(argv)
    assert re.search("Unknown scheduler 'x': choose one of .*ddim", capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
