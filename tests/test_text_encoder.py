"""Stage 1: tokenizer, CLIP/T5 text encoders, contrastive loss, retrieval metric and the training script."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel, CLIPTextModel, T5EncoderModel

from conftest import run_stage
from ldm_pipeline.text_encoder import (
    ImageTower,
    build_contrastive_model,
    build_text_encoder,
    contrastive_loss,
    load_pretrained_text_encoder,
    mask_words,
    masked_token_loss,
    pooled_text_features,
    retrieval_accuracy,
    same_caption_matrix,
    text_states,
    token_region_loss,
    token_region_similarities,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parent.parent
TINY = {"clip": REPO / "configs" / "tiny" / "text_encoder.json", "t5": REPO / "configs" / "tiny" / "text_encoder_t5.json"}
CAPTIONS = [
    "a red cat", "a blue house", "two green stars", "a red cat left of a blue house",
    "a yellow car above a purple heart", "three orange circles", "a red cat",
]


def tiny_model_config(architecture: str) -> dict:
    return json.loads(TINY[architecture].read_text())["model"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(CAPTIONS, vocab_size=100, model_max_length=12).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_through_auto_tokenizer(tokenizer):
    assert (tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<unk>", "<s>", "</s>")
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2, 3)
    assert tokenizer.model_max_length == 12
    vocab = tokenizer.get_vocab()

    encoding = tokenizer(["A Red CAT", "a red cat left of a blue house above a red cat"],
                         padding="max_length", truncation=True, max_length=tokenizer.model_max_length)
    short, long = encoding.input_ids
    assert short == [2, vocab["a"], vocab["red"], vocab["cat"], 3] + [0] * 7
    assert encoding.attention_mask[0] == [1] * 5 + [0] * 7
    assert len(long) == 12 and long[0] == 2 and long[-1] == 3, "truncation must keep <s> ... </s>"
    assert tokenizer.decode(short, skip_special_tokens=True) == "a red cat"


def test_tokenizer_vocabulary_is_deterministic_and_frequency_ordered():
    first = train_tokenizer(CAPTIONS, vocab_size=100, model_max_length=12).get_vocab()
    assert first == train_tokenizer(CAPTIONS, vocab_size=100, model_max_length=12).get_vocab()
    words = sorted((token for token in first if len(token) > 1 and not token.startswith(("#", "<"))), key=first.get)
    assert words[:4] == ["cat", "red", "blue", "house"], "most frequent first, ties alphabetical"
    # an unseen word made of seen letters is spelled with word pieces, not mapped to <unk>
    tokenizer = train_tokenizer(CAPTIONS, vocab_size=100, model_max_length=12)
    assert tokenizer.tokenize("car") == ["car"]
    assert tokenizer.tokenize("rat") == ["r", "##a", "##t"]
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CAPTIONS, vocab_size=10, model_max_length=12)


# ------------------------------------------------------------------------------------------- text encoders


def test_clip_text_encoder_pools_at_eos_and_ignores_padding(tokenizer):
    encoder = build_text_encoder(tiny_model_config("clip"), tokenizer).eval()
    assert isinstance(encoder, CLIPTextModel)
    assert (encoder.config.eos_token_id, encoder.config.pad_token_id, encoder.config.vocab_size) == (3, 0, len(tokenizer))
    assert encoder.config.max_position_embeddings == tokenizer.model_max_length

    ids = tokenizer(["a red cat", "two green stars left of a red cat"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        pooled = pooled_text_features(encoder, ids.input_ids, ids.attention_mask)
        hidden = encoder(ids.input_ids).last_hidden_state
    eos_positions = (ids.input_ids == 3).int().argmax(dim=1)
    torch.testing.assert_close(pooled, hidden[torch.arange(2), eos_positions])
    with torch.no_grad():
        unpadded = pooled_text_features(encoder, ids.input_ids[:1, :5], ids.attention_mask[:1, :5])
    torch.testing.assert_close(unpadded, pooled[:1])


def test_t5_text_encoder_pools_masked_mean(tokenizer):
    encoder = build_text_encoder(tiny_model_config("t5"), tokenizer).eval()
    assert isinstance(encoder, T5EncoderModel)
    assert (encoder.config.eos_token_id, encoder.config.pad_token_id, encoder.config.vocab_size) == (3, 0, len(tokenizer))

    ids = tokenizer(["a red cat", "two green stars left of a red cat"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        pooled = pooled_text_features(encoder, ids.input_ids, ids.attention_mask)
        hidden = encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    length = int(ids.attention_mask[0].sum())
    torch.testing.assert_close(pooled[0], hidden[0, :length].mean(dim=0))
    with torch.no_grad():
        unpadded = pooled_text_features(encoder, ids.input_ids[:1, :length], ids.attention_mask[:1, :length])
    torch.testing.assert_close(unpadded, pooled[:1], atol=1e-5, rtol=1e-5)


def test_bad_model_configs_are_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="architecture"):
        build_text_encoder({"architecture": "bert"}, tokenizer)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        build_text_encoder({"architecture": "clip", "text_encoder": {"max_position_embeddings": 4}}, tokenizer)
    with pytest.raises(ValueError, match="patch_size"):
        ImageTower(patch_size=0)
    with pytest.raises(ValueError, match="norm_num_groups"):
        ImageTower(block_out_channels=(8, 12), norm_num_groups=8)


def test_relative_attention_slopes_start_t5_bias_as_alibi_distance_penalty(tokenizer):
    slopes = [2.0, 1.0, 0.5, 0.0]
    model_config = {**tiny_model_config("t5"), "relative_attention_slopes": slopes}
    model_config["text_encoder"] = {**model_config["text_encoder"], "num_heads": 4}
    encoder = build_text_encoder(model_config, tokenizer)
    attention = encoder.encoder.block[0].layer[0].SelfAttention
    bias = attention.compute_bias(8, 8)[0]  # [heads, query, key]; T5 buckets are exact for |j - i| < 8
    distance = np.abs(np.arange(8)[None, :] - np.arange(8)[:, None])
    expected = -np.array(slopes)[:, None, None] * distance[None]
    np.testing.assert_allclose(bias.detach().numpy(), expected, atol=1e-6)
    assert attention.relative_attention_bias.weight.requires_grad, "a starting point, still trained"


def test_bad_relative_attention_slopes_are_clear_errors(tokenizer):
    t5 = tiny_model_config("t5")
    with pytest.raises(ValueError, match=r"relative_attention_slopes.*2 numbers >= 0"):
        build_text_encoder({**t5, "relative_attention_slopes": [1.0, 0.5, 0.25]}, tokenizer)
    with pytest.raises(ValueError, match=r"relative_attention_slopes.*2 numbers >= 0"):
        build_text_encoder({**t5, "relative_attention_slopes": [1.0, -1.0]}, tokenizer)
    with pytest.raises(ValueError, match="applies to T5"):
        build_text_encoder({**tiny_model_config("clip"), "relative_attention_slopes": [1.0, 1.0]}, tokenizer)


def test_image_tower_patch_stem_keeps_a_spatial_grid():
    tower = ImageTower(block_out_channels=(8, 16), norm_num_groups=4, pooled_size=2, patch_size=4, projection_dim=5)
    stem = tower.features[0]
    assert (stem.kernel_size, stem.stride, stem.out_channels) == ((4, 4), (4, 4), 8)
    assert tower.features(torch.zeros(3, 3, 64, 64)).shape == (3, 16 * 2 * 2)
    assert tower(torch.zeros(3, 3, 64, 64)).shape == (3, 5)


@pytest.mark.parametrize("architecture", ["clip", "t5"])
def test_contrastive_training_loss_falls(tokenizer, architecture):
    torch.manual_seed(0)
    model = build_contrastive_model(tiny_model_config(architecture), tokenizer)
    captions = ["a red cat", "a blue house", "two green stars", "three orange circles"]
    colors = torch.tensor([[1.0, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 0, -1]])
    images = torch.zeros(4, 3, 32, 32)
    for index, (color, corner) in enumerate(zip(colors, [(0, 0), (0, 16), (16, 0), (16, 16)])):
        images[index, :, corner[0]:corner[0] + 16, corner[1]:corner[1] + 16] = color[:, None, None]
    tokens = tokenizer(captions, padding="max_length", return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        output = model(tokens.input_ids, tokens.attention_mask, images)
        loss = contrastive_loss(output.text_embeds, output.image_embeds, output.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 1.0 and losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        output = model(tokens.input_ids, tokens.attention_mask, images)
    assert retrieval_accuracy(output.text_embeds, output.image_embeds, captions)["top1"] == 1.0


# ------------------------------------------------------------------------------ loss and retrieval metric


def test_contrastive_loss_matches_hand_computation():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits = 2 * [[1, 0.6], [0, 0.8]]
    rows = -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) - math.log(math.exp(1.6) / (1 + math.exp(1.6)))
    cols = -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
    expected = 0.5 * (rows / 2 + cols / 2)
    assert contrastive_loss(text, image, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_matches_clip_reference_and_handles_duplicate_captions():
    generator = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    image = F.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    logits = 3.0 * text @ image.t()
    reference = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    torch.testing.assert_close(contrastive_loss(text, image, 3.0), reference)
    distinct = ["a", "b", "c", "d", "e", "f"]
    torch.testing.assert_close(contrastive_loss(text, image, 3.0, same_caption_matrix(distinct)), reference)

    # captions 0 and 1 are equal: both images are right answers for both captions, with weight 1/2 each
    duplicated = ["a", "a", "c", "d", "e", "f"]
    targets = torch.eye(6)
    targets[:2, :2] = 0.5
    soft = lambda x: -(targets * x.log_softmax(dim=1)).sum(dim=1).mean()  # noqa: E731
    expected = (soft(logits) + soft(logits.t())) / 2
    torch.testing.assert_close(contrastive_loss(text, image, 3.0, same_caption_matrix(duplicated)), expected)


def test_token_region_similarities_match_a_loop_over_filip_equations():
    generator = torch.Generator().manual_seed(0)
    tokens = F.normalize(torch.randn(3, 6, 5, generator=generator), dim=-1)  # [B_t, L, P]
    regions = F.normalize(torch.randn(4, 9, 5, generator=generator), dim=-1)  # [B_i, R, P]
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    text_to_image, image_to_text = token_region_similarities(tokens, mask, regions)
    t, v, m = tokens.double().numpy(), regions.double().numpy(), mask.numpy().astype(bool)
    for i in range(3):
        for j in range(4):
            cosines = t[i][m[i]] @ v[j].T  # [words of caption i, R]
            assert text_to_image[i, j].item() == pytest.approx(cosines.max(axis=1).mean(), abs=1e-6)
            assert image_to_text[i, j].item() == pytest.approx(cosines.max(axis=0).mean(), abs=1e-6)


def test_token_region_loss_is_the_symmetric_contrastive_loss_of_its_similarities():
    generator = torch.Generator().manual_seed(1)
    tokens = F.normalize(torch.randn(4, 5, 6, generator=generator), dim=-1)
    regions = F.normalize(torch.randn(4, 4, 6, generator=generator), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    text_to_image, image_to_text = token_region_similarities(tokens, mask, regions)
    expected = (F.cross_entropy(5.0 * text_to_image, torch.arange(4))
                + F.cross_entropy(5.0 * image_to_text.t(), torch.arange(4))) / 2
    torch.testing.assert_close(token_region_loss(tokens, mask, regions, 5.0), expected)
    duplicated = same_caption_matrix(["a", "a", "b", "c"])
    targets = duplicated.double() / duplicated.double().sum(dim=1, keepdim=True)
    soft = lambda x, y: -(y * x.double().log_softmax(dim=1)).sum(dim=1).mean()  # noqa: E731
    expected = (soft(5.0 * text_to_image, targets) + soft(5.0 * image_to_text.t(), targets.t())) / 2
    assert token_region_loss(tokens, mask, regions, 5.0, duplicated).item() == pytest.approx(expected.item(), rel=1e-6)


def test_token_region_similarity_tells_a_colour_swap_only_from_bound_token_states():
    red, green, star, box = torch.eye(4)
    regions = torch.stack([F.normalize(red + star, dim=0), F.normalize(green + box, dim=0)])[None]  # red star, green box
    swapped = torch.stack([F.normalize(green + star, dim=0), F.normalize(red + box, dim=0)])[None]
    images = torch.cat([regions, swapped])  # [2, R, P]
    mask = torch.ones(1, 4)
    bag_of_words = torch.stack([red, star, green, box])[None]  # "a red star and a green box", word by word
    bound = torch.stack([red, F.normalize(red + star, dim=0), green, F.normalize(green + box, dim=0)])[None]
    scores_bag, _ = token_region_similarities(bag_of_words, mask, images)
    scores_bound, _ = token_region_similarities(bound, mask, images)
    assert scores_bag[0, 0].item() == pytest.approx(scores_bag[0, 1].item())
    assert scores_bound[0, 0].item() > scores_bound[0, 1].item() + 0.1


def model_with_head(tokenizer, architecture: str, **head: bool):
    """A tiny image-text model in eval mode with the given head, three captions' tokens and three images."""
    torch.manual_seed(0)
    model = build_contrastive_model(tiny_model_config(architecture), tokenizer, **head).eval()
    tokens = tokenizer(CAPTIONS[:3], padding="max_length", return_tensors="pt")
    return model, tokens, torch.rand(3, 3, 32, 32) * 2 - 1


