"""Grounding loss on cross-attention: each object word's attention is pulled onto that object's mask.

TokenCompose (Wang, Sha, Ding, Wang & Tu 2024, "TokenCompose: Text-to-Image Diffusion with Token-level Supervision",
arXiv:2312.03626, sec. 3.2) adds two terms to the denoising loss, computed from the cross-attention probabilities
A ∈ [0, 1]^{N×L} of a layer (N = h·w image positions, L tokens; softmax over tokens, mean over heads) and the mask
M_i ∈ [0, 1]^N of the object that token i names:

    L_token = (1/|I|) Σ_{i∈I} (1 - Σ_u A_{u,i} M_{i,u} / Σ_u A_{u,i})²                          (eq. 3)
    L_pixel = (1/|I|) Σ_{i∈I} (1/N) Σ_u BCE(A_{u,i}, M_{i,u})                                     (eq. 4)
    L = L_LDM + λ L_token + β L_pixel                                                            (eq. 5)

averaged over the cross-attention layers. L_token asks that the token's attention lie inside its object; L_pixel
that every position of the object attend to the token and no other position does. Here I are the grounded tokens
of a caption: each token of an object word and of the colour word bound to it (so "red" in "a red star and a
green box" is pulled onto the star). TokenCompose binarises the masks at each layer's resolution; the maps of a
small U-Net are coarse (4×4 and 2×2 on the demo's 8×8 latents), so the masks here are the objects' area
coverage of each position, in [0, 1], the target of both terms.

Sources of masks: the built-in shapes data renders each object's mask (``shapes.grounded_words``); user data may
name one mask image per word in a column (``--grounding_column``). Rows without masks, and captions dropped for
guidance, add nothing. ``train_unet.py --grounding_token_weight λ --grounding_pixel_weight β`` turns it on.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ldm_pipeline.prompt_encoding import tokenize_prompts
from ldm_pipeline.vae import vae_scale_factor

MAX_GROUNDED_TOKENS = 8  # per caption: enough for two objects with a colour each and words split into tokens
MASK_LEVELS = 255  # masks are stored as uint8 coverage: round(255 · coverage)


def grounded_token_positions(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Positions of the tokens whose character span overlaps ``[start, end)`` (special and padding tokens have
    empty spans and never do)."""
    return [position for position, (token_start, token_end) in enumerate(offsets)
            if token_end > token_start and token_start < end and token_end > start]


def coverage(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area coverage of ``mask`` [..., H, W] (values in [0, 1]) at ``size`` (h, w): the mean of each block,
    ``adaptive_avg_pool2d`` (exact area averaging when H, W are multiples of h, w)."""
    leading = mask.shape[:-2]
    pooled = F.adaptive_avg_pool2d(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size)
    return pooled.reshape(*leading, *size)


def encode_grounding(tokenizer, captions: Sequence[str], groundings: Sequence[list | None],
                     latent_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The grounding targets of a batch, in the tokenizer's positions and at the latent resolution.

    ``groundings[b]`` lists caption ``b``'s grounded words as ``(start, end, mask)``: the word's character span
    and its object's mask [H, W] in [0, 1] at image resolution; None (or empty) for a row without masks. Returns
    ``grounding_tokens`` LongTensor[B, K] (token positions, -1 where unused) and ``grounding_masks``
    ByteTensor[B, K, h, w] (coverage · 255), K = ``MAX_GROUNDED_TOKENS``. Words beyond K tokens are dropped."""
    batch = len(captions)
    tokens = torch.full((batch, MAX_GROUNDED_TOKENS), -1, dtype=torch.long)
    masks = torch.zeros((batch, MAX_GROUNDED_TOKENS, *latent_size), dtype=torch.uint8)
    if not any(groundings):
        return {"grounding_tokens": tokens, "grounding_masks": masks}
    offsets = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_offsets_mapping=True)["offset_mapping"]
    for row, words in enumerate(groundings):
        slot = 0
        for start, end, mask in words or ():
            latent_mask = (coverage(torch.as_tensor(mask), latent_size) * MASK_LEVELS).round().to(torch.uint8)
            for position in grounded_token_positions(offsets[row], start, end):
                if slot < MAX_GROUNDED_TOKENS:
                    tokens[row, slot], masks[row, slot] = position, latent_mask
                    slot += 1
    return {"grounding_tokens": tokens, "grounding_masks": masks}


