"""Stage 1: a tokenizer and a text encoder (CLIP or T5) trained from scratch with a CLIP contrastive objective.

The text tower is a ``transformers`` ``CLIPTextModel`` or ``T5EncoderModel`` (chosen by the config's
``"architecture"``); the image tower is a small CNN that exists only to train it. Both map into a joint space
where matching caption/image pairs have a high cosine similarity:

    t_i = normalize(W_text · pool(text_encoder(caption_i)))      i = 1..B
    v_j = normalize(image_tower(image_j))
    logits_ij = exp(s) · <t_i, v_j>                               s = learnable log logit scale
    loss = ½ · [CE(logits, targets) + CE(logitsᵀ, targetsᵀ)]

With ``hard_negatives`` (NegCLIP, Yuksekgonul et al. 2023, arXiv:2210.01936) each shapes caption with a
binding/order counterpart adds that counterpart as a text no image matches (`hard_negative_captions`).

Only the text encoder and the tokenizer are used downstream (the U-Net cross-attends to
``last_hidden_state``).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from ldm_pipeline.config import hub_lookup, local_or_hub
from ldm_pipeline.data.shapes import binding_counterpart, canonical_caption
from ldm_pipeline.prompt_encoding import tokenize_prompts
from ldm_pipeline.stage_dirs import check_stage_dirs

ARCHITECTURES = ("clip", "t5")
PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN = "<pad>", "<unk>", "<s>", "</s>", "<mask>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN)  # ids 0-4 in a trained vocabulary


# --------------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(
    captions: Iterable[str],
    vocab_size: int,
    model_max_length: int,
    min_frequency: int = 1,
) -> PreTrainedTokenizerFast:
    """Learn a lower-casing WordPiece tokenizer (``tokenizers`` library) from ``captions``.

    Captions are normalised (NFD, lower case, accents stripped) and split into words and punctuation. The
    vocabulary is: the special tokens ``<pad> <unk> <s> </s> <mask>`` (ids 0-4), every character seen (as a word start
    ``c`` and as a continuation ``##c``, so an unseen word still encodes, letter by letter), then whole words
    seen at least ``min_frequency`` times, most frequent first (ties alphabetical) until ``vocab_size``.
    Unlike the library's ``WordPieceTrainer``, whose merges break ties in hash-map order, the same captions
    always give the same vocabulary.

    Every encoding is ``<s> tokens </s>``; padding uses ``<pad>`` on the right; truncation to
    ``model_max_length`` keeps ``</s>`` (the CLIP text model pools at the first ``</s>``). Save it with
    ``save_pretrained`` and load it back with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if model_max_length < 3:
        raise ValueError(f"model_max_length={model_max_length}: it must leave room for <s>, one token and </s>.")
    normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter[str] = Counter()
    for caption in captions:
        if caption:
            word_counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    if not word_counts:
        raise ValueError("train_tokenizer got no non-empty captions: check the dataset's caption column.")

    characters = sorted({character for word in word_counts for character in word})
    vocab = list(SPECIAL_TOKENS) + characters + [f"##{character}" for character in characters]
    if vocab_size < len(vocab):
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the {len(SPECIAL_TOKENS)} special tokens and the "
            f"{2 * len(characters)} character pieces of these captions: raise it to at least {len(vocab)}."
        )
    known = set(vocab)
    frequent_words = sorted((w for w, n in word_counts.items() if n >= min_frequency and w not in known),
                            key=lambda w: (-word_counts[w], w))
    vocab += frequent_words[: vocab_size - len(vocab)]

    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    bos_id, eos_id = vocab.index(BOS_TOKEN), vocab.index(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        mask_token=MASK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
    )


# ------------------------------------------------------------------------------------------------ text encoder


