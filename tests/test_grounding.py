"""The grounding loss (TokenCompose's token and pixel terms on cross-attention): which words name which objects,
their masks, the targets in token positions, the recorder against Diffusers' attention, the two terms against
their formulas, and train_unet.py with the loss, cached and uncached."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from conftest import make_tiny_tokenizer, make_tiny_unet, run_stage
from ldm_pipeline.data import shapes
from ldm_pipeline.data.shapes_grounding import grounded_words, object_masks, scene_grounding
from ldm_pipeline.grounding import (
    MASK_LEVELS,
    MAX_GROUNDED_TOKENS,
    coverage,
    encode_grounding,
    grounded_token_positions,
    grounding_losses,
    layer_size,
    record_cross_attention,
)
from test_unet_training import base_args


def scene_of(category: str, seed: int = 0) -> shapes.Scene:
    return shapes.sample_scene(np.random.default_rng(seed), category)


def words_of(scene) -> list[tuple[str, list[int]]]:
    return [(scene.caption[start:end], objects) for start, end, objects in grounded_words(scene)]


def test_grounded_words_name_each_object_and_its_colour():
    attribution = scene_of("color_attribution")
    first, second = attribution.objects
    assert words_of(attribution) == [(first.color, [0]), (first.kind, [0]), (second.color, [1]), (second.kind, [1])]
    position = scene_of("position")
    assert words_of(position) == [(position.objects[0].kind, [0]), (position.objects[1].kind, [1])]
    assert words_of(scene_of("two_objects")) == [(obj.kind, [i]) for i, obj in enumerate(scene_of("two_objects").objects)]
    colors = scene_of("colors")
    assert words_of(colors) == [(colors.objects[0].color, [0]), (colors.objects[0].kind, [0])]
    for seed in range(20):
        counting = scene_of("counting", seed)
        count = len(counting.objects)
        kind = counting.objects[0].kind
        assert words_of(counting) == [(kind if count == 1 else shapes.PLURALS[kind], list(range(count)))]


def test_object_masks_are_the_rendered_objects_pixels():
    for seed, category in enumerate(shapes.CATEGORIES * 3):
        scene = scene_of(category, seed)
        image, _ = shapes.render_scene(scene, 32)
        pixels = np.asarray(image)
        masks = object_masks(scene, 32)
        assert not (masks.sum(0) > 1).any(), "a pixel belongs to two objects"
        drawn = (pixels != shapes.BACKGROUND).any(-1)
        np.testing.assert_array_equal(masks.any(0), drawn)
        for obj, mask in zip(scene.objects, masks):
            assert (pixels[mask] == shapes.COLORS[obj.color]).all()


def test_scene_grounding_unites_the_masks_a_plural_names():
    scene = next(s for s in (scene_of("counting", seed) for seed in range(50)) if len(s.objects) >= 2)
    (_, _, mask), = scene_grounding(scene, 32)
    np.testing.assert_array_equal(mask, object_masks(scene, 32).any(0).astype(np.float32))


def test_token_positions_follow_the_character_offsets():
    tokenizer = make_tiny_tokenizer(16)
    caption = "a red star and a green box"
    offsets = tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
    tokens = tokenizer(caption).input_ids
    star = caption.index("star")
    assert [tokenizer.convert_ids_to_tokens(tokens[p]) for p in grounded_token_positions(offsets, star, star + 4)] == ["star"]
    assert grounded_token_positions(offsets, 0, 0) == []


def test_encode_grounding_puts_each_word_at_its_token_with_its_coverage():
    tokenizer = make_tiny_tokenizer(16)
    caption = "a red star and a green box"
    left = np.zeros((16, 16), np.float32)
    left[:, :4] = 1  # a quarter of the width: the first 2 of 8 latent columns
    quarter = np.zeros((16, 16), np.float32)
    quarter[0, 0] = 1  # a quarter of the first 2x2 block
    words = [(caption.index("star"), caption.index("star") + 4, left), (caption.index("box"), len(caption), quarter)]
    targets = encode_grounding(tokenizer, [caption, "a cat"], [words, None], latent_size=(8, 8))
    ids = tokenizer(caption).input_ids
    star, box = ids.index(tokenizer.convert_tokens_to_ids("star")), ids.index(tokenizer.convert_tokens_to_ids("box"))
    assert targets["grounding_tokens"].tolist() == [[star, box] + [-1] * (MAX_GROUNDED_TOKENS - 2),
                                                    [-1] * MAX_GROUNDED_TOKENS]
    masks = targets["grounding_masks"]
    assert masks.shape == (2, MAX_GROUNDED_TOKENS, 8, 8) and masks.dtype == torch.uint8
    expected_left = torch.zeros(8, 8, dtype=torch.uint8)
    expected_left[:, :2] = MASK_LEVELS
    torch.testing.assert_close(masks[0, 0], expected_left)
    assert masks[0, 1, 0, 0] == round(MASK_LEVELS / 4) and masks[0, 1].sum() == masks[0, 1, 0, 0]
    assert masks[1].sum() == 0


def test_coverage_is_the_block_mean():
    mask = torch.rand(3, 16, 16)
    torch.testing.assert_close(coverage(mask, (4, 4)), mask.reshape(3, 4, 4, 4, 4).mean((2, 4)))


def test_layer_size_of_each_downsampling():
    assert layer_size(64, (8, 8)) == (8, 8) and layer_size(16, (8, 8)) == (4, 4) and layer_size(2, (4, 2)) == (2, 1)
    with pytest.raises(ValueError, match="no down-sampling"):
        layer_size(7, (8, 8))


def test_the_recorder_computes_diffusers_attention_and_keeps_the_probabilities():
    unet = make_tiny_unet(sample_size=8)
    sample, timestep, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 6, 32)
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad():
        reference = unet(sample, timestep, encoder_hidden_states=states).sample
    recorder = record_cross_attention(unet)
    assert sum(p is recorder for p in unet.attn_processors.values()) == 4  # attn2: down 1, mid 1, up 2
    assert all(p is not recorder for name, p in unet.attn_processors.items() if "attn1" in name)
    recorder.recording = True
    with torch.no_grad():
        recorded = unet(sample, timestep, encoder_hidden_states=states).sample
    torch.testing.assert_close(recorded, reference, rtol=0, atol=0)
    maps = recorder.take()
    assert len(maps) == 4 and recorder.maps == []
    for probabilities, heads in maps:
        assert probabilities.shape == (2 * heads, 16, 6)  # 4x4 positions, 6 tokens
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(2 * heads, 16))


def reference_losses(attention: torch.Tensor, tokens: torch.Tensor, masks: torch.Tensor):
    """TokenCompose's eq. 3 and 4 written out per row and token: attention [B, N, L] (head mean), masks [B, K, N]."""
    token_rows, pixel_rows = [], []
    for row in range(attention.shape[0]):
        token_terms, pixel_terms = [], []
        for slot, token in enumerate(tokens[row].tolist()):
            if token < 0:
                continue
            a, m = attention[row, :, token], masks[row, slot]
            token_terms.append((1 - (a * m).sum() / a.sum()) ** 2)
            pixel_terms.append(-(m * a.log() + (1 - m) * (1 - a).log()).mean())
        token_rows.append(torch.stack(token_terms).mean() if token_terms else torch.tensor(0.0))
        pixel_rows.append(torch.stack(pixel_terms).mean() if pixel_terms else torch.tensor(0.0))
    return torch.stack(token_rows).mean(), torch.stack(pixel_rows).mean()


