"""Stage 2: AutoencoderKL config checks, LDM loss terms, PSNR/SSIM, scaling factor and the training script."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from conftest import run_stage
from ldm_pipeline.config import DataConfig
from ldm_pipeline.data import build_dataset
from ldm_pipeline.vae import (
    LPIPS,
    PatchDiscriminator,
    adaptive_weight,
    build_vae,
    discriminator_factor,
    gaussian_window,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    kl_loss,
    latent_statistics,
    load_lpips,
    psnr,
    reconstruction_metrics,
    ssim,
    vae_scale_factor,
    validate_vae_config,
)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny" / "vae.json"
TINY_F8 = REPO / "configs" / "tiny" / "vae_f8.json"


def tiny_model_config(path: Path = TINY) -> dict:
    return json.loads(path.read_text())["model"]


# ----------------------------------------------------------------------------------------------- configs


def test_every_vae_config_builds_with_the_stated_downsampling_factor():
    expected = {"tiny/vae.json": 4, "tiny/vae_f8.json": 8, "demo/vae.json": 4, "demo/vae_f8.json": 8, "gpu/vae.json": 8}
    for name, factor in expected.items():
        config = json.loads((REPO / "configs" / name).read_text())
        resolution = config["data"]["resolution"]
        validate_vae_config(config["model"], resolution)
        assert vae_scale_factor(config["model"]) == factor, name
    vae = build_vae(tiny_model_config(TINY_F8), 32).eval()
    latents = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
    assert latents.shape == (1, vae.config.latent_channels, 4, 4)


def test_bad_configs_fail_with_a_message_saying_what_to_change():
    config = tiny_model_config()
    with pytest.raises(ValueError, match=r"--resolution 30 is not divisible by the VAE's downsampling factor f = 4.*28 or 32"):
        validate_vae_config(config, 30)
    bad_blocks = {"autoencoder": {**config["autoencoder"], "down_block_types": ["DownEncoderBlock2D"] * 2}}
    with pytest.raises(ValueError, match="down_block_types has 2 entries but block_out_channels has 3"):
        validate_vae_config(bad_blocks, 32)
    with pytest.raises(ValueError, match="norm_num_groups=4 does not divide block_out_channels \\[6\\]"):
        validate_vae_config({"autoencoder": {**config["autoencoder"], "block_out_channels": [8, 6, 16]}}, 32)
    with pytest.raises(ValueError, match="'autoencoder' object"):
        validate_vae_config(config["autoencoder"], 32)
    with pytest.raises(ValueError, match="Unknown model.discriminator keys"):
        validate_vae_config({**config, "discriminator": {"layers": 3}}, 32)


# ----------------------------------------------------------------------------------------------- loss terms


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    torch.manual_seed(0)
    weight = torch.randn(3, 4, requires_grad=True)
    inputs = torch.randn(5, 4)
    outputs = inputs @ weight.T
    rec_loss, generator_loss = outputs.abs().mean(), -(outputs**3).mean()
    rec_grad = torch.autograd.grad(rec_loss, weight, retain_graph=True)[0]
    gen_grad = torch.autograd.grad(generator_loss, weight, retain_graph=True)[0]
    expected = rec_grad.norm() / (gen_grad.norm() + 1e-4)
    got = adaptive_weight(rec_loss, generator_loss, weight, disc_weight=0.5)
    assert torch.allclose(got, 0.5 * expected, rtol=1e-6) and not got.requires_grad
    constant_generator_loss = (outputs * 0).sum()  # zero gradient: the ratio is clamped at 1e4
    assert adaptive_weight(10 * rec_loss, constant_generator_loss, weight).item() == pytest.approx(1e4)


def test_hinge_kl_and_switch_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert generator_adversarial_loss(fake).item() == pytest.approx(1 / 3 * -(-2.0 + 0.0 + 1.0))
    assert [discriminator_factor(step, 3) for step in (0, 2, 3, 9)] == [0.0, 0.0, 1.0, 1.0]

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / 2 / (3 * 12 * 12)
    assert kl_loss(posterior, 3 * 12 * 12).item() == pytest.approx(expected.item(), rel=1e-5)


def test_patch_discriminator_gives_one_logit_per_patch_and_round_trips(tmp_path):
    discriminator = PatchDiscriminator(base_channels=8, num_layers=2).eval()
    logits = discriminator(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 1, 6, 6)  # 32 -> 16 -> 8 -> 7 -> 6
    discriminator.save_pretrained(tmp_path)
    assert torch.equal(PatchDiscriminator.from_pretrained(tmp_path).eval()(torch.ones(1, 3, 32, 32)),
                       discriminator(torch.ones(1, 3, 32, 32)))


def test_lpips_is_off_with_a_message_when_weights_are_absent(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert load_lpips(None) is None
        assert load_lpips(tmp_path / "missing.safetensors") is None
    assert "Perceptual (LPIPS) term is off: no --lpips_weights" in caplog.text
    assert "missing.safetensors does not exist (weights are never downloaded)" in caplog.text

    from safetensors.torch import save_file
    torch.manual_seed(0)
    state = {k: v.abs() if k.startswith("lin") else v for k, v in LPIPS().state_dict().items() if k not in ("shift", "scale")}
    save_file(state, tmp_path / "lpips.safetensors")
    lpips = load_lpips(tmp_path / "lpips.safetensors")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lpips(x, x), torch.zeros(2)) and (lpips(x, y) > 0).all()
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="does not hold LPIPS-VGG16 weights"):
        load_lpips(tmp_path / "partial.safetensors")


# ----------------------------------------------------------------------------------------------- metrics


def reference_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al.'s SSIM written out window by window (Gaussian 11x11, sigma 1.5, valid windows), one channel."""
    coords = np.arange(11) - 5
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_a_window_by_window_reference_and_known_values():
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 16, 18))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    got = ssim(torch.from_numpy(x), torch.from_numpy(y))
    expected = [np.mean([reference_ssim(x[b, c], y[b, c]) for c in range(3)]) for b in range(2)]
    assert np.allclose(got.numpy(), expected, rtol=0, atol=1e-10)
    assert torch.allclose(ssim(torch.from_numpy(x), torch.from_numpy(x)), torch.ones(2, dtype=torch.float64))
    a, b, c1 = 0.3, 0.7, 0.01**2  # flat images: SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    flat = ssim(torch.full((1, 3, 16, 16), a, dtype=torch.float64), torch.full((1, 3, 16, 16), b, dtype=torch.float64))
    assert flat.item() == pytest.approx((2 * a * b + c1) / (a**2 + b**2 + c1), rel=1e-9)
    assert gaussian_window().sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_psnr_matches_its_formula():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.stack([torch.full((3, 8, 8), 0.1), torch.full((3, 8, 8), 0.01)])
    assert torch.allclose(psnr(x, y), torch.tensor([20.0, 40.0], dtype=torch.float64))
    torch.manual_seed(0)
    a, b = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    mse = ((a.double() - b.double()) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(psnr(a, b), 10 * torch.log10(1 / mse))
    assert torch.allclose(psnr(2 * a - 1, 2 * b - 1, data_range=2.0), psnr(a, b))


# ----------------------------------------------------------------------------------------------- scaling factor


def test_scaling_factor_is_one_over_the_std_of_sampled_latents():
    torch.manual_seed(0)
    vae = build_vae(tiny_model_config(), 32).eval()
    batches = [torch.rand(4, 3, 32, 32) * 2 - 1 for _ in range(3)]
    factor = 1.0 / latent_statistics(vae, batches, generator=torch.Generator().manual_seed(7))["std"]
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        latents = torch.cat([vae.encode(x).latent_dist.sample(generator=generator) for x in batches])
    assert factor == pytest.approx(1 / latents.double().std().item(), rel=1e-9)
    stats = latent_statistics(vae, batches, sample=False)
    with torch.no_grad():
        means = torch.cat([vae.encode(x).latent_dist.mean for x in batches]).double()
    assert stats["std"] == pytest.approx(means.std().item(), rel=1e-9)
    assert stats["mean"] == pytest.approx(means.mean().item(), rel=1e-9, abs=1e-12)
    assert stats["num_elements"] == means.numel()


def test_save_and_load_round_trip_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    vae = build_vae(tiny_model_config(), 32).eval()
    vae.register_to_config(scaling_factor=0.123456789)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "vae").glob("*.bin"))
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert loaded.config.scaling_factor == 0.123456789
    original_state, loaded_state = vae.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for name in original_state:
        assert torch.equal(original_state[name], loaded_state[name]), name
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae(x).sample, loaded(x).sample)


