"""Build the U-Net stage's latent/text cache ahead of training, with all processes in parallel.

    accelerate launch training/cache_latents.py --config configs/demo/unet.json --text_encoder TEXT_STAGE_OUT \\
        --vae VAE_STAGE_OUT [data args] [--cache_dir DIR] [--cache_dtype float16] [--cache_shard_size N]

Takes the U-Net stage's config and flags (the same schema as ``training/train_unet.py``) and builds the same cache
(``ldm_pipeline.caching.open_or_build_cache``), so a later ``train_unet.py`` run with the same inputs reuses it.
Process ``p`` of ``n`` computes shards ``p, p + n, ...``; a killed run keeps its finished shards and the next one
computes only the missing ones. The cache directory defaults to OUTPUT_DIR/../cache, as in training.
"""

from __future__ import annotations

import time

from accelerate import Accelerator

from ldm_pipeline.caching import open_or_build_cache
from ldm_pipeline.config import load_stage_config
from ldm_pipeline.data import build_dataset, dataset_fingerprint
from ldm_pipeline.errors import run_cli
from ldm_pipeline.grounding import grounding_encoder
from ldm_pipeline.text_encoder import load_pretrained_text_encoder
from ldm_pipeline.unet import frozen_stage_fingerprints
from ldm_pipeline.vae import load_vae


def main(argv: list[str] | None = None) -> dict:
    config = load_stage_config("unet", argv, __doc__)
    data = config.data
    if data.random_flip or data.random_crop:
        raise ValueError("--random_flip / --random_crop change the images every epoch, so they cannot be cached: "
                         "train without a cache (train_unet.py turns it off) or drop those flags.")
    accelerator = Accelerator()
    tokenizer, text_encoder = load_pretrained_text_encoder(config.training.text_encoder, "--text_encoder")
    vae = load_vae(config.training.vae)
    for frozen in (text_encoder, vae):
        frozen.requires_grad_(False).eval().to(accelerator.device)
    grounding = grounding_encoder(config.training, tokenizer, vae, data.resolution)  # what train_unet.py caches
    dataset = build_dataset(data, split="train", grounding=grounding is not None)
    if not getattr(dataset, "has_masks", False):
        grounding = None  # as train_unet.py: no masks, no grounding loss
    start = time.perf_counter()
    cache = open_or_build_cache(config, accelerator, dataset, vae, text_encoder, tokenizer,
                                frozen_stage_fingerprints(vae, text_encoder, tokenizer),
                                dataset_fingerprint(data, "train"), grounding=grounding)
    seconds = time.perf_counter() - start
    size = cache.size_on_disk()
    accelerator.print(f"Cache {cache.directory}: {len(cache)} samples, {cache.manifest['num_captions']} distinct "
                      f"captions, {cache.num_shards} shards, {size / 2**20:.1f} MiB; ready in {seconds:.1f} s.")
    accelerator.end_training()
    return {"cache_dir": str(cache.directory), "num_samples": len(cache), "num_shards": cache.num_shards,
            "size_bytes": size, "seconds": round(seconds, 3)}


if __name__ == "__main__":
    run_cli(main, prog="cache_latents.py")
