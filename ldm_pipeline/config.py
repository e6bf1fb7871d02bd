"""Typed configuration of the three training stages: one schema, merged in one place, validated.

A stage config file (``configs/<size>/<stage>.json``) has three sections:

    {"model": {...},     the stage's model sizes, passed to the Diffusers / Transformers constructors
     "training": {...},  fields of the stage's ``*TrainingConfig`` dataclass below
     "data": {...}}      fields of ``DataConfig``

Precedence, applied by :func:`load_stage_config` and nowhere else: dataclass defaults < JSON file < command line.
Every command-line flag is generated from the same dataclasses, so a field has one name, one type, one default and
one help text. Unknown keys are an error that names the closest valid key; values are checked for type
(``"use_ema": "false"`` is rejected, not read as true) and range (``--max_train_steps 0`` is rejected).
Library code receives these objects, never an ``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ldm_pipeline.errors import ConfigError
from ldm_pipeline.schedulers import SAMPLING_DEFAULTS

SECTIONS = ("model", "training", "data")


def option(default: Any = None, help: str = "", *, choices: Sequence | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, run_only: bool = False, required: bool = False):
    """A config field. ``ge``/``gt``/``le`` bound numbers; ``choices`` lists the allowed values. ``run_only``
    marks settings that say how a run is carried out (where to log, how often to save, where a frozen stage
    lies: its weights are fingerprinted instead) rather than what is trained: they are left out of the run
    fingerprint, so a resume may change them."""
    metadata = dict(help=help, choices=choices, ge=ge, gt=gt, le=le, run_only=run_only, required=required)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------------- schema


@dataclass
class DataConfig:
    """Where the images and captions come from and how they are preprocessed (``ldm_pipeline.data``)."""

    dataset_name: str | None = option(None, "A Hugging Face dataset (name or path) for datasets.load_dataset. "
                                            "Default: the built-in shapes data.")
    dataset_config_name: str | None = option(None, "The dataset's configuration name.")
    train_data_dir: str | None = option(None, "A local folder: imagefolder with metadata.jsonl/metadata.csv, "
                                              "save_to_disk output, or Parquet/Arrow files.")
    image_column: str = option("image", "Column of the images.")
    caption_column: str = option("text", "Column of the captions.")
    grounding_column: str = option("grounding", "Column of an imagefolder's metadata.jsonl naming, per row, a mask "
                                                'image for words of the caption ({"cat": "masks/1_cat.png"}): read '
                                                "only by the U-Net's grounding loss (--grounding_token_weight).")
    resolution: int | None = option(None, "Side of the square training images.", gt=0, required=True)
    center_crop: bool = option(False, "Centre-crop after resizing (the default crop).")
    random_crop: bool = option(False, "Random crop after resizing instead of a centre crop.")
    random_flip: bool = option(False, "Flip images horizontally at random. Off by default: it contradicts "
                                      "'left of' / 'right of' captions.")
    skip_bad_images: bool = option(False, "Skip bad rows instead of stopping: an unreadable image is replaced by "
                                          "the next readable row (counted); a row without a caption is left out.")
    num_train_samples: int | None = option(None, "Size of the built-in shapes training set.", gt=0)
    shapes_categories: list[str] | None = option(None, "Caption categories of the built-in shapes training data, "
                                                       "each item's drawn uniformly from this list: repeat a name "
                                                       "to weight it (default: all six, equally).")
    shapes_held_out_orders: float = option(0.0, "Fraction of the relation and colour-binding word orders of the "
                                                "built-in shapes data left out of training, each with its reverse "
                                                "kept ('a cat left of a tree' out, 'a tree left of a cat' in): a "
                                                "test of word order (benchmarks/bench_word_order.py). At most 0.5.",
                                           ge=0, le=0.5)
    num_validation_samples: int = option(200, "Validation items this stage reads: the size of the shapes "
                                              "validation stream, or the first N of the held-out items of user data "
                                              "(ldm_pipeline.data.split).", gt=0)
    num_held_out_samples: int | None = option(None, "Items of user data that no stage trains on: a random slice "
                                                    "chosen with --data_seed, the same for every stage and ldm-eval "
                                                    "(pass the same value to each). Default: a tenth of the data, "
                                                    "at most 200. Data with a validation split or folder, or tar "
                                                    "shards, hold out that split or whole shards instead.", gt=0)
    data_seed: int = option(0, "Seed of the shapes data and of the held-out slice of user data.", ge=0)
    max_train_samples: int | None = option(None, "Keep only this many training items.", gt=0)
    streaming: bool = option(False, "Stream the data (datasets.IterableDataset) instead of reading it as a "
                                    "map-style dataset: tar shards, Parquet/Arrow files or a Hub dataset.")
    shuffle_buffer_size: int = option(1000, "With --streaming: shuffle buffer of IterableDataset.shuffle (the "
                                            "shard order is shuffled too).", gt=0)
    num_validation_shards: int = option(1, "Tar shards (or data files, with --streaming) held out for validation "
                                           "when the data has no validation split of its own: the last ones in "
                                           "name order.", gt=0)

    def __post_init__(self):
        if self.center_crop and self.random_crop:
            raise ConfigError("--center_crop and --random_crop are exclusive; pass one of them.")
        if self.shapes_categories is not None:
            from ldm_pipeline.data.shapes import CATEGORIES

            unknown = sorted(set(self.shapes_categories) - set(CATEGORIES))
            if unknown or not self.shapes_categories:
                raise ConfigError(f"--shapes_categories {' '.join(self.shapes_categories) or '(empty)'}: "
                                  f"{'unknown ' + ', '.join(unknown) if unknown else 'empty list'}; name some of "
                                  f"{', '.join(CATEGORIES)} (repeat one to weight it).")
        if self.shapes_held_out_orders and (self.dataset_name or self.train_data_dir):
            raise ConfigError("--shapes_held_out_orders applies to the built-in shapes data: with your own data, "
                              "leave the captions you want held out out of its folder instead.")
        if self.streaming and self.max_train_samples is not None:
            raise ConfigError("--max_train_samples cannot be combined with --streaming (a stream has no first N "
                              "items that every process agrees on): stream fewer shards instead.")

    @property
    def source(self) -> str:
        """A short name of the data for messages: the dataset name, the folder, or ``shapes``."""
        return self.dataset_name or self.train_data_dir or "shapes"


@dataclass
class TrainingConfig:
    """Settings every stage shares: optimisation, checkpoints, logging (Diffusers' training-script flags)."""

    output_dir: str = option("outputs/run", "Where weights, logs and checkpoints go.", run_only=True)
    overwrite_output_dir: bool = option(False, "Start a new run in an OUTPUT_DIR that holds another run's "
                                               "checkpoints, deleting them.", run_only=True)
    seed: int = option(0, "Seed of the weights' initialisation and of every random draw.", ge=0)
    train_batch_size: int = option(16, "Batch size per process.", gt=0)
    max_train_steps: int = option(1000, "Number of optimizer updates.", gt=0, run_only=True)
    learning_rate: float = option(1e-4, "Peak learning rate.", gt=0)
    lr_scheduler: str = option("constant_with_warmup", "diffusers.optimization schedule.",
                               choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                        "constant_with_warmup", "piecewise_constant"))
    lr_warmup_steps: int = option(0, "Linear warm-up steps.", ge=0)
    adam_beta1: float = option(0.9, "AdamW beta1.", ge=0, le=1)
    adam_beta2: float = option(0.999, "AdamW beta2.", ge=0, le=1)
    adam_weight_decay: float = option(0.0, "AdamW decoupled weight decay.", ge=0)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer update.", gt=0)
    mixed_precision: str = option("auto", "Autocast precision. auto (the default): bf16 on a CUDA GPU that "
                                          "supports it, else fp32 ('no'); fp16/bf16 need a GPU.",
                                  choices=("auto", "no", "fp16", "bf16"))
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this (0: no clipping).", ge=0)
    checkpointing_steps: int = option(500, "Save a resumable state every N steps.", gt=0, run_only=True)
    checkpoints_total_limit: int | None = option(2, "Keep at most this many checkpoints.", gt=0, run_only=True)
    resume_from_checkpoint: str | None = option(None, 'A checkpoint directory, or "latest" for the newest one in '
                                                      "OUTPUT_DIR/checkpoints.", run_only=True)
    dataloader_num_workers: int | None = option(None, "DataLoader worker processes, which make the batches while "
                                                      "the loop trains. Default: 0 on a CPU (the batches are made "
                                                      "in the training process), on a GPU half of the process's "
                                                      "share of the cores, 1 to 8.", ge=0, run_only=True)
    num_threads: int = option(0, "Intra-op CPU threads. 0 (the default): auto, one per core that other processes "
                                 "leave free, re-checked every few seconds, at most OMP_NUM_THREADS when set; N: "
                                 "exactly N (runs then agree bit for bit). Ignored on GPUs.", ge=0, run_only=True)
    loss_read_steps: int | None = option(None, "Read the losses from the device, check them for NaN/inf and "
                                               "record their mean in OUTPUT_DIR/train_log.jsonl every N steps (and "
                                               "at every --logging_steps line, checkpoint and the final save). "
                                               "Default: 1 on a CPU, where a non-finite loss stops the run before "
                                               "its update is applied; 50 on a GPU, where each read waits for the "
                                               "device: a non-finite loss then stops the run at the next read, "
                                               "naming the step it first appeared, before anything is saved.",
                                           gt=0, run_only=True)
    pin_memory: bool | None = option(None, "Batches in pinned host memory, copied to the GPU without blocking "
                                           "(default: on with CUDA).", run_only=True)
    device_random_draws: bool | None = option(None, "Draw each step's noise, timesteps and caption dropout on the "
                                                    "GPU from a generator seeded per step, as on a CPU (default: "
                                                    "on with CUDA; exact resume holds, but the numbers differ from "
                                                    "a CPU run's).", run_only=True)
    allow_tf32: bool | None = option(None, "TF32 matrix products and convolutions for the fp32 parts of a CUDA "
                                           "run (default: on with CUDA).", run_only=True)
    adamw_implementation: str = option("auto", "AdamW kernel: auto (fused on CUDA, PyTorch's default on a CPU), "
                                               "default, for-loop, foreach or fused.",
                                       choices=("auto", "default", "for-loop", "foreach", "fused"), run_only=True)
    ema_foreach: bool | None = option(None, "Update the --use_ema average with multi-tensor (foreach) kernels "
                                            "(default: on with CUDA).", run_only=True)
    channels_last: bool = option(False, "Store the convolutional models' weights and activations in NHWC order "
                                        "(measure it: benchmarks/bench_step_options.py).", run_only=True)
    torch_compile: str = option("no", "torch.compile the trained models: no, default, reduce-overhead (CUDA graphs) "
                                      "or max-autotune (measure it first: the compile takes minutes).",
                                choices=("no", "default", "reduce-overhead", "max-autotune"), run_only=True)
    report_to: str = option("tensorboard", "Trackers: tensorboard, all or none.",
                            choices=("tensorboard", "all", "none"), run_only=True)
    logging_dir: str | None = option(None, "Tensorboard directory (default OUTPUT_DIR/logs).", run_only=True)
    logging_steps: int = option(100, "Print a line with the mean loss of the last N steps every N steps (above the "
                                     "progress bar; the losses of every --loss_read_steps are in "
                                     "OUTPUT_DIR/train_log.jsonl).", gt=0,
                                run_only=True)
    use_ema: bool = option(False, "Keep an exponential moving average of the weights and save it as the model.")
    ema_decay: float = option(0.999, "EMA decay.", ge=0, le=1)
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.",
                                          run_only=True)
    validation_steps: int | None = option(None, "Run validation every N steps.", gt=0, run_only=True)
    push_to_hub: bool = option(False, "Upload the final output to the Hub (needs internet and a token).",
                               run_only=True)
    hub_model_id: str | None = option(None, "Hub repository for --push_to_hub (default: OUTPUT_DIR's name).",
                                      run_only=True)
    hub_token: str | None = option(None, "Hub token (default: the one huggingface-cli login saved).",
                                   run_only=True)


