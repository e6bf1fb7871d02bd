"""``LatentDiffusionPipeline``: text-to-image sampling with the three separately trained stages.

    pipe = LatentDiffusionPipeline.from_pretrained("runs/demo/pipeline")
    image = pipe("a red circle left of a blue square").images[0]      # the saved DPM-Solver++, 20 steps, w = 5

Components: ``tokenizer`` + ``text_encoder`` (CLIP or T5, stage 1), ``vae`` (``AutoencoderKL``, stage 2),
``unet`` (``UNet2DConditionModel``, stage 3) and a ``scheduler`` (any Diffusers noise scheduler). Sampling:

    c = text_encoder(tokenize(prompt)),  c_0 = text_encoder(tokenize(negative_prompt or ""))
    z_T ~ N(0, I) · init_noise_sigma
    for t in scheduler.timesteps:
        eps = eps_u + w · (eps_c - eps_u),   [eps_u, eps_c] = unet([z_t, z_t], t, [c_0, c])   (w = guidance_scale)
        (with guidance_interval=(σ_lo, σ_hi): eps = eps_c = unet(z_t, t, c) where σ_t is outside (σ_lo, σ_hi])
        z_{t-1} = scheduler.step(eps, t, z_t)
    image = vae.decode(z_0 / scaling_factor + shift_factor)

With CLIP components and the same scheduler and generator the result equals Diffusers'
``StableDiffusionPipeline`` (same random draws, same operations, same order).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open
from transformers import CLIPTextModel, PreTrainedTokenizerBase, T5EncoderModel

from ldm_pipeline.attention import xformers_unavailable_reason
from ldm_pipeline.finite_output import check_finite
from ldm_pipeline.prompt_encoding import encode_prompts, tokenize_prompts
from ldm_pipeline.schedulers import SAMPLING_DEFAULTS, in_guidance_interval, scheduler_from_name, timestep_sigma
from ldm_pipeline.vae import vae_scale_factor

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MODEL_INDEX = "model_index.json"
COMPONENT_NAMES = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
COMPONENT_BASES = {
    "diffusers": ("ModelMixin", "SchedulerMixin"),
    "transformers": ("PreTrainedModel", "PreTrainedTokenizerBase"),
}
WEIGHTS_SUFFIX = ".safetensors"


def text_encoder_width(text_encoder) -> int | None:
    """The width ``D`` of the encoder's ``last_hidden_state`` (CLIP ``hidden_size``, T5 ``d_model``)."""
    config = text_encoder.config
    return getattr(config, "hidden_size", None) or getattr(config, "d_model", None)


def check_components_fit(vae, text_encoder, tokenizer, unet) -> None:
    """Raise ``ValueError`` when the stages cannot work together: the VAE's ``latent_channels`` must be the U-Net's
    ``in_channels``, the text encoder's width its ``cross_attention_dim``, and every token id of the tokenizer an
    entry of the encoder's embedding table. Components that are None are not checked."""
    if vae is not None and unet is not None:
        latent_channels = getattr(vae.config, "latent_channels", None)
        if latent_channels is not None and latent_channels != unet.config.in_channels:
            raise ValueError(
                f"The VAE (vae/config.json) has latent_channels={latent_channels} but the U-Net "
                f"(unet/config.json) takes in_channels={unet.config.in_channels}: use the VAE the U-Net stage was "
                "trained on (train_unet.py --vae), or train the U-Net on this VAE."
            )
    if text_encoder is not None and unet is not None:
        width = text_encoder_width(text_encoder)
        cross_attention_dim = unet.config.cross_attention_dim
        dims = set(cross_attention_dim) if isinstance(cross_attention_dim, (list, tuple)) else {cross_attention_dim}
        if width is not None and dims != {width}:
            raise ValueError(
                f"The text encoder (text_encoder/config.json) gives {width}-d embeddings but the U-Net "
                f"(unet/config.json) has cross_attention_dim={cross_attention_dim}: use the text encoder the U-Net "
                "stage was trained with (train_unet.py --text_encoder), or train the U-Net on this encoder."
            )
    if text_encoder is not None and tokenizer is not None:
        vocab_size = getattr(text_encoder.config, "vocab_size", None)
        if vocab_size is not None and len(tokenizer) > vocab_size:
            raise ValueError(
                f"The tokenizer (tokenizer/) has {len(tokenizer)} tokens but the text encoder "
                f"(text_encoder/config.json) embeds only vocab_size={vocab_size}: use the tokenizer saved with "
                "this text encoder (both come from the same train_text_encoder.py run)."
            )


