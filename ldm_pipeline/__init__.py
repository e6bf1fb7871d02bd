"""ldm-pipeline: latent diffusion text-to-image trained from scratch on the Hugging Face stack."""

__version__ = "0.1.0"

from .pipeline_latent_diffusion import LatentDiffusionPipeline
from .schedulers import SAMPLING_DEFAULTS, scheduler_from_name
