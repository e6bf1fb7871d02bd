"""Evaluation on user data: alignment with its ceiling and floor, FID and precision/recall against numpy/scipy,
memorization of a model that returns training images, and ``ldm-eval --text_stage`` end to end on an export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from scipy.spatial.distance import cdist

from ldm_pipeline.cli_eval import build_parser as eval_parser
from ldm_pipeline.cli_eval import evaluate_command
from ldm_pipeline.cli_eval import main as eval_main
from ldm_pipeline.config import DataConfig
from ldm_pipeline.data import build_dataset
from ldm_pipeline.data.export import main as export_main
from ldm_pipeline.evaluation.alignment import (
    TEXT_PROJECTION_FILE,
    StageOneTowers,
    alignment_scores,
    fit_text_projection,
    load_stage_one_towers,
    save_text_projection,
    shuffled_captions,
)
from ldm_pipeline.evaluation.feature_metrics import fidelity_and_diversity, knn_radii, precision_recall
from ldm_pipeline.evaluation.memorization import memorization_summary, nearest_training_images
from ldm_pipeline.evaluation.user_data import evaluate_on_user_data
from ldm_pipeline.prompt_encoding import tokenize_prompts
from ldm_pipeline.text_encoder import build_contrastive_model, contrastive_loss, same_caption_matrix, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
RESOLUTION = 32


def shapes_split(split: str):
    return build_dataset(DataConfig(resolution=RESOLUTION, num_train_samples=512, num_validation_samples=48),
                         split)


@pytest.fixture(scope="module")
def contrastive_model():
    """The tiny text-stage model of configs/tiny, trained 150 steps on 512 shapes pairs (about 4 s)."""
    torch.manual_seed(0)
    items = [shapes_split("train")[i] for i in range(512)]
    captions = [item["caption"] for item in items]
    pixels = torch.stack([item["pixel_values"] for item in items])
    config = json.loads((REPO / "configs" / "tiny" / "text_encoder.json").read_text())["model"]
    tokenizer = train_tokenizer(captions, vocab_size=200, model_max_length=24)
    model = build_contrastive_model(config, tokenizer)
    tokens = tokenize_prompts(tokenizer, captions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = torch.randint(0, len(captions), (64,), generator=generator)
        output = model(tokens["input_ids"][batch], tokens["attention_mask"][batch], pixels[batch])
        loss = contrastive_loss(output.text_embeds, output.image_embeds, output.logit_scale,
                                same_caption_matrix([captions[i] for i in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.tokenizer = tokenizer
    return model


@pytest.fixture(scope="module")
def towers(contrastive_model):
    return StageOneTowers(contrastive_model.tokenizer, contrastive_model.text_encoder, contrastive_model.image_tower,
                          contrastive_model.text_projection.weight.detach().clone())


@pytest.fixture(scope="module")
def text_stage_dir(contrastive_model, tmp_path_factory):
    """The model saved as train_text_encoder.py lays out a text stage, plus its text projection."""
    directory = tmp_path_factory.mktemp("text_stage")
    contrastive_model.tokenizer.save_pretrained(directory / "tokenizer")
    contrastive_model.text_encoder.save_pretrained(directory / "text_encoder")
    contrastive_model.image_tower.save_pretrained(directory / "image_tower")
    save_text_projection(contrastive_model, directory)
    return directory


class SequencePipeline:
    """A stand-in "model" that returns the given images [H, W, 3] in [0, 1], in order, whatever the prompts."""

    def __init__(self, images):
        self.images = list(images)
        self.scheduler = None

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, height=None, width=None, output_type="np", **kwargs):
        batch, self.images = self.images[: len(prompt)], self.images[len(prompt) :]
        return SimpleNamespace(images=np.stack(batch))


def unit_images(dataset, indices) -> list[np.ndarray]:
    return [((dataset[i]["pixel_values"] + 1) / 2).permute(1, 2, 0).numpy() for i in indices]


# ------------------------------------------------------------------------------------------------ alignment

def test_alignment_scores_match_a_numpy_loop():
    rng = np.random.default_rng(0)
    pool = [f"caption {i}" for i in range(7)]
    pool_embeds = F.normalize(torch.from_numpy(rng.normal(size=(7, 5))).float(), dim=-1)
    image_embeds = F.normalize(torch.from_numpy(rng.normal(size=(12, 5))).float(), dim=-1)
    captions = [pool[i] for i in rng.integers(0, 7, 12)]
    scores = alignment_scores(image_embeds, captions, pool, pool_embeds)
    similarity = image_embeds.numpy() @ pool_embeds.numpy().T
    for i, caption in enumerate(captions):
        own = similarity[i, pool.index(caption)]
        assert scores["cosines"][i] == pytest.approx(own, abs=1e-6)
        assert scores["ranks"][i] == 1 + sum(value > own for value in similarity[i])
    assert scores["top1"] == pytest.approx(np.mean([similarity[i].argmax() == pool.index(c) for i, c in enumerate(captions)]))
    assert scores["chance_top1"] == pytest.approx(1 / 7) and scores["chance_top5"] == pytest.approx(5 / 7)


def test_shuffled_captions_move_every_caption():
    captions = [f"c{i}" for i in range(20)]
    shuffled = shuffled_captions(captions, seed=3)
    assert sorted(shuffled) == sorted(captions) and all(a != b for a, b in zip(captions, shuffled))
    assert shuffled == shuffled_captions(captions, seed=3)


def test_fit_text_projection_is_the_ridge_solution():
    rng = np.random.default_rng(1)
    text, image = rng.normal(size=(40, 6)), rng.normal(size=(40, 3))
    expected = np.linalg.solve(text.T @ text + 1e-3 * 40 * np.eye(6), text.T @ image).T
    fitted = fit_text_projection(torch.from_numpy(text).float(), torch.from_numpy(image).float())
    np.testing.assert_allclose(fitted.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_image_tower_features_and_embeddings_match_a_direct_forward(towers):
    pixels = torch.stack([shapes_split("validation")[i]["pixel_values"] for i in range(5)])
    joint, features = towers.embed_images(pixels)
    with torch.no_grad():
        direct = towers.image_tower.features(pixels)
        np.testing.assert_allclose(features.numpy(), direct.numpy(), atol=1e-5)
        np.testing.assert_allclose(joint.numpy(), F.normalize(towers.image_tower(pixels), dim=-1).numpy(), atol=1e-5)


def test_real_images_score_the_ceiling_and_shuffled_captions_the_floor(towers):
    heldout = shapes_split("validation")
    count = len(heldout)
    faithful = evaluate_on_user_data(SequencePipeline(unit_images(heldout, range(count))), towers, heldout)["alignment"]
    for key in ("cosine", "top1", "top5"):
        assert faithful["generated"][key] == pytest.approx(faithful["real"][key], abs=1e-5)
    assert faithful["real"]["cosine"] > faithful["shuffled"]["cosine"] + 0.1
    assert faithful["real"]["top1"] > 3 * faithful["real"]["chance_top1"] > faithful["shuffled"]["top1"]
    assert faithful["real"]["top5"] > faithful["shuffled"]["top5"] + 0.1

    others = unit_images(heldout, [(i + 1) % count for i in range(count)])  # each caption gets another's image
    confused = evaluate_on_user_data(SequencePipeline(others), towers, heldout)["alignment"]
    assert confused["generated"]["cosine"] < faithful["real"]["cosine"] - 0.1
    assert confused["generated"]["cosine"] == pytest.approx(faithful["shuffled"]["cosine"], abs=0.08)
    assert confused["generated"]["top5"] < faithful["real"]["top5"] / 2


# ------------------------------------------------------------------------------------ fidelity and diversity

def brute_force_precision_recall(real, fake, k):
    def covered(queries, support):
        distances = cdist(support, support)
        radii = [sorted(row[np.arange(len(support)) != j])[k - 1] for j, row in enumerate(distances)]
        return np.mean([any(np.linalg.norm(q - s) <= r for s, r in zip(support, radii)) for q in queries])

    return covered(fake, real), covered(real, fake)


def test_precision_recall_match_a_brute_force_computation():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(30, 4)), rng.normal(0.7, 1.3, size=(25, 4))
    for k in (1, 3, 5):
        result = precision_recall(real, fake, k)
        assert (result["precision"], result["recall"]) == pytest.approx(brute_force_precision_recall(real, fake, k))
    np.testing.assert_allclose(knn_radii(real, 3), np.sort(cdist(real, real), axis=1)[:, 3])
    same = precision_recall(real, real, 3)
    assert same["precision"] == same["recall"] == 1.0
    far = precision_recall(real, real + 100, 3)
    assert far["precision"] == far["recall"] == 0.0


def test_fid_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(40, 5)), rng.normal(0.5, 1.5, size=(30, 5))
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fidelity_and_diversity(real, fake)["fid"] == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------- memorization

def test_nearest_training_images_match_cdist_over_batches():
    rng = np.random.default_rng(0)
    queries = {"pixels": rng.random((6, 12)), "features": rng.normal(size=(6, 4))}
    train = {"pixels": rng.random((23, 12)), "features": rng.normal(size=(23, 4))}
    batches = [({space: train[space][i : i + 5] for space in train}, np.arange(i, min(i + 5, 23))) for i in range(0, 23, 5)]
    found = nearest_training_images(queries, batches)
    pixels = cdist(queries["pixels"], train["pixels"]) / np.sqrt(12)
    features = cdist(queries["features"], train["features"], metric="cosine")
    for space, expected in (("pixels", pixels), ("features", features)):
        np.testing.assert_array_equal(found[space]["index"], expected.argmin(1))
        np.testing.assert_allclose(found[space]["distance"], expected.min(1), atol=1e-9)


def test_memorization_threshold_is_the_heldout_percentile():
    heldout = {"pixels": {"distance": np.arange(1, 101, dtype=float)}}
    generated = {"pixels": {"distance": np.array([0.5, 5.9, 6.0, 50.0])}}
    summary = memorization_summary(generated, heldout, percentile=5)["pixels"]
    assert summary["threshold"] == pytest.approx(np.percentile(np.arange(1, 101), 5))
    assert summary["flags"].tolist() == [True, True, False, False]
    assert summary["share_heldout"] == pytest.approx(0.05)


def test_a_model_that_returns_training_images_is_flagged(towers):
    heldout, train = shapes_split("validation"), shapes_split("train")
    copies = unit_images(train, range(0, 3 * len(heldout), 3))  # generation i is training image 3 i
    report = evaluate_on_user_data(SequencePipeline(copies), towers, heldout, train)
    for space in ("pixels", "features"):
        assert report["memorization"][space]["share_generated"] == 1.0
        assert report["memorization"][space]["share_heldout"] <= 0.1

    honest = evaluate_on_user_data(SequencePipeline(unit_images(heldout, range(len(heldout)))), towers, heldout, train)
    for space in ("pixels", "features"):
        row = honest["memorization"][space]
        assert row["share_generated"] == pytest.approx(row["share_heldout"])


# ----------------------------------------------------------------------------------------- ldm-eval end to end

@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_data")
    export_main(["--out", str(folder), "--num_samples", "40", "--resolution", "16"])
    return folder


def test_ldm_eval_on_user_data_end_to_end(tmp_path, tiny_pipeline_dir, text_stage_dir, user_folder, capsys):
    out = tmp_path / "eval"
    report = evaluate_command([
        "--model", str(tiny_pipeline_dir), "--text_stage", str(text_stage_dir), "--train_data_dir", str(user_folder),
        "--num_held_out_samples", "8", "--steps", "2", "--scheduler", "ddim", "--guidance_scale", "2",
        "--batch_size", "3", "--seed", "1", "--out", str(out)])
    assert report == json.loads((out / "report.json").read_text())
    assert report["num_images"] == 8 and report["settings"]["resolution"] == 16
    assert report["settings"]["text_projection"] == "saved"
    assert report["memorization"]["num_train_images"] == 32
    assert 0 <= report["fidelity"]["precision"] <= 1 and np.isfinite(report["fidelity"]["fid"])
    assert report["fidelity_train_vs_heldout"]["num_train_images"] == 8
    judgements = json.loads((out / "judgements.json").read_text())
    assert len(judgements) == 8 and all(0 <= j["nearest_train"]["pixels"]["index"] < 32 for j in judgements)
    assert np.mean([j["cosine"] for j in judgements]) == pytest.approx(report["alignment"]["generated"]["cosine"], abs=1e-6)
    for name in ("grid_samples.png", "memorization_pixels.png", "memorization_features.png"):
        with Image.open(out / name) as grid:
            assert grid.size[0] > 0
    assert len(list((out / "samples").glob("*.png"))) == 8
    assert "(ceiling)" in capsys.readouterr().out

    again = evaluate_command([
        "--model", str(tiny_pipeline_dir), "--text_stage", str(text_stage_dir), "--train_data_dir", str(user_folder),
        "--num_held_out_samples", "8", "--steps", "2", "--scheduler", "ddim", "--guidance_scale", "2",
        "--batch_size", "8", "--seed", "1", "--out", str(tmp_path / "again")])
    assert again["alignment"]["generated"]["cosine"] == pytest.approx(report["alignment"]["generated"]["cosine"], abs=1e-5)
    assert again["fidelity"]["fid"] == pytest.approx(report["fidelity"]["fid"], rel=1e-4)


def test_ldm_eval_refits_a_missing_text_projection(tmp_path, text_stage_dir, user_folder):
    stage = tmp_path / "stage"
    for name in ("tokenizer", "text_encoder", "image_tower"):
        (stage / name).mkdir(parents=True)
        for file in (text_stage_dir / name).iterdir():
            (stage / name / file.name).write_bytes(file.read_bytes())
    train = build_dataset(DataConfig(resolution=16, train_data_dir=str(user_folder), num_validation_samples=8))
    towers = load_stage_one_towers(stage, fit_dataset=train)
    assert "refit" in towers.projection_source and towers.text_projection.shape == (32, 32)
    with pytest.raises(FileNotFoundError, match=TEXT_PROJECTION_FILE):
        load_stage_one_towers(stage)


def test_ldm_eval_user_data_errors_name_the_flag(tmp_path, tiny_pipeline_dir, user_folder, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--model", str(tiny_pipeline_dir), "--train_data_dir", str(user_folder), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "ldm-eval: error: --train_data_dir needs --text_stage TEXT_STAGE_DIR (the text stage trained on that data: "
        "its towers judge the images).")
    with pytest.raises(FileNotFoundError, match="image_tower/"):
        evaluate_command(["--model", str(tiny_pipeline_dir), "--text_stage", str(tmp_path),
                          "--train_data_dir", str(user_folder), "--num_validation_samples", "8", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--streaming: ldm-eval reads the training split by index .*: drop "
                                         r"--streaming"):
        evaluate_command(["--model", str(tiny_pipeline_dir), "--text_stage", str(tmp_path), "--streaming",
                          "--train_data_dir", str(user_folder), "--num_validation_samples", "8", "--out", str(tmp_path)])


# ------------------------------------------------------------------------------ benchmarks/alignment_vs_geneval

def test_alignment_vs_geneval_rank_correlation_and_arguments(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import alignment_vs_geneval as benchmark

    rows = [{"geneval_overall": g, "alignment": {"cosine": c, "top1": t}}
            for g, c, t in ((0.1, 0.20, 0.3), (0.4, 0.25, 0.1), (0.3, 0.31, 0.2), (0.6, 0.40, 0.5))]
    correlations = benchmark.rank_correlations(rows)
    ranks = lambda values: np.argsort(np.argsort(values))  # noqa: E731
    for key in ("cosine", "top1"):
        expected = np.corrcoef(ranks([r["geneval_overall"] for r in rows]), ranks([r["alignment"][key] for r in rows]))[0, 1]
        assert correlations[key] == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least 3 snapshots"):
        benchmark.rank_correlations(rows[:2])

    arguments = benchmark.alignment_arguments(tmp_path / "run", REPO / "configs" / "tiny", num_captions=6)
    parsed = eval_parser().parse_args(["--model", "m", "--out", "o"] + arguments)
    assert parsed.text_stage == str(tmp_path / "run" / "text_encoder_stage") and parsed.num_images == 6
    assert parsed.num_train_samples == 32 and parsed.num_validation_samples == 8 and parsed.train_data_dir is None
    snapshot = benchmark.eval_arguments(tmp_path, tmp_path / "o", tmp_path / "step-3", {"steps": 2}, seed=1)
    assert snapshot[snapshot.index("--unet") + 1] == str(tmp_path / "step-3")