def test_grounding_losses_match_the_formulas():
    torch.manual_seed(0)
    heads, batch, tokens_count = 2, 3, 5
    probabilities = torch.softmax(torch.randn(batch * heads, 16, tokens_count), -1)  # one 4x4 layer
    tokens = torch.tensor([[1, 3, -1], [2, -1, -1], [-1, -1, -1]])
    masks = torch.rand(batch, 3, 8, 8)  # latent resolution; the layer sees 2x2 block means
    token_loss, pixel_loss = grounding_losses([(probabilities, heads)], tokens, masks)
    attention = probabilities.view(batch, heads, 16, tokens_count).mean(1)
    expected = reference_losses(attention, tokens, coverage(masks, (4, 4)).flatten(2))
    torch.testing.assert_close(token_loss, expected[0])
    torch.testing.assert_close(pixel_loss, expected[1])


def test_attention_inside_the_mask_costs_no_token_loss_and_spread_attention_does():
    positions = 16
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :, :2] = 1  # left half
    inside = torch.zeros(1, positions, 2)
    inside[0, :, 1] = mask.flatten() / 8  # token 1 attends to the left half only (rows need not sum to 1 here)
    inside[0, :, 0] = 1 - inside[0, :, 1]
    spread = torch.full((1, positions, 2), 0.5)
    tokens = torch.tensor([[1]])
    assert grounding_losses([(inside, 1)], tokens, mask)[0].item() == pytest.approx(0.0)
    assert grounding_losses([(spread, 1)], tokens, mask)[0].item() == pytest.approx(0.25)  # (1 - 1/2)²


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_token_term_trains_the_cross_attention_keys(checkpointing):
    unet = make_tiny_unet(sample_size=8).train()
    if checkpointing:  # the maps must keep their graph through recomputation
        unet.enable_gradient_checkpointing()
    recorder = record_cross_attention(unet)
    recorder.recording = True
    unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), encoder_hidden_states=torch.randn(2, 6, 32))
    recorder.recording = False
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    token_loss, _ = grounding_losses(recorder.take(), torch.tensor([[2], [3]]), mask)
    token_loss.backward()
    keys = [module.to_k.weight.grad for name, module in unet.named_modules() if name.endswith("attn2")]
    assert keys and all(grad is not None and grad.abs().sum() > 0 for grad in keys)
    assert recorder.maps == []  # a recomputing backward records nothing


