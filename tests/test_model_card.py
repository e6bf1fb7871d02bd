"""ldm_pipeline.model_card: the Hub-format README of a saved pipeline and of each stage output, read from the files
the stages write: a title that names the model, a usage snippet that works for its reader (never a path of the
machine that wrote it), ``datasets`` only for a Hub dataset, the ldm-eval scores with their command and a sample
grid; and push_to_hub up to the (mocked) upload call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image

import ldm_pipeline.model_card as model_card
from ldm_pipeline.model_card import push_to_hub, write_model_card

TEXT_METRICS = {"top1": 0.416, "top5": 0.744, "num_pairs": 500, "architecture": "clip", "train_steps": 400,
                "train_seconds_this_run": 106.0}
VAE_METRICS = {"psnr": 30.22, "ssim": 0.948, "scaling_factor": 0.8797, "latent_shape": [8, 8, 8], "resolution": 32,
               "train_steps": 2500, "train_seconds_this_run": 134.0}
UNET_METRICS = {"train_steps": 2600, "train_seconds_this_run": 834.0, "images_per_second": 205.0,
                "prediction_type": "epsilon", "num_parameters": 6_800_000}
REPORT = {"scores": {"single_object": 1.0, "colors": 1.0, "overall": 0.646}, "fid": 2.59, "inception_fid": 12.5,
          "settings": {"seed": 0, "steps": 20}}


@pytest.fixture()
def run_dirs(tiny_pipeline_dir, tmp_path):
    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, pipeline)
    (pipeline / "unet_metrics.json").write_text(json.dumps(UNET_METRICS))
    log = [{"step": 1300, "loss": 0.2, "lr": 2e-3, "elapsed_s": 400.0}, {"step": 2600, "loss": 0.125, "lr": 2e-3,
                                                                          "elapsed_s": 830.0}]
    (pipeline / "train_log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in log))
    text_stage, vae_stage = tmp_path / "te", tmp_path / "vae"
    text_stage.mkdir(), vae_stage.mkdir()
    (text_stage / "text_encoder_metrics.json").write_text(json.dumps(TEXT_METRICS))
    (vae_stage / "vae_metrics.json").write_text(json.dumps(VAE_METRICS))
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({"model": {"block_out_channels": [64, 128]}, "training": {"learning_rate": 2e-3}}))
    return {"pipeline": pipeline, "text_encoder": text_stage, "vae": vae_stage, "config": config}


def metadata_and_text(path):
    card = ModelCard.load(path)
    return {key: value for key, value in card.data.to_dict().items() if value is not None}, card.text.lstrip()


def test_pipeline_card_has_hub_metadata_training_evaluation_and_samples(run_dirs, tmp_path):
    report, grid = tmp_path / "report.json", tmp_path / "grid.png"
    report.write_text(json.dumps(REPORT))
    Image.new("RGB", (8, 8), (255, 0, 0)).save(grid)
    command = "ldm-eval --model path/to/pipeline --out eval --num_images 16 --seed 0"
    path = write_model_card(run_dirs["pipeline"], {"text_encoder": run_dirs["text_encoder"], "vae": run_dirs["vae"]},
                            eval_report=report, eval_command=command, sample_grid=grid,
                            sample_prompts=["a red cat", "two blue stars"], configs={"unet": run_dirs["config"]},
                            hub_model_id="user/ldm-shapes")
    assert path == run_dirs["pipeline"] / "README.md"
    metadata, text = metadata_and_text(path)
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "text-to-image"
    assert metadata["license"] == "apache-2.0" and "base_model" not in metadata and "datasets" not in metadata
    assert {"trained-from-scratch", "text-to-image", "latent-diffusion"} <= set(metadata["tags"])
    assert text.startswith("# ldm-pipeline text-to-image model: user/ldm-shapes\n")
    assert 'DiffusionPipeline.from_pretrained("user/ldm-shapes")' in text
    assert 'LatentDiffusionPipeline.from_pretrained("user/ldm-shapes")' in text and "path/to" not in text.split(
        "## Evaluation")[0]
    assert 'pipe("a red cat").images[0]    # the saved DDIMScheduler, 20 steps, guidance 5' in text
    assert "the built-in `shapes` dataset, every stage trained from scratch" in text
    assert "trained from scratch, 400 steps, 1.8 minutes" in text                        # 106 s
    assert "| held-out PSNR (dB) | 30.22 |" in text and "| held-out SSIM | 0.948 |" in text
    assert "trained from scratch, 2,600 steps, 13.9 minutes, final training loss 0.125" in text  # 834 s
    assert '"learning_rate": 0.002' in text
    assert "| overall | 0.646 |" in text and "Inception FID: 12.500" in text and "classifier FID: 2.590" in text
    assert f"```bash\n{command}\n```" in text and "- settings: seed=0, steps=20" in text
    assert "![samples](samples.png)" in text and 'top to bottom: "a red cat", "two blue stars".' in text
    assert Image.open(run_dirs["pipeline"] / "samples.png").getpixel((0, 0)) == (255, 0, 0)
    assert text.index("## Usage") < text.index("## Evaluation") < text.index("## Samples") < text.index("## Training")


def test_a_local_card_names_the_model_and_carries_no_machine_path(run_dirs, tmp_path, monkeypatch):
    """Without a Hub id the title takes the run's name (``runs/demo/pipeline``: ``demo``) and the snippet a
    placeholder explained beside it; local data is named by its folder only and is no ``datasets`` entry; the
    YAML front matter stays what the Hub reads."""
    pipeline = tmp_path / "runs" / "demo" / "pipeline"
    shutil.copytree(run_dirs["pipeline"], pipeline)
    data = tmp_path / "data" / "my_folder"
    data.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for data_flags in ({"train_data_dir": str(data)}, {"dataset_name": str(data)}, {"dataset_name": "data/my_folder"}):
        path = write_model_card(pipeline, **data_flags)
        metadata, text = metadata_and_text(path)
        assert text.startswith("# ldm-pipeline text-to-image model: demo\n")
        assert 'DiffusionPipeline.from_pretrained("path/to/pipeline")' in text
        assert "`path/to/pipeline` stands for the directory that holds this card" in text
        assert "trained with ldm-pipeline on local data (`my_folder`)" in text and "datasets" not in metadata
        assert str(tmp_path) not in path.read_text()
    front_matter = yaml.safe_load(path.read_text().split("---")[1])
    assert front_matter == {"library_name": "diffusers", "license": "apache-2.0", "pipeline_tag": "text-to-image",
                            "tags": ["ldm-pipeline", "latent-diffusion", "text-to-image", "trained-from-scratch"]}

    write_model_card(run_dirs["vae"])
    assert metadata_and_text(run_dirs["vae"] / "README.md")[1].startswith("# ldm-pipeline VAE: vae\n")


def test_datasets_metadata_names_only_a_hub_dataset(run_dirs):
    path = write_model_card(run_dirs["pipeline"], dataset_name="user/captioned-shapes")
    metadata, text = metadata_and_text(path)
    assert metadata["datasets"] == ["user/captioned-shapes"]
    assert "[`user/captioned-shapes`](https://huggingface.co/datasets/user/captioned-shapes)" in text
    for not_a_hub_name in ("/data/my folder", "./shapes", "a/b/c"):
        metadata, _ = metadata_and_text(write_model_card(run_dirs["pipeline"], dataset_name=not_a_hub_name))
        assert "datasets" not in metadata, not_a_hub_name


def test_stage_card_and_base_model(run_dirs):
    write_model_card(run_dirs["text_encoder"], base_models={"text_encoder": "openai/clip-vit-base-patch32"})
    metadata, text = metadata_and_text(run_dirs["text_encoder"] / "README.md")
    assert metadata["library_name"] == "transformers" and "pipeline_tag" not in metadata
    assert metadata["base_model"] == ["openai/clip-vit-base-patch32"] and "trained-from-scratch" not in metadata["tags"]
    assert "started from `openai/clip-vit-base-patch32`" in text and "| held-out text-to-image retrieval top-1 | 0.416 |" in text
    assert "VAE" not in text and "U-Net" not in text

    write_model_card(run_dirs["vae"])
    metadata, text = metadata_and_text(run_dirs["vae"] / "README.md")
    assert metadata["library_name"] == "diffusers" and "trained-from-scratch" in metadata["tags"]
    assert "2,500 steps, 2.2 minutes" in text and "| latent scaling factor | 0.8797 |" in text


def test_model_card_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing is not a directory"):
        write_model_card(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither model_index.json nor a stage metrics file"):
        write_model_card(tmp_path)


class FakeHfApi:
    """Records the calls push_to_hub makes instead of reaching the Hub; a name without a namespace gets the
    token owner's (``user/``), as on the Hub."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private, exist_ok, repo_type))
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"user/{repo_id}"})()

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/1"})()