def build_text_encoder(model_config: dict, tokenizer: PreTrainedTokenizerBase) -> CLIPTextModel | T5EncoderModel:
    """A randomly initialised text encoder sized by ``model_config`` with ids taken from ``tokenizer``.

    ``model_config["architecture"]`` is ``"clip"`` (``CLIPTextConfig`` kwargs in ``model_config["text_encoder"]``)
    or ``"t5"`` (``T5Config`` kwargs; ``model_config["relative_attention_slopes"]``, one number per head, starts
    its relative position bias as a distance penalty: `init_relative_attention_slopes`). Vocabulary size and
    pad/bos/eos ids always come from the tokenizer; the CLIP position table defaults to
    ``tokenizer.model_max_length`` entries.
    """
    architecture = model_config.get("architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(f'model.architecture is {architecture!r}: set it to one of {list(ARCHITECTURES)} in the config.')
    kwargs = dict(model_config.get("text_encoder", {}))
    for token in ("pad_token", "eos_token"):
        if getattr(tokenizer, token) is None:
            raise ValueError(f"The tokenizer has no {token}: train it with train_tokenizer or set one.")
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    slopes = model_config.get("relative_attention_slopes")
    if slopes is not None and architecture != "t5":
        raise ValueError(f"model.relative_attention_slopes applies to T5 text encoders, not to {architecture!r}: "
                         "remove it or set model.architecture to 't5'.")

    if architecture == "clip":
        if tokenizer.eos_token_id == 2:
            raise ValueError(
                "CLIPTextModel treats eos_token_id == 2 as a legacy config and pools at the largest token id "
                "instead of at </s>: use a tokenizer whose </s> id is not 2 (train_tokenizer gives 3)."
            )
        kwargs.setdefault("max_position_embeddings", tokenizer.model_max_length)
        if kwargs["max_position_embeddings"] < tokenizer.model_max_length:
            raise ValueError(
                f"model.text_encoder.max_position_embeddings={kwargs['max_position_embeddings']} is smaller than the "
                f"tokenizer's model_max_length={tokenizer.model_max_length}: raise it or shorten model_max_length."
            )
        config = CLIPTextConfig(**kwargs, **ids, bos_token_id=tokenizer.bos_token_id)
        return CLIPTextModel(config)

    config = T5Config(**kwargs, **ids, decoder_start_token_id=tokenizer.pad_token_id, is_encoder_decoder=False, use_cache=False)
    text_encoder = T5EncoderModel(config)
    if slopes is not None:
        init_relative_attention_slopes(text_encoder, slopes)
    return text_encoder


def init_relative_attention_slopes(text_encoder: T5EncoderModel, slopes: Sequence[float]) -> None:
    """Initialise a T5 encoder's relative position bias as ALiBi's distance penalty, one slope per head.

    T5 adds a learned bias ``b_h(bucket(j - i))`` to the attention logit of query i and key j (Raffel et al. 2020,
    arXiv:1910.10683, sec. 2.1); it is set to ``-m_h · |j - i|`` as in ALiBi (Press et al. 2022, arXiv:2108.12409,
    sec. 3), with ``|j - i|`` the smallest distance the bucket holds, and stays trainable. With ``b = 0`` attention
    and the token states are nearly the same set for "a red star and a green box" and "a green star and a red box"
    (`benchmarks/bench_binding.py`, set cosine), and the U-Net's cross-attention, blind to order, cannot tell the
    two apart; a distance penalty makes each word's state take most from its neighbours (``star`` from ``red``).
    """
    from transformers.models.t5.modeling_t5 import T5Attention

    config = text_encoder.config
    if config.model_type != "t5":
        raise ValueError(f"model.relative_attention_slopes applies to T5 text encoders, not to {config.model_type!r}.")
    if len(slopes) != config.num_heads or any(not isinstance(m, (int, float)) or m < 0 for m in slopes):
        raise ValueError(f"model.relative_attention_slopes={list(slopes)}: give {config.num_heads} numbers >= 0, one "
                         f"per attention head (text_encoder.num_heads={config.num_heads}).")
    max_distance, num_buckets = config.relative_attention_max_distance, config.relative_attention_num_buckets
    distances = torch.arange(-max_distance, max_distance + 1)
    buckets = T5Attention._relative_position_bucket(distances, bidirectional=True, num_buckets=num_buckets,
                                                    max_distance=max_distance)
    nearest = torch.full((num_buckets,), float(max_distance)).scatter_reduce(0, buckets, distances.abs().float(), "amin")
    bias = text_encoder.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
    with torch.no_grad():
        bias.weight.copy_(-nearest[:, None] * torch.tensor(slopes, dtype=torch.float32)[None, :])  # [buckets, heads]


def text_hidden_size(text_encoder: CLIPTextModel | T5EncoderModel) -> int:
    config = text_encoder.config
    return config.d_model if config.model_type == "t5" else config.hidden_size


def text_states(
    text_encoder: CLIPTextModel | T5EncoderModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_states [B, L, H], pooled [B, H])`` of one forward pass.

    Token states are what the U-Net cross-attends to (`encode_prompts`). Pooled: CLIP -> ``pooler_output`` (the
    hidden state at the first ``</s>``, causal attention, no padding mask, exactly as pipelines call it); T5 -> the
    mean of ``last_hidden_state`` over unmasked tokens.
    """
    if text_encoder.config.model_type == "t5":
        hidden = text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return hidden, (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    outputs = text_encoder(input_ids=input_ids)
    return outputs.last_hidden_state, outputs.pooler_output


def pooled_text_features(
    text_encoder: CLIPTextModel | T5EncoderModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """One vector per caption [B, H]: the pooled output of `text_states`."""
    return text_states(text_encoder, input_ids, attention_mask)[1]


def load_pretrained_text_encoder(
    name_or_path: str | os.PathLike, flag: str = "--pretrained_text_encoder",
) -> tuple[PreTrainedTokenizerBase, CLIPTextModel | T5EncoderModel]:
    """``(tokenizer, text_encoder)`` from a Hub name or a directory.

    A directory with ``tokenizer/`` and ``text_encoder/`` sub-folders (this stage's output, a Diffusers pipeline)
    is read from those; otherwise tokenizer and model are read from ``name_or_path`` itself. The model class
    follows the config's ``model_type``: ``clip``/``clip_text_model`` -> ``CLIPTextModel``, ``t5``/``mt5``/``umt5``
    -> ``T5EncoderModel``.
    """
    name_or_path = local_or_hub(name_or_path, flag)
    check_stage_dirs({flag: ("text_encoder", name_or_path)})
    root = Path(name_or_path)
    if root.is_dir() and (root / "text_encoder").is_dir() and (root / "tokenizer").is_dir():
        model_path, tokenizer_path = root / "text_encoder", root / "tokenizer"
    else:
        model_path = tokenizer_path = name_or_path
    with hub_lookup(name_or_path, flag):
        model_type = AutoConfig.from_pretrained(model_path).model_type
    if model_type in ("clip", "clip_text_model"):
        model_class = CLIPTextModel
    elif model_type in ("t5", "mt5", "umt5"):
        model_class = T5EncoderModel
    else:
        raise ValueError(
            f"{flag} {name_or_path} is a {model_type!r} model: a CLIP or a T5 text encoder is expected."
        )
    return AutoTokenizer.from_pretrained(tokenizer_path), model_class.from_pretrained(model_path)


# ---------------------------------------------------------------------------------------- contrastive training


class ImageTower(ModelMixin, ConfigMixin):
    """A small CNN from images in [-1, 1] to the joint text-image space (training-only).

    A patchify stem (``patch_size`` x ``patch_size`` conv with that stride, GroupNorm, SiLU) maps the image to
    ``block_out_channels[0]`` channels at 1/``patch_size`` resolution; each further entry adds a stage that halves
    the resolution (3x3 stride-2 conv, GroupNorm, SiLU, 3x3 conv, GroupNorm, SiLU). Normalising at full resolution
    is what makes a CNN slow on a CPU, hence the stem. The last feature map is average-pooled to a
    ``pooled_size`` x ``pooled_size`` grid, not to a single vector, so where an object is (captions say
    "left of", "above") survives into the linear projection.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        norm_num_groups: int = 8,
        pooled_size: int = 4,
        projection_dim: int = 64,
        patch_size: int = 2,
    ):
        super().__init__()
        for out_channels in block_out_channels:
            if out_channels % norm_num_groups:
                raise ValueError(f"image_tower block_out_channels {out_channels} is not divisible by norm_num_groups={norm_num_groups}.")
        if patch_size < 1:
            raise ValueError(f"image_tower patch_size={patch_size}: it must be at least 1.")
        channels = block_out_channels[0]
        layers = [nn.Conv2d(in_channels, channels, patch_size, stride=patch_size), nn.GroupNorm(norm_num_groups, channels), nn.SiLU()]
        for out_channels in block_out_channels[1:]:
            layers += [
                nn.Conv2d(channels, out_channels, 3, stride=2, padding=1),
                nn.GroupNorm(norm_num_groups, out_channels),
                nn.SiLU(),
                nn.Conv2d(out_channels, out_channels, 3, padding=1),
                nn.GroupNorm(norm_num_groups, out_channels),
                nn.SiLU(),
            ]
            channels = out_channels
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(pooled_size), nn.Flatten())
        self.projection = nn.Linear(channels * pooled_size * pooled_size, projection_dim)

    def grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, C, g, g]: the pooled feature grid (g = ``pooled_size``) before projection."""
        return self.features[:-1](pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(self.features(pixel_values))


def clamped_logit_scale(log_logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(min(s, log 100))``: a learned contrastive temperature, clamped as in CLIP (Radford et al. 2021)."""
    return log_logit_scale.clamp(max=math.log(100.0)).exp()


