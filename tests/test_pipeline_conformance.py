"""The properties Diffusers' pipeline test mixins check (PipelineTesterMixin, PipelineLatentTesterMixin,
PipelineKarrasSchedulerTesterMixin), written for LatentDiffusionPipeline and checked against Diffusers'
StableDiffusionPipeline on the same components where it has the same feature: cross_attention_kwargs, optional
components, the ``components`` round trip, batching, guidance changed in a callback, attention slicing, VAE
slicing/tiling, Karras schedulers, CPU offload and fp16 (CUDA only), and the checks made at load time."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.schedulers import KarrasDiffusionSchedulers

from conftest import (
    TINY_SCHEDULE,
    make_tiny_clip,
    make_tiny_components,
    make_tiny_scheduler,
    make_tiny_tokenizer,
    make_tiny_unet,
)
from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.schedulers import SAMPLING_DEFAULTS
from test_pipeline import make_reference_pipeline

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red cat", "two blue stars left of a house"]
IMAGE_SIZE = 16
LATENT_SHAPE = (4, 8, 8)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def components():
    return make_tiny_components("clip", IMAGE_SIZE)


def make_pipeline(components, **overrides) -> LatentDiffusionPipeline:
    pipe = LatentDiffusionPipeline(**{**components, "scheduler": make_tiny_scheduler(), **overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample(pipe, prompt=PROMPTS, **kwargs):
    kwargs = {"num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "np", "generator": seeded(), **kwargs}
    return pipe(prompt, **kwargs).images


# ------------------------------------------------------------------------------------------------ cross_attention_kwargs


class GainAttnProcessor(AttnProcessor2_0):
    """SDPA attention whose output is multiplied by ``gain``, an extra argument from ``cross_attention_kwargs``."""

    def __init__(self):
        super().__init__()
        self.gains = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
        self.gains.append(gain)
        return gain * super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_cross_attention_kwargs_reach_the_attention_processors_as_in_stable_diffusion(components):
    unet = make_tiny_unet(IMAGE_SIZE // 2)
    processor = GainAttnProcessor()
    unet.set_attn_processor(processor)
    with_gain = {**components, "unet": unet}
    ours = make_pipeline(with_gain)
    reference = make_reference_pipeline(with_gain, make_tiny_scheduler())

    images = sample(ours, cross_attention_kwargs={"gain": 0.5})
    assert processor.gains and set(processor.gains) == {0.5}
    expected = reference(PROMPTS, num_inference_steps=3, guidance_scale=4.0, output_type="np", generator=seeded(),
                         cross_attention_kwargs={"gain": 0.5}).images
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)
    assert np.abs(images - sample(ours)).max() > 1e-3  # the default gain 1 gives other images


# ------------------------------------------------------------------------------------------------ optional components


def test_every_component_may_be_none_at_construction(components):
    empty = LatentDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=None, scheduler=None)
    assert empty.vae_scale_factor == 8  # StableDiffusionPipeline's fallback
    with pytest.raises(ValueError, match="no unet, scheduler, which sampling needs"):
        empty(prompt_embeds=torch.zeros(1, 16, 32))


def test_pipeline_without_a_vae_returns_the_latents(components, caplog):
    """Without a VAE the factor falls back to 8 (default size 8 x 8 = 64 px for this U-Net's 8 x 8 latents)."""
    noise = torch.randn(2, *LATENT_SHAPE, generator=seeded(3))
    expected = sample(make_pipeline(components), latents=noise, output_type="latent")
    without_vae = make_pipeline(components, vae=None)
    latents = sample(without_vae, latents=noise, output_type="pil")
    assert isinstance(latents, torch.Tensor) and "no VAE: returning latents" in caplog.text
    torch.testing.assert_close(latents, expected)


def test_pipeline_without_text_encoder_takes_prompt_embeds(components):
    full = make_pipeline(components)
    prompt_embeds, negative_prompt_embeds = full.encode_prompt(PROMPTS, negative_prompt=["a dog", ""])
    without_text = make_pipeline(components, text_encoder=None, tokenizer=None)
    images = sample(without_text, prompt=None, prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds)
    np.testing.assert_array_equal(images, sample(full, negative_prompt=["a dog", ""]))
    with pytest.raises(ValueError, match="no tokenizer and no text_encoder.*pass `prompt_embeds`"):
        sample(without_text)
    with pytest.raises(ValueError, match="pass `negative_prompt_embeds`"):
        sample(without_text, prompt=None, prompt_embeds=prompt_embeds)


def test_encode_prompt_alone_without_unet_vae_or_scheduler(components):
    """encode_prompt = (c, c_0) repeated per image, as StableDiffusionPipeline.encode_prompt."""
    text_only = LatentDiffusionPipeline(vae=None, text_encoder=components["text_encoder"],
                                        tokenizer=components["tokenizer"], unet=None, scheduler=None)
    reference = make_reference_pipeline(components, make_tiny_scheduler())
    ours = text_only.encode_prompt(PROMPTS, "cpu", 2, True, negative_prompt=["a dog", "a cat"])
    expected = reference.encode_prompt(PROMPTS, "cpu", 2, True, negative_prompt=["a dog", "a cat"])
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want)
    conditional, unconditional = text_only.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    assert unconditional is None and conditional.shape == (2, 16, 32)


