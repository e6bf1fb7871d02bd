"""ldm-pipeline: latent diffusion text-to-image trained from scratch on the Hugging Face stack."""

__version__ = "0.1.0"

import diffusers

from .pipeline_latent_diffusion import LatentDiffusionPipeline
from .schedulers import SAMPLING_DEFAULTS, scheduler_from_name

# Diffusers' generic loader resolves model_index.json's "_class_name" as an attribute of the diffusers module:
# with this, DiffusionPipeline.from_pretrained(dir) builds a LatentDiffusionPipeline (see ldm_pipeline_diffusers.py).
setattr(diffusers, LatentDiffusionPipeline.__name__, LatentDiffusionPipeline)
