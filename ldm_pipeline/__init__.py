"""ldm-pipeline: latent diffusion text-to-image trained from scratch on the Hugging Face stack."""

__version__ = "0.1.0"