class TokenRegionHead(nn.Module):
    """Training-only projections of token states and image regions into one space, for `token_region_loss`.

    ``u_il = normalize(W_tok · h_il)`` for each token state [H] and ``w_jr = normalize(W_reg · f_jr + p_r)`` for
    each cell r of the image tower's pooled grid [C]; the learned per-cell offset ``p_r`` lets a region say where
    it is ("left of", "above").
    """

    def __init__(self, hidden_size: int, region_channels: int, num_regions: int, projection_dim: int):
        super().__init__()
        self.token_projection = nn.Linear(hidden_size, projection_dim, bias=False)
        self.region_projection = nn.Linear(region_channels, projection_dim)
        self.region_position = nn.Parameter(torch.zeros(num_regions, projection_dim))
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, token_states: torch.Tensor, grid: torch.Tensor):
        tokens = F.normalize(self.token_projection(token_states), dim=-1)  # [B, L, P]
        regions = self.region_projection(grid.flatten(2).transpose(1, 2)) + self.region_position  # [B, g·g, P]
        return tokens, F.normalize(regions, dim=-1), clamped_logit_scale(self.log_logit_scale)


class MaskedTokenHead(nn.Module):
    """Training-only head that predicts masked caption words from their token states and the image.

    Image-conditioned masked language modelling (ALBEF, Li et al. 2021, arXiv:2107.07651, sec. 3.2): the state
    ``h_l`` of a masked position attends over the cells of the image tower's pooled grid, ``r_c = W_reg · f_c +
    p_c`` (a learned offset ``p_c`` per cell says where the cell is), and a small MLP reads the word:

        a_l = MultiHeadAttention(q = h_l, k = v = r)
        logits_l = W_2 · GELU(W_1 · LayerNorm(h_l + a_l))          [V] over the tokenizer's vocabulary

    To name the masked word of "a <mask> star and a green box" from the image, the masked state must know that it
    belongs to "star" (its neighbour), not to "box": word order and binding have to be in the token states, which
    is what the U-Net's cross-attention reads. A contrastive loss alone can be met by a bag of words.
    """

    def __init__(self, hidden_size: int, region_channels: int, num_regions: int, vocab_size: int, num_heads: int):
        super().__init__()
        self.region_projection = nn.Linear(region_channels, hidden_size)
        self.region_position = nn.Parameter(torch.randn(num_regions, hidden_size) * 0.02)
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, vocab_size))

    def forward(self, token_states: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """[B, L, H] token states, [B, C, g, g] image grid -> [B, L, V] logits."""
        regions = self.region_projection(grid.flatten(2).transpose(1, 2)) + self.region_position  # [B, g·g, H]
        attended, _ = self.attention(token_states, regions, regions, need_weights=False)  # [B, L, H]
        return self.mlp(self.norm(token_states + attended))


@dataclass
class ContrastiveOutput:
    """What `TextImageContrastiveModel.forward` computes: unit text and image embeddings [B, P] and the logit
    scale; with a `TokenRegionHead`, unit token and region embeddings ([B, L, P], [B, g·g, P]) and their scale;
    with masked captions and a `MaskedTokenHead`, the logits of every position of the masked captions [B, L, V]."""

    text_embeds: torch.Tensor
    image_embeds: torch.Tensor
    logit_scale: torch.Tensor
    token_embeds: torch.Tensor | None = None
    region_embeds: torch.Tensor | None = None
    token_logit_scale: torch.Tensor | None = None
    masked_token_logits: torch.Tensor | None = None


class TextImageContrastiveModel(nn.Module):
    """Text tower + text projection + image tower + learnable logit scale, as one module for ``accelerator.prepare``.

    ``forward`` returns a `ContrastiveOutput`: L2-normalised text and image embeddings and ``logit_scale =
    exp(s)``, with ``s`` initialised to ``log(1 / 0.07)`` and clamped to at most ``log(100)`` as in CLIP. With a
    ``token_region_head`` it also holds the token and region embeddings of the same forward pass, for
    `token_region_loss`; with ``masked_token_head`` and ``masked_input_ids``, the `MaskedTokenHead` logits of the
    masked captions, each read against its own image, for `masked_token_loss`.
    """

    def __init__(self, text_encoder: CLIPTextModel | T5EncoderModel, image_tower: ImageTower, projection_dim: int,
                 token_region_head: bool = False, masked_token_head: bool = False):
        super().__init__()
        self.text_encoder = text_encoder
        self.image_tower = image_tower
        self.text_projection = nn.Linear(text_hidden_size(text_encoder), projection_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if image_tower.config.projection_dim != projection_dim:
            raise ValueError(
                f"image_tower.projection_dim={image_tower.config.projection_dim} differs from projection_dim={projection_dim}."
            )
        hidden_size, region_channels = text_hidden_size(text_encoder), image_tower.config.block_out_channels[-1]
        num_regions = image_tower.config.pooled_size ** 2
        self.token_region_head = None
        if token_region_head:
            self.token_region_head = TokenRegionHead(hidden_size, region_channels, num_regions, projection_dim)
        self.masked_token_head = None
        if masked_token_head:
            config = text_encoder.config
            num_heads = config.num_heads if config.model_type == "t5" else config.num_attention_heads
            self.masked_token_head = MaskedTokenHead(hidden_size, region_channels, num_regions, config.vocab_size,
                                                     num_heads)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embed_pooled_text(pooled_text_features(self.text_encoder, input_ids, attention_mask))

    def embed_pooled_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, H] pooled text features -> [B, P] unit text embeddings."""
        return F.normalize(self.text_projection(pooled), dim=-1)

    def embed_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """[B, C, g, g] image-tower grid -> [B, P] unit image embeddings."""
        return F.normalize(self.image_tower.projection(grid.flatten(1)), dim=-1)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embed_grid(self.image_tower.grid(pixel_values))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                masked_input_ids: torch.Tensor | None = None) -> ContrastiveOutput:
        """``input_ids``/``attention_mask`` [B_t, L] may hold more captions than there are images [B, 3, H, W]
        (hard negatives come last); ``masked_input_ids`` [B, L] are the first B captions with words masked."""
        logit_scale = clamped_logit_scale(self.log_logit_scale)
        token_states, pooled = text_states(self.text_encoder, input_ids, attention_mask)  # [B_t, L, H], [B_t, H]
        grid = self.image_tower.grid(pixel_values)  # [B, C, g, g]
        output = ContrastiveOutput(self.embed_pooled_text(pooled), self.embed_grid(grid), logit_scale)
        num_images = len(pixel_values)
        if self.token_region_head is not None:
            output.token_embeds, output.region_embeds, output.token_logit_scale = self.token_region_head(
                token_states[:num_images], grid)
        if masked_input_ids is not None:
            if self.masked_token_head is None:
                raise ValueError("masked_input_ids given to a model built without a masked-token head.")
            masked_states = text_states(self.text_encoder, masked_input_ids, attention_mask[:num_images])[0]
            output.masked_token_logits = self.masked_token_head(masked_states, grid)  # [B, L, V]
        return output


TEXT_PROJECTION_FILE = "text_projection.safetensors"


def save_text_projection(model: TextImageContrastiveModel, output_dir: str | os.PathLike) -> Path:
    """Write ``model.text_projection.weight`` ([P, H]) to ``OUTPUT_DIR/text_projection.safetensors``, beside
    ``text_encoder/`` and ``image_tower/``: with it the stage output is the whole image-text model (its
    text-image similarity scores generated images in ``ldm-eval --text_stage``)."""
    from safetensors.torch import save_file

    path = Path(output_dir) / TEXT_PROJECTION_FILE
    save_file({"weight": model.text_projection.weight.detach().cpu().contiguous()}, str(path))
    return path


def build_contrastive_model(model_config: dict, tokenizer: PreTrainedTokenizerBase,
                            token_region_head: bool = False, masked_token_head: bool = False) -> TextImageContrastiveModel:
    """Text encoder (``build_text_encoder``) + ``ImageTower(**model_config["image_tower"])`` joined in
    ``model_config["projection_dim"]`` dimensions (and a `TokenRegionHead` when ``token_region_head``, a
    `MaskedTokenHead` when ``masked_token_head``)."""
    projection_dim = model_config.get("projection_dim", 64)
    image_tower = ImageTower(**{**model_config.get("image_tower", {}), "projection_dim": projection_dim})
    return TextImageContrastiveModel(build_text_encoder(model_config, tokenizer), image_tower, projection_dim,
                                     token_region_head, masked_token_head)


def same_caption_matrix(captions: Sequence[str]) -> torch.Tensor:
    """Boolean ``[B, B]`` matrix, ``True`` where caption i equals caption j."""
    ids = {caption: index for index, caption in enumerate(dict.fromkeys(captions))}
    labels = torch.tensor([ids[caption] for caption in captions])
    return labels[:, None] == labels[None, :]


def caption_targets(num_captions: int, same_caption: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``T`` [B, B]: the identity without ``same_caption``, else ``T_ij = same_ij / Σ_k same_ik``."""
    if same_caption is None:
        return torch.eye(num_captions, device=like.device, dtype=like.dtype)
    same = same_caption.to(device=like.device, dtype=like.dtype, non_blocking=True)
    return same / same.sum(dim=1, keepdim=True)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``CE(X, T) = -1/B · Σ_i Σ_j T_ij · log softmax_j(X_i)``."""
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def contrastive_loss(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    same_caption: torch.Tensor | None = None,
    negative_text_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) loss of L2-normalised embeddings, optionally with hard-negative captions (NegCLIP).

    ``logits_ij = logit_scale · <t_i, v_j>`` and ``loss = ½ · [CE(logits, T) + CE(logitsᵀ, Tᵀ)]`` with
    ``CE(X, T) = -1/B · Σ_i Σ_j T_ij · log softmax_j(X_i)``. Without ``same_caption``, ``T`` is the identity
    (plain CLIP). With it, image j is a correct answer for caption i whenever the two captions are equal:
    ``T_ij = same_ij / Σ_k same_ik``, so duplicate captions in a batch are not pushed apart as negatives.

    ``negative_text_embeds`` [H, D] are captions no image matches (`hard_negative_captions`). They join the texts
    each image chooses from, not the queries: the image-to-text term becomes ``CE([logitsᵀ | N], [Tᵀ | 0])`` with
    ``N_jh = logit_scale · <v_j, n_h>`` ([B, B + H] logits), the text-to-image term is unchanged (Yuksekgonul et
    al. 2023, "When and why vision-language models behave like bags-of-words", arXiv:2210.01936, sec. 4).
    """
    logits = logit_scale * text_embeds @ image_embeds.t()
    targets = caption_targets(len(logits), same_caption, logits)
    text_to_image = soft_cross_entropy(logits, targets)
    if negative_text_embeds is None:
        image_to_text = soft_cross_entropy(logits.t(), targets.t())
    else:
        negative_logits = logit_scale * image_embeds @ negative_text_embeds.t()  # [B, H]
        image_logits = torch.cat([logits.t(), negative_logits], dim=1)  # [B, B + H]
        image_targets = F.pad(targets.t(), (0, len(negative_text_embeds)))  # [B, B + H]
        image_to_text = soft_cross_entropy(image_logits, image_targets)
    return (text_to_image + image_to_text) / 2


def token_region_similarities(
    token_embeds: torch.Tensor, token_mask: torch.Tensor, region_embeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP's token-wise similarities (Yao et al. 2021, arXiv:2111.07783, sec. 3.1.1, eq. 4-5) of every caption
    i with every image j, from unit token embeddings u_il (mask m_il) and unit region embeddings w_jr:

        text to image  s_ij = Σ_l m_il · max_r <u_il, w_jr> / Σ_l m_il      each word finds its best region
        image to text  s'_ij = 1/R · Σ_r max_{l: m_il = 1} <u_il, w_jr>     each region finds its best word

    Returns ``(s, s')``, both [B_text, B_image]. A bag-of-words caption cannot separate "a red star and a green
    box" from its swap under s: its "star" token matches the star region whatever the star's colour, so only
    token states that carry their object's colour score the right image higher.
    """
    length = int(token_mask.sum(dim=1).max().clamp(min=1))
    token_embeds, token_mask = token_embeds[:, :length], token_mask[:, :length].to(token_embeds.dtype)
    similarity = torch.einsum("ilp,jrp->ijlr", token_embeds, region_embeds)  # [B_t, B_i, L, R]
    text_to_image = (similarity.amax(dim=3) * token_mask[:, None]).sum(dim=2) / token_mask.sum(dim=1, keepdim=True).clamp(min=1)
    masked = similarity.masked_fill(token_mask[:, None, :, None] == 0, float("-inf"))
    image_to_text = masked.amax(dim=2).mean(dim=2)
    return text_to_image, image_to_text


def token_region_loss(
    token_embeds: torch.Tensor,
    token_mask: torch.Tensor,
    region_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    same_caption: torch.Tensor | None = None,
) -> torch.Tensor:
    """FILIP's contrastive loss (Yao et al. 2021, arXiv:2111.07783, eq. 2-5) on `token_region_similarities`:
    ``½ · [CE(scale · s, T) + CE(scale · s'ᵀ, Tᵀ)]`` with the targets ``T`` of `contrastive_loss`."""
    text_to_image, image_to_text = token_region_similarities(token_embeds, token_mask, region_embeds)
    targets = caption_targets(len(text_to_image), same_caption, text_to_image)
    return (soft_cross_entropy(logit_scale * text_to_image, targets)
            + soft_cross_entropy(logit_scale * image_to_text.t(), targets.t())) / 2


MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # BERT's corruption of a chosen word: <mask>, a random word, or kept as it is


def mask_words(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: Sequence[int], mask_token_id: int,
               probability: float, uniform: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(corrupted_ids, targets)`` [B, L] for masked-token prediction (BERT, Devlin et al. 2019,
    arXiv:1810.04805, sec. 3.1, "Task #1").

    A word token (attended, not a special token) at position l of caption i is chosen when ``uniform[i, l, 0] <
    probability``; a caption none of whose words is drawn gets its word with the smallest draw chosen, so every
    caption with a word has at least one. A chosen word becomes ``<mask>`` when ``uniform[i, l, 1] < 0.8``, a
    random non-special token (``uniform[i, l, 2]`` picks it) when it is below 0.9, and stays as it is otherwise:
    since any word may be wrong, every token state has to carry its context, not only the masked ones.
    ``targets`` holds the original id where chosen and -100 elsewhere. ``uniform`` [B, L, 3] are U(0, 1) draws from
    the caller (the same for the same step and sample: exact resume).
    """
    special = torch.tensor(list(special_ids), device=input_ids.device)
    words = attention_mask.bool() & ~torch.isin(input_ids, special)
    uniform = uniform.to(input_ids.device)
    draws = uniform[..., 0].masked_fill(~words, 2.0)  # [B, L]; 2.0 is never drawn
    chosen = draws < probability
    first = F.one_hot(draws.argmin(dim=1), draws.shape[1]).bool() & words  # [B, L]
    chosen |= first & ~chosen.any(dim=1, keepdim=True)
    vocabulary = torch.arange(vocab_size, device=input_ids.device)
    vocabulary = vocabulary[~torch.isin(vocabulary, special)]  # [V - specials]
    random_words = vocabulary[(uniform[..., 2] * len(vocabulary)).long().clamp(max=len(vocabulary) - 1)]  # [B, L]
    corrupted = torch.where(chosen & (uniform[..., 1] < MASK_SHARE), mask_token_id, input_ids)
    corrupted = torch.where(chosen & (uniform[..., 1] >= MASK_SHARE) & (uniform[..., 1] < MASK_SHARE + RANDOM_SHARE),
                            random_words, corrupted)
    return corrupted, input_ids.masked_fill(~chosen, -100)


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor, num_masked: torch.Tensor | int | None = None) -> torch.Tensor:
    """``Σ_{masked (i, l)} -log softmax(logits_il)[target_il] / num_masked`` ([B, L, V] logits, [B, L] targets with
    -100 where nothing is masked). ``num_masked`` defaults to this batch's count; in a run of several processes
    it is the global batch's count, so that the processes' losses add up to the global batch's mean."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    count = (targets != -100).sum() if num_masked is None else num_masked
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


def hard_negative_captions(captions: Sequence[str]) -> list[tuple[int, str]]:
    """``(i, negative)`` pairs: the hard negatives of a (global) batch of captions, each from its caption ``i``.

    The negative of a caption is its `binding_counterpart` (the same words, colours or objects swapped: "a red
    star and a green box" -> "a green star and a red box", "a cat left of a tree" -> "a tree left of a cat"), as
    in NegCLIP (Yuksekgonul et al. 2023, arXiv:2210.01936, sec. 4). A negative is kept only if it means a scene
    no caption of the batch means (`canonical_caption`: "a tree left of a cat" is dropped when the batch holds
    "a cat right of a tree"), and each meaning once, from its first caption. Captions of the other categories
    and captions outside the shapes grammar (user data) have none.
    """
    batch_meanings = {canonical_caption(caption) for caption in captions}
    negatives, seen = [], set()
    for index, caption in enumerate(captions):
        negative = binding_counterpart(caption)
        if negative is None:
            continue
        meaning = canonical_caption(negative)
        if meaning not in batch_meanings and meaning not in seen:
            seen.add(meaning)
            negatives.append((index, negative))
    return negatives


@torch.no_grad()
def retrieval_accuracy(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    captions: Sequence[str] | None = None,
    k: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Text-to-image top-k retrieval accuracy over N held-out pairs (caption i belongs to image i).

    Each caption queries all N images ranked by cosine similarity. Rule for duplicates: the dataset has
    identical captions for different images, and such images are equally right answers, so a query is a hit at
    k when any of the k best images has a caption equal to the query's (with ``captions=None`` only image i
    counts). Returns ``{"top1": ..., "top5": ..., "chance_top1": ...}``; ``chance_top1`` is the top-1 accuracy a
    random ranking has in expectation, ``mean_i (#images whose caption equals caption i) / N``.
    """
    if text_embeds.shape != image_embeds.shape or text_embeds.ndim != 2:
        raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and image_embeds {tuple(image_embeds.shape)} must both be [N, D].")
    num_pairs = len(text_embeds)
    if captions is not None and len(captions) != num_pairs:
        raise ValueError(f"Got {len(captions)} captions for {num_pairs} pairs.")
    correct = torch.eye(num_pairs, dtype=torch.bool) if captions is None else same_caption_matrix(captions)
    similarity = F.normalize(text_embeds.float(), dim=-1) @ F.normalize(image_embeds.float(), dim=-1).t()
    ranking = similarity.cpu().argsort(dim=1, descending=True)
    hits = correct.gather(1, ranking)
    metrics = {f"top{kk}": hits[:, :kk].any(dim=1).float().mean().item() for kk in k}
    metrics["chance_top1"] = correct.float().mean(dim=1).mean().item()
    return metrics


class CollateWithTokens:
    """The DataLoader's ``collate_fn`` of the contrastive stage: ``collate_examples`` plus the captions' tokens
    (``input_ids``, ``attention_mask`` [B, L], ``tokenize_prompts``), so that DataLoader workers tokenize, not the
    training loop (256 captions cost milliseconds of the host's time per step)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        from ldm_pipeline.data import collate_examples

        batch = collate_examples(items)
        tokens = tokenize_prompts(self.tokenizer, batch["captions"])
        return {**batch, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def gather_captions(accelerator, captions: Sequence[str]) -> list[str]:
    """The captions of the global batch: every process's, in process order."""
    from accelerate.utils import gather_object

    return list(captions) if accelerator.num_processes == 1 else list(gather_object(list(captions)))


def gather_rows(accelerator, rows: torch.Tensor) -> torch.Tensor:
    """Every process's ``rows`` [B_p, D] (B_p may differ between processes) concatenated in process order, this
    process's own rows kept in the autograd graph (the others are copies without gradient).

    Every process then computes the contrastive loss L of the whole global batch, so the negatives of a caption are
    all n·B images, as with one process of batch n·B. Process p's gradient covers only the paths through its own
    rows; DDP averages the n gradients, so the loss to backpropagate is n · L (``StageTrainer.backward`` of
    ``loss * num_processes``), whose averaged gradient is the gradient of L (Radford et al. 2021, arXiv:2103.00020,
    sec. 2.5: the similarity matrix over the global batch).
    """
    from accelerate.utils import gather

    count, index = accelerator.num_processes, accelerator.process_index
    if count == 1:
        return rows
    sizes = gather(torch.tensor([len(rows)], device=rows.device)).tolist()
    width = max(max(sizes), 1)
    padded = rows.new_zeros((width, *rows.shape[1:]))
    padded[: len(rows)] = rows.detach()
    everyone = gather(padded)  # [n·width, D]
    return torch.cat([rows if process == index else everyone[process * width: process * width + size]
                      for process, size in enumerate(sizes)])


def own_hard_negatives(accelerator, batch_captions: Sequence[str], num_own: int) -> tuple[list[str], int]:
    """This process's share of the global batch's hard negatives and how many the global batch has.

    ``batch_captions`` are the global batch's (`gather_captions`), of which this process holds ``num_own`` from
    ``process_index * num_own``. The negatives are those of `hard_negative_captions` over all of them, so ``n``
    processes of batch ``B`` get the negatives of one process of batch ``n·B``; each process encodes the ones that
    come from its own captions, and `gather_rows` joins them in the same order.
    """
    negatives = hard_negative_captions(batch_captions)
    first = accelerator.process_index * num_own
    return [negative for index, negative in negatives if first <= index < first + num_own], len(negatives)


@torch.no_grad()
def evaluate_retrieval(model: TextImageContrastiveModel, tokenizer, dataloader, device) -> dict:
    """Held-out text-to-image retrieval: every caption ranks every held-out image (see ``retrieval_accuracy``)."""
    was_training = model.training
    model.eval()
    text_embeds, image_embeds, captions = [], [], []
    for batch in dataloader:
        tokens = tokenize_prompts(tokenizer, batch["captions"])
        text_embeds.append(model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).cpu())
        image_embeds.append(model.encode_image(batch["pixel_values"].to(device)).cpu())
        captions += batch["captions"]
    model.train(was_training)
    metrics = retrieval_accuracy(torch.cat(text_embeds), torch.cat(image_embeds), captions, k=(1, 5))
    return {**metrics, "num_pairs": len(captions)}