@pytest.mark.parametrize("architecture", ["clip", "t5"])
def test_token_region_head_returns_token_states_of_the_same_forward_pass(tokenizer, architecture):
    model, tokens, images = model_with_head(tokenizer, architecture, token_region_head=True)
    with torch.no_grad():
        output = model(tokens.input_ids, tokens.attention_mask, images)
        states, _ = text_states(model.text_encoder, tokens.input_ids, tokens.attention_mask)
        head = model.token_region_head
        grid = model.image_tower.grid(images)
    torch.testing.assert_close(output.text_embeds, model.encode_text(tokens.input_ids, tokens.attention_mask))
    torch.testing.assert_close(output.image_embeds, model.encode_image(images))
    torch.testing.assert_close(output.token_embeds, F.normalize(head.token_projection(states), dim=-1))
    pooled_size = model.image_tower.config.pooled_size
    cells = grid.permute(0, 2, 3, 1).reshape(3, pooled_size ** 2, -1)  # row-major cells
    torch.testing.assert_close(output.region_embeds, F.normalize(head.region_projection(cells) + head.region_position, dim=-1))


def test_mask_words_corrupts_only_words_at_the_drawn_positions_as_bert_does(tokenizer):
    tokens = tokenizer(["a red cat left of a blue house", "a cat", ""], padding="max_length", return_tensors="pt")
    ids, mask = tokens.input_ids, tokens.attention_mask
    special = torch.tensor(tokenizer.all_special_ids)
    words = mask.bool() & ~torch.isin(ids, special)
    uniform = torch.rand((*ids.shape, 3), generator=torch.Generator().manual_seed(0))
    corrupted, targets = mask_words(ids, mask, tokenizer.all_special_ids, tokenizer.mask_token_id, 0.3, uniform,
                                    len(tokenizer))
    chosen = words & (uniform[..., 0] < 0.3)
    for row in range(2):  # a caption none of whose draws is below 0.3 gets its word with the smallest draw
        if not chosen[row].any():
            chosen[row, uniform[row, :, 0].masked_fill(~words[row], 2).argmin()] = True
    assert chosen[:2].any(dim=1).all() and not chosen[2].any()
    assert torch.equal(targets, ids.masked_fill(~chosen, -100)) and torch.equal(corrupted[~chosen], ids[~chosen])
    non_special = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    for i, l in chosen.nonzero().tolist():
        kind, pick = uniform[i, l, 1].item(), uniform[i, l, 2].item()
        expected = (tokenizer.mask_token_id if kind < 0.8 else non_special[int(pick * len(non_special))] if kind < 0.9
                    else ids[i, l].item())
        assert corrupted[i, l].item() == expected
    # every word chosen; with draws of 0 in the second channel every one becomes <mask>
    everything, _ = mask_words(ids, mask, tokenizer.all_special_ids, tokenizer.mask_token_id, 1.0,
                               torch.zeros((*ids.shape, 3)), len(tokenizer))
    assert torch.equal(everything == tokenizer.mask_token_id, words)
    large = torch.rand((4000, 1, 3), generator=torch.Generator().manual_seed(1))
    many, _ = mask_words(ids[:1, 2:3].repeat(4000, 1), torch.ones(4000, 1, dtype=torch.long),
                         tokenizer.all_special_ids, tokenizer.mask_token_id, 1.0, large, len(tokenizer))
    assert abs((many == tokenizer.mask_token_id).float().mean().item() - 0.8) < 0.03