@dataclass
class TextEncoderTrainingConfig(TrainingConfig):
    pretrained_text_encoder: str | None = option(None, "Skip training: copy this CLIP/T5 text encoder and tokenizer "
                                                       "(Hub name or directory) to OUTPUT_DIR.")
    validation_batch_size: int | None = option(None, "Batch size for held-out retrieval (default: the training "
                                                     "batch size).", gt=0, run_only=True)
    hard_negatives: bool = option(False, "NegCLIP hard negatives: each shapes caption with a binding/order "
                                         "counterpart (colours or objects swapped) adds that caption as a text no "
                                         "image matches. Captions outside the shapes grammar get none.")
    token_region_weight: float = option(0.0, "Weight of FILIP's token-wise loss: each token state must find its "
                                             "region of the image (0: off). It rewards token states that carry "
                                             "their object's colour and place, which the U-Net cross-attends to.",
                                        ge=0)
    masked_token_weight: float = option(0.0, "Weight of image-conditioned masked-token prediction (ALBEF's MLM): "
                                             "words of each caption are masked and a small head must name them from "
                                             "the other token states and the image (0: off). It puts word order "
                                             "and binding into the token states, which a contrastive loss alone "
                                             "does not.", ge=0)
    masked_token_probability: float = option(0.15, "Share of each caption's words masked for --masked_token_weight "
                                                   "(at least one word per caption).", gt=0, le=1)


