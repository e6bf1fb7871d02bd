"""Binding/order hard negatives (NegCLIP) in text-encoder training, and the binding benchmark."""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import make_tiny_t5, make_tiny_tokenizer, run_stage
from ldm_pipeline.data.shapes import (
    CATEGORIES,
    INVERSE_RELATIONS,
    RELATIONS,
    _relation_holds,
    binding_counterpart,
    canonical_caption,
    grammar_caption,
    parse_caption,
    sample_scene,
    scene_from_caption,
)
from ldm_pipeline.evaluation.alignment import StageOneTowers, load_stage_one_towers
from ldm_pipeline.text_encoder import (
    ImageTower,
    init_relative_attention_slopes,
    contrastive_loss,
    gather_captions,
    gather_rows,
    hard_negative_captions,
    own_hard_negatives,
    same_caption_matrix,
)

REPO = Path(__file__).resolve().parent.parent
TINY_CLIP = REPO / "configs" / "tiny" / "text_encoder.json"
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_binding  # noqa: E402


# ------------------------------------------------------------------------------------------ the negative rule


@pytest.mark.parametrize("caption, negative", [
    ("a red star and a green box", "a green star and a red box"),
    ("a red star and an orange box", "an orange star and a red box"),
    ("an orange cat and a blue house", "a blue cat and an orange house"),
    ("a cat left of a tree", "a tree left of a cat"),
    ("a heart above a car", "a car above a heart"),
    ("a box below a ball", "a ball below a box"),
    ("A Cat  right of a TREE", "a tree right of a cat"),
    # no counterpart: the swap means the same scene
    ("a red star and a red box", None),
    ("a red box and a green box", None),
    ("a cat left of a cat", None),
    # no counterpart: categories without binding or order
    ("a cat", None), ("a red cat", None), ("three stars", None), ("a cat and a tree", None),
    # no counterpart: outside the shapes grammar (user data)
    ("a red star and a green box number 3", None), ("a photo of a red cat left of a dog", None), ("", None),
])
def test_binding_counterpart_of_hand_written_captions(caption, negative):
    assert binding_counterpart(caption) == negative


def test_canonical_caption_equates_exactly_the_same_scenes():
    same = [("a red star and a green box", "a green box and a red star"),
            ("a cat left of a tree", "a tree right of a cat"), ("a car above a box", "a box below a car"),
            ("a cat and a tree", "a tree and a cat"), ("A red  cat", "a red cat")]
    different = [("a red star and a green box", "a green star and a red box"),
                 ("a cat left of a tree", "a tree left of a cat"), ("a cat left of a tree", "a cat above a tree"),
                 ("a red cat", "a blue cat"), ("two cats", "three cats"), ("a cat", "one cat")]
    for a, b in same:
        assert canonical_caption(a) == canonical_caption(b), (a, b)
    for a, b in different:
        assert canonical_caption(a) != canonical_caption(b), (a, b)
    assert canonical_caption("a photo of a cat") is None


def random_grammar_caption(rng: np.random.Generator) -> str:
    """A caption of any category from a small vocabulary, same kind or colour twice allowed, so that a batch
    often holds a caption's counterpart or another wording of it."""
    kinds = [("cat", "tree", "box")[i] for i in rng.integers(3, size=2)]
    colors = [("red", "orange", "green")[i] for i in rng.integers(3, size=2)]
    category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    if category == "counting":
        return grammar_caption(category, [kinds[0]] * int(rng.integers(1, 5)), [None] * 4)
    if category in ("single_object", "colors"):
        return grammar_caption(category, kinds[:1], colors[:1])
    return grammar_caption(category, kinds, colors, RELATIONS[int(rng.integers(4))] if category == "position" else None)


def words_without_articles(caption: str) -> list[str]:
    return sorted(word for word in caption.lower().split() if word not in ("a", "an"))


