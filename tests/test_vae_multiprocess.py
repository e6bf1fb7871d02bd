"""The VAE stage over processes: the posterior noise is drawn for the global batch (each process keeps its rows), the
PatchGAN's batch norms and the adaptive GAN weight are global, so 2 CPU processes (gloo) of batch 4 train as 1
process of batch 8, and a 2-process run resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from conftest import run_stage
from ldm_pipeline.config import load_stage_config
from ldm_pipeline.data_order import step_generator
from ldm_pipeline.trainer import StageTrainer
from ldm_pipeline.vae import AutoencoderWithPosterior, build_vae

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "vae.json"
LATENT_SHAPE = (4, 8, 8)  # configs/tiny/vae.json: 4 latent channels, f = 4 at 32 px
ZERO_GRADIENT_PARAMETERS = ("to_k.bias",)  # softmax is shift-invariant: their gradient is 0 up to float noise


def vae_args(out: Path, *extra: str) -> list[str]:
    """4 steps of the tiny config with the PatchGAN from step 2 (adaptive weight, batch norms) and EMA."""
    return ["--config", str(TINY), "--output_dir", str(out), "--num_train_samples", "32", "--disc_start", "2",
            "--use_ema", "--ema_decay", "0.5", "--checkpointing_steps", "2", "--report_to", "none", *extra]


def launch_two_processes(argv: list[str]) -> str:
    """``training/train_vae.py`` with ``argv`` on 2 CPU processes (``configs/accelerate/cpu_2_processes.yaml``)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "cpu_2_processes.yaml"), str(REPO / "training" / "train_vae.py"),
               *argv]
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": python_path}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def train_history(out: Path) -> list[dict]:
    """The per-step records of ``train_log.jsonl`` without their wall-clock times."""
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records if "loss" in r]


def weights(out: Path, relative: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / relative))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae_two") / "run"
    stdout = launch_two_processes(vae_args(out, "--max_train_steps", "4", "--train_batch_size", "4"))
    assert "batch 4 x 2 processes" in stdout
    assert stdout.count("held-out PSNR") == 1, "only the main process validates and saves"
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae_one") / "run"
    run_stage("vae", vae_args(out, "--max_train_steps", "4", "--train_batch_size", "8"))
    return out


def assert_same_training(expected: Path, got: Path) -> None:
    """Every logged term (L1, KL, generator and discriminator losses, the adaptive weight, the logits, the learning
    rate) of each step, the saved (EMA) VAE, the discriminator with its batch-norm running statistics, and the
    held-out metrics agree to float tolerance. The weights of parameters whose gradient is 0 in exact arithmetic get
    Adam-normalised float noise, so they are held to a twentieth of one learning-rate step (1e-4) instead of 1e-5."""
    reference, history = train_history(expected), train_history(got)
    assert [r["step"] for r in history] == [1, 2, 3, 4] and "gan_weight" in history[2]
    assert [sorted(r) for r in history] == [sorted(r) for r in reference]
    for a, b in zip(reference, history):
        np.testing.assert_allclose([b[k] for k in sorted(a)], [a[k] for k in sorted(a)], rtol=1e-4, atol=1e-7,
                                   err_msg=f"step {a['step']}")
    for relative in ("vae/diffusion_pytorch_model.safetensors", "checkpoints/checkpoint-4/model_1.safetensors"):
        reference_weights = weights(expected, relative)
        for name, tensor in weights(got, relative).items():
            atol = 1e-4 if name.endswith(ZERO_GRADIENT_PARAMETERS) else 1e-5
            torch.testing.assert_close(tensor, reference_weights[name], rtol=1e-4, atol=atol, msg=f"{relative}: {name}")
    saved, metrics = (json.loads((run / "vae_metrics.json").read_text()) for run in (got, expected))
    for key in ("psnr", "ssim", "scaling_factor"):
        assert saved[key] == pytest.approx(metrics[key], rel=1e-4), key


