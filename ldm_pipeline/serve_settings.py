"""What one request may ask of ``ldm-serve``: the page's settings, parsed from its JSON with errors worded in the
page's labels (``FIELD_LABELS``), and the server's limits on the work of one request, derived from the model
(:class:`ServeLimits`).

The defaults of :class:`GenerationSettings` are the page's sampling defaults: the form starts with them and an API
request gets them for the fields it leaves out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ldm_pipeline.schedulers import SAMPLING_DEFAULTS, scheduler_from_name

MAX_SEED = 2**32 - 1
MAX_STEPS = 250
MAX_IMAGES = 8
SIDE_OVER_TRAINED = 2

# The page's field names and labels, in the page's order. Errors about a setting name it by its label.
FIELD_LABELS = {
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "num_images": "Images",
    "scheduler": "Scheduler",
    "steps": "Steps",
    "guidance_scale": "Guidance scale",
    "seed": "Seed",
    "width": "Width",
    "height": "Height",
    "guidance_interval": "Guidance σ range",
}
# The pipeline's argument names, as its own error messages quote them, and the page's label for each.
ARGUMENT_LABELS = {
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "num_images_per_prompt": "Images",
    "num_inference_steps": "Steps",
    "guidance_scale": "Guidance scale",
    "guidance_interval": "Guidance σ range",
    "height": "Height",
    "width": "Width",
}


@dataclass(frozen=True)
class GenerationSettings:
    """What the page sends. The field defaults are the page's defaults (the form starts with them, via
    ``/api/info``) and what an API request gets for a field it leaves out: the project's sampling defaults
    (``ldm_pipeline.schedulers.SAMPLING_DEFAULTS``, shared with ``pipe(...)``, ldm-generate and ldm-eval).

    ``scheduler`` "" keeps the pipeline's saved scheduler, ``seed`` None draws one, ``height``/``width`` None take
    the pipeline's default size, ``guidance_interval`` None guides every step."""

    prompt: str
    negative_prompt: str = ""
    num_images: int = 4
    scheduler: str = ""  # the saved one: SAMPLING_DEFAULTS.scheduler for a pipeline saved by train_unet.py
    steps: int = SAMPLING_DEFAULTS.num_inference_steps
    guidance_scale: float = SAMPLING_DEFAULTS.guidance_scale
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    guidance_interval: tuple[float, float] | None = SAMPLING_DEFAULTS.guidance_interval

    @classmethod
    def from_form(cls, form: Mapping[str, Any]) -> "GenerationSettings":
        """Parse the page's fields (strings or numbers). A field that is unknown, not a number or not text names
        itself by its page label; ranges are :meth:`ServeLimits.check`'s."""
        unknown = [name for name in form if name not in FIELD_LABELS]
        if unknown:
            raise ValueError(f"Unknown setting {unknown[0]!r}: the settings are {', '.join(FIELD_LABELS)}.")
        for name, value in form.items():
            check_text(name, value)
        defaults = cls(prompt="")
        prompt = form.get("prompt", "")
        if not isinstance(prompt, str):
            raise ValueError(f"Prompt must be text, got {prompt!r}.")
        scheduler = str(form.get("scheduler", defaults.scheduler) or "").strip()
        if scheduler:
            scheduler_from_name(scheduler)  # an unknown name: "Unknown scheduler 'x': choose one of ..."
        return cls(
            prompt=prompt,
            negative_prompt=str(form.get("negative_prompt", "") or ""),
            num_images=parse_number(form, "num_images", defaults.num_images, integer=True),
            scheduler=scheduler,
            steps=parse_number(form, "steps", defaults.steps, integer=True),
            guidance_scale=parse_number(form, "guidance_scale", defaults.guidance_scale, integer=False),
            seed=parse_seed(form.get("seed")),
            height=parse_number(form, "height", None, integer=True),
            width=parse_number(form, "width", None, integer=True),
            guidance_interval=parse_interval(form.get("guidance_interval")),
        )


