"""The one place where prompts become text embeddings, shared by U-Net training and the pipeline.

Training and sampling must see identical conditioning, so both call these two functions:

    batch = tokenize_prompts(tokenizer, prompts)                      # padded to model_max_length
    embeds = encode_prompts(text_encoder, batch.input_ids, batch.attention_mask)   # [B, L, D]

A ``CLIPTextModel`` is called without the padding mask (causal attention; exactly what Diffusers'
``StableDiffusionPipeline`` does, so the padding positions carry the EOS-like states the U-Net saw in
Stable Diffusion style training). A ``T5EncoderModel`` is bidirectional and is called with the mask.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CLIP_MODEL_TYPES = ("clip", "clip_text_model")
UNSET_MODEL_MAX_LENGTH = int(1e20)  # transformers' placeholder is int(1e30); anything this large means "unset"


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> BatchEncoding:
    """``input_ids`` and ``attention_mask`` (``LongTensor[B, model_max_length]``) for ``prompts``.

    Every prompt is padded to ``tokenizer.model_max_length``; a longer prompt is truncated (the tokenizer's
    special tokens are kept) and a warning names the part that was removed.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"prompts must be strings, got types {sorted({type(p).__name__ for p in prompts})}.")
    max_length = tokenizer.model_max_length
    if max_length is None or max_length >= UNSET_MODEL_MAX_LENGTH:
        raise ValueError(
            "The tokenizer has no model_max_length: set tokenizer.model_max_length (the text encoder's "
            "sequence length) before saving it."
        )
    text_inputs = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    _warn_about_truncation(tokenizer, prompts, max_length)
    return text_inputs


def _warn_about_truncation(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int) -> None:
    content_ids = tokenizer(prompts, add_special_tokens=False, truncation=False).input_ids
    kept = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    for prompt, ids in zip(prompts, content_ids):
        if len(ids) > kept:
            removed_text = tokenizer.decode(ids[kept:], skip_special_tokens=True)
            logger.warning(
                "The following part of your input was truncated because the text encoder can only handle "
                f"sequences up to {max_length} tokens: {removed_text!r} (prompt: {prompt!r})"
            )


def is_clip_text_model(text_encoder: PreTrainedModel) -> bool:
    return getattr(text_encoder.config, "model_type", None) in CLIP_MODEL_TYPES


@torch.no_grad()
def encode_prompts(
    text_encoder: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """``last_hidden_state`` (``FloatTensor[B, L, D]``) of ``text_encoder`` for tokenized prompts.

    CLIP text models get no attention mask (unless their config sets ``use_attention_mask``), exactly as in
    ``StableDiffusionPipeline.encode_prompt``; every other encoder (T5) gets ``attention_mask``. The encoder is
    frozen downstream, so no gradients are recorded.
    """
    if is_clip_text_model(text_encoder) and not getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = None
    elif attention_mask is not None:
        attention_mask = attention_mask.to(text_encoder.device)
    return text_encoder(input_ids.to(text_encoder.device), attention_mask=attention_mask)[0]