def stopped_at_step_2(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished 4-step run as a run killed after its checkpoint at step 2 leaves it."""
    copy = tmp_path / "stopped"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint-4")
    shutil.rmtree(copy / "vae")
    return copy


def test_two_processes_of_batch_4_train_as_one_process_of_batch_8(two_processes, one_process):
    assert_same_training(one_process, two_processes)


def test_a_two_process_run_stopped_at_step_2_resumes_exactly(two_processes, tmp_path):
    resumed = stopped_at_step_2(two_processes, tmp_path)
    assert (resumed / "checkpoints" / "checkpoint-2" / "random_states_1.pkl").is_file()
    launch_two_processes(vae_args(resumed, "--max_train_steps", "4", "--train_batch_size", "4",
                                  "--resume_from_checkpoint", "latest"))
    assert train_history(resumed) == train_history(two_processes)
    for relative in ("vae/diffusion_pytorch_model.safetensors", "checkpoints/checkpoint-4/model_1.safetensors"):
        reference = weights(two_processes, relative)
        for name, tensor in weights(resumed, relative).items():
            assert torch.equal(tensor, reference[name]), f"{relative}: {name}"


def test_a_one_process_checkpoint_resumes_on_two_processes_with_the_same_global_batch(one_process, tmp_path):
    """1 process x batch 8 stopped at step 2, resumed by 2 processes x batch 4: the run an uninterrupted one would
    have been (process 1 continues from process 0's random state)."""
    resumed = stopped_at_step_2(one_process, tmp_path)
    stdout = launch_two_processes(vae_args(resumed, "--max_train_steps", "4", "--train_batch_size", "4",
                                           "--resume_from_checkpoint", "latest"))
    assert ("written by 1 process(es) x batch 8 x 1 accumulation, with 2 x 4 x 1: the same global batch of 8"
            in stdout)
    assert_same_training(one_process, resumed)


def test_a_two_process_checkpoint_resumes_on_one_process_with_the_same_global_batch(two_processes, tmp_path):
    resumed = stopped_at_step_2(two_processes, tmp_path)
    run_stage("vae", vae_args(resumed, "--max_train_steps", "4", "--train_batch_size", "8",
                              "--resume_from_checkpoint", "latest"))
    assert_same_training(two_processes, resumed)


def test_a_resume_with_another_global_batch_is_refused_with_the_arithmetic(two_processes, tmp_path):
    resumed = stopped_at_step_2(two_processes, tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint-2 was written by 2 process\(es\) x batch 4 x 1 accumulation = "
                                         r"global batch 8; this run has 1 x 4 x 1 = 4: pass --train_batch_size 8 or "
                                         r"--gradient_accumulation_steps 2 to continue it with the same global batch"):
        run_stage("vae", vae_args(resumed, "--max_train_steps", "4", "--train_batch_size", "4",
                                  "--resume_from_checkpoint", "latest"))


def test_posterior_noise_of_a_process_is_its_rows_of_the_global_draw(tmp_path, monkeypatch):
    """Process 1 of 2 with batch 4 decodes z = mean + std * eps with eps rows 4..7 of the global batch's draw from
    the step's generator: the latents and reconstructions of Diffusers' ``DiagonalGaussianDistribution.sample`` for
    the global batch of 8, rows 4..7. A per-process draw (4 rows, or a generator seeded by the process) fails."""
    config = load_stage_config("vae", ["--config", str(TINY), "--output_dir", str(tmp_path)])
    try:
        trainer = StageTrainer(config)
        trainer.micro_step = 5
        monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
        noise = {}
        for index in (0, 1):
            monkeypatch.setattr(Accelerator, "process_index", property(lambda self, index=index: index))
            noise[index] = trainer.global_randn((4, *LATENT_SHAPE), trainer.generator())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    vae = build_vae(config.model, 32).eval()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        latents = posterior.sample(generator=step_generator(config.training.seed, 0, 5))  # [8, 4, 8, 8]
        expected = vae.decode(latents).sample
        torch.testing.assert_close(posterior.mean + posterior.std * torch.cat([noise[0], noise[1]]), latents)
        reconstruction, _ = AutoencoderWithPosterior(vae)(images[4:], noise[1])
    assert not torch.allclose(noise[0], noise[1])
    torch.testing.assert_close(reconstruction, expected[4:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_global_batch_norm_formula_is_batch_norm_2d(monkeypatch, momentum):
    """The multi-process path of ``GlobalBatchNorm2d`` (explicit sums, here over one process) gives
    ``nn.BatchNorm2d``'s outputs, gradients and running statistics (unbiased variance, momentum or cumulative
    average) over three training steps."""
    import ldm_pipeline.vae as vae_module

    monkeypatch.setattr(vae_module, "num_processes", lambda: 2)
    monkeypatch.setattr(vae_module, "sum_over_processes", lambda tensor: tensor)
    reference = torch.nn.BatchNorm2d(5, momentum=momentum)
    torch.nn.init.normal_(reference.weight, 1.0, 0.3)
    torch.nn.init.normal_(reference.bias, 0.0, 0.3)
    norm = vae_module.GlobalBatchNorm2d(5, momentum=momentum)
    norm.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = (torch.randn(6, 5, 4, 3, generator=generator) * 2 + 1).requires_grad_()
        upstream = torch.randn(6, 5, 4, 3, generator=generator)
        expected = reference(x)
        expected_grads = torch.autograd.grad((expected * upstream).sum(), [x, reference.weight, reference.bias])
        got = norm(x)
        grads = torch.autograd.grad((got * upstream).sum(), [x, norm.weight, norm.bias])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(norm.state_dict()[name], buffer, msg=name)