def read_model_index(directory: Path) -> dict[str, Any]:
    """``model_index.json`` of ``directory`` after checking that it names only what this pipeline loads.

    The pipeline class must be ``LatentDiffusionPipeline`` (plain, or the ``[module, class]`` pair older saves
    wrote); each component is ``[null, null]`` or ``[library, class]`` with library ``diffusers`` or
    ``transformers`` and a model, scheduler or tokenizer class of that library. Anything else (a tampered file)
    raises ``ValueError`` naming the entry, before any module is imported or any weight is read.
    """
    path = directory / MODEL_INDEX
    try:
        model_index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}): save the pipeline again with save_pretrained."
        ) from error
    if not isinstance(model_index, dict):
        raise ValueError(f"{path} must hold a JSON object: save the pipeline again with save_pretrained.")
    class_name = model_index.get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, (list, tuple)) and class_name else class_name
    if class_name != LatentDiffusionPipeline.__name__:
        raise ValueError(
            f"{path} describes a {class_name!r} pipeline, not a LatentDiffusionPipeline: load it with its own "
            "class, or pass the directory written by LatentDiffusionPipeline.save_pretrained."
        )
    for name, entry in model_index.items():
        if name.startswith("_"):
            continue
        if name not in COMPONENT_NAMES:
            raise ValueError(
                f"{path} lists an unknown component {name!r}: a LatentDiffusionPipeline has only "
                f"{', '.join(COMPONENT_NAMES)}. Remove the entry or save the pipeline again."
            )
        if entry is None or list(entry) == [None, None]:
            continue
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise ValueError(f"{path}: {name} must be [library, class], got {entry!r}.")
        library, component_class = entry
        if library not in COMPONENT_BASES:
            raise ValueError(
                f"{path}: {name} comes from library {library!r}; only {' and '.join(COMPONENT_BASES)} components "
                "are loaded (no code is run from a pipeline directory). Fix the entry or save the pipeline again."
            )
        if not is_component_class(library, component_class):
            raise ValueError(
                f"{path}: {name} names class {component_class!r}, which is not a {library} "
                f"{' or '.join(COMPONENT_BASES[library])} class. Fix the entry or save the pipeline again."
            )
    return model_index


def is_component_class(library: str, class_name: Any) -> bool:
    """Whether ``library.class_name`` is a class derived from one of the library's component bases."""
    if not isinstance(class_name, str) or not class_name.isidentifier():
        return False
    module = importlib.import_module(library)
    try:
        candidate = getattr(module, class_name, None)
    except Exception:  # lazy modules raise their own errors for names they cannot import
        return False
    bases = tuple(getattr(module, base) for base in COMPONENT_BASES[library])
    return inspect.isclass(candidate) and issubclass(candidate, bases)


def check_weight_files(directory: Path, components: list[str]) -> None:
    """Raise ``ValueError`` naming the first ``.safetensors`` file of ``components`` whose header or size is not
    that of a complete file (a truncated download or copy), before any model is built."""
    for name in components:
        for weights_path in sorted((directory / name).glob(f"*{WEIGHTS_SUFFIX}")):
            try:
                with safe_open(str(weights_path), framework="pt") as weights:
                    weights.keys()
            except Exception as error:  # safetensors reports every malformed file as SafetensorError
                raise ValueError(
                    f"{weights_path} is not a complete safetensors file ({error}): it was truncated or corrupted; "
                    "copy or download it again, or re-run the stage that wrote it."
                ) from error