def check_text(name: str, value: Any) -> None:
    """Refuse a string with a lone UTF-16 surrogate (JSON's ``"\\ud800"``): it is not text that can be
    tokenized or written into a PNG."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            code = ord(value[error.start])
            raise ValueError(f"{FIELD_LABELS[name]} holds a lone UTF-16 surrogate (U+{code:04X} at character "
                             f"{error.start + 1}), which is not text: type or paste it again.") from None


def parse_number(form: Mapping[str, Any], name: str, default, integer: bool):
    """``form[name]`` as an int (``integer``) or a finite float; ``default`` when it is absent or blank."""
    value = form.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    label = FIELD_LABELS[name]
    kind = "a whole number" if integer else "a number"
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be {kind}, got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{label} must be a finite number, got {value!r}.")
    if integer and not number.is_integer():
        raise ValueError(f"{label} must be a whole number, got {value!r}.")
    return int(number) if integer else number


def parse_interval(value: Any) -> tuple[float, float] | None:
    """None for an empty field; otherwise two noise levels ``σ_lo σ_hi`` with ``0 <= σ_lo < σ_hi`` ("1 inf",
    "0.3, 5" or a JSON pair)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.replace(",", " ").split() if isinstance(value, str) else value
    try:
        low, high = (float(part) for part in parts)
        if not 0 <= low < high:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{FIELD_LABELS['guidance_interval']} must be two noise levels 'σ_lo σ_hi' with "
                         f"0 <= σ_lo < σ_hi (e.g. '1 inf'), or empty to guide every step; got {value!r}.") from None
    return low, high


def parse_seed(value: Any) -> int | None:
    """None for "random" or an empty field; otherwise an integer in [0, 2**32 - 1]."""
    if value is None or str(value).strip().lower() in ("", "random", "-1"):
        return None
    try:
        seed = int(str(value).strip())
    except ValueError:
        seed = None
    if seed is None or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"Seed must be a whole number from 0 to {MAX_SEED}, or 'random'; got {value!r}.")
    return seed


@dataclass(frozen=True)
class ServeLimits:
    """The most work one request may ask for: images, sampling steps, and image sides (multiples of
    ``size_step``, the VAE factor, from ``size_step`` to ``max_side`` px)."""

    max_images: int
    max_steps: int
    max_side: int
    size_step: int

    @classmethod
    def for_pipeline(cls, pipe, max_images: int | None = None, max_steps: int | None = None,
                     max_side: int | None = None) -> "ServeLimits":
        """Limits derived from the model where not given: ``MAX_IMAGES`` images; ``min(MAX_STEPS,
        num_train_timesteps)`` steps; sides up to ``SIDE_OVER_TRAINED`` times the U-Net's trained size (the
        largest of ``unet.config.sample_size * vae_scale_factor``), rounded down to the VAE factor."""
        factor = pipe.vae_scale_factor
        train_timesteps = getattr(pipe.scheduler.config, "num_train_timesteps", MAX_STEPS)
        side = max_side if max_side is not None else SIDE_OVER_TRAINED * max(pipe.default_height_width())
        limits = cls(max_images=MAX_IMAGES if max_images is None else max_images,
                     max_steps=min(MAX_STEPS, train_timesteps) if max_steps is None else max_steps,
                     max_side=side // factor * factor, size_step=factor)
        for flag, value in (("max_images", limits.max_images), ("max_steps", limits.max_steps)):
            if value <= 0:
                raise ValueError(f"--{flag} must be positive, got {value}.")
        if limits.max_side < factor:
            raise ValueError(f"--max_side {side} is below the VAE factor {factor}: use a multiple of {factor}.")
        return limits

    def sizes(self) -> list[int]:
        """The image sides the page offers."""
        return list(range(self.size_step, self.max_side + 1, self.size_step))

    def check(self, settings: GenerationSettings) -> None:
        """Raise ``ValueError`` (worded with the page's labels) for settings beyond these limits."""
        for name, value, most, flag in (("num_images", settings.num_images, self.max_images, "max_images"),
                                        ("steps", settings.steps, self.max_steps, "max_steps")):
            if not 1 <= value <= most:
                raise ValueError(f"{FIELD_LABELS[name]} must be from 1 to {most} on this server (ldm-serve "
                                 f"--{flag}), got {value}.")
        step = self.size_step
        for name in ("width", "height"):
            size = getattr(settings, name)
            if size is not None and (size % step or not step <= size <= self.max_side):
                nearest = min(max(step, round(size / step) * step), self.max_side)
                raise ValueError(f"{FIELD_LABELS[name]} must be a multiple of {step} (the VAE factor) from {step} "
                                 f"to {self.max_side} px on this server (ldm-serve --max_side), got {size}: use "
                                 f"e.g. {nearest}.")