def grounding_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_train_unet_with_the_grounding_loss_cached_equals_uncached(tiny_stage_dirs, tmp_path):
    flags = ("--max_train_steps", "3", "--grounding_token_weight", "0.5", "--grounding_pixel_weight", "0.1",
             "--caption_dropout_prob", "0")
    cached = tmp_path / "cached"
    metrics = run_stage("unet", base_args(tiny_stage_dirs, cached, *flags))
    assert metrics["cached"] is True
    manifest = next((tmp_path / "cache").glob("train-*/manifest.json"))
    assert json.loads(manifest.read_text())["grounding"] is True
    uncached = tmp_path / "uncached"
    run_stage("unet", base_args(tiny_stage_dirs, uncached, *flags, "--no_cache"))
    for a, b in zip(grounding_log(cached), grounding_log(uncached), strict=True):
        assert a["token_loss"] > 0 and a["pixel_loss"] > 0
        for name in ("loss", "token_loss", "pixel_loss"):
            assert a[name] == pytest.approx(b[name], rel=1e-4), name
    plain = tmp_path / "plain"
    run_stage("unet", base_args(tiny_stage_dirs, plain, "--max_train_steps", "3", "--caption_dropout_prob", "0"))
    first = grounding_log(cached)[0]
    expected = grounding_log(plain)[0]["loss"] + 0.5 * first["token_loss"] + 0.1 * first["pixel_loss"]
    assert first["loss"] == pytest.approx(expected, rel=1e-5)


def test_grounding_refuses_torch_compile(tiny_stage_dirs, tmp_path):
    with pytest.raises(ValueError, match="--torch_compile no"):
        run_stage("unet", base_args(tiny_stage_dirs, tmp_path / "out", "--max_train_steps", "1",
                                    "--grounding_token_weight", "1", "--torch_compile", "default"))



# ------------------------------------------------------------------------------------------------ user data


