"""No black images from NaN or infinite values: the pipeline checks its final latents and its decoded images once
each (one ``torch.isfinite(...).all()``) and, only when a value is not finite, looks for the cause to name it:

    check_finite(latents, "The denoised latents", pipe, guidance_scale, ("text_encoder", "unet"))
    check_finite(images, "The decoded images", pipe, guidance_scale, ("text_encoder", "unet", "vae"))

Causes, in the order they are looked for: a component weight that is NaN or infinite (damaged weights), a VAE
``scaling_factor`` / ``shift_factor`` that is not a finite number (or a zero scaling factor), a guidance scale so
large that ``eps_u + w (eps_c - eps_u)`` overflows, else a U-Net whose predictions overflow.
"""

from __future__ import annotations

import itertools
import math

import torch

LARGE_GUIDANCE_SCALE = 1e3
COMPONENT_NAMES = {"text_encoder": "text encoder", "unet": "U-Net", "vae": "VAE"}


def non_finite_weight(module: torch.nn.Module) -> str | None:
    """The name of the first floating-point parameter or buffer of ``module`` holding NaN or inf, else None."""
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def non_finite_cause(pipe, guidance_scale: float, components: tuple[str, ...]) -> str:
    """What made a non-finite output, named with the component, config value or argument to change."""
    for component in components:
        module = getattr(pipe, component, None)
        name = non_finite_weight(module) if isinstance(module, torch.nn.Module) else None
        if name is not None:
            return (f"the {COMPONENT_NAMES[component]} weight {component}.{name} is NaN or inf: the {component}/ "
                    "weights are damaged (load a good copy, or train the stage again)")
    if "vae" in components and getattr(pipe, "vae", None) is not None:
        for key in ("scaling_factor", "shift_factor"):
            value = getattr(pipe.vae.config, key, None)
            if value is not None and (not math.isfinite(value) or (key == "scaling_factor" and value == 0)):
                return (f"vae.config.{key} is {value}: set it in vae/config.json (the VAE stage writes "
                        "scaling_factor = 1 / the std of its latents)")
    if abs(guidance_scale) > LARGE_GUIDANCE_SCALE:
        return (f"guidance_scale={guidance_scale:g} makes the guided prediction eps_u + w (eps_c - eps_u) overflow: "
                "use a value such as 1 to 20")
    return ("the U-Net's predictions overflowed although every weight is finite (a diverged model?): try "
            "guidance_scale 1, or an earlier checkpoint of the model")


def check_finite(values: torch.Tensor, what: str, pipe, guidance_scale: float, components: tuple[str, ...]) -> None:
    """A ValueError naming the cause (`non_finite_cause`) when ``values`` hold NaN or inf."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    raise ValueError(f"{what} hold NaN or inf ({bad} of {values.numel()} values), so no image is returned: "
                     f"{non_finite_cause(pipe, guidance_scale, components)}.")