# ----------------------------------------------------------------------------------------------- training script




def read_history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """6 steps of the tiny config (PatchGAN on from step 3) with EMA; checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("vae_run")
    metrics = run_stage("vae", ["--config", str(TINY), "--output_dir", str(out), "--use_ema", "--ema_decay", "0.5"])
    return out, metrics


def test_training_loss_falls_and_outputs_are_written(tiny_run):
    out, metrics = tiny_run
    history = [record for record in read_history(out) if "rec_loss" in record]
    assert [record["step"] for record in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["rec_loss"] < 0.8 * history[0]["rec_loss"]
    assert "d_loss" not in history[2] and "d_loss" in history[3] and history[3]["gan_weight"] > 0
    saved = json.loads((out / "vae_metrics.json").read_text())
    assert saved == metrics and {"psnr", "ssim", "scaling_factor", "latent_std"} <= saved.keys()
    loop = saved["loop_seconds"]
    assert set(loop) == {"step", "data", "around_the_step"} and min(loop.values()) >= 0 and loop["step"] > 0
    assert sum(loop.values()) <= saved["train_seconds_this_run"] + 0.05
    assert sum(saved["loop_shares"].values()) == pytest.approx(1, abs=1e-3)
    assert saved["latent_shape"] == [4, 8, 8] and saved["train_steps"] == 6 and saved["ema"]
    grid = Image.open(out / "reconstructions.png")
    assert grid.size == (4 * 32, 2 * 32)
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard logs missing"


def test_saved_vae_holds_the_scaling_factor_and_reproduces_the_reported_metrics(tiny_run):
    out, metrics = tiny_run
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    assert vae.config.scaling_factor == pytest.approx(1 / metrics["latent_std"], rel=1e-12)
    config = json.loads(TINY.read_text())
    args = DataConfig(**config["data"])
    batches = [torch.stack([build_dataset(args, "train")[i]["pixel_values"] for i in range(start, start + 16)])
               for start in (0, 16)]
    expected = 1.0 / latent_statistics(vae, batches, generator=torch.Generator("cpu").manual_seed(0))["std"]
    assert vae.config.scaling_factor == pytest.approx(expected, rel=1e-9)
    validation = build_dataset(args, "validation")
    held_out = reconstruction_metrics(vae, [torch.stack([validation[i]["pixel_values"] for i in range(16)])])
    assert held_out["psnr"] == pytest.approx(metrics["psnr"], rel=1e-9)
    assert held_out["ssim"] == pytest.approx(metrics["ssim"], rel=1e-9)


def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(tiny_run, tmp_path):
    full_run, _ = tiny_run
    common = ["--config", str(TINY), "--output_dir", str(tmp_path), "--use_ema", "--ema_decay", "0.5"]
    run_stage("vae", common + ["--max_train_steps", "4", "--checkpointing_steps", "2"])
    run_stage("vae", common + ["--resume_from_checkpoint", str(tmp_path / "checkpoints" / "checkpoint-2")])
    uninterrupted = [r for r in read_history(full_run) if "rec_loss" in r]
    resumed = [r for r in read_history(tmp_path) if "rec_loss" in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(uninterrupted, resumed):
        assert {k: v for k, v in a.items() if k != "elapsed_s"} == {k: v for k, v in b.items() if k != "elapsed_s"}
    full_weights = load_file(full_run / "vae" / "diffusion_pytorch_model.safetensors")
    resumed_weights = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    for name in full_weights:
        assert torch.equal(full_weights[name], resumed_weights[name]), name


def test_script_rejects_a_resolution_the_vae_cannot_downsample(tmp_path):
    out = tmp_path / "never_created"
    with pytest.raises(ValueError, match="--resolution 30 is not divisible"):
        run_stage("vae", ["--config", str(TINY), "--output_dir", str(out), "--resolution", "30"])
    assert not out.exists()