def test_masked_token_loss_is_the_mean_cross_entropy_over_masked_words():
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[-100, 3, -100, 5], [6, -100, -100, -100]])
    by_hand = -(logits[0, 1].log_softmax(-1)[3] + logits[0, 3].log_softmax(-1)[5] + logits[1, 0].log_softmax(-1)[6]) / 3
    torch.testing.assert_close(masked_token_loss(logits, targets), by_hand)
    # a process of a run of several divides its sum by the global batch's count
    torch.testing.assert_close(masked_token_loss(logits, targets, num_masked=torch.tensor(6)), by_hand / 2)


@pytest.mark.parametrize("architecture", ["clip", "t5"])
def test_masked_token_head_reads_masked_states_against_their_own_image(tokenizer, architecture):
    model, tokens, images = model_with_head(tokenizer, architecture, masked_token_head=True)
    masked = tokens.input_ids.clone()
    masked[:, 2] = tokenizer.mask_token_id
    with torch.no_grad():
        output = model(tokens.input_ids, tokens.attention_mask, images, masked_input_ids=masked)
        states, _ = text_states(model.text_encoder, masked, tokens.attention_mask)  # [3, L, H]
        head, grid = model.masked_token_head, model.image_tower.grid(images)  # [3, C, g, g]
        regions = head.region_projection(grid.flatten(2).transpose(1, 2)) + head.region_position  # [3, g·g, H]
        queries = states @ head.attention.in_proj_weight[:states.shape[-1]].t()  # one head at a time below
    num_heads, width = head.attention.num_heads, states.shape[-1] // head.attention.num_heads
    keys, values = (regions @ w.t() + b for w, b in zip(head.attention.in_proj_weight.chunk(3)[1:],
                                                        head.attention.in_proj_bias.chunk(3)[1:]))
    queries = queries + head.attention.in_proj_bias[:states.shape[-1]]
    split = lambda x: x.unflatten(-1, (num_heads, width)).transpose(1, 2)  # noqa: E731  [B, heads, n, width]
    weights = (split(queries) @ split(keys).transpose(-1, -2) / math.sqrt(width)).softmax(-1)
    attended = head.attention.out_proj((weights @ split(values)).transpose(1, 2).flatten(2))
    torch.testing.assert_close(output.masked_token_logits, head.mlp(head.norm(states + attended)), atol=1e-5, rtol=1e-4)
    assert output.masked_token_logits.shape == (3, tokens.input_ids.shape[1], len(tokenizer))
    changed = images.clone()
    changed[0] = -changed[0]
    with torch.no_grad():  # each caption is read against its own image: another image 0 changes only row 0
        other = model(tokens.input_ids, tokens.attention_mask, changed, masked_input_ids=masked).masked_token_logits
    torch.testing.assert_close(other[1:], output.masked_token_logits[1:])
    assert not torch.allclose(other[0], output.masked_token_logits[0])


