"""Evaluation: the object detector and classifier on real renders, GenEval's judging rules, the Frechet distance
against scipy's matrix square root, sanity scores (real renders ~100%, noise 0%) and ``ldm-eval`` end to end on a
tiny random pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg, ndimage

from conftest import make_tiny_vae
from ldm_pipeline.cli_eval import evaluate_command
from ldm_pipeline.cli_eval import main as eval_main
from ldm_pipeline.data.shapes import (
    CATEGORIES,
    COLORS,
    GENERATOR_VERSION,
    parse_caption,
    render_scene,
    sample_scene,
    scene_rng,
)
from ldm_pipeline.evaluation.classifier import WEIGHTS_DIR, ObjectClassifier, crop_mask, load_object_classifier
from ldm_pipeline.evaluation.detector import DetectedObject, ObjectDetector, label_components, remove_specks
from ldm_pipeline.evaluation.fid import frechet_distance, frechet_distance_of_features
from ldm_pipeline.evaluation.scoring import (
    GenEvalScorer,
    judge,
    make_prompt_set,
    relative_position,
    render_prompt_set,
)
from ldm_pipeline.evaluation.train_classifier import (
    HELD_OUT_RESOLUTIONS,
    METRICS_NAME,
    MIN_ACCURACY,
    accuracy,
    build_parser,
    labelled_crops,
    train,
)
from ldm_pipeline.vae import reconstruct


@pytest.fixture(scope="module")
def scorer():
    return GenEvalScorer(load_object_classifier())


@pytest.fixture(scope="module")
def noise_images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(60)]


def obj(kind, color="red", box=(0, 0, 10, 10), probability=0.9):
    return DetectedObject(box=box, area=100, color=color, mask=np.zeros((1, 1), bool), kind=kind,
                          kind_probability=probability)


# ------------------------------------------------------------------------------------------------ detector, classifier


def test_label_components_matches_scipy():
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.6):
        mask = rng.random((40, 53)) < density
        for connectivity, structure in ((4, None), (8, np.ones((3, 3)))):
            ours, count = label_components(mask, connectivity)
            reference, reference_count = ndimage.label(mask, structure=structure)
            assert count == reference_count
            np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("resolution", [32, 64])
def test_detector_finds_rendered_objects_exactly(resolution):
    detector = ObjectDetector(COLORS)
    for index in range(60):
        image, rendered = render_scene(sample_scene(scene_rng(5, index, "test")), resolution)
        found = sorted(detector(image), key=lambda o: o.center)
        truth = sorted(rendered, key=lambda o: o.center)
        assert [o.color for o in found] == [o.color for o in truth]
        # speck removal may trim a one-pixel tip (a star's point, an ear) off the box
        assert all(np.abs(np.subtract(f.box, t.box)).max() <= 1 for f, t in zip(found, truth))


def test_remove_specks_drops_noise_and_never_adds_pixels():
    rng = np.random.default_rng(0)
    mask = np.zeros((30, 30), bool)
    mask[5:20, 5:20] = True
    mask[25, 25] = mask[2, 27] = mask[2, 28] = True  # a speck and a pair
    noisy = mask | (rng.random(mask.shape) < 0.02)
    cleaned = remove_specks(noisy)
    assert not (cleaned & ~noisy).any()
    assert not cleaned[25, 25] and not cleaned[2, 27] and not cleaned[2, 28]
    assert cleaned[5:20, 5:20].all()


def test_crop_mask_pads_to_square_and_resizes():
    mask = np.zeros((20, 20), bool)
    mask[5:9, 2:18] = True  # a 16 x 4 bar: its square box is 16 x 16, the bar fills the middle quarter
    crop = crop_mask(mask, (2, 5, 18, 9), crop_size=16)
    assert crop.shape == (16, 16)
    np.testing.assert_allclose(crop[6:10], 1.0)
    np.testing.assert_allclose(crop[:5], 0.0)
    np.testing.assert_allclose(crop[11:], 0.0)


def test_shipped_classifier_heldout_accuracy_on_fresh_renders():
    model = load_object_classifier()
    crops, kinds, _ = labelled_crops(300, seed=123, split="test", resolutions=HELD_OUT_RESOLUTIONS)
    assert len(kinds) > 450
    assert accuracy(model, crops, kinds) >= MIN_ACCURACY
    degraded_crops, degraded_kinds, _ = labelled_crops(150, seed=124, split="test", resolutions=HELD_OUT_RESOLUTIONS,
                                                       degraded_fraction=1.0)
    assert accuracy(model, degraded_crops, degraded_kinds) >= 0.98


def test_shipped_classifier_matches_current_renderer():
    metrics = json.loads((WEIGHTS_DIR / METRICS_NAME).read_text())
    assert metrics["shapes_generator_version"] == GENERATOR_VERSION, (
        "shapes.py renders differently from when the classifier was trained: rerun "
        "`python -m ldm_pipeline.evaluation.train_classifier`"
    )
    assert metrics["accuracy"] >= MIN_ACCURACY


def test_classifier_training_is_deterministic():
    args = build_parser().parse_args(["--num_train_images", "40", "--max_train_steps", "3", "--batch_size", "16"])
    first, _ = train(args, evaluate=False)
    second, _ = train(args, evaluate=False)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_classifier_rejects_wrong_crop_shape():
    with pytest.raises(ValueError, match="crops of shape"):
        ObjectClassifier().features(torch.zeros(2, 3, 32, 32))


# ------------------------------------------------------------------------------------------------ GenEval rules


def test_relative_position_follows_geneval_formula():
    assert relative_position((0, 0, 10, 10), (30, 2, 40, 12)) == {"left of"}
    assert relative_position((30, 2, 40, 12), (0, 0, 10, 10)) == {"right of"}
    assert relative_position((0, 0, 10, 10), (2, 30, 12, 40)) == {"above"}
    assert relative_position((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}  # diagonal: x = y = 0.707
    # offset 11 along x, shrunk by 0.1 * (10 + 10) = 2 -> 9 / 11 > 0.5; a 1-pixel offset is shrunk to nothing
    assert relative_position((0, 0, 10, 10), (11, 0, 21, 10)) == {"left of"}
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()


def test_judge_categories():
    assert judge([obj("cat")], "a cat")[0]
    assert not judge([obj("house")], "a cat")[0]
    assert not judge([], "a cat")[0]
    assert judge([obj("cat"), obj("house")], "a cat and a house")[0]
    assert not judge([obj("cat"), obj("cat")], "a cat and a house")[0]
    three = [obj("star"), obj("star"), obj("star")]
    assert judge(three, "three stars")[0]
    assert not judge(three[:2], "three stars")[0]
    assert not judge(three + [obj("star")], "three stars")[0]
    assert judge(three + [obj("ball")], "three stars")[0]
    assert judge([obj("cat", "red")], "a red cat")[0]
    assert not judge([obj("cat", "blue")], "a red cat")[0]
    # the most confident cat decides the colour, as GenEval takes detections by score
    assert not judge([obj("cat", "blue", probability=0.99), obj("cat", "red", probability=0.6)], "a red cat")[0]
    left, right = (0, 0, 10, 10), (30, 0, 40, 10)
    assert judge([obj("cat", box=left), obj("house", box=right)], "a cat left of a house")[0]
    assert not judge([obj("cat", box=right), obj("house", box=left)], "a cat left of a house")[0]
    assert not judge([obj("cat", box=left)], "a cat left of a house")[0]
    assert judge([obj("cat", "red"), obj("house", "blue")], "a red cat and a blue house")[0]
    assert not judge([obj("cat", "blue"), obj("house", "red")], "a red cat and a blue house")[0]
    unsure = obj("cat")
    unsure.kind = None  # below min_kind_probability: counts as nothing
    assert not judge([unsure], "a cat")[0]


def test_prompt_set_is_balanced_seeded_and_in_grammar():
    prompts = make_prompt_set(7, seed=3)
    assert [p.category for p in prompts] == [c for c in CATEGORIES for _ in range(7)]
    assert [p.prompt for p in prompts] == [p.prompt for p in make_prompt_set(7, seed=3)]
    assert [p.prompt for p in prompts] != [p.prompt for p in make_prompt_set(7, seed=4)]
    assert all(parse_caption(p.prompt)["category"] == p.category for p in prompts)
    with pytest.raises(ValueError, match="positive"):
        make_prompt_set(0)


def test_prompt_set_of_held_out_or_trained_word_orders():
    from ldm_pipeline.data.shapes import is_held_out_order

    held_out = make_prompt_set(10, seed=2, word_orders="held_out", held_out_orders=0.25, data_seed=0)
    trained = make_prompt_set(10, seed=2, word_orders="trained", held_out_orders=0.25, data_seed=0)
    assert [p.category for p in held_out] == ["position"] * 10 + ["color_attribution"] * 10
    assert all(is_held_out_order(p.prompt, 0.25, 0) for p in held_out)
    assert not any(is_held_out_order(p.prompt, 0.25, 0) for p in trained)
    everything = make_prompt_set(10, seed=2, categories=("position", "color_attribution"))
    for plain, kept in zip(everything, trained):  # a prompt of a trained order is not drawn again
        assert is_held_out_order(plain.prompt, 0.25, 0) or kept.prompt == plain.prompt
    with pytest.raises(ValueError, match="shapes_held_out_orders"):
        make_prompt_set(3, word_orders="held_out")
    with pytest.raises(ValueError, match="no word order"):
        make_prompt_set(3, categories=("colors",), word_orders="trained", held_out_orders=0.25)


# ------------------------------------------------------------------------------------------------ sanity scores


@pytest.mark.parametrize("resolution", [32, 64])
def test_real_renders_score_near_perfect(scorer, resolution):
    prompts = make_prompt_set(12, seed=11)
    scores, _ = scorer.score(render_prompt_set(prompts, resolution), [p.prompt for p in prompts])
    assert all(scores[c] >= 0.95 for c in CATEGORIES), scores
    assert scores["overall"] == pytest.approx(np.mean([scores[c] for c in CATEGORIES]))


def test_real_renders_with_noisy_background_still_score_high(scorer):
    prompts = make_prompt_set(8, seed=12)
    rng = np.random.default_rng(0)
    noisy = [np.clip(np.asarray(im, float) + rng.normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8)
             for im in render_prompt_set(prompts, 64)]
    scores, _ = scorer.score(noisy, [p.prompt for p in prompts])
    assert scores["overall"] >= 0.9, scores


def test_noise_and_blank_images_score_zero(scorer, noise_images):
    prompts = make_prompt_set(10, seed=0)
    scores, _ = scorer.score(noise_images, [p.prompt for p in prompts])
    assert scores["overall"] <= 0.05, scores
    blank = [Image.new("RGB", (64, 64), (232, 232, 232))] * len(prompts)
    assert scorer.score(blank, [p.prompt for p in prompts])[0]["overall"] == 0.0


def test_colour_is_read_from_pixels(scorer):
    prompts = [p for p in make_prompt_set(20, seed=13) if p.category == "colors"]
    for prompt in prompts:
        image = np.array(render_prompt_set([prompt], 64)[0])
        wrong = next(name for name in COLORS if name != prompt.scene.objects[0].color)
        recoloured = image.copy()
        recoloured[(image == COLORS[prompt.scene.objects[0].color]).all(-1)] = COLORS[wrong]
        assert scorer.judge(image, prompt.prompt).correct
        assert not scorer.judge(recoloured, prompt.prompt).correct


# ------------------------------------------------------------------------------------------------ FID


def reference_frechet(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 1.5
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference_frechet(mu1, s1, mu2, s2), rel=1e-6)
    # 1-D closed form: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9 + 1)


def test_classifier_fid_real_vs_real_small_and_vs_noise_large(scorer, noise_images):
    real_1 = render_prompt_set(make_prompt_set(20, seed=1), 64)
    real_2 = render_prompt_set(make_prompt_set(20, seed=2), 64)
    features_1, features_2 = scorer.image_features(real_1), scorer.image_features(real_2)
    real_vs_real = frechet_distance_of_features(features_1, features_2)
    real_vs_noise = frechet_distance_of_features(features_1, scorer.image_features(noise_images))
    assert real_vs_real < 2.0
    assert real_vs_noise > 20 * real_vs_real


# ------------------------------------------------------------------------------------------------ ldm-eval


def test_ldm_eval_on_tiny_pipeline(tmp_path, tiny_pipeline_factory, capsys):
    pipeline_dir = tmp_path / "pipeline"
    tiny_pipeline_factory(resolution=32).save_pretrained(pipeline_dir)
    out = tmp_path / "eval"
    eval_main(["--model", str(pipeline_dir), "--num_images", "2", "--steps", "2", "--seed", "0", "--out", str(out),
               "--batch_size", "5", "--scheduler", "ddim", "--guidance_scale", "2"])
    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]) == set(CATEGORIES) | {"overall"}
    assert report["scores"]["overall"] == pytest.approx(np.mean([report["scores"][c] for c in CATEGORIES]))
    judgements = json.loads((out / "judgements.json").read_text())
    assert report["num_images"] == 12 and len(judgements) == 12
    assert [j["correct"] for j in judgements if j["category"] == "colors"].count(True) / 2 == report["scores"]["colors"]
    assert report["settings"]["resolution"] == 32 and report["settings"]["steps"] == 2
    assert report["settings"]["scheduler"] == "DDIMScheduler"
    assert report["classifier_accuracy"] >= 0.95
    assert np.isfinite(report["fid"])
    assert "| **overall** |" in (out / "report.md").read_text()
    assert (out / "report.md").read_text() in capsys.readouterr().out
    for category in CATEGORIES:
        with Image.open(out / f"grid_{category}.png") as grid:
            assert grid.size[0] > 0
    assert len(list((out / "samples").glob("*.png"))) == 12


def test_ldm_eval_real_mode(tmp_path):
    out = tmp_path / "real"
    eval_main(["--real", "--num_images", "3", "--resolution", "48", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["scores"]["overall"] >= 0.95
    assert report["model"] == "real renders (--real)"
    orders = tmp_path / "orders"
    eval_main(["--real", "--num_images", "3", "--word_orders", "held_out", "--shapes_held_out_orders", "0.25",
               "--out", str(orders)])
    report = json.loads((orders / "report.json").read_text())
    assert list(report["num_images_per_category"]) == ["position", "color_attribution"]
    assert report["settings"]["word_orders"] == "held_out" and report["scores"]["overall"] >= 0.95


def test_ldm_eval_vae_mode_scores_the_reconstructions_of_the_renders(tmp_path):
    vae = make_tiny_vae(resolution=32)
    vae.save_pretrained(tmp_path / "vae_stage" / "vae")
    out = tmp_path / "vae_eval"
    eval_main(["--vae", str(tmp_path / "vae_stage"), "--num_images", "2", "--batch_size", "5", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["resolution"] == 32 and report["model"].startswith("VAE reconstructions")
    assert report["num_images"] == 12 and set(report["scores"]) == set(CATEGORIES) | {"overall"}

    prompt = make_prompt_set(2, seed=0)[5]
    render = np.asarray(render_prompt_set([prompt], 32)[0], dtype=np.float32)
    pixel_values = torch.from_numpy(render).permute(2, 0, 1)[None] / 127.5 - 1
    expected = ((reconstruct(vae.eval(), pixel_values)[0].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy()
    saved = np.asarray(Image.open(out / "samples" / f"{prompt.category}_{prompt.index:04d}.png"))
    np.testing.assert_allclose(saved, (expected * 255).round(), atol=1)

    with pytest.raises(OSError, match="no vae/config.json"):
        evaluate_command(["--vae", str(tmp_path / "nowhere"), "--num_images", "1", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="not divisible by the VAE's factor"):
        evaluate_command(["--vae", str(tmp_path / "vae_stage"), "--resolution", "31", "--num_images", "1",
                          "--out", str(tmp_path / "o")])


def test_ldm_eval_bad_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="num_images must be positive"):
        evaluate_command(["--real", "--num_images", "0", "--out", str(tmp_path)])
    with pytest.raises(OSError, match="no model_index.json|not a pipeline directory"):
        evaluate_command(["--model", str(tmp_path), "--num_images", "1", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--real", "--batch_size", "-1", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "ldm-eval: error: --batch_size must be positive, got -1.\n"
