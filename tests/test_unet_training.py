"""training/train_unet.py on the tiny config with tiny random text-encoder/VAE stage outputs: end to end with a
loadable pipeline, exact resume, cache reuse and invalidation, cache == reference loop, NaN loss, options."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from transformers import T5EncoderModel
from safetensors.torch import load_file

from conftest import make_tiny_t5, make_tiny_tokenizer, make_tiny_vae, run_stage
from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.caching import MANIFEST, ShardedLatentCache, read_manifest
from ldm_pipeline.trainer import NonFiniteLossError

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny" / "unet.json"
RESOLUTION = 16  # tiny VAE factor 2 -> 8x8x4 latents






@pytest.fixture(scope="module")
def stages(tiny_stage_dirs):
    return tiny_stage_dirs


def base_args(stages: Path, out: Path, *extra: str, cache_dir: Path | None = None) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--text_encoder", str(stages / "text"), "--vae", str(stages / "vae_stage"),
            "--output_dir", str(out), "--resolution", str(RESOLUTION), "--num_train_samples", "16",
            "--train_batch_size", "4", "--report_to", "none",
            "--cache_dir", str(cache_dir or out.parent / "cache"), *extra]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(stages, tmp_path_factory):
    """``(output dir, metrics, what the run printed)``."""
    out = tmp_path_factory.mktemp("run") / "pipeline"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = run_stage("unet", base_args(stages, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                                              "--validation_steps", "4", "--report_to", "tensorboard",
                                              "--logging_steps", "2", "--snapshot_steps", "3"))
    return out, metrics, printed.getvalue()


def test_end_to_end_saves_a_loadable_pipeline(trained):
    out, metrics, printed = trained
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(set(r) == {"step", "loss", "lr", "elapsed_s"} and np.isfinite(r["loss"]) for r in records)
    for step in (2, 4):  # a loss line every --logging_steps: the mean of the steps since the last one
        mean = (records[step - 2]["loss"] + records[step - 1]["loss"]) / 2
        assert f"step {step}/4: loss {mean:.4f} (mean of the last 2 steps), lr {records[step - 1]['lr']:.1e}\n" in printed
    assert f"step 3: U-Net snapshot written to {out / 'snapshots' / 'step-3'}\n" in printed
    assert f"step 4: validation images written to {out / 'validation' / 'step-4.png'}\n" in printed
    assert "waiting for the others" not in printed  # one process waits for no one
    assert metrics["train_steps"] == 4 and metrics["cached"] is True
    assert (out / "validation" / "step-4.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["checkpoint-2", "checkpoint-4"]
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / component).is_dir()
    assert not [p for p in out.rglob("*.bin") if "checkpoints" not in p.parts], "weights must be safetensors"

    pipe = LatentDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"  # SAMPLING_DEFAULTS' sampler
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++" and pipe.scheduler.config.clip_sample is False
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.unet.config.sample_size == RESOLUTION // 2
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels
    final_weights = load_file(str(out / "checkpoints" / "checkpoint-4" / "model.safetensors"))
    torch.testing.assert_close(pipe.unet.state_dict()["conv_in.weight"], final_weights["conv_in.weight"])
    images = pipe(["a red circle"], num_inference_steps=2, guidance_scale=2.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(images).all()


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(trained, stages, tmp_path):
    uninterrupted, *_ = trained
    out = tmp_path / "resumed"
    run_stage("unet", base_args(stages, out, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    assert len(losses(out)) == 2
    run_stage("unet", base_args(stages, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                         "--resume_from_checkpoint", "latest"))
    assert losses(out) == losses(uninterrupted)


def test_cache_is_reused_and_invalidated(stages, tmp_path, monkeypatch):
    calls = {"vae": 0}
    original_encode = AutoencoderKL.encode

    def counting_encode(self, *args, **kwargs):
        calls["vae"] += 1
        return original_encode(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    cache_dir = tmp_path / "cache"
    run_stage("unet", base_args(stages, tmp_path / "a", "--max_train_steps", "1", cache_dir=cache_dir))
    assert calls["vae"] > 0
    first_dirs = sorted(cache_dir.iterdir())
    assert len(first_dirs) == 1
    mtimes = {p: p.stat().st_mtime_ns for p in first_dirs[0].iterdir()}

    calls["vae"] = 0
    run_stage("unet", base_args(stages, tmp_path / "b", "--max_train_steps", "2", cache_dir=cache_dir))
    assert calls["vae"] == 0, "a second run with the same VAE, text encoder and data must not run the VAE"
    assert {p: p.stat().st_mtime_ns for p in first_dirs[0].iterdir()} == mtimes
    assert losses(tmp_path / "b")[0] == losses(tmp_path / "a")[0]

    changed_vae = make_tiny_vae(RESOLUTION)
    with torch.no_grad():
        changed_vae.encoder.conv_in.weight.mul_(1.01)
    changed_vae.save_pretrained(tmp_path / "vae2" / "vae")
    argv = base_args(stages, tmp_path / "c", "--max_train_steps", "1", cache_dir=cache_dir)
    argv[argv.index("--vae") + 1] = str(tmp_path / "vae2")
    run_stage("unet", argv)
    assert calls["vae"] > 0, "changed VAE weights must recompute the cache"
    assert len(list(cache_dir.iterdir())) == 2

    calls["vae"] = 0
    run_stage("unet", base_args(stages, tmp_path / "d", "--max_train_steps", "1", "--num_train_samples", "12",
                         cache_dir=cache_dir))
    assert calls["vae"] > 0, "changed data must recompute the cache"

    directory = max(cache_dir.iterdir(), key=lambda p: (p / MANIFEST).stat().st_mtime_ns)
    key = json.loads((directory / MANIFEST).read_text())["key"]
    cache = ShardedLatentCache(directory, key)
    batch = cache.__getitems__(range(len(cache)))
    assert batch["latent_mean"].shape == (12, 4, RESOLUTION // 2, RESOLUTION // 2)
    assert (batch["latent_std"] > 0).all() and cache.empty_embeds().shape == (16, 32)
    with pytest.raises(ValueError, match="other inputs"):
        read_manifest(directory, key[:24] + "0" * 40)


def test_cached_training_equals_the_reference_loop(trained, stages, tmp_path):
    """--no_cache runs VAE + text encoder every step (Diffusers' example); same draws -> same losses."""
    cached, *_ = trained
    out = tmp_path / "reference"
    metrics = run_stage("unet", base_args(stages, out, "--max_train_steps", "4", "--no_cache"))
    assert metrics["cached"] is False
    np.testing.assert_allclose(losses(out), losses(cached), rtol=1e-4)


@pytest.mark.parametrize("read_every", [
    [],                             # a CPU's default: every loss read and checked before its update
    ["--loss_read_steps", "5"],     # a GPU's way: found at step 4, when the checkpoint due there reads the losses
])
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(stages, tmp_path, monkeypatch, read_every):
    import ldm_pipeline.unet as unet_module

    real_loss, calls = unet_module.diffusion_loss, {"n": 0}

    def loss_that_breaks_at_step_3(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(unet_module, "diffusion_loss", loss_that_breaks_at_step_3)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="step 2" if not read_every else "at step 2 .*read at step 4"):
        run_stage("unet", base_args(stages, out, "--max_train_steps", "4", "--checkpointing_steps", "2", *read_every))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors"))
    assert not (out / "model_index.json").exists()


def test_options_v_prediction_ema_accumulation_offset_xformers_fallback(stages, tmp_path, capsys):
    out = tmp_path / "options"
    run_stage("unet", base_args(stages, out, "--max_train_steps", "2", "--prediction_type", "v_prediction", "--use_ema",
                         "--ema_decay", "0.5", "--gradient_accumulation_steps", "2", "--noise_offset", "0.1",
                         "--snr_gamma", "5", "--gradient_checkpointing", "--checkpointing_steps", "2",
                         "--enable_xformers_memory_efficient_attention"))
    assert "scaled_dot_product_attention" in capsys.readouterr().out
    scheduler_config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["_class_name"] == "DPMSolverMultistepScheduler"
    assert scheduler_config["prediction_type"] == "v_prediction" and scheduler_config["clip_sample"] is False
    saved = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    raw = load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors"))
    assert not torch.equal(saved["conv_in.weight"], raw["conv_in.weight"]), "the saved U-Net holds the EMA weights"
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors").is_file()  # EMA state for resume
    assert json.loads((checkpoint / "unet_ema" / "config.json").read_text())["optimization_step"] == 2
    assert not list(checkpoint.glob("custom_checkpoint_*")), "EMA state is saved as safetensors, not pickled"
    assert len(losses(out)) == 2


def test_bad_stage_paths_are_clear_errors(stages, tmp_path):
    argv = base_args(stages, tmp_path / "x", "--max_train_steps", "1")
    argv[argv.index("--vae") + 1] = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="--vae"):
        run_stage("unet", argv)
    argv = base_args(stages, tmp_path / "x", "--max_train_steps", "1")
    argv[argv.index("--text_encoder") + 1] = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="--text_encoder"):
        run_stage("unet", argv)