@dataclass
class VAETrainingConfig(TrainingConfig):
    kl_weight: float = option(1e-6, "Weight of the KL term (LDM: 1e-6).", ge=0)
    disc_start: int = option(50001, "Optimizer step at which the PatchGAN loss starts.", ge=0)
    disc_weight: float = option(0.5, "Multiplier of the adaptive GAN weight.", ge=0)
    disc_learning_rate: float | None = option(None, "Discriminator learning rate (default: --learning_rate).", gt=0)
    perceptual_weight: float = option(1.0, "Weight of LPIPS, when --lpips_weights is given.", ge=0)
    lpips_weights: str | None = option(None, "Local LPIPS-VGG16 weights (.safetensors/.pth); never downloaded. "
                                             "Without it: L1 only.")
    validation_batch_size: int = option(64, "Batch size of held-out metrics.", gt=0, run_only=True)
    num_reconstructions: int = option(8, "Held-out images in reconstructions.png.", gt=0, run_only=True)
    scaling_factor_max_samples: int | None = option(None, "Encode at most this many training images for the latent "
                                                          "std (default: all).", gt=0)


@dataclass
class UNetTrainingConfig(TrainingConfig):
    text_encoder: str | None = option(None, "Text stage output (text_encoder/ and tokenizer/), a pipeline dir, or a "
                                            "Hub name.", required=True, run_only=True)
    vae: str | None = option(None, "VAE stage output (vae/), a vae dir, or a Hub name.", required=True,
                             run_only=True)
    prediction_type: str | None = option(None, "Overrides model.noise_scheduler.prediction_type.",
                                         choices=("epsilon", "v_prediction"))
    snr_gamma: float | None = option(None, "Min-SNR-γ loss weighting (5.0 is typical).", gt=0)
    noise_offset: float = option(0.0, "Offset-noise scale (0 disables).", ge=0)
    caption_dropout_prob: float = option(0.1, "Probability of training on the empty prompt (for classifier-free "
                                              "guidance).", ge=0, le=1)
    grounding_token_weight: float = option(0.0, "Weight λ of the grounding loss's token term (TokenCompose, "
                                                "ldm_pipeline.grounding): each object word's cross-attention is "
                                                "pulled inside its object's mask. Needs masks: the built-in shapes "
                                                "data, or --grounding_column of your data. 0 turns it off.", ge=0)
    grounding_pixel_weight: float = option(0.0, "Weight β of the grounding loss's pixel term (binary cross-entropy "
                                                "of each object word's attention map against the mask).", ge=0)
    validation_prompts: list[str] | None = option(None, "Prompts of the validation grids.", run_only=True)
    validation_num_inference_steps: int = option(SAMPLING_DEFAULTS.num_inference_steps,
                                                 "Sampling steps of the validation grids.", gt=0, run_only=True)
    validation_guidance_scale: float = option(SAMPLING_DEFAULTS.guidance_scale,
                                              "Guidance scale of the validation grids.", ge=0, run_only=True)
    validation_scheduler: str = option(SAMPLING_DEFAULTS.scheduler, "Sampler name for validation grids.",
                                       run_only=True)
    enable_xformers_memory_efficient_attention: bool = option(False, "xFormers attention on CUDA; elsewhere "
                                                                     "PyTorch's SDPA is kept (with a message).",
                                                              run_only=True)
    no_cache: bool = option(False, "Run VAE and text encoder on every step (the reference loop) instead of "
                                   "caching.", run_only=True)
    cache_dir: str | None = option(None, "Latent/text cache directory (default OUTPUT_DIR/../cache).", run_only=True)
    cache_batch_size: int = option(64, "Batch size of the caching pass.", gt=0, run_only=True)
    cache_dtype: str = option("float32", "Storage dtype of the cached VAE posteriors (float16 halves the cache; "
                                         "its error is printed by benchmarks/bench_scale.py).",
                              choices=("float32", "float16"))
    cache_on_device: bool | None = option(None, "Hold the whole latent/text cache in GPU memory when it takes at "
                                                "most a quarter of the free memory, and gather each batch there "
                                                "(default: on with CUDA).", run_only=True)
    cache_shard_size: int = option(1024, "Samples (and distinct captions) per cache shard file.", gt=0,
                                   run_only=True)
    snapshot_steps: int | None = option(None, "Every N steps also save the (EMA) U-Net alone to "
                                              "OUTPUT_DIR/snapshots/step-N, for benchmarks/time_to_quality.py. "
                                              "Unlike checkpoints these are never pruned.", gt=0, run_only=True)