def write_grounded_folder(root, rows=12, line_override=None):
    """``rows`` 32x16 images (centre-cropped to their middle 16 columns at resolution 16), each with a red block
    and its mask; row 0 has no grounding column. ``line_override`` replaces some metadata rows."""
    from PIL import Image

    (root / "masks").mkdir(parents=True)
    lines = []
    for i in range(rows):
        pixels = np.full((16, 32, 3), 200, np.uint8)
        mask = np.zeros((16, 32), np.uint8)
        top, left = i % 8, 8 + i % 8  # inside the kept columns 8..23
        pixels[top:top + 4, left:left + 6] = (255, 0, 0)
        mask[top:top + 4, left:left + 6] = 1
        Image.fromarray(pixels).save(root / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")  # values 0/1: nonzero is the object
        row = {"file_name": f"{i}.png", "text": "a red box left of a cat"}
        if i:
            row["grounding"] = {"box": f"masks/{i}.png", "Red": f"masks/{i}.png"}
        lines.append(json.dumps((line_override or {}).get(i, row)))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_user_masks_line_up_with_the_training_image_and_their_words(tmp_path):
    from ldm_pipeline.config import DataConfig
    from ldm_pipeline.data import build_dataset

    root = write_grounded_folder(tmp_path / "data")
    dataset = build_dataset(DataConfig(train_data_dir=str(root), resolution=16), "train", grounding=True)
    caption = "a red box left of a cat"
    seen_ungrounded = False
    for index in range(len(dataset)):
        item = dataset[index]
        if item["grounding"] is None:
            seen_ungrounded = True
            continue
        red = ((item["pixel_values"][0] > 0.9) & (item["pixel_values"][1] < -0.9)).numpy()
        spans = [(start, end) for start, end, _ in item["grounding"]]
        assert spans == [(6, 9), (2, 5)] and caption[6:9] == "box"  # "Red" matched case-insensitively
        for _, _, mask in item["grounding"]:
            np.testing.assert_array_equal(mask, red.astype(np.float32))
    assert seen_ungrounded or len(dataset) < 12  # row 0 may be held out


@pytest.mark.parametrize("override, message", [
    ({1: {"file_name": "1.png", "text": "a red box", "grounding": {"dog": "masks/1.png"}}}, "'dog' is not a word"),
    ({1: {"file_name": "1.png", "text": "a red box", "grounding": {"box": "../1.png"}}}, "points outside"),
    ({1: {"file_name": "1.png", "text": "a red box", "grounding": ["box"]}}, "must be an object of words"),
    ({1: {"file_name": "1.png", "text": "a red box", "grounding": {"box": "masks/none.png"}}}, "cannot read mask"),
])
def test_bad_grounding_rows_are_one_clear_line(tmp_path, override, message):
    from ldm_pipeline.config import DataConfig
    from ldm_pipeline.data import build_dataset

    root = write_grounded_folder(tmp_path / "data", line_override=override)
    with pytest.raises(ValueError, match=message) as error:
        dataset = build_dataset(DataConfig(train_data_dir=str(root), resolution=16, num_held_out_samples=1), "train",
                                grounding=True)
        for index in range(len(dataset)):
            dataset[index]
    assert "metadata.jsonl line 2" in str(error.value)


def test_user_data_without_masks_trains_without_the_loss(tiny_stage_dirs, tmp_path, capsys):
    root = write_grounded_folder(tmp_path / "data", rows=6, line_override={
        i: {"file_name": f"{i}.png", "text": "a box"} for i in range(6)})
    out = tmp_path / "out"
    argv = base_args(tiny_stage_dirs, out, "--max_train_steps", "1", "--grounding_token_weight", "1",
                     "--train_data_dir", str(root), "--num_held_out_samples", "1")
    at = argv.index("--num_train_samples")
    run_stage("unet", argv[:at] + argv[at + 2:])
    assert "has no object masks" in capsys.readouterr().out
    assert "token_loss" not in grounding_log(out)[0]
    assert json.loads(next((tmp_path / "cache").glob("train-*/manifest.json")).read_text())["grounding"] is False


def test_train_unet_grounds_user_data(tiny_stage_dirs, tmp_path):
    root = write_grounded_folder(tmp_path / "data")
    out = tmp_path / "out"
    argv = base_args(tiny_stage_dirs, out, "--max_train_steps", "2", "--grounding_token_weight", "1",
                     "--caption_dropout_prob", "0", "--train_data_dir", str(root), "--num_held_out_samples", "2")
    at = argv.index("--num_train_samples")
    run_stage("unet", argv[:at] + argv[at + 2:])  # the size of the built-in data: not for a folder
    assert all(row["token_loss"] > 0 for row in grounding_log(out))