def sample_in_inference_mode(call: Callable) -> Callable:
    """Run ``call`` under ``torch.inference_mode`` (no autograd bookkeeping at all: a few percent faster than
    ``no_grad`` on a CPU) and give back ordinary tensors (cloned outside inference mode), so callers may modify
    the returned images/latents in place or use them in autograd."""

    @functools.wraps(call)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            output = call(*args, **kwargs)
        images = output.images if isinstance(output, ImagePipelineOutput) else output[0]
        if isinstance(images, torch.Tensor):
            images = images.clone()
            output = ImagePipelineOutput(images=images) if isinstance(output, ImagePipelineOutput) else (images,)
        return output

    return wrapper


def check_guidance_interval(guidance_interval, scheduler: SchedulerMixin) -> tuple[float, float] | None:
    """``guidance_interval`` as ``(σ_lo, σ_hi)`` floats with ``0 <= σ_lo < σ_hi``, or None; ``ValueError`` otherwise."""
    if guidance_interval is None:
        return None
    try:
        low, high = (float(bound) for bound in guidance_interval)
    except (TypeError, ValueError):
        raise ValueError(f"`guidance_interval` must be two noise levels (σ_lo, σ_hi), got {guidance_interval!r}.") from None
    if math.isnan(low) or math.isnan(high) or not 0 <= low < high:
        raise ValueError(f"`guidance_interval` ({low}, {high}) must satisfy 0 <= σ_lo < σ_hi "
                         "(e.g. (0.3, 5.0); (0, inf) guides every step).")
    try:
        timestep_sigma(scheduler, 0)
    except ValueError as error:
        raise ValueError(f"`guidance_interval`: {error}") from None
    return low, high


def warn_if_clipping_latents(scheduler: SchedulerMixin) -> None:
    if getattr(scheduler.config, "clip_sample", False):
        logger.warning(
            f"{scheduler.__class__.__name__} has clip_sample=True, which clips the predicted x_0 to [-1, 1]; "
            "latents are not in that range. Create it with clip_sample=False (scheduler_from_name does)."
        )