def test_t5_text_encoder_stage(stages, tmp_path):
    """A T5 text stage: the U-Net's cross-attention width follows d_model and the pipeline loads the T5 encoder."""
    tokenizer = make_tiny_tokenizer(16)
    make_tiny_t5(tokenizer).save_pretrained(tmp_path / "t5" / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "t5" / "tokenizer")
    argv = base_args(stages, tmp_path / "out", "--max_train_steps", "1")
    argv[argv.index("--text_encoder") + 1] = str(tmp_path / "t5")
    run_stage("unet", argv)
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "out")
    assert isinstance(pipe.text_encoder, T5EncoderModel)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.d_model


def launch_two_processes(argv: list[str]) -> str:
    """``training/train_unet.py`` with ``argv`` on 2 CPU processes (``configs/accelerate/cpu_2_processes.yaml``)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "cpu_2_processes.yaml"), str(REPO / "training" / "train_unet.py"),
               *argv]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_two_processes_of_batch_b_train_as_one_process_of_batch_2b_and_resume_exactly(stages, tmp_path):
    """Noise, timesteps and caption dropout are drawn for the global batch and each process keeps its rows, so 2
    CPU processes (gloo) of batch 4 give the losses and weights of 1 process of batch 8 (to float tolerance); and a
    2-process run stopped at step 2 and resumed gives the losses of the uninterrupted one."""
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run_stage("unet", base_args(stages, one, "--max_train_steps", "4", "--train_batch_size", "8"))
    output = launch_two_processes(base_args(stages, two, "--max_train_steps", "4", "--train_batch_size", "4"))
    assert "batch 4 x 2 processes" in output
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-4)
    launch_two_processes(base_args(stages, resumed, "--max_train_steps", "2", "--train_batch_size", "4",
                                   "--checkpointing_steps", "2"))
    assert (resumed / "checkpoints" / "checkpoint-2" / "random_states_1.pkl").is_file()
    launch_two_processes(base_args(stages, resumed, "--max_train_steps", "4", "--train_batch_size", "4",
                                   "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"))
    assert losses(resumed) == losses(two)
    for name, tensor in load_file(str(one / "unet" / "diffusion_pytorch_model.safetensors")).items():
        other = load_file(str(two / "unet" / "diffusion_pytorch_model.safetensors"))[name]
        torch.testing.assert_close(other, tensor, rtol=1e-4, atol=1e-5, msg=name)