def test_from_pretrained_with_components_set_to_none(tiny_pipeline_dir, tmp_path):
    loaded = LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir, vae=None, scheduler=None)
    assert loaded.vae is None and loaded.scheduler is None and loaded.vae_scale_factor == 8
    embeds, _ = loaded.encode_prompt("a red cat")
    assert embeds.shape == (1, 16, 32)
    with pytest.raises(ValueError, match="no scheduler"):
        loaded("a red cat", num_inference_steps=1)

    loaded.save_pretrained(tmp_path)  # saved as [null, null] and loaded back as None
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == [None, None]
    again = LatentDiffusionPipeline.from_pretrained(tmp_path)
    assert again.vae is None and again.scheduler is None and again.unet is not None


# ------------------------------------------------------------------------------------------------ PipelineTesterMixin


def test_components_round_trip(components):
    pipe = make_pipeline(components)
    assert set(pipe.components) == {"vae", "text_encoder", "tokenizer", "unet", "scheduler"}
    rebuilt = LatentDiffusionPipeline(**pipe.components)
    rebuilt.set_progress_bar_config(disable=True)
    assert all(rebuilt.components[name] is module for name, module in pipe.components.items())
    np.testing.assert_array_equal(sample(rebuilt), sample(pipe))


def test_batch_of_one_equals_single_call_and_batches_equal_single_images(components):
    pipe = make_pipeline(components)
    np.testing.assert_array_equal(sample(pipe, prompt=PROMPTS[:1]), sample(pipe, prompt=PROMPTS[0]))
    batch = sample(pipe, prompt=PROMPTS * 2, generator=[seeded(seed) for seed in range(4)])
    for index in range(4):
        alone = sample(pipe, prompt=PROMPTS[index % 2], generator=seeded(index))
        np.testing.assert_allclose(batch[index : index + 1], alone, atol=1e-4, rtol=0)


def test_num_images_per_prompt_with_prompt_embeds(components):
    pipe = make_pipeline(components)
    embeds, negative = pipe.encode_prompt(PROMPTS, num_images_per_prompt=1)
    for count in (1, 3):
        images = sample(pipe, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative,
                        num_images_per_prompt=count)
        assert images.shape == (2 * count, IMAGE_SIZE, IMAGE_SIZE, 3)
        np.testing.assert_array_equal(images, sample(pipe, num_images_per_prompt=count))


def test_dict_and_tuple_outputs_are_equal(components):
    pipe = make_pipeline(components)
    (from_tuple,) = pipe(PROMPTS, num_inference_steps=2, output_type="np", generator=seeded(), return_dict=False)
    np.testing.assert_array_equal(from_tuple, sample(pipe, num_inference_steps=2,
                                                     guidance_scale=SAMPLING_DEFAULTS.guidance_scale))


def test_guidance_cut_off_in_a_callback_as_in_stable_diffusion(components):
    """Diffusers' SDCFGCutoffCallback sets the guidance scale to 0 after 40% of the steps and keeps the conditional
    embeddings: the loop then runs the conditional batch alone; the images equal StableDiffusionPipeline's."""
    ours = make_pipeline(components)
    reference = make_reference_pipeline(components, make_tiny_scheduler())
    kwargs = dict(num_inference_steps=5, guidance_scale=4.0, output_type="np")
    images = ours(PROMPTS[0], generator=seeded(2), callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4),
                  **kwargs).images
    assert ours.guidance_scale == 0.0 and not ours.do_classifier_free_guidance
    expected = reference(PROMPTS[0], generator=seeded(2),
                         callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4), **kwargs).images
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)
    assert np.abs(images - sample(ours, PROMPTS[0], generator=seeded(2), num_inference_steps=5)).max() > 1e-4