def test_retrieval_accuracy_perfect_alignment_and_duplicate_caption_rule():
    embeds = torch.eye(6)
    perfect = retrieval_accuracy(embeds, embeds, [f"caption {i}" for i in range(6)])
    assert perfect["top1"] == 1.0 and perfect["top5"] == 1.0
    assert perfect["chance_top1"] == pytest.approx(1 / 6)

    # query i is closest to image i - 1, then to image i
    text = embeds
    image = F.normalize(0.5 * embeds + embeds.roll(-1, dims=0), dim=-1)
    by_index = retrieval_accuracy(text, image, k=(1, 2))
    assert by_index["top1"] == 0.0 and by_index["top2"] == 1.0

    # captions 0 and 1 are identical, so query 1 retrieving image 0 becomes a hit
    captions = ["a red cat", "a red cat", "a", "b", "c", "d"]
    by_caption = retrieval_accuracy(text, image, captions, k=(1, 2))
    assert by_caption["top1"] == pytest.approx(1 / 6) and by_caption["top2"] == 1.0
    assert by_caption["chance_top1"] == pytest.approx((2 / 6 * 2 + 1 / 6 * 4) / 6)
    with pytest.raises(ValueError, match="captions"):
        retrieval_accuracy(text, image, captions[:3])


def test_retrieval_accuracy_on_hand_made_similarity_matrix():
    """With image_embeds = I the similarity matrix is the row-normalised text_embeds, so ranks are set by hand:
    query i has its own image at rank i + 1 (1-based), the other images in decreasing order after it."""
    similarity = torch.tensor([
        [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],   # own image (0) ranked 1st
        [0.9, 0.8, 0.1, 0.2, 0.3, 0.4],   # own image (1) ranked 2nd
        [0.9, 0.8, 0.7, 0.1, 0.2, 0.3],   # 3rd
        [0.9, 0.8, 0.7, 0.6, 0.1, 0.2],   # 4th
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],   # 5th
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],   # 6th
    ])
    metrics = retrieval_accuracy(similarity, torch.eye(6), k=(1, 2, 5, 6))
    assert metrics["top1"] == pytest.approx(1 / 6) and metrics["top2"] == pytest.approx(2 / 6)
    assert metrics["top5"] == pytest.approx(5 / 6) and metrics["top6"] == 1.0
    # query 5 shares its caption with image 0, its best match, so it becomes a top-1 hit
    captions = ["red", "a", "b", "c", "d", "red"]
    shared = retrieval_accuracy(similarity, torch.eye(6), captions, k=(1, 5))
    assert shared["top1"] == pytest.approx(2 / 6) and shared["top5"] == 1.0