@dataclass(frozen=True)
class StageSpec:
    """What distinguishes one stage's configuration: its training dataclass and its ``model`` section keys."""

    name: str
    script: str
    training_class: type
    model_keys: tuple[str, ...]
    required_model_keys: tuple[str, ...]


STAGES = {
    "text_encoder": StageSpec("text_encoder", "train_text_encoder.py", TextEncoderTrainingConfig,
                              ("architecture", "tokenizer", "text_encoder", "image_tower", "projection_dim",
                               "relative_attention_slopes"),
                              ("architecture",)),
    "vae": StageSpec("vae", "train_vae.py", VAETrainingConfig, ("autoencoder", "discriminator"), ("autoencoder",)),
    "unet": StageSpec("unet", "train_unet.py", UNetTrainingConfig, ("unet", "noise_scheduler"), ()),
}


@dataclass
class StageConfig:
    """A stage's whole configuration: ``model`` (constructor arguments), ``training`` and ``data``."""

    stage: str
    model: dict
    training: TrainingConfig
    data: DataConfig
    path: str | None = None

    def fingerprint(self) -> dict:
        """What defines the trained result: the model section and every field not marked ``run_only``."""
        return {"stage": self.stage, "model": self.model,
                "training": {f.name: getattr(self.training, f.name) for f in dataclasses.fields(self.training)
                             if not f.metadata.get("run_only")},
                "data": dataclasses.asdict(self.data)}

    def check_output_outside_data(self) -> None:
        """An output, logging or cache directory inside ``--train_data_dir`` is a ``ConfigError``: the run's own files
        would become part of its data (and of the data's fingerprint, so that no resume would ever match)."""
        if self.data.train_data_dir is None:
            return
        data_dir = Path(self.data.train_data_dir).resolve()
        for flag in ("output_dir", "logging_dir", "cache_dir"):
            value = getattr(self.training, flag, None)
            if value is not None and (data_dir == Path(value).resolve() or data_dir in Path(value).resolve().parents):
                raise ConfigError(f"--{flag} {value} is inside --train_data_dir {self.data.train_data_dir}: the run's "
                                  "checkpoints and logs would become part of the training data (and change its "
                                  f"fingerprint, so no resume would be accepted). Choose an --{flag} outside it.")

    def option_defaults(self) -> dict:
        """``{"training": {...}, "data": {...}}``: every option's schema default, for checkpoints written before an
        option existed (an absent option there stands for its default)."""
        def defaults(instance) -> dict:
            return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(instance)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
        return {"training": defaults(self.training), "data": defaults(self.data)}