def check_tokenizer_offsets(tokenizer) -> None:
    """The grounding loss finds words' tokens by character offsets: only fast (Rust) tokenizers give them."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"--grounding_token_weight / --grounding_pixel_weight need a fast tokenizer (character "
                         f"offsets of each token); {type(tokenizer).__name__} is not one: save the text stage's "
                         "tokenizer with a tokenizer.json.")
    tokenize_prompts(tokenizer, [""])  # the same max length check as training


def grounding_encoder(args, tokenizer, vae, resolution: int) -> Callable | None:
    """``encode_grounding`` bound to ``tokenizer`` and the latent size, when the U-Net stage ``args`` weighs a
    grounding term (``grounding_token_weight`` or ``grounding_pixel_weight``); else None."""
    if not (args.grounding_token_weight or args.grounding_pixel_weight):
        return None
    check_tokenizer_offsets(tokenizer)
    side = resolution // vae_scale_factor(vae)
    return functools.partial(encode_grounding, tokenizer, latent_size=(side, side))


class CrossAttentionRecorder:
    """An attention processor for the U-Net's cross-attention layers that computes the attention exactly as
    Diffusers' ``AttnProcessor`` does (softmax(Q Kᵀ / sqrt(d)) V) and, while ``recording``, keeps each layer's
    probabilities [B·heads, N, L] for the grounding loss (they stay in the autograd graph)."""

    def __init__(self):
        self.recording = False
        self.maps: list[tuple[torch.Tensor, int]] = []  # (probabilities [B·heads, N, L], heads)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # [B, N, C]
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))  # [B·heads, N or L, d]
        probabilities = attn.get_attention_scores(query, key, attention_mask)  # [B·heads, N, L]
        if self.recording:
            self.maps.append((probabilities, attn.heads))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probabilities, value))  # [B, N, C]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def take(self) -> list[tuple[torch.Tensor, int]]:
        """The maps recorded since the last call, handed over and forgotten here."""
        maps, self.maps = self.maps, []
        return maps


def record_cross_attention(unet) -> CrossAttentionRecorder:
    """Give every cross-attention layer (``attn2``) of ``unet`` one shared ``CrossAttentionRecorder``; the other
    layers keep their processors. Returns the recorder (set ``recording`` around a training forward)."""
    recorder = CrossAttentionRecorder()
    processors = {name: (recorder if name.endswith("attn2.processor") else processor)
                  for name, processor in unet.attn_processors.items()}
    if recorder not in processors.values():
        raise ValueError("The U-Net has no cross-attention layers (attn2) to ground: use Cross-attention blocks "
                         "(e.g. CrossAttnDownBlock2D) in model.unet.")
    unet.set_attn_processor(processors)
    return recorder


def layer_size(num_positions: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h', w') of a layer with ``num_positions`` = h'·w' positions on latents of ``latent_size`` (each down-sampling
    halves both sides)."""
    height, width = latent_size
    scale = math.sqrt(height * width / num_positions)
    size = (round(height / scale), round(width / scale))
    if size[0] * size[1] != num_positions:
        raise ValueError(f"A cross-attention layer has {num_positions} positions, which is no down-sampling of "
                         f"{height}x{width} latents.")
    return size


def grounding_losses(maps: Sequence[tuple[torch.Tensor, int]], tokens: torch.Tensor, masks: torch.Tensor,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_token, L_pixel) of the module docstring for recorded ``maps`` and targets ``tokens`` LongTensor[B, K]
    (-1 unused) and ``masks`` [B, K, h, w] (coverage in [0, 1]).

    Each row's terms are the mean over its grounded tokens (0 for a row with none) and the loss is the mean over
    rows and layers, so that every row weighs the same, in one process or across many."""
    valid = (tokens >= 0).float()  # [B, K]
    per_row_count = valid.sum(1).clamp_min(1)
    gather_index = tokens.clamp_min(0)
    token_loss = pixel_loss = 0.0
    for probabilities, heads in maps:
        batch_heads, num_positions, num_tokens = probabilities.shape
        attention = probabilities.float().view(batch_heads // heads, heads, num_positions, num_tokens).mean(1)
        attention = attention.gather(2, gather_index[:, None, :].expand(-1, num_positions, -1))  # [B, N, K]
        attention = attention.transpose(1, 2)  # [B, K, N]
        target = coverage(masks, layer_size(num_positions, masks.shape[-2:])).flatten(2)  # [B, K, N]
        inside = (attention * target).sum(-1) / attention.sum(-1).clamp_min(eps)
        per_token = (1 - inside) ** 2
        clamped = attention.clamp(eps, 1 - eps)  # written out: F.binary_cross_entropy refuses to run under autocast
        bce = -(target * clamped.log() + (1 - target) * (1 - clamped).log()).mean(-1)
        token_loss = token_loss + ((per_token * valid).sum(1) / per_row_count).mean()
        pixel_loss = pixel_loss + ((bce * valid).sum(1) / per_row_count).mean()
    return token_loss / len(maps), pixel_loss / len(maps)