def test_push_to_hub_creates_the_repo_and_uploads_without_training_state(run_dirs, monkeypatch):
    FakeHfApi.calls = []
    monkeypatch.setattr(model_card, "HfApi", FakeHfApi)
    with pytest.raises(FileNotFoundError, match="no README.md: call write_model_card"):
        push_to_hub(run_dirs["pipeline"], "user/ldm-shapes")
    assert FakeHfApi.calls == []
    write_model_card(run_dirs["pipeline"])
    url = push_to_hub(run_dirs["pipeline"], "user/ldm-shapes", token="hf_x", private=True)
    assert url == "https://huggingface.co/user/ldm-shapes/commit/1"
    assert FakeHfApi.calls[:2] == [("init", "hf_x"), ("create_repo", "user/ldm-shapes", True, True, "model")]
    upload = FakeHfApi.calls[3][1]
    assert upload["repo_id"] == "user/ldm-shapes" and upload["folder_path"] == str(run_dirs["pipeline"])
    assert "checkpoints/*" in upload["ignore_patterns"] and "logs/*" in upload["ignore_patterns"]


def test_every_stage_writes_its_card_and_push_to_hub_uploads_it(tmp_path, monkeypatch):
    """``--push_to_hub`` after training: the repo is created first, so that the card names its full id
    (``--hub_model_id tiny-vae`` becomes ``user/tiny-vae``), then the output folder is uploaded (the Hub calls
    need the network, so they are replaced here)."""
    import ldm_pipeline.model_card as model_card
    from conftest import run_stage

    uploads = []
    monkeypatch.setattr(model_card, "HfApi", FakeHfApi)
    monkeypatch.setattr(model_card, "push_to_hub", lambda folder, repo, token=None: uploads.append((folder, repo)) or
                        f"https://huggingface.co/{repo}")
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "vae.json"
    out = tmp_path / "vae_stage"
    run_stage("vae", ["--config", str(config), "--output_dir", str(out), "--max_train_steps", "2",
                      "--report_to", "none", "--push_to_hub", "--hub_model_id", "tiny-vae"])
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "trained-from-scratch" in card
    assert "\n# ldm-pipeline VAE: user/tiny-vae\n" in card and "datasets" not in card
    assert uploads == [(out, "user/tiny-vae")]