# --------------------------------------------------------------------------------------------------- checking


def closest_match(name: str, candidates: Sequence[str]) -> str | None:
    """The candidate closest to ``name`` (``difflib``, similarity >= 0.6), or None: the one owner of every "did
    you mean" (config keys, flags, config file names)."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def closest(name: str, candidates: Sequence[str]) -> str:
    """`` Did you mean 'x'?`` for the closest candidate, or a list of all of them."""
    match = closest_match(name, candidates)
    if match:
        return f" Did you mean {match!r}?"
    return f" Valid keys: {', '.join(sorted(candidates))}."


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(annotation) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _describe(value) -> str:
    return f"{value!r} (a {type(value).__name__})" if isinstance(value, str) else repr(value)


def check_value(name: str, value: Any, annotation: Any, metadata: dict, where: str) -> Any:
    """``value`` converted to the field's type, or a ``ConfigError`` naming ``where`` (file and key, or flag)."""
    base, optional = _unwrap_optional(annotation)
    if value is None:
        if optional and not metadata.get("required"):
            return None
        if metadata.get("required"):
            raise ConfigError(f"{where} is required: pass it on the command line or set it in the config.")
        raise ConfigError(f"{where} must not be null.")
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_describe(value)}.")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{where} must be an integer, got {_describe(value)}.")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {_describe(value)}.")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value}.")
    elif base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {_describe(value)}.")
    elif typing.get_origin(base) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {_describe(value)}.")
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} = {value!r} is not one of {', '.join(map(str, choices))}.")
    for bound, test, text in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                              ("le", lambda v, b: v <= b, "<=")):
        limit = metadata.get(bound)
        if limit is not None and not test(value, limit):
            raise ConfigError(f"{where} = {value} is out of range: it must be {text} {limit:g}.")
    return value