class LatentDiffusionPipeline(DiffusionPipeline, StableDiffusionMixin):
    r"""Text-to-image latent diffusion (Rombach et al. 2022) with classifier-free guidance.

    Args:
        vae (`AutoencoderKL`): decodes latents to images; ``config.scaling_factor`` (and ``shift_factor`` if set)
            map U-Net latents back to VAE latents.
        text_encoder (`CLIPTextModel` or `T5EncoderModel`): its ``last_hidden_state`` is the cross-attention context.
        tokenizer (`PreTrainedTokenizerBase`): pads every prompt to ``model_max_length``.
        unet (`UNet2DConditionModel`): the noise predictor; ``cross_attention_dim`` equals the encoder's width.
        scheduler (`SchedulerMixin`): any Diffusers scheduler (swap with ``set_scheduler(name)`` or
            ``Scheduler.from_config(pipe.scheduler.config)``).

    Every component may be None, as in ``StableDiffusionPipeline``: without ``text_encoder``/``tokenizer`` pass
    ``prompt_embeds`` (and ``negative_prompt_embeds`` under guidance); without a VAE ``__call__`` returns the
    latents (``vae_scale_factor`` falls back to 8); without a scheduler ``encode_prompt`` still works. A call that
    needs a missing component raises ``ValueError`` naming it.

    ``save_pretrained(dir)`` writes ``model_index.json`` and one folder per component (weights as safetensors, no
    code); ``LatentDiffusionPipeline.from_pretrained(dir)`` checks it and loads it back and never runs code from
    ``dir``. Diffusers' generic ``DiffusionPipeline.from_pretrained(dir)`` gives the same pipeline without those
    checks: ldm-pipeline registers this class with ``diffusers`` (``ldm_pipeline_diffusers``).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL | None,
        text_encoder: CLIPTextModel | T5EncoderModel | None,
        tokenizer: PreTrainedTokenizerBase | None,
        unet: UNet2DConditionModel | None,
        scheduler: SchedulerMixin | None,
    ):
        super().__init__()
        check_components_fit(vae, text_encoder, tokenizer, unet)
        if scheduler is not None:
            warn_if_clipping_latents(scheduler)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "LatentDiffusionPipeline":
        """Load a pipeline directory written by ``save_pretrained`` (or a Hub repo id); kwargs as in Diffusers
        (``torch_dtype``, component overrides such as ``scheduler=...`` or ``vae=None``).

        A local directory is checked before anything is built: ``model_index.json`` may name only Diffusers and
        Transformers component classes (:func:`read_model_index`), every safetensors file must be complete
        (:func:`check_weight_files`), and the loaded VAE and text encoder must fit the U-Net
        (:func:`check_components_fit`). Each failure is one ``ValueError`` naming the file and what to do.
        Components saved as ``None`` load as ``None``.
        """
        path = Path(pretrained_model_name_or_path).expanduser()
        if path.is_dir():
            if not (path / MODEL_INDEX).is_file():
                raise FileNotFoundError(
                    f"{path} holds no pipeline: there is no {MODEL_INDEX} in it. Pass the directory written by "
                    "LatentDiffusionPipeline.save_pretrained (the U-Net stage's --output_dir)."
                )
            model_index = read_model_index(path)
            saved_as_none = {
                name: None for name, entry in model_index.items()
                if name in COMPONENT_NAMES and (entry is None or list(entry) == [None, None])
            }
            kwargs = {**saved_as_none, **kwargs}
            check_weight_files(path, [name for name in COMPONENT_NAMES if name in model_index and name not in kwargs])
            try:
                return super().from_pretrained(str(path), **kwargs)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error
        name = str(pretrained_model_name_or_path)
        if path.exists() or path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1 or "\\" in name:
            raise FileNotFoundError(f"{name} is not a pipeline directory (it does not exist or is a file).")
        try:
            return super().from_pretrained(name, **kwargs)
        except OSError as error:
            raise FileNotFoundError(
                f"{name} is neither a local pipeline directory nor a Hub repo that can be loaded ({error})."
            ) from error

    @classmethod
    def load_config(cls, *args, **kwargs):
        """``model_index.json`` with ``_class_name`` as a plain name, so that loading through this class uses
        this class and never a ``[module, class]`` file that older saves wrote beside it."""
        outputs = super().load_config(*args, **kwargs)
        config = outputs[0] if isinstance(outputs, tuple) else outputs
        if isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = config["_class_name"][-1]
        return outputs

    # ------------------------------------------------------------------------------------ conveniences

    def set_scheduler(self, name: str) -> None:
        """Replace the scheduler by the one called ``name`` (see ``ldm_pipeline.schedulers``) on the same noise
        schedule."""
        self.scheduler = scheduler_from_name(name, self.scheduler.config if self.scheduler is not None else None)

    def enable_xformers_memory_efficient_attention(self, attention_op: Callable | None = None) -> bool:
        """Use xFormers attention when it is installed and the pipeline runs on CUDA; otherwise log why not and
        keep PyTorch's ``scaled_dot_product_attention`` (also memory-efficient). Returns whether xFormers is on."""
        reason = xformers_unavailable_reason(self.unet.device if self.unet is not None else None)
        if reason is None:
            super().enable_xformers_memory_efficient_attention(attention_op)
            return True
        logger.warning(f"xFormers memory-efficient attention is not enabled: {reason}. Keeping PyTorch "
                       "scaled_dot_product_attention (SDPA).")
        return False

    # ------------------------------------------------------------------------------------ properties

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Guidance ``eps_u + w (eps_c - eps_u)`` is on for ``w > 1``; ``w <= 1`` runs the conditional batch only."""
        return self._guidance_scale > 1

    @property
    def guidance_interval(self) -> tuple[float, float] | None:
        return self._guidance_interval

    def guides_at(self, timestep) -> bool:
        """Whether step ``timestep`` is guided: classifier-free guidance is on and ``σ_t`` lies in ``guidance_interval``.

        Kynkäänniemi et al. 2024 (arXiv:2404.07724) apply the guided denoiser only for ``σ ∈ (σ_lo, σ_hi]``
        and the conditional one elsewhere; an unguided step runs the U-Net on the conditional half of the batch only.
        """
        if not self.do_classifier_free_guidance:
            return False
        return in_guidance_interval(self.scheduler, timestep, self._guidance_interval)

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------------------------ building blocks

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt_embeds, negative_prompt_embeds)``, each ``[batch · num_images_per_prompt, L, D]``; the negative
        ones (the empty prompt unless ``negative_prompt`` is given) only with classifier-free guidance, else None.

        Needs ``tokenizer`` and ``text_encoder`` only for what is not given as embeddings; runs without U-Net,
        VAE or scheduler. ``device`` defaults to the pipeline's execution device.
        """
        device = device or self._execution_device
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            batch_size = len(prompts)
        else:
            batch_size = prompt_embeds.shape[0]

        if prompt_embeds is None:
            prompt_embeds = self.embed_prompts(prompts, "prompt_embeds")
        embeds_dtype = next(
            (module.dtype for module in (self.text_encoder, self.unet) if module is not None), prompt_embeds.dtype
        )
        prompt_embeds = prompt_embeds.to(dtype=embeds_dtype, device=device)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)  # [B · n, L, D]

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                negative_prompts = [""] * batch_size
            elif isinstance(negative_prompt, str):
                negative_prompts = [negative_prompt] * batch_size
            else:
                negative_prompts = list(negative_prompt)
            negative_prompt_embeds = self.embed_prompts(negative_prompts, "negative_prompt_embeds")
            if negative_prompt_embeds.shape[1:] != prompt_embeds.shape[1:]:
                raise ValueError(
                    f"prompt_embeds have shape {tuple(prompt_embeds.shape[1:])} per prompt but the text encoder gives "
                    f"{tuple(negative_prompt_embeds.shape[1:])}: pass negative_prompt_embeds of the same shape."
                )
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=embeds_dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        else:
            negative_prompt_embeds = None
        return prompt_embeds, negative_prompt_embeds

    def embed_prompts(self, prompts: list[str], embeds_argument: str) -> torch.Tensor:
        """``text_encoder(tokenize(prompts))`` ``[B, L, D]``; without a text encoder or tokenizer a ``ValueError``
        says to pass ``embeds_argument`` instead."""
        missing = [name for name in ("tokenizer", "text_encoder") if getattr(self, name, None) is None]
        if missing:
            raise ValueError(
                f"This pipeline has no {' and no '.join(missing)}, so it cannot encode prompts: pass "
                f"`{embeds_argument}` (from a pipeline that has them: pipe.encode_prompt(...)), or load the "
                "pipeline with its text encoder and tokenizer."
            )
        text_inputs = tokenize_prompts(self.tokenizer, prompts)
        return encode_prompts(self.text_encoder, text_inputs.input_ids, text_inputs.attention_mask)

    def require(self, *names: str) -> None:
        """Raise ``ValueError`` when a component that the current call needs is None."""
        missing = [name for name in names if getattr(self, name, None) is None]
        if missing:
            raise ValueError(
                f"This pipeline has no {', '.join(missing)}, which sampling needs: load it with "
                f"LatentDiffusionPipeline.from_pretrained(dir) or set pipe.{missing[0]} = ... first."
            )

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``z_T = n · init_noise_sigma`` with ``n ~ N(0, I)`` drawn from ``generator`` (or ``n = latents``)."""
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got {len(generator)} generators for {batch_size} images (prompts × num_images_per_prompt): pass one "
                "generator or exactly one per image."
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"latents have shape {tuple(latents.shape)}, expected {shape} "
                    "(images, unet.config.in_channels, height // vae_scale_factor, width // vae_scale_factor)."
                )
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict[str, Any]:
        """``eta`` and ``generator`` for the schedulers whose ``step`` takes them (DDIM-style ``eta``)."""
        step_parameters = set(inspect.signature(self.scheduler.step).parameters)
        extra_step_kwargs = {}
        if "eta" in step_parameters:
            extra_step_kwargs["eta"] = eta
        elif eta:
            logger.warning(f"eta={eta} is ignored: {self.scheduler.__class__.__name__}.step takes no eta.")
        if "generator" in step_parameters:
            extra_step_kwargs["generator"] = generator
        return extra_step_kwargs

    def decode_latents(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        """Images in [-1, 1] from U-Net latents: ``vae.decode(z / scaling_factor + shift_factor)``."""
        latents = latents / self.vae.config.scaling_factor
        shift_factor = getattr(self.vae.config, "shift_factor", None)
        if shift_factor is not None:
            latents = latents + shift_factor
        return self.vae.decode(latents, return_dict=False, generator=generator)[0]

    def default_height_width(self) -> tuple[int, int]:
        sample_size = self.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def check_inputs(
        self,
        prompt,
        height,
        width,
        num_inference_steps,
        num_images_per_prompt,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        output_type,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        """Raise ``ValueError`` naming the first argument that cannot work."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass a `prompt` (a string or a list of strings) or `prompt_embeds`.")
        if prompt is not None:
            if not isinstance(prompt, (str, list, tuple)):
                raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
            if not isinstance(prompt, str):
                if len(prompt) == 0:
                    raise ValueError("`prompt` is an empty list: pass at least one prompt.")
                if not all(isinstance(p, str) for p in prompt):
                    raise ValueError("`prompt` must be a string or a list of strings.")
        for name, texts in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            for text in [texts] if isinstance(texts, str) else texts if isinstance(texts, (list, tuple)) else []:
                if isinstance(text, str) and not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError as error:
                        raise ValueError(f"`{name}` {text[:40]!r} is not valid Unicode text (a lone UTF-16 "
                                         f"surrogate, {text[error.start]!r}, at character {error.start}): send "
                                         "the text as UTF-8.") from None
        if prompt_embeds is not None and prompt_embeds.ndim != 3:
            raise ValueError(f"`prompt_embeds` must be [batch, sequence, dim], got shape {tuple(prompt_embeds.shape)}.")

        factor = self.vae_scale_factor
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or size <= 0 or size % factor != 0:
                nearest = max(factor, round(size / factor) * factor) if isinstance(size, (int, float)) else factor
                raise ValueError(
                    f"`{name}`={size} must be a positive multiple of {factor} (the VAE's downsampling factor, "
                    f"2 ** (len(vae.config.block_out_channels) - 1)): use e.g. {nearest}."
                )
        if not isinstance(num_inference_steps, int) or num_inference_steps <= 0:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt <= 0:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")

        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
            if len(negative_prompt) != batch_size:
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries but there are {batch_size} prompts: pass "
                    "one negative prompt per prompt, or a single string for all."
                )
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape."
                )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown `output_type` {output_type!r}: choose one of {OUTPUT_TYPES}.")
        unknown_inputs = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown_inputs:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {unknown_inputs} are not available: choose from "
                f"{self._callback_tensor_inputs}."
            )

    # ------------------------------------------------------------------------------------ sampling

    @sample_in_inference_mode
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = SAMPLING_DEFAULTS.num_inference_steps,
        guidance_scale: float = SAMPLING_DEFAULTS.guidance_scale,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_interval: tuple[float, float] | None = SAMPLING_DEFAULTS.guidance_interval,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images for ``prompt``.

        Args:
            prompt (`str` or `list[str]`): the prompt(s); or pass `prompt_embeds` instead.
            height, width (`int`, defaults to ``unet.config.sample_size * vae_scale_factor``): image size in pixels,
                multiples of ``vae_scale_factor``.
            num_inference_steps (`int`, defaults to ``SAMPLING_DEFAULTS.num_inference_steps``, 20): scheduler steps.
            guidance_scale (`float`, defaults to ``SAMPLING_DEFAULTS.guidance_scale``, 5.0): ``w`` in
                ``eps_u + w (eps_c - eps_u)``; ``w <= 1`` disables classifier-free guidance (one U-Net batch per
                step instead of two).
            negative_prompt (`str` or `list[str]`): replaces the empty prompt of the unconditional branch.
            num_images_per_prompt (`int`, defaults to 1): images per prompt.
            eta (`float`, defaults to 0.0): DDIM's ``η``; ``σ_t = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev)``.
                Passed to schedulers whose ``step`` takes it, ignored (with a warning) by the rest.
            generator (`torch.Generator` or a list, one per image): makes sampling reproducible.
            latents (`torch.Tensor`): the initial noise ``n`` (``z_T = n · init_noise_sigma``), shape
                ``[images, in_channels, height / f, width / f]``.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor` ``[batch, L, D]``): precomputed text embeddings.
            output_type (`str`): ``"pil"`` (list of PIL images), ``"np"`` (``[N, H, W, 3]`` in [0, 1]), ``"pt"``
                (``[N, 3, H, W]`` in [0, 1]) or ``"latent"`` (the final latents, not decoded). A pipeline without
                a VAE returns the latents for every output type.
            return_dict (`bool`): return an `ImagePipelineOutput` rather than the tuple ``(images,)``.
            cross_attention_kwargs (`dict`): passed to the U-Net's attention processors at every step, as in
                ``StableDiffusionPipeline`` (e.g. the extra arguments of a custom ``AttnProcessor``).
            guidance_interval (`tuple[float, float]`, optional): ``(σ_lo, σ_hi)``; guide only the steps whose noise
                level ``σ_t = sqrt((1 - ᾱ_t) / ᾱ_t)`` lies in ``(σ_lo, σ_hi]`` and use the conditional prediction
                at the others, which cost one U-Net batch instead of two (Kynkäänniemi et al. 2024,
                arXiv:2404.07724). None (default) guides every step.
            callback_on_step_end (`Callable` or `PipelineCallback`): called after every step as
                ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> dict``; returned
                ``"latents"``/``"prompt_embeds"``/``"negative_prompt_embeds"`` replace the current ones. As in
                Diffusers, ``prompt_embeds`` is the U-Net's context: ``[negative; positive]`` under guidance.
            callback_on_step_end_tensor_inputs (`list[str]`): the tensors put into ``callback_kwargs``.

        Returns:
            `ImagePipelineOutput` with ``.images``, or ``(images,)`` when ``return_dict`` is False.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        self.require("unet", "scheduler")

        # 0. Default height and width from the U-Net's sample size
        default_height, default_width = self.default_height_width()
        height = default_height if height is None else height
        width = default_width if width is None else width

        # 1. Check inputs
        self.check_inputs(
            prompt,
            height,
            width,
            num_inference_steps,
            num_images_per_prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        if not math.isfinite(guidance_scale):
            raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale}.")
        warn_if_clipping_latents(self.scheduler)
        self._guidance_scale = guidance_scale
        self._guidance_interval = check_guidance_interval(guidance_interval, self.scheduler)
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        # 2. Batch size and device
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        # 3. Encode the prompts; with guidance the U-Net sees [unconditional; conditional] in one batch
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 4. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 5. Initial latents
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 6. Scheduler step arguments (eta, generator)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                guided = self.guides_at(t)
                latent_model_input = torch.cat([latents] * 2) if guided else latents
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
                context = prompt_embeds
                if self.do_classifier_free_guidance and not guided:
                    context = prompt_embeds.chunk(2)[1]

                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=context,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    return_dict=False,
                )[0]

                if guided:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_text - noise_pred_uncond)

                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    available = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()

        # 8. Decode (no image from NaN or inf: the cause is named instead)
        check_finite(latents, "The denoised latents", self, guidance_scale, ("text_encoder", "unet"))
        if self.vae is None and output_type != "latent":
            logger.warning(f"This pipeline has no VAE: returning latents instead of output_type={output_type!r}.")
        if output_type == "latent" or self.vae is None:
            image = latents
        else:
            image = self.decode_latents(latents, generator=generator)
            check_finite(image, "The decoded images", self, guidance_scale, ("text_encoder", "unet", "vae"))
            image = self.image_processor.postprocess(
                image, output_type=output_type, do_denormalize=[True] * image.shape[0]
            )

        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
