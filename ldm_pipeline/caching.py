"""Latent and text-embedding cache for U-Net training: the frozen VAE and text encoder run once, not every step.

The U-Net stage trains on z_0 = (z - shift_factor) · scaling_factor with z ~ q_VAE(z | x) and on the context
c = text_encoder(caption). Both frozen models are deterministic functions of the data, so their outputs are
computed once per (VAE, text encoder + tokenizer, data, resolution) and stored as safetensors:

    latent_mean, latent_std   FloatTensor[N, C, h, w]   mean and std of the VAE posterior q(z | x_i)
    caption_ids               LongTensor[N]             row of ``text_embeds`` holding sample i's caption
    text_embeds               FloatTensor[U, L, D]      ``encode_prompts`` of the U distinct captions
    empty_embeds              FloatTensor[L, D]         the empty prompt "" (caption dropout / guidance)

The posterior's mean *and* std are cached and a fresh latent z = mean + std · ε is drawn every step, as LDM
(``DiagonalGaussianDistribution.sample``) and Diffusers' ``train_text_to_image.py`` do, so caching does not
change the training distribution. The file name carries a SHA-256 key over the VAE's weights and config,
the text encoder's weights and config, the tokenizer, and the data fingerprint: change any of them and a new
cache is computed; the same inputs in a later run (or epoch) reuse the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_pipeline.prompt_encoding import encode_prompts, tokenize_prompts
from ldm_pipeline.trainer import atomic_file

CACHE_FORMAT_VERSION = "2"

# ------------------------------------------------------------------------------------------------ fingerprints


def fingerprint_model(model: torch.nn.Module) -> str:
    """SHA-256 over a model's class, config and every tensor of its ``state_dict`` (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        config_dict = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
        config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_") and k != "transformers_version"}
        digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    return hash_tensors(model.state_dict(), digest)


def fingerprint_tokenizer(tokenizer) -> str:
    """SHA-256 over the tokenizer's vocabulary/rules, ``model_max_length`` and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(f"{rules}|{tokenizer.model_max_length}|{special}".encode()).hexdigest()


def cache_key(frozen_fingerprints: dict[str, str], data_key: str) -> str:
    """The cache's identity: one hash over the VAE, text encoder and tokenizer fingerprints and the data's."""
    parts = [CACHE_FORMAT_VERSION] + [frozen_fingerprints[name] for name in ("vae", "text_encoder", "tokenizer")]
    return hashlib.sha256("|".join(parts + [data_key]).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ the cache


TENSOR_NAMES = ("latent_mean", "latent_std", "caption_ids", "text_embeds", "empty_embeds")


def hash_tensors(tensors: dict[str, torch.Tensor], digest=None) -> str:
    """SHA-256 (continuing ``digest`` when given) over the names, dtypes, shapes and bytes of ``tensors``, in name
    order."""
    digest = digest or hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class LatentCache:
    """Cached VAE posteriors and text embeddings of one dataset split (see the module docstring)."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    caption_ids: torch.Tensor
    text_embeds: torch.Tensor
    empty_embeds: torch.Tensor
    key: str = ""

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).contiguous() for name in TENSOR_NAMES}

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file, fsync, rename) so that an interrupted write is never reused, with a
        SHA-256 checksum of the tensors so that a file damaged later is never used either."""
        tensors = self.tensors()
        with atomic_file(path) as partial:
            save_file(tensors, str(partial), metadata={"key": self.key, "format_version": CACHE_FORMAT_VERSION,
                                                       "sha256": hash_tensors(tensors)})

    @classmethod
    def load(cls, path: str | os.PathLike, key: str) -> "LatentCache":
        """The cache stored at ``path``; ``ValueError`` when it belongs to other inputs or its bytes changed."""
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("key") != key:
            raise ValueError(f"Cache {path} was computed for other inputs (key {metadata.get('key')} != {key}).")
        tensors = load_file(str(path))
        if hash_tensors(tensors) != metadata.get("sha256"):
            raise ValueError(f"Cache {path} is damaged: its checksum does not match its tensors.")
        return cls(**tensors, key=key)


class CachedLatentDataset(torch.utils.data.Dataset):
    """Items ``{"latent_mean", "latent_std", "prompt_embeds", "index"}`` of a ``LatentCache``, in dataset order."""

    def __init__(self, cache: LatentCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict:
        return {
            "latent_mean": self.cache.latent_mean[index],
            "latent_std": self.cache.latent_std[index],
            "prompt_embeds": self.cache.text_embeds[self.cache.caption_ids[index]],
            "index": index,
        }


def cache_path(cache_dir: str | os.PathLike, split: str, key: str) -> Path:
    return Path(cache_dir) / f"latents-{split}-{key[:24]}.safetensors"


@torch.no_grad()
def encode_posterior(vae, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior q(z | x) for images in [-1, 1]."""
    posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean.float().cpu(), posterior.std.float().cpu()