def build_section(cls, values: dict, sources: dict[str, str]):
    """An instance of dataclass ``cls`` from ``values`` (already free of unknown keys), every value checked."""
    hints = _field_types(cls)
    checked = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            checked[f.name] = check_value(f.name, values[f.name], hints[f.name], f.metadata, sources[f.name])
        elif f.metadata.get("required"):
            raise ConfigError(f"{sources.get(f.name, '--' + f.name)} is required: pass --{f.name} or set it in the "
                              "config.")
    return cls(**checked)


def _section_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_model_section(spec: StageSpec, model: Any, where: str) -> None:
    if not isinstance(model, dict):
        raise ConfigError(f"{where}: 'model' must be a JSON object.")
    for other in STAGES.values():
        if other is not spec and model and set(model) <= set(other.model_keys) and not set(model) & set(spec.model_keys):
            raise ConfigError(f"{where} is a {other.name} config (model keys {sorted(model)}): pass it to "
                              f"training/{other.script}, or give {spec.script} a {spec.name} config.")
    for key in model:
        if key not in spec.model_keys:
            raise ConfigError(f"{where}: model.{key} is not a key of a {spec.name} config.{closest(key, spec.model_keys)}")
    for key in spec.required_model_keys:
        if key not in model:
            raise ConfigError(f"{where}: the {spec.name} config needs model.{key}.")