# ------------------------------------------------------------------------------------- training script






@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_run")
    metrics = run_stage("text_encoder", ["--config", str(TINY["clip"]), "--output_dir", str(out)])
    return out, metrics


def check_saved_stage(out: Path, model_class) -> None:
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    encoder = model_class.from_pretrained(out / "text_encoder")
    assert (out / "text_encoder" / "model.safetensors").is_file()
    assert not list((out / "text_encoder").glob("*.bin"))
    assert (out / "image_tower" / "diffusion_pytorch_model.safetensors").is_file()
    ImageTower.from_pretrained(out / "image_tower")
    assert encoder.config.vocab_size == len(tokenizer) and encoder.config.eos_token_id == tokenizer.eos_token_id
    loaded_tokenizer, loaded_encoder = load_pretrained_text_encoder(out)
    assert isinstance(loaded_encoder, model_class) and loaded_tokenizer.get_vocab() == tokenizer.get_vocab()


def test_train_script_clip_end_to_end(clip_run, capsys):
    out, metrics = clip_run
    check_saved_stage(out, CLIPTextModel)
    saved = json.loads((out / "text_encoder_metrics.json").read_text())
    assert saved["architecture"] == "clip" and saved["train_steps"] == 8 and saved["num_pairs"] == 32
    assert 0.0 <= saved["top1"] <= saved["top5"] <= 1.0 and saved == metrics
    history = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in history if "loss" in record] == list(range(1, 9))
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard logs missing"


