"""The main job end to end on the tiny configs: three `accelerate launch` stages, evaluation, samples, summary;
also on a user imagefolder."""

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.data.export import main as export_main
from ldm_pipeline.data.shapes import CATEGORIES
from training import run_demo

REPO = Path(__file__).resolve().parent.parent


def test_main_job_runs_all_stages_and_writes_a_summary(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo.main(["--config_dir", str(REPO / "configs" / "tiny"), "--output_dir", str(out)])

    assert set(summary["seconds_per_stage"]) == {"text_encoder", "vae", "unet", "evaluation", "samples"}
    assert 0.0 <= summary["text_encoder"]["top1"] <= summary["text_encoder"]["top5"] <= 1.0
    assert summary["vae"]["psnr"] > 0 and summary["vae"]["scaling_factor"] > 0
    scores = summary["evaluation"]["scores"]
    assert set(CATEGORIES) | {"overall"} <= set(scores)
    assert abs(scores["overall"] - sum(scores[c] for c in CATEGORIES) / len(CATEGORIES)) < 1e-6

    grid = Image.open(summary["sample_grid"])
    assert grid.size[0] > 0 and grid.size[1] > 0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert "retrieval" in (out / "summary.md").read_text()

    pipe = LatentDiffusionPipeline.from_pretrained(summary["pipeline"])
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"  # the sampling defaults' sampler
    image = pipe("a red cat", num_inference_steps=2, output_type="np").images
    assert image.shape[0] == 1 and image.shape[-1] == 3

    # The pipeline's model card: the run's name, the scores with the command that made them, the sample grid.
    pipeline_dir = Path(summary["pipeline"])
    card = (pipeline_dir / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["library_name"] == "diffusers" and front_matter["pipeline_tag"] == "text-to-image"
    assert "datasets" not in front_matter and "\n# ldm-pipeline text-to-image model: demo\n" in card
    assert "ldm-eval --model path/to/pipeline --out eval --num_images 2 --scheduler ddim --steps 2 " \
           "--guidance_scale 2.0 --seed 0" in card
    assert f"| overall | {scores['overall']:.3f} |" in card and "![samples](samples.png)" in card
    assert (pipeline_dir / "samples.png").read_bytes() == Path(summary["sample_grid"]).read_bytes()
    assert str(tmp_path) not in card
    logs = {path.name: path.read_text() for path in (out / "logs").glob("*.log")}
    for name in ("text_encoder.log", "vae.log", "unet.log"):
        assert "Training" in logs[name], name
        for noise in ("were not passed to `accelerate launch`", "INFO accelerate.", "Saved checkpoint"):
            assert noise not in logs[name], (name, noise)
    assert "should be kept in float32" not in logs["samples.log"]


def test_skip_existing_reuses_finished_stages(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    marker = out / "text_encoder_stage" / "tokenizer" / "tokenizer.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    launched = []
    monkeypatch.setattr(run_demo, "run", lambda command, log_path: launched.append(command) or 1.0)
    monkeypatch.setattr(run_demo, "write_model_card", lambda *args, **kwargs: None)
    run_demo.main(["--config_dir", str(REPO / "configs" / "tiny"), "--output_dir", str(out), "--skip_existing"])
    scripts = [" ".join(command) for command in launched]
    assert not any("train_text_encoder.py" in s for s in scripts)
    assert any("train_vae.py" in s for s in scripts) and any("train_unet.py" in s for s in scripts)


def test_gpu_demo_recipe_passes_threads_and_extra_flags_to_its_stages(tmp_path, monkeypatch):
    """configs/gpu_demo through the same recipe: the thread count of every training launch, the extra training flags
    after each config (a CPU dry run: few steps, fp32) and the extra evaluation flags after eval.json's."""
    launched = []
    monkeypatch.setattr(run_demo, "run", lambda command, log_path: launched.append(command) or 1.0)
    monkeypatch.setattr(run_demo, "write_model_card", lambda *args, **kwargs: None)
    summary = run_demo.main(["--config_dir", str(REPO / "configs" / "gpu_demo"), "--output_dir", str(tmp_path),
                             "--num_cpu_threads_per_process", "1", "--train_args", "--max_train_steps 3 "
                             "--mixed_precision no", "--eval_args", "--num_images 2"])
    training, evaluation = launched[:3], launched[3]
    for command, stage in zip(training, ("text_encoder", "vae", "unet")):
        assert command[command.index("--num_cpu_threads_per_process") + 1] == "1"
        assert command[command.index("--config") + 1] == str(REPO / "configs" / "gpu_demo" / f"{stage}.json")
        assert command[-4:] == ["--max_train_steps", "3", "--mixed_precision", "no"]
    assert evaluation[evaluation.index("--num_images") + 1] == "64" and evaluation[-2:] == ["--num_images", "2"]
    assert summary["cpu_threads_per_process"] == 1
    monkeypatch.setattr(run_demo.os, "cpu_count", lambda: 16)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_demo.cpu_threads_per_process(None) == run_demo.GPU_CPU_THREADS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_demo.cpu_threads_per_process(None) == 16 and run_demo.cpu_threads_per_process(2) == 2


def test_every_config_set_trains_its_stages_at_one_resolution():
    """The U-Net's latents come from the VAE at the U-Net's resolution: a VAE trained at another size would be
    asked to encode images it never saw (and the text encoder's image tower learns on the same images)."""
    for config_dir in sorted(p for p in (REPO / "configs").iterdir() if p.is_dir() and p.name != "accelerate"):
        resolutions = {}
        for name in ("text_encoder.json", "vae.json", "unet.json"):
            path = config_dir / name
            if path.exists():
                resolutions[name] = json.loads(path.read_text())["data"]["resolution"]
        assert set(resolutions) == {"text_encoder.json", "vae.json", "unet.json"}, config_dir  # configs/<size>/<stage>.json
        assert len(set(resolutions.values())) == 1, f"{config_dir.name}: {resolutions}"


def test_data_flags_reach_every_stage_and_own_data_is_judged_by_the_text_stage(tmp_path, monkeypatch):
    out, folder = tmp_path / "mine", tmp_path / "my_folder"
    export_main(["--out", str(folder), "--num_samples", "30", "--resolution", "16"])
    launched = []

    def fake_run(command, log_path):
        launched.append(command)
        if "ldm_pipeline.cli_eval" in command:
            eval_dir = Path(command[command.index("--out") + 1])
            eval_dir.mkdir(parents=True)
            (eval_dir / "judgements.json").write_text(json.dumps([{"caption": f"a photo {i % 20}"} for i in range(30)]))
        return 1.0

    cards = []
    monkeypatch.setattr(run_demo, "run", fake_run)
    monkeypatch.setattr(run_demo, "write_model_card", lambda directory, stage_dirs, **kwargs: cards.append(kwargs))
    (folder / "metadata.jsonl").write_text((folder / "metadata.jsonl").read_text().replace('"text":', '"caption":'))
    demo = ["--config_dir", str(REPO / "configs" / "tiny"), "--output_dir", str(out), "--train_data_dir", str(folder),
            "--caption_column", "caption", "--random_flip"]
    with pytest.raises(ValueError, match=r"--num_held_out_samples 16 holds out more than half of the 30 items"):
        run_demo.main(demo + ["--num_held_out_samples", "16"])
    assert launched == []  # refused before the first stage
    summary = run_demo.main(demo + ["--num_held_out_samples", "5"])
    assert summary["held_out"].startswith("held-out slice: 5 of 30 items")
    for command in launched[:4]:
        flags = command[command.index("--train_data_dir"):]
        assert flags[:2] == ["--train_data_dir", str(folder)] and "--random_flip" in flags
        assert flags[flags.index("--caption_column") + 1] == "caption"
        assert flags[flags.index("--num_held_out_samples") + 1] == "5" and "--num_validation_samples" not in flags
    evaluation, samples = launched[3], launched[4]
    assert evaluation[evaluation.index("--text_stage") + 1] == str(out.resolve() / "text_encoder_stage")
    prompts = [samples[i + 1] for i, arg in enumerate(samples) if arg == "--prompt"]
    assert prompts == [f"a photo {i}" for i in range(run_demo.NUM_USER_SAMPLE_PROMPTS)]
    (card,) = cards  # own data: the grid of held-out captions, no shapes scores, the folder as local data
    assert card["sample_prompts"] == prompts and card["eval_report"] is None
    assert card["train_data_dir"] == str(folder) and card["dataset_name"] is None


def test_main_job_on_a_user_imagefolder(tmp_path):
    """`run_demo.py --train_data_dir`: the three stages train on an exported folder and ldm-eval judges the
    generations with the text stage's towers."""
    folder = tmp_path / "my_folder"
    export_main(["--out", str(folder), "--num_samples", "48", "--resolution", "32"])
    out = tmp_path / "mine"
    summary = run_demo.main(["--config_dir", str(REPO / "configs" / "tiny"), "--output_dir", str(out),
                             "--train_data_dir", str(folder), "--num_held_out_samples", "8"])

    report = summary["evaluation"]
    assert summary["data"] == str(folder) and report["num_images"] == 8
    splits = [json.loads((out / stage / "data_split.json").read_text())
              for stage in ("text_encoder_stage", "vae_stage", "pipeline")]
    assert all(split == splits[0] for split in splits) and splits[0]["num_held_out"] == 8
    assert report["held_out_sha256"] == splits[0]["held_out_sha256"]  # ldm-eval evaluated on what no stage saw
    assert set(report["alignment"]) == {"generated", "real", "shuffled"}
    assert report["memorization"]["num_train_images"] == 40
    assert 0.0 <= report["fidelity"]["precision"] <= 1.0
    captions = {json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()}
    assert {j["caption"] for j in json.loads((out / "eval" / "judgements.json").read_text())} <= captions
    assert "(ceiling)" in (out / "summary.md").read_text()
    assert Image.open(summary["sample_grid"]).size[0] > 0


def test_only_the_data_flags_given_reach_the_stages():
    """The stages' configs keep their own data settings (e.g. 500 held-out pairs) unless a flag overrides them."""
    assert run_demo.data_flags(run_demo.parse_args([])) == []
    assert run_demo.data_flags(run_demo.parse_args(["--train_data_dir", "d", "--random_flip"])) == [
        "--train_data_dir", "d", "--random_flip", "true"]