def stage_config_from_dict(stage: str, config: dict, overrides: dict | None = None,
                           path: str | None = None) -> StageConfig:
    """Merge ``config`` (a parsed JSON file) and ``overrides`` (command-line values) into a checked
    ``StageConfig``."""
    spec = STAGES[stage]
    where = path or "config"
    if not isinstance(config, dict):
        raise ConfigError(f"{where} must be a JSON object with 'model', 'training' and 'data' sections.")
    for key in config:
        if key not in SECTIONS:
            raise ConfigError(f"{where}: unknown section {key!r}.{closest(key, SECTIONS)}")
    _check_model_section(spec, config.get("model", {}), where)
    training_fields, data_fields = _section_fields(spec.training_class), _section_fields(DataConfig)
    merged = {"training": {}, "data": {}}
    sources = {"training": {}, "data": {}}
    for section, known in (("training", training_fields), ("data", data_fields)):
        values = config.get(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: '{section}' must be a JSON object.")
        for key, value in values.items():
            if key not in known:
                other = "data" if section == "training" else "training"
                if key in (data_fields if section == "training" else training_fields):
                    raise ConfigError(f"{where}: {section}.{key} belongs in the '{other}' section.")
                raise ConfigError(f"{where}: {section}.{key} is not a {spec.name} setting.{closest(key, known)}")
            merged[section][key] = value
            sources[section][key] = f"{where}: {section}.{key}"
    for key, value in (overrides or {}).items():
        section = "training" if key in training_fields else "data" if key in data_fields else None
        if section is None:
            raise ConfigError(f"--{key} is not a {spec.name} setting.{closest(key, training_fields + data_fields)}")
        merged[section][key] = value
        sources[section][key] = f"--{key}"
    for section, cls, known in (("training", spec.training_class, training_fields), ("data", DataConfig, data_fields)):
        for name in known:
            sources[section].setdefault(name, f"--{name}")
    training = build_section(spec.training_class, merged["training"], sources["training"])
    data = build_section(DataConfig, merged["data"], sources["data"])
    if training.logging_dir is None:
        training.logging_dir = os.path.join(training.output_dir, "logs")
    return StageConfig(stage=stage, model=dict(config.get("model", {})), training=training, data=data, path=path)


def read_config_file(path: str | os.PathLike) -> dict:
    """The JSON object of a config file, or a ``ConfigError`` naming the file and the position of a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}. {_what_exists_instead(path)}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}.") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}).") from None


def _what_exists_instead(path: Path) -> str:
    """``configs/tiny has: eval.json, unet.json, ...; did you mean ...?`` for a config path that does not exist:
    the JSON files of its folder, or the sub-folders of the nearest folder that exists."""
    folder = path.parent
    if folder.is_dir():
        names = sorted(p.name for p in folder.glob("*.json"))
        match = closest_match(path.name, names)
        hint = f" Did you mean {str(folder / match)!r}?" if match else ""
        return f"{folder} has: {', '.join(names) or 'no .json file'}.{hint}"
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return (f"{path.parent} does not exist; {folder} has the folders: {', '.join(names) or 'none'}. Pass --config "
            "configs/<size>/<stage>.json.")


# --------------------------------------------------------------------------------------------------- command line


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` for every command of the project: an error is one line, ``PROG: error: MESSAGE``
    with exit status 2 (no usage block), and an unknown flag is named with the closest valid one
    (``closest_match``), also when it hides a required flag (``--num_smaples`` for ``--num_samples``). ``--help``
    shows every flag's default (``DefaultsHelpFormatter``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return namespace

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        unknown = [arg for arg in getattr(self, "_given", ()) if self._is_unknown_flag(arg)]
        if unknown:
            message = self.unknown_flags_message(unknown)
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _is_unknown_flag(self, arg: str) -> bool:
        name = arg.split("=", 1)[0]
        return name.startswith("--") and len(name) > 2 and not any(
            option == name or (self.allow_abbrev and option.startswith(name)) for option in self._option_string_actions)

    def unknown_flags_message(self, flags: Sequence[str]) -> str:
        """``unrecognized argument --max_trian_steps: did you mean --max_train_steps? (--help lists the flags)``."""
        parts = []
        for flag in flags:
            match = closest_match(flag.split("=", 1)[0], list(self._option_string_actions))
            parts.append(f"{flag}: did you mean {match}?" if match else flag)
        noun = "argument" if len(flags) == 1 else "arguments"
        return f"unrecognized {noun} {'; '.join(parts)} (--help lists the flags)"


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def help_with_default(text: str, default: Any, shown: str | None = None) -> str:
    """``text`` ending in ``(default: VALUE).``, unless the default is None or False (the text says what happens
    then) or the text speaks of its default already. ``shown`` replaces ``VALUE`` (argparse's ``%(default)s``)."""
    if default is None or default is False or "default" in text.lower():
        return text
    value = str(default).replace("%", "%%") if shown is None else shown
    return f"{text.rstrip('.')} (default: {value})."


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with every flag's default (:func:`help_with_default`); the description keeps its lines."""

    def _get_help_string(self, action):
        if not action.option_strings or action.default is argparse.SUPPRESS:
            return action.help
        return help_with_default(action.help or "", action.default, "%(default)s")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, title: str, with_defaults: bool = False) -> None:
    """One flag per field of ``cls``. Unset flags are absent from the parsed namespace (so that a config file
    fills what the command line leaves out), or hold the field's default with ``with_defaults``. Booleans work
    as switches (``--use_ema``) or with a value (``--use_ema false``)."""
    group = parser.add_argument_group(title)
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        base, _ = _unwrap_optional(hints[f.name])
        field_default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs: dict[str, Any] = dict(default=field_default if with_defaults else argparse.SUPPRESS,
                                      help=help_with_default(f.metadata.get("help", ""), field_default))
        if base is bool:
            kwargs.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
        elif typing.get_origin(base) is list:
            kwargs.update(nargs="+", type=str)
        else:
            kwargs.update(type=base)
        if f.metadata.get("choices") and base is str:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(f"--{f.name}", **kwargs)


def build_stage_parser(stage: str, description: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``training/train_<stage>.py``: ``--config`` plus a flag for every schema field."""
    spec = STAGES[stage]
    parser = CommandParser(prog=spec.script, description=description,
                           epilog="The defaults shown are the schema's: the --config file overrides them, "
                                  "and a flag overrides both.")
    parser.add_argument("--config", required=True, help="Stage config JSON (configs/<size>/<stage>.json).")
    add_dataclass_arguments(parser, spec.training_class, "training")
    add_dataclass_arguments(parser, DataConfig, "data")
    return parser


def load_stage_config(stage: str, argv: Sequence[str] | None = None, description: str | None = None) -> StageConfig:
    """Parse ``argv``, read ``--config``, and merge: defaults < JSON < command line (the one place it happens)."""
    parser = build_stage_parser(stage, description)
    namespace = vars(parser.parse_args(argv))
    path = namespace.pop("config")
    return stage_config_from_dict(stage, read_config_file(path), namespace, path=str(path))


def data_config_from_argv(argv: Sequence[str]) -> DataConfig:
    """A ``DataConfig`` from data flags alone (``["--resolution", "32", "--train_data_dir", "x"]``)."""
    parser = CommandParser()
    add_dataclass_arguments(parser, DataConfig, "data")
    values = vars(parser.parse_args(list(argv)))
    return build_section(DataConfig, values, {name: f"--{name}" for name in _section_fields(DataConfig)})


def data_config_from_args(args: argparse.Namespace) -> DataConfig:
    """The ``DataConfig`` of a namespace made by a parser that called ``add_dataclass_arguments(.., DataConfig)``."""
    values = {name: value for name, value in vars(args).items() if name in _section_fields(DataConfig)}
    return build_section(DataConfig, values, {name: f"--{name}" for name in _section_fields(DataConfig)})


def local_or_hub(name_or_path: str | os.PathLike, flag: str) -> str:
    """``name_or_path`` when it is an existing local path or can only be a Hub name (``org/name``). A path that
    does not exist but is plainly local (absolute, starting with ``.``, more than two parts, or whose first
    folder exists here, like ``runs/te`` with ``runs/`` present) is an error naming ``flag``: it must not be
    looked up, or downloaded, as a Hub repository of the same name."""
    path = Path(name_or_path)
    if path.exists():
        return str(name_or_path)
    first = Path(path.parts[0]) if path.parts else path
    if path.is_absolute() or str(name_or_path).startswith(".") or len(path.parts) > 2 or first.is_dir():
        raise FileNotFoundError(f"{flag} {name_or_path}: no such directory. Pass the stage's output directory.")
    return str(name_or_path)


@contextlib.contextmanager
def hub_lookup(name: str | os.PathLike, flag: str):
    """Around loading ``name`` (a local path, or else a Hub name: see `local_or_hub`): when it is no local path, a
    failure (offline, no such repository) is one line saying that there is no local directory of that name either."""
    from huggingface_hub.errors import HFValidationError

    try:
        yield
    except (OSError, HFValidationError) as error:
        if Path(name).exists():
            raise
        reason = " ".join(str(error).split()).split(". ")[0].rstrip(".")
        raise FileNotFoundError(f"{flag} {name}: no such local directory, and no Hub model of that name could be "
                                f"loaded ({reason}). Pass the stage's output directory (check the path), or a "
                                "Hub name with internet access.") from error


def config_hash(payload: Any) -> str:
    """SHA-256 (hex, 16 characters) of a JSON-serialisable payload with sorted keys."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