def test_train_script_t5_end_to_end_with_quiet_logs(tmp_path, capsys, caplog):
    """A T5 stage with a checkpoint: its log holds no library bookkeeping (Accelerate's seven INFO lines per
    checkpoint, the shared-tensor warning of T5's tied embedding, the project's own checkpoint line, which is at debug
    level) but a loss line every --logging_steps."""
    caplog.set_level(logging.INFO)
    metrics = run_stage("text_encoder", ["--config", str(TINY["t5"]), "--output_dir", str(tmp_path), "--max_train_steps", "4",
                          "--gradient_accumulation_steps", "2", "--logging_steps", "4"])
    printed = capsys.readouterr().out
    assert f"retrieval top1={metrics['top1']:.3f} top5={metrics['top5']:.3f} (32 held-out pairs" in printed
    check_saved_stage(tmp_path, T5EncoderModel)
    assert metrics["architecture"] == "t5" and metrics["train_steps"] == 4
    assert (tmp_path / "checkpoints" / "checkpoint-4").is_dir()
    losses = [record["loss"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()
              if "loss" in (record := json.loads(line))]
    assert f"step 4/4: loss {sum(losses) / 4:.4f} (mean of the last 4 steps), lr " in printed
    logged = [f"{record.name}: {record.getMessage()}" for record in caplog.records]
    assert not [line for line in logged if line.startswith(("accelerate.checkpointing", "accelerate.accelerator"))
                or "shared tensor" in line or "Saved checkpoint" in line], logged


def test_train_script_with_the_token_region_and_masked_token_losses_logs_them_and_resumes_exactly(tmp_path):
    flags = ["--config", str(TINY["t5"]), "--token_region_weight", "0.5", "--masked_token_weight", "1",
             "--max_train_steps", "4", "--checkpointing_steps", "2"]
    run_stage("text_encoder", flags + ["--output_dir", str(tmp_path / "full")])
    history = [json.loads(line) for line in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    token_losses = [record["token_region_loss"] for record in history if "loss" in record]
    assert len(token_losses) == 4 and all(0 < value < math.log(64) + 1 for value in token_losses), history
    vocabulary = len(AutoTokenizer.from_pretrained(tmp_path / "full" / "tokenizer"))
    word_losses = [record["masked_token_loss"] for record in history if "loss" in record]
    assert len(word_losses) == 4 and abs(word_losses[0] - math.log(vocabulary)) < 1.0, (word_losses, vocabulary)
    run_stage("text_encoder", flags + ["--output_dir", str(tmp_path / "resumed"), "--max_train_steps", "2"])
    run_stage("text_encoder", flags + ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"])
    full = load_file(tmp_path / "full" / "text_encoder" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "text_encoder" / "model.safetensors")
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_resume_from_checkpoint_continues_exactly(clip_run, tmp_path):
    full_run, _ = clip_run
    run_stage("text_encoder", ["--config", str(TINY["clip"]), "--output_dir", str(tmp_path), "--max_train_steps", "4"])
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-4"]
    run_stage("text_encoder", ["--config", str(TINY["clip"]), "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    uninterrupted = load_file(full_run / "text_encoder" / "model.safetensors")
    resumed = load_file(tmp_path / "text_encoder" / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name


def test_pretrained_text_encoder_is_copied_without_training(tokenizer, tmp_path):
    hub_like = tmp_path / "tiny-clip"  # a Hub repository keeps tokenizer and model in one folder
    source = build_text_encoder(tiny_model_config("clip"), tokenizer)
    source.save_pretrained(hub_like)
    tokenizer.save_pretrained(hub_like)
    out = tmp_path / "out"
    run_stage("text_encoder", ["--config", str(TINY["clip"]), "--output_dir", str(out), "--pretrained_text_encoder", str(hub_like)])
    copied = load_file(out / "text_encoder" / "model.safetensors")
    for name, weight in source.state_dict().items():
        assert torch.equal(copied[name], weight), name
    assert AutoTokenizer.from_pretrained(out / "tokenizer").get_vocab() == tokenizer.get_vocab()
    assert not (out / "checkpoints").exists()

    pipeline_like = tmp_path / "t5-pipeline"  # tokenizer/ and text_encoder/ sub-folders
    build_text_encoder(tiny_model_config("t5"), tokenizer).save_pretrained(pipeline_like / "text_encoder")
    tokenizer.save_pretrained(pipeline_like / "tokenizer")
    assert isinstance(load_pretrained_text_encoder(pipeline_like)[1], T5EncoderModel)

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)).save_pretrained(bert)
    with pytest.raises(ValueError, match="CLIP or a T5"):
        load_pretrained_text_encoder(bert)
    with pytest.raises(FileNotFoundError):
        load_pretrained_text_encoder(tmp_path / "missing")


def make_imagefolder(root: Path, num_images: int) -> None:
    from ldm_pipeline.data import ShapesDataset

    root.mkdir(parents=True)
    shapes = ShapesDataset(num_images, 32, seed=1)
    with open(root / "metadata.jsonl", "w") as metadata:
        for index in range(num_images):
            item = shapes[index]
            item["image"].save(root / f"{index}.png")
            metadata.write(json.dumps({"file_name": f"{index}.png", "text": f"{item['caption']} number {index}"}) + "\n")


def test_dataset_captions_are_those_of_the_split_items(tmp_path):
    from ldm_pipeline.config import DataConfig
    from ldm_pipeline.data import build_dataset, dataset_captions

    make_imagefolder(tmp_path / "folder", 12)
    for data in ({"num_train_samples": 10, "num_validation_samples": 5},
                 {"train_data_dir": str(tmp_path / "folder"), "num_held_out_samples": 3}):
        for split in ("train", "validation"):
            dataset = build_dataset(DataConfig(resolution=32, **data), split=split)
            assert dataset_captions(dataset) == [dataset[i]["caption"] for i in range(len(dataset))]
    assert len(dataset) == 3


def test_train_script_on_an_imagefolder(tmp_path):
    make_imagefolder(tmp_path / "folder", 24)
    metrics = run_stage("text_encoder", ["--config", str(TINY["clip"]), "--output_dir", str(tmp_path / "out"), "--train_data_dir",
                          str(tmp_path / "folder"), "--num_held_out_samples", "6", "--max_train_steps", "1",
                          "--checkpointing_steps", "1"])
    assert metrics["num_pairs"] == 6 and metrics["train_steps"] == 1
    check_saved_stage(tmp_path / "out", CLIPTextModel)


def test_two_process_cpu_launch(tmp_path):
    """``accelerate launch --config_file configs/accelerate/cpu_2_processes.yaml``: 2 CPU processes (gloo) of batch
    8 compute the contrastive loss over the global batch and the masked-token loss as shares of the global batch's
    mean, so they train as 1 process of batch 16 does."""
    two, one = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "cpu_2_processes.yaml"),
               str(REPO / "training" / "train_text_encoder.py"), "--config", str(TINY["clip"]),
               "--output_dir", str(two), "--max_train_steps", "3", "--checkpointing_steps", "3",
               "--train_batch_size", "8", "--masked_token_weight", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "batch 8 x 2 processes" in result.stdout
    assert result.stdout.count("retrieval top1=") == 1, "only the main process reports"
    assert (two / "checkpoints" / "checkpoint-3" / "random_states_1.pkl").is_file()
    check_saved_stage(two, CLIPTextModel)
    run_stage("text_encoder", ["--config", str(TINY["clip"]), "--output_dir", str(one), "--max_train_steps", "3",
                               "--checkpointing_steps", "3", "--train_batch_size", "16", "--masked_token_weight", "1"])
    history = {path: [json.loads(line)["loss"] for line in (path / "train_log.jsonl").read_text().splitlines()
                      if '"loss"' in line] for path in (one, two)}
    np.testing.assert_allclose(history[two], history[one], rtol=1e-4)