def test_hard_negatives_never_mean_a_batch_caption_over_random_batches():
    rng = np.random.default_rng(0)
    total = 0
    for _ in range(300):
        captions = [random_grammar_caption(rng) for _ in range(int(rng.integers(1, 13)))]
        negatives = hard_negative_captions(captions)
        batch_meanings = {canonical_caption(caption) for caption in captions}
        negative_meanings = [canonical_caption(negative) for _, negative in negatives]
        assert len(set(negative_meanings)) == len(negatives), "each meaning once"
        for (index, negative), meaning in zip(negatives, negative_meanings):
            caption = captions[index]
            assert negative == binding_counterpart(caption)
            assert meaning not in batch_meanings, (negative, captions)
            source, swapped = parse_caption(caption), parse_caption(negative)
            assert swapped["category"] == source["category"] in ("color_attribution", "position")
            assert words_without_articles(negative) == words_without_articles(caption), "same words"
            if source["category"] == "color_attribution":
                assert swapped["kinds"] == source["kinds"] and swapped["colors"] == source["colors"][::-1]
            else:
                assert swapped["kinds"] == source["kinds"][::-1] and swapped["relation"] == source["relation"]
        for caption in captions:  # and none is missed
            counterpart = binding_counterpart(caption)
            if counterpart is not None and canonical_caption(counterpart) not in batch_meanings:
                assert canonical_caption(counterpart) in negative_meanings, (caption, captions)
        total += len(negatives)
    assert total > 300, "the batches must exercise the rule"


def test_hard_negatives_drop_other_wordings_of_batch_captions():
    captions = ["a red star and a green box", "a red box and a green star",     # the first one's counterpart, reworded
                "a cat left of a tree", "a cat right of a house", "a cat left of a house",   # counterparts, reworded
                "a car above a ball", "a ball below a car",                     # one meaning, one negative
                "a red cat", "my dog left of a tree"]
    assert hard_negative_captions(captions) == [(2, "a tree left of a cat"), (5, "a ball above a car")]


def test_scene_from_caption_renders_what_the_caption_says():
    rng = np.random.default_rng(0)
    for caption in ["an orange cat and a red box", "a tree left of a cat", "a car below a heart", "three stars",
                    "a cat left of a cat"]:
        scene = scene_from_caption(caption, rng)
        assert scene.caption == caption
        parsed = parse_caption(caption)
        assert [obj.kind for obj in scene.objects] == parsed["kinds"] * (parsed["count"] if len(parsed["kinds"]) == 1 else 1)
        if parsed["category"] == "color_attribution":
            assert [obj.color for obj in scene.objects] == parsed["colors"]
        if parsed["relation"]:
            assert _relation_holds(scene.objects[0].rel_box, scene.objects[1].rel_box, parsed["relation"])
            inverse = INVERSE_RELATIONS[parsed["relation"]]
            assert _relation_holds(scene.objects[1].rel_box, scene.objects[0].rel_box, inverse)


# ------------------------------------------------------------------------------------------------------ loss


def negclip_loss_numpy(text, image, negatives, scale, captions):
    """NegCLIP written out: text-to-image CE over the B images; image-to-text CE over B captions + H negatives;
    images of equal captions share the target mass."""
    text, image, negatives = (np.asarray(x, dtype=np.float64) for x in (text, image, negatives))
    same = np.array([[a == b for b in captions] for a in captions], dtype=np.float64)
    targets = same / same.sum(axis=1, keepdims=True)
    batch = len(text)
    text_to_image = 0.0
    for i in range(batch):
        logits = scale * image @ text[i]
        log_probs = logits - np.log(np.exp(logits).sum())
        text_to_image -= (targets[i] * log_probs).sum() / batch
    image_to_text = 0.0
    for j in range(batch):
        logits = scale * np.concatenate([text @ image[j], negatives @ image[j]])
        log_probs = logits - np.log(np.exp(logits).sum())
        image_to_text -= (targets[:, j] * log_probs[:batch]).sum() / batch
    return (text_to_image + image_to_text) / 2


