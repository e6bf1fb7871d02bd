"""Shared test fixtures: a tiny random ``LatentDiffusionPipeline`` (CLIP or T5 text encoder) built in milliseconds.

    pipe = make_tiny_pipeline("clip")              # or "t5"; images of `resolution` px (default 16)
    def test_x(tiny_pipeline_dir): ...             # session-scoped CLIP pipeline saved with save_pretrained
    def test_y(tiny_pipeline_factory): pipe = tiny_pipeline_factory("t5", resolution=32)

Components: a word-level tokenizer whose vocabulary holds the shapes grammar's words (``<s> ... </s>``, padded to
``model_max_length``), a 2-layer text encoder of width 32, a 2-level ``AutoencoderKL`` (factor 2, 4 latent
channels, ``scaling_factor`` 0.7), a 2-level cross-attention ``UNet2DConditionModel`` and Stable Diffusion's
noise schedule with ``clip_sample=False``. All weights are random but seeded: the same call gives the same pipeline.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
TINY_WORDS = (
    "a an the and of left right above below one two three four "
    "red orange yellow green blue purple pink brown "
    "cat house tree car star heart ball box cats houses trees cars stars hearts balls boxes "
    "dog circle square squares small big"
).split()
TINY_HIDDEN = 32
TINY_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def make_tiny_tokenizer(model_max_length: int = 16) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def make_tiny_clip(tokenizer, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(config).eval()


def make_tiny_t5(tokenizer, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TINY_HIDDEN,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config).eval()


def make_tiny_vae(resolution: int = 16, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
        scaling_factor=0.7,
    ).eval()


def make_tiny_unet(sample_size: int = 8, cross_attention_dim: int = TINY_HIDDEN, seed: int = 0,
                   **overrides) -> UNet2DConditionModel:
    """Extra ``UNet2DConditionModel`` arguments (e.g. ``addition_embed_type``) go in ``overrides``."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        **overrides,
    ).eval()


def make_tiny_scheduler(**overrides) -> DDIMScheduler:
    """Stable Diffusion's DDIM configuration with ``clip_sample=False``."""
    return DDIMScheduler(**TINY_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, **overrides)


def make_tiny_components(text_arch: str = "clip", resolution: int = 16, model_max_length: int = 16) -> dict:
    """``vae, text_encoder, tokenizer, unet`` (no scheduler) for images of ``resolution`` px (even)."""
    if text_arch not in ("clip", "t5"):
        raise ValueError(f"text_arch must be 'clip' or 't5', got {text_arch!r}.")
    tokenizer = make_tiny_tokenizer(model_max_length)
    text_encoder = make_tiny_clip(tokenizer) if text_arch == "clip" else make_tiny_t5(tokenizer)
    return dict(
        vae=make_tiny_vae(resolution),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=make_tiny_unet(sample_size=resolution // 2),
    )


def make_tiny_pipeline(text_arch: str = "clip", resolution: int = 16, scheduler=None, model_max_length: int = 16):
    """A random ``LatentDiffusionPipeline`` (progress bar off) making ``resolution`` px images."""
    from ldm_pipeline import LatentDiffusionPipeline

    components = make_tiny_components(text_arch, resolution, model_max_length)
    pipe = LatentDiffusionPipeline(**components, scheduler=scheduler or make_tiny_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipeline_factory():
    """``make_tiny_pipeline`` as a fixture, for test files that prefer not to import from conftest."""
    return make_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A directory written by ``make_tiny_pipeline("clip").save_pretrained`` (16 px images); do not modify it."""
    directory = tmp_path_factory.mktemp("tiny_pipeline")
    make_tiny_pipeline("clip").save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_t5_pipeline_dir(tmp_path_factory):
    """Same as ``tiny_pipeline_dir`` with a T5 text encoder."""
    directory = tmp_path_factory.mktemp("tiny_t5_pipeline")
    make_tiny_pipeline("t5").save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_stage_dirs(tmp_path_factory):
    """Random text-encoder and VAE stage outputs laid out as the stages write them: ``text/`` (text_encoder/,
    tokenizer/), ``vae_stage/vae`` and ``other_vae/vae`` (same shape, other weights), for 16 px images."""
    root = tmp_path_factory.mktemp("stages")
    tokenizer = make_tiny_tokenizer(16)
    make_tiny_clip(tokenizer).save_pretrained(root / "text" / "text_encoder")
    tokenizer.save_pretrained(root / "text" / "tokenizer")
    make_tiny_vae(16).save_pretrained(root / "vae_stage" / "vae")
    make_tiny_vae(16, seed=1).save_pretrained(root / "other_vae" / "vae")
    return root


TEST_THREADS = torch.get_num_threads()


def run_stage(stage: str, argv: list[str]) -> dict:
    """``training/train_<stage>.py`` run in this process with ``argv`` (``ldm_pipeline.trainer.run_in_process``), at
    a fixed thread count (``--num_threads``, which a later flag in ``argv`` overrides): runs that tests compare bit for
    bit must not see the thread count follow the machine's load."""
    from ldm_pipeline.trainer import run_in_process

    return run_in_process(importlib.import_module(f"training.train_{stage}").main,
                          ["--num_threads", str(TEST_THREADS), *argv])


@pytest.fixture(autouse=True)
def _grad_mode_is_left_as_found():
    """A test (or the code it runs) that leaves autograd off would break every later test: fail it instead."""
    yield
    assert torch.is_grad_enabled(), "autograd was left disabled (torch.set_grad_enabled(False) without a restore)"