def test_guidance_scale_changed_in_a_callback_is_used(components):
    pipe = make_pipeline(components)

    def increase_guidance(pipeline, step, timestep, callback_kwargs):
        pipeline._guidance_scale += 1.0
        return callback_kwargs

    sample(pipe, guidance_scale=2.0, callback_on_step_end=increase_guidance,
           callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps


def test_attention_slicing_gives_the_same_images(components):
    pipe = make_pipeline(components)
    expected = sample(pipe)
    pipe.enable_attention_slicing(slice_size=1)
    np.testing.assert_allclose(sample(pipe), expected, atol=1e-5, rtol=0)
    pipe.disable_attention_slicing()
    np.testing.assert_allclose(sample(pipe), expected, atol=1e-5, rtol=0)


def test_vae_slicing_gives_the_same_images_and_tiling_decodes_tile_by_tile(components):
    vae = AutoencoderKL.from_config(components["vae"].config)
    vae.load_state_dict(components["vae"].state_dict())
    pipe = make_pipeline(components, vae=vae.eval())
    noise = torch.randn(4, *LATENT_SHAPE, generator=seeded(5))
    expected = sample(pipe, prompt=PROMPTS * 2, latents=noise)
    pipe.vae.enable_slicing()
    np.testing.assert_allclose(sample(pipe, prompt=PROMPTS * 2, latents=noise), expected, atol=1e-5, rtol=0)
    pipe.vae.disable_slicing()
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = IMAGE_SIZE // 2, LATENT_SHAPE[1] // 2
    tiled = sample(pipe, prompt=PROMPTS * 2, latents=noise)
    latents = sample(pipe, prompt=PROMPTS * 2, latents=noise, output_type="latent")
    with torch.no_grad():
        decoded = pipe.vae.tiled_decode(latents / pipe.vae.config.scaling_factor).sample
    np.testing.assert_allclose(tiled, (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert np.abs(tiled - expected).max() > 1e-6  # four blended tiles of a random VAE: not one decode
    pipe.vae.disable_tiling()


def test_to_float16_converts_every_module(components):
    pipe = make_pipeline(make_tiny_components("clip", IMAGE_SIZE))
    pipe.to(dtype=torch.float16)
    assert {pipe.vae.dtype, pipe.unet.dtype, pipe.text_encoder.dtype} == {torch.float16}


@pytest.mark.parametrize("scheduler_name", [s.name for s in KarrasDiffusionSchedulers
                                            if s.name != "DPMSolverSDEScheduler"])
def test_every_karras_scheduler_samples_the_same_shape(components, scheduler_name):
    """(DPMSolverSDEScheduler needs the optional torchsde package and is left out.)"""
    pipe = make_pipeline(components)
    pipe.scheduler = getattr(diffusers, scheduler_name).from_config({**pipe.scheduler.config, "skip_prk_steps": True})
    steps = 5 if "KDPM2" in scheduler_name else 2
    images = sample(pipe, num_inference_steps=steps)
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()


def test_freeu_changes_the_images_as_in_stable_diffusion(components):
    ours, reference = make_pipeline(components), make_reference_pipeline(components, make_tiny_scheduler())
    plain = sample(ours)
    for pipe in (ours, reference):
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        with_freeu = sample(ours)
        expected = reference(PROMPTS, num_inference_steps=3, guidance_scale=4.0, output_type="np",
                             generator=seeded()).images
    finally:
        ours.disable_freeu()
    np.testing.assert_allclose(with_freeu, expected, atol=1e-5, rtol=0)
    assert np.abs(with_freeu - plain).max() > 1e-4
    np.testing.assert_array_equal(sample(ours), plain)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - cos(a, b) of the flattened arrays (Diffusers' ``numpy_cosine_similarity_distance``)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def fp16_and_fp32_images(device: str) -> dict[str, np.ndarray]:
    """The images of one random tiny pipeline on ``device``: in fp32 (TF32 off, so the reference is fp32: cuDNN
    convolutions use TF32 by default, which rounds their inputs as fp16 does), fp32 with another seed, and in fp16,
    ours and StableDiffusionPipeline's on the same fp16 components."""
    components = make_tiny_components("clip", IMAGE_SIZE)
    pipe = make_pipeline(components).to(device)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        images = {"fp32": sample(pipe), "fp32, another seed": sample(pipe, generator=seeded(1))}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    pipe.to(dtype=torch.float16)
    images["fp16"] = sample(pipe)
    fp16_components = {name: getattr(pipe, name) for name in ("vae", "text_encoder", "tokenizer", "unet")}
    reference = make_reference_pipeline(fp16_components, make_tiny_scheduler())
    images["fp16, StableDiffusionPipeline"] = reference(PROMPTS, num_inference_steps=3, guidance_scale=4.0,
                                                         output_type="np", generator=seeded()).images
    return images


@requires_cuda
def test_fp16_on_cuda_is_close_to_fp32():
    """Diffusers' criterion for fp16 pipelines (``PipelineTesterMixin.test_float16_inference``: cosine distance of the
    images below 5e-2), with a mean absolute difference below 1e-2 on [0, 1] images, against a true fp32 reference.
    Not a maximum over pixels: this random model's 3 guided DDIM steps multiply the error of its ε by up to
    guidance · sqrt(1 - ᾱ_t) / sqrt(ᾱ_t) (about 4 x 3.5) on the way to x_0, so single pixels may differ by more than
    5e-2 where the image is right. The same criteria reject the image of another seed, and our fp16 images are
    StableDiffusionPipeline's on the same fp16 components (so the dtypes of prompt encoding, guidance, scheduler
    and VAE are Diffusers')."""
    images = fp16_and_fp32_images("cuda")
    fp16, fp32, other = images["fp16"], images["fp32"], images["fp32, another seed"]
    error = {"mean": float(np.abs(fp16 - fp32).mean()), "max": float(np.abs(fp16 - fp32).max()),
             "cosine": cosine_distance(fp16, fp32)}
    assert np.isfinite(fp16).all() and error["mean"] < 1e-2 and error["cosine"] < 5e-2, error
    assert np.abs(other - fp32).mean() > 1e-2 and cosine_distance(other, fp32) > 5e-2, "the criteria cannot fail"
    np.testing.assert_allclose(fp16, images["fp16, StableDiffusionPipeline"], atol=1e-2, rtol=0)


@requires_cuda
def test_model_cpu_offload_gives_the_same_images():
    pipe = make_pipeline(make_tiny_components("clip", IMAGE_SIZE)).to("cuda")
    expected = sample(pipe)
    pipe.to("cpu")
    pipe.enable_model_cpu_offload()
    np.testing.assert_allclose(sample(pipe), expected, atol=2e-4, rtol=0)
    assert pipe.unet.device.type == "cpu"  # moved back after the call


# ------------------------------------------------------------------------------------------------ checks at load time


@pytest.fixture()
def pipeline_copy(tiny_pipeline_dir, tmp_path):
    directory = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, directory)
    return directory


def edit_model_index(directory, **entries):
    path = directory / "model_index.json"
    model_index = {**json.loads(path.read_text()), **entries}
    path.write_text(json.dumps(model_index))


@pytest.mark.parametrize(
    "entries, message",
    [
        (dict(unet=["os", "system"]), "unet comes from library 'os'; only diffusers and transformers"),
        (dict(unet=["my_code", "UNet"]), "unet comes from library 'my_code'"),
        (dict(vae=["diffusers", "NoSuchModel"]), "vae names class 'NoSuchModel'"),
        (dict(vae=["diffusers", "DiffusionPipeline"]), "vae names class 'DiffusionPipeline'"),
        (dict(text_encoder=["transformers", "pipeline"]), "text_encoder names class 'pipeline'"),
        (dict(safety_checker=["diffusers", "AutoencoderKL"]), "unknown component 'safety_checker'"),
        (dict(_class_name="StableDiffusionPipeline"), "'StableDiffusionPipeline' pipeline, not a LatentDiffusion"),
    ],
)
def test_a_tampered_model_index_is_refused_before_loading(pipeline_copy, entries, message):
    edit_model_index(pipeline_copy, **entries)
    with pytest.raises(ValueError, match="model_index.json.*" + message.replace("(", "\\(")):
        LatentDiffusionPipeline.from_pretrained(pipeline_copy)


def test_a_custom_component_file_in_the_directory_is_never_imported(pipeline_copy, tmp_path):
    marker = tmp_path / "code_was_run"
    (pipeline_copy / "unet" / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    edit_model_index(pipeline_copy, unet=["evil", "UNet2DConditionModel"])
    with pytest.raises(ValueError, match="unet comes from library 'evil'"):
        LatentDiffusionPipeline.from_pretrained(pipeline_copy, trust_remote_code=True)
    assert not marker.exists()


def test_invalid_json_in_model_index(pipeline_copy):
    (pipeline_copy / "model_index.json").write_text('{"_class_name": "LatentDiffusionPipeline",')
    with pytest.raises(ValueError, match="model_index.json is not valid JSON.*save_pretrained"):
        LatentDiffusionPipeline.from_pretrained(pipeline_copy)


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_truncated_weights_are_named_at_load_time(pipeline_copy, component):
    (weights,) = (pipeline_copy / component).glob("*.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{component}/{weights.name} is not a complete safetensors file"):
        LatentDiffusionPipeline.from_pretrained(pipeline_copy)
    weights.write_bytes(data[:5])  # not even a header
    with pytest.raises(ValueError, match="truncated or corrupted"):
        LatentDiffusionPipeline.from_pretrained(pipeline_copy)


def test_a_vae_that_does_not_fit_the_unet_is_refused_at_load_time(pipeline_copy):
    vae_config = json.loads((pipeline_copy / "vae" / "config.json").read_text())
    wrong_vae = AutoencoderKL.from_config({**vae_config, "latent_channels": 8})
    shutil.rmtree(pipeline_copy / "vae")
    wrong_vae.save_pretrained(pipeline_copy / "vae")
    with pytest.raises(ValueError, match="latent_channels=8 but the U-Net .*in_channels=4.*--vae"):
        LatentDiffusionPipeline.from_pretrained(pipeline_copy)
    assert LatentDiffusionPipeline.from_pretrained(pipeline_copy, vae=None).vae is None


def test_a_text_encoder_that_does_not_fit_the_unet_is_refused(pipeline_copy, components):
    tokenizer = make_tiny_tokenizer(16)
    wide = make_tiny_clip(tokenizer)
    wide = type(wide)(type(wide.config)(**{**wide.config.to_dict(), "hidden_size": 48}))
    shutil.rmtree(pipeline_copy / "text_encoder")
    wide.save_pretrained(pipeline_copy / "text_encoder")
    with pytest.raises(ValueError, match="48-d embeddings but the U-Net.*cross_attention_dim=32"):
        LatentDiffusionPipeline.from_pretrained(pipeline_copy)
    with pytest.raises(ValueError, match="48-d embeddings"):
        LatentDiffusionPipeline(**{**components, "text_encoder": wide}, scheduler=DDIMScheduler(**TINY_SCHEDULE))


def test_a_tokenizer_larger_than_the_text_encoder_vocabulary_is_refused(components):
    small = make_tiny_clip(components["tokenizer"])
    small = type(small)(type(small.config)(**{**small.config.to_dict(), "vocab_size": 10}))
    with pytest.raises(ValueError, match="tokenizer .* has 4\\d tokens but the text encoder.*vocab_size=10"):
        LatentDiffusionPipeline(**{**components, "text_encoder": small}, scheduler=make_tiny_scheduler())


# ------------------------------------------------------------------------------- benchmarks/bench_pipeline


def test_bench_pipeline_components_give_stable_diffusions_images():
    """The latency benchmark's premise: its random components take the shapes of ``configs/demo`` (VAE and U-Net
    built from the configs, a CLIP text encoder as wide as the demo's T5), and on them both pipelines compute the
    same images, so the timed rows compare the same work."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_pipeline

    demo = {name: json.loads((REPO / "configs" / "demo" / f"{name}.json").read_text())
            for name in ("unet", "text_encoder")}
    parts = bench_pipeline.random_components("demo")
    assert list(parts["unet"].config.block_out_channels) == demo["unet"]["model"]["unet"]["block_out_channels"]
    assert parts["unet"].config.sample_size == demo["unet"]["data"]["resolution"] // 4
    assert parts["text_encoder"].config.hidden_size == demo["text_encoder"]["model"]["text_encoder"]["d_model"]
    assert parts["scheduler"].config.beta_schedule == demo["unet"]["model"]["noise_scheduler"]["beta_schedule"]
    assert parts["scheduler"].config.steps_offset == 1 and not parts["scheduler"].config.clip_sample

    ours = LatentDiffusionPipeline(**parts)
    reference = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    images = [pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                   output_type="np").images for pipe in (ours, reference)]
    assert images[0].shape == (2, 32, 32, 3)
    np.testing.assert_allclose(images[0], images[1], atol=1e-6)
    assert images[0].std() > 0.01