def test_loss_with_hard_negatives_matches_the_formula():
    generator = torch.Generator().manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=generator), dim=-1)  # noqa: E731
    text, image, negatives = unit(6, 8), unit(6, 8), unit(3, 8)
    for captions in (list("abcdef"), list("aacdea")):
        same = same_caption_matrix(captions)
        loss = contrastive_loss(text, image, 4.0, same, negatives)
        assert loss.item() == pytest.approx(negclip_loss_numpy(text, image, negatives, 4.0, captions), rel=1e-5)
        assert loss.item() > contrastive_loss(text, image, 4.0, same).item(), "negatives only add to the softmax"
        assert torch.equal(contrastive_loss(text, image, 4.0, same, negatives[:0]), contrastive_loss(text, image, 4.0, same))


def test_loss_without_negatives_is_bitwise_the_clip_loss():
    """With ``negative_text_embeds=None`` the loss is computed exactly as before the option existed."""
    generator = torch.Generator().manual_seed(1)
    text, image = (F.normalize(torch.randn(7, 5, generator=generator), dim=-1) for _ in range(2))
    same = same_caption_matrix(list("abcabcd"))
    logits = 3.0 * text @ image.t()
    targets = same.float() / same.float().sum(dim=1, keepdim=True)
    text_to_image = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    image_to_text = -(targets.t() * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    assert torch.equal(contrastive_loss(text, image, 3.0, same), (text_to_image + image_to_text) / 2)


# --------------------------------------------------------------------------------------------------- training


def losses(out: Path) -> list[float]:
    return [record["loss"] for record in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
            if "loss" in record]


def test_option_on_without_grammar_captions_trains_bitwise_as_off(tmp_path):
    """User captions outside the grammar have no negatives: the run is bitwise that of the option off."""
    from ldm_pipeline.data import ShapesDataset

    folder = tmp_path / "folder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index, item in enumerate(ShapesDataset(24, 32, seed=1)):
            item["image"].save(folder / f"{index}.png")
            metadata.write(json.dumps({"file_name": f"{index}.png", "text": f"{item['caption']} number {index}"}) + "\n")
    common = ["--config", str(TINY_CLIP), "--train_data_dir", str(folder), "--num_validation_samples", "8",
              "--max_train_steps", "2", "--checkpointing_steps", "2", "--report_to", "none"]
    run_stage("text_encoder", common + ["--output_dir", str(tmp_path / "off")])
    run_stage("text_encoder", common + ["--output_dir", str(tmp_path / "on"), "--hard_negatives"])
    assert losses(tmp_path / "on") == losses(tmp_path / "off")
    off, on = (load_file(tmp_path / run / "text_encoder" / "model.safetensors") for run in ("off", "on"))
    assert all(torch.equal(off[name], on[name]) for name in off)
    assert [json.loads(line)["hard_negatives"] for line in (tmp_path / "on" / "train_log.jsonl").read_text().splitlines()
            if "loss" in line] == [0.0, 0.0]


@pytest.fixture(scope="module")
def hard_negative_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hard_negatives")
    metrics = run_stage("text_encoder", ["--config", str(TINY_CLIP), "--output_dir", str(out), "--max_train_steps", "4",
                                         "--checkpointing_steps", "4", "--report_to", "none", "--hard_negatives"])
    return out, metrics


def test_tiny_training_with_hard_negatives(hard_negative_run):
    out, metrics = hard_negative_run
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [record for record in records if "loss" in record]
    assert [record["step"] for record in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(record["loss"]) for record in steps)
    assert sum(record["hard_negatives"] for record in steps) > 0, "a shapes batch of 16 has binding/order captions"
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    saved = json.loads((out / "checkpoints" / "checkpoint-4" / "run_fingerprint.json").read_text())
    assert saved["training"]["hard_negatives"] is True, "the option is part of what defines the run"


class ThreadedProcesses:
    """``n`` data-parallel processes played by threads: ``accelerate.utils.gather`` and ``gather_object`` exchange
    their values through a barrier, in process order, as the collectives do."""

    def __init__(self, count: int):
        self.count, self.barrier, self.slots = count, threading.Barrier(count, timeout=30), [None] * count
        self.local = threading.local()

    def exchange(self, value) -> list:
        self.barrier.wait()
        self.slots[self.local.rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        return values

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.exchange(tensor))

    def gather_object(self, objects: list) -> list:
        return [item for part in self.exchange(objects) for item in part]

    def run(self, function) -> list:
        def as_process(rank):
            self.local.rank = rank
            return function(SimpleNamespace(num_processes=self.count, process_index=rank))

        with ThreadPoolExecutor(self.count) as pool:
            return [future.result() for future in [pool.submit(as_process, rank) for rank in range(self.count)]]


def test_two_processes_get_the_hard_negatives_and_gradients_of_one(monkeypatch):
    """2 processes of batch 8: the negatives are those of the global batch of 16 (a caption whose counterpart is
    in the other process's half gets none), each encoded once by the process of its caption and gathered, so the
    loss and the averaged gradient of ``2 · L`` are those of 1 process of batch 16."""
    rng = np.random.default_rng(1)
    captions = [random_grammar_caption(rng) for _ in range(16)]
    captions[1], captions[12] = "a red star and a green box", "a green star and a red box"
    captions[2], captions[3] = "a cat left of a tree", "a heart above a car"
    vocabulary = sorted(set(captions) | {negative for _, negative in hard_negative_captions(captions)})
    generator = torch.Generator().manual_seed(0)
    text_table, image_table = torch.randn(len(vocabulary), 8, generator=generator), torch.randn(16, 8, generator=generator)

    def train_step(accelerator) -> tuple[float, torch.Tensor, torch.Tensor, list[str]]:
        local = 16 // accelerator.num_processes
        rows = slice(accelerator.process_index * local, (accelerator.process_index + 1) * local)
        own_captions = captions[rows]
        texts, images = text_table.clone().requires_grad_(), image_table.clone().requires_grad_()
        batch = gather_captions(accelerator, own_captions)
        negatives, _ = own_hard_negatives(accelerator, batch, local)
        ids = torch.tensor([vocabulary.index(caption) for caption in own_captions + negatives])
        text_embeds, image_embeds = F.normalize(texts[ids], dim=-1), F.normalize(images[rows], dim=-1)
        text_embeds, negative_embeds = text_embeds[:local], gather_rows(accelerator, text_embeds[local:])
        text_embeds, image_embeds = gather_rows(accelerator, text_embeds), gather_rows(accelerator, image_embeds)
        loss = contrastive_loss(text_embeds, image_embeds, 5.0, same_caption_matrix(batch), negative_embeds)
        (loss * accelerator.num_processes).backward()
        return loss.item(), texts.grad, images.grad, negatives

    (one_loss, one_text_grad, one_image_grad, one_negatives), = ThreadedProcesses(1).run(train_step)
    assert one_negatives == [negative for _, negative in hard_negative_captions(captions)]
    assert "a green star and a red box" not in one_negatives and "a tree left of a cat" in one_negatives

    processes = ThreadedProcesses(2)
    monkeypatch.setattr("accelerate.utils.gather", processes.gather)
    monkeypatch.setattr("accelerate.utils.gather_object", processes.gather_object)
    results = processes.run(train_step)
    assert results[0][3] + results[1][3] == one_negatives and results[0][3] and results[1][3]
    for loss, _, _, _ in results:
        assert loss == pytest.approx(one_loss, rel=1e-6)
    torch.testing.assert_close((results[0][1] + results[1][1]) / 2, one_text_grad)
    torch.testing.assert_close((results[0][2] + results[1][2]) / 2, one_image_grad)


# -------------------------------------------------------------------------------------------------- benchmark


def test_pairwise_accuracy_counts_wins_and_ties():
    anchors = torch.eye(4)
    right = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    wrong = torch.tensor([[0.0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])  # win, loss, win, tie
    assert bench_binding.pairwise_accuracy(anchors, right, wrong) == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert bench_binding.pairwise_accuracy(anchors, wrong, right) == pytest.approx((0 + 1 + 0 + 0.5) / 4)


def test_caption_pairs_differ_as_their_family_says():
    for family in bench_binding.FAMILIES:
        pairs = bench_binding.caption_pairs(family, 30, seed=3)
        assert pairs == bench_binding.caption_pairs(family, 30, seed=3) != bench_binding.caption_pairs(family, 30, seed=4)
        for a, b in pairs:
            assert canonical_caption(a) != canonical_caption(b)
            if family == "colour word":
                changed = [(x, y) for x, y in zip(parse_caption(a)["colors"], parse_caption(b)["colors"]) if x != y]
                assert len(changed) == 1 and changed[0][1] not in parse_caption(a)["colors"]
                assert parse_caption(a)["kinds"] == parse_caption(b)["kinds"]
            else:
                assert b == binding_counterpart(a)


def bag_of_words_towers() -> StageOneTowers:
    """A T5 encoder without its relative position bias: attention and mean pooling ignore word order, so the two
    captions of a swap pair (the same words) get the same pooled vector, up to float rounding."""
    tokenizer = make_tiny_tokenizer()
    encoder = make_tiny_t5(tokenizer)
    with torch.no_grad():
        for block in encoder.encoder.block:
            attention = block.layer[0].SelfAttention
            if attention.has_relative_attention_bias:
                attention.relative_attention_bias.weight.zero_()
    torch.manual_seed(0)
    tower = ImageTower(block_out_channels=(8, 16), norm_num_groups=4, pooled_size=2, projection_dim=16).eval()
    return StageOneTowers(tokenizer, encoder, tower, torch.randn(16, encoder.config.d_model))


def test_benchmark_scores_a_bag_of_words_encoder_at_chance_on_swaps():
    scores = bench_binding.binding_scores(bag_of_words_towers(), num_pairs=24, seed=0, resolution=32)
    for family in ("colour swap", "position swap"):
        assert scores[family]["image_to_text"] == 0.5, "one text for both captions: every comparison is a tie"
        assert scores[family]["pooled_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert scores["colour word"]["pooled_cosine"] < 0.999, "different words are visible to a bag of words"


def test_benchmark_on_a_trained_stage(hard_negative_run, tmp_path, capsys):
    out, _ = hard_negative_run
    report = bench_binding.main(["--text_encoder", str(out), "--num_pairs", "12", "--num_probe", "40", "--json",
                                 str(tmp_path / "binding.json")])
    assert json.loads((tmp_path / "binding.json").read_text()) == json.loads(json.dumps(report))
    printed = capsys.readouterr().out
    assert printed.count(str(out)) == 2 and "position swap" in printed, "one row per encoder in each table"
    probes = report["encoders"][str(out)].pop("probes")
    assert set(probes) == set(bench_binding.PROBES) and all(0.0 <= value <= 1.0 for value in probes.values())
    for family, figures in report["encoders"][str(out)].items():
        assert figures["num_pairs"] == 12
        for key in ("image_to_text", "text_to_image"):
            assert 0.0 <= figures[key] <= 1.0
        for key in ("token_cosine", "pooled_cosine"):
            assert -1.0 <= figures[key] <= 1.0 + 1e-6

    towers = load_stage_one_towers(out)
    pairs = bench_binding.caption_pairs("colour swap", 16, seed=0)
    images, _ = towers.embed_images(bench_binding.render_captions([a for a, _ in pairs], 32, np.random.default_rng(0)))
    texts_a, texts_b = towers.embed_texts([a for a, _ in pairs]), towers.embed_texts([b for _, b in pairs])
    accuracy = bench_binding.pairwise_accuracy(images, texts_a, texts_b)
    assert bench_binding.pairwise_accuracy(images, texts_b, texts_a) == pytest.approx(1 - accuracy)
    expected = ((images * texts_a).sum(-1) > (images * texts_b).sum(-1)).double().mean().item()
    assert accuracy == pytest.approx(expected, abs=0.5 / 16), "ties aside, the share of wins"


@pytest.mark.parametrize("caption, expected", [
    ("a red star and a green box", [(2, "red"), (6, "green")]),
    ("an orange cat and a blue house", [(2, "orange"), (6, "blue")]),
    ("a red box and a green box", [(2, "red"), (6, "green")]),
])
def test_probe_targets_of_colour_captions(caption, expected):
    assert bench_binding.object_word_targets(caption, "noun colour") == expected


@pytest.mark.parametrize("caption, expected", [
    ("a cat left of a tree", [(1, "left"), (5, "right")]),
    ("a cat right of a tree", [(1, "right"), (5, "left")]),
    ("a heart above a car", [(1, "top"), (4, "bottom")]),
    ("a ball below a box", [(1, "bottom"), (4, "top")]),
])
def test_probe_targets_of_position_captions(caption, expected):
    assert bench_binding.object_word_targets(caption, "noun side") == expected


def test_ridge_probe_matches_numpy_least_squares():
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(60, 5)), rng.normal(size=(40, 5))
    train_y, test_y = list(rng.integers(0, 3, 60)), list(rng.integers(0, 3, 40))
    mean, std = train_x.mean(axis=0), train_x.std(axis=0, ddof=1)
    design = lambda x: np.hstack([(x - mean) / std, np.ones((len(x), 1))])  # noqa: E731
    ridge = 0.1
    # ridge as an augmented least-squares problem: extra rows sqrt(ridge · N) · I for the weights, none for the bias
    augmented = np.vstack([design(train_x), np.hstack([np.sqrt(ridge * 60) * np.eye(5), np.zeros((5, 1))])])
    targets = np.vstack([np.eye(3)[train_y], np.zeros((5, 3))])
    weights = np.linalg.lstsq(augmented, targets, rcond=None)[0]
    expected = float(((design(test_x) @ weights).argmax(axis=1) == np.array(test_y)).mean())
    accuracy = bench_binding.ridge_probe_accuracy(torch.tensor(train_x), train_y, torch.tensor(test_x), test_y, 3, ridge)
    assert accuracy == pytest.approx(expected)
    separable = torch.tensor(np.eye(3)[train_y] + 0.01 * rng.normal(size=(60, 3)))
    assert bench_binding.ridge_probe_accuracy(separable, train_y, separable, train_y, 3) == 1.0


def test_probe_of_a_bag_of_words_encoder_cannot_beat_a_half_on_swapped_captions():
    towers = bag_of_words_towers()
    rng = np.random.default_rng(0)
    captions = [sample_scene(rng, "color_attribution").caption for _ in range(200)]
    train_x, train_y = bench_binding.object_word_states(towers, captions, "noun colour")
    test = [caption for caption in captions[:60] if binding_counterpart(caption) is not None]
    test_x, test_y = bench_binding.object_word_states(towers, test + [binding_counterpart(c) for c in test], "noun colour")
    accuracy = bench_binding.ridge_probe_accuracy(train_x, train_y, test_x, test_y, len(bench_binding.COLORS))
    assert accuracy <= 0.5 + 1e-9, "the same state for 'star' in a caption and its swap, with the colours swapped"


def test_set_cosine_is_one_for_the_same_states_in_another_order_and_lower_otherwise():
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(2, 5, 8, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    shuffled = states[:, [2, 0, 1, 3, 4]]
    shuffled_mask = mask[:, [2, 0, 1, 3, 4]]
    assert bench_binding.set_cosine(states, mask, shuffled, shuffled_mask).item() == pytest.approx(1.0)
    other = torch.randn(2, 5, 8, generator=generator)
    cosines = F.normalize(states[0, :4], dim=-1) @ F.normalize(other[0, :4], dim=-1).t()
    first = ((cosines.max(dim=1).values.mean() + cosines.max(dim=0).values.mean()) / 2).item()
    cosines = F.normalize(states[1, :3], dim=-1) @ F.normalize(other[1, :3], dim=-1).t()
    second = ((cosines.max(dim=1).values.mean() + cosines.max(dim=0).values.mean()) / 2).item()
    assert bench_binding.set_cosine(states, mask, other, mask).item() == pytest.approx((first + second) / 2, abs=1e-6)


def test_a_distance_penalty_makes_swapped_captions_different_sets_of_token_states():
    towers = bag_of_words_towers()
    pairs = bench_binding.caption_pairs("colour swap", 24, seed=0)
    assert bench_binding.state_cosines(towers, *map(list, zip(*pairs)))["set_cosine"] == pytest.approx(1.0, abs=1e-5)
    init_relative_attention_slopes(towers.text_encoder, [2.0, 1.0, 0.5, 0.25])
    assert bench_binding.state_cosines(towers, *map(list, zip(*pairs)))["set_cosine"] < 0.999