@torch.no_grad()
def encode_captions(text_encoder, tokenizer, captions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """``encode_prompts(text_encoder, tokenize_prompts(tokenizer, captions))`` in batches -> FloatTensor[N, L, D]."""
    embeds = []
    for start in range(0, len(captions), batch_size):
        tokens = tokenize_prompts(tokenizer, list(captions[start:start + batch_size]))
        embeds.append(encode_prompts(text_encoder, tokens.input_ids, tokens.attention_mask).float().cpu())
    return torch.cat(embeds)


def compute_cache(
    dataset: torch.utils.data.Dataset,
    collate_fn: Callable,
    vae,
    text_encoder,
    tokenizer,
    batch_size: int = 64,
    key: str = "",
) -> LatentCache:
    """Run the VAE over every image and the text encoder over every distinct caption, once, in dataset order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    means, stds, captions = [], [], []
    for batch in loader:
        mean, std = encode_posterior(vae, batch["pixel_values"])
        means.append(mean)
        stds.append(std)
        captions += list(batch["captions"])
    distinct = sorted(set(captions))
    row = {caption: i for i, caption in enumerate(distinct)}
    return LatentCache(
        latent_mean=torch.cat(means),
        latent_std=torch.cat(stds),
        caption_ids=torch.tensor([row[c] for c in captions], dtype=torch.long),
        text_embeds=encode_captions(text_encoder, tokenizer, distinct, batch_size),
        empty_embeds=encode_captions(text_encoder, tokenizer, [""])[0],
        key=key,
    )


def load_or_compute_cache(
    cache_dir: str | os.PathLike,
    split: str,
    key: str,
    compute: Callable[[], LatentCache],
    log: Callable[[str], None] = print,
) -> tuple[LatentCache, bool]:
    """``(cache, reused)``: the stored cache for ``key`` if there is one, else ``compute()`` saved under ``cache_dir``."""
    path = cache_path(cache_dir, split, key)
    if path.is_file():
        try:
            cache = LatentCache.load(path, key)
            log(f"Reusing latent/text cache {path} ({len(cache)} samples).")
            return cache, True
        except Exception as error:  # a truncated or foreign file: recompute it
            log(f"Ignoring unreadable cache {path} ({error}); recomputing.")
    log(f"Computing latent/text cache {path} (VAE and text encoder run once over the {split} data).")
    cache = compute()
    cache.key = key
    cache.save(path)
    return cache, False


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor, scaling_factor: float, shift_factor: float | None = None
) -> torch.Tensor:
    """z_0 = (mean + std · ε - shift_factor) · scaling_factor: a fresh draw from the cached posterior, scaled
    as the pipeline expects (it decodes ``z_0 / scaling_factor + shift_factor``)."""
    latents = mean + std * noise
    if shift_factor is not None:
        latents = latents - shift_factor
    return latents * scaling_factor


def load_shared_cache(accelerator, cache_dir: str | os.PathLike, split: str, key: str,
                      compute: Callable[[], LatentCache]) -> LatentCache:
    """The cache for ``key``: the main process reuses or computes it first, then every other process reads the
    file it wrote (the frozen models run once, not once per process)."""
    cache = None
    if accelerator.is_main_process:
        cache, _ = load_or_compute_cache(cache_dir, split, key, compute, accelerator.print)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        cache, _ = load_or_compute_cache(cache_dir, split, key, compute, accelerator.print)
    return cache
