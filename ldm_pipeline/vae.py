"""Stage 2 machinery: the `AutoencoderKL` that defines the latent space, its LDM training objective and metrics.

The objective is the one of Rombach et al. (2022), "High-Resolution Image Synthesis with Latent Diffusion
Models" (``LPIPSWithDiscriminator`` in the LDM code base), written per pixel value::

    L_AE = L_rec + kl_weight * L_KL + disc_factor(step) * lambda * L_G
    x_hat = decode(z),  z = mean + std * eps,  eps ~ N(0, I)        (a sample of the posterior q(z | x))
    L_rec = mean |x - x_hat|  (+ perceptual_weight * mean LPIPS(x, x_hat) when LPIPS weights are present locally)
    L_KL  = (1 / B) * sum_{b, latent elements} KL(q(z | x_b) || N(0, I)) / D,   D = 3 * H * W pixel values
    L_G   = -mean D_phi(x_hat)                                  (hinge generator loss of a PatchGAN D_phi)
    lambda = ||grad_w L_rec|| / (||grad_w L_G|| + 1e-4), clamped to [0, 1e4], times disc_weight,
             w = the weight of the decoder's last layer (``decoder.conv_out``)
    L_D   = 0.5 * (mean relu(1 - D_phi(x)) + mean relu(1 + D_phi(x_hat)))      (hinge discriminator loss)

LDM sums the reconstruction and KL terms over pixels; dividing both by D keeps LDM's ``kl_weight`` (1e-6) and
the adaptive weight unchanged while the loss reads as a per-pixel L1. LDM's learned output log-variance is fixed
at its initial value 0. ``disc_factor(step)`` is 0 before ``disc_start`` and 1 from then on.

Every term is the one of the global batch, so ``n`` processes of batch ``B`` train as one process of batch ``n·B``:
L_rec, L_KL, L_G and L_D are per-sample means, which DDP's gradient average over processes of equal batches turns
into global means; the PatchGAN's batch norms take their statistics over the global batch (``GlobalBatchNorm2d``);
the two gradients of lambda are averaged over processes before their norms are taken (``adaptive_weight``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL, ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ldm_pipeline.config import hub_lookup, local_or_hub
from ldm_pipeline.stage_dirs import check_stage_dirs

logger = logging.getLogger(__name__)

ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


# ----------------------------------------------------------------------------------------------- configs


def autoencoder_kwargs(model_config: dict) -> dict:
    """The ``AutoencoderKL`` keyword arguments of a stage config's ``model`` section.

    The section is ``{"autoencoder": {...AutoencoderKL kwargs...}, "discriminator": {...}}``. Block types
    default to one ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` per entry of ``block_out_channels``.
    """
    if "autoencoder" not in model_config:
        raise ValueError(
            "The VAE config's 'model' section needs an 'autoencoder' object with AutoencoderKL arguments "
            f"(and optionally 'discriminator'); got keys {sorted(model_config)}."
        )
    kwargs = dict(model_config["autoencoder"])
    channels = kwargs.get("block_out_channels")
    if isinstance(channels, (list, tuple)):
        kwargs.setdefault("down_block_types", ["DownEncoderBlock2D"] * len(channels))
        kwargs.setdefault("up_block_types", ["UpDecoderBlock2D"] * len(channels))
    return kwargs


DEFAULT_VAE_SCALE_FACTOR = 8  # StableDiffusionPipeline's factor when it has no VAE


def vae_scale_factor(vae) -> int:
    """f = 2 ** (len(block_out_channels) - 1): every encoder block but the last halves the image size.

    ``vae`` is an ``AutoencoderKL``, its ``config``, a VAE stage config's ``model`` section, or None (a pipeline
    without a VAE: Stable Diffusion's 8)."""
    if vae is None:
        return DEFAULT_VAE_SCALE_FACTOR
    if isinstance(vae, dict) and "autoencoder" in vae:
        channels = autoencoder_kwargs(vae).get("block_out_channels", (64,))
    else:
        config = getattr(vae, "config", vae)
        channels = config["block_out_channels"] if isinstance(config, dict) else config.block_out_channels
    return 2 ** (len(channels) - 1)


def load_vae(name_or_path: str, flag: str = "--vae") -> AutoencoderKL:
    """The VAE of a stage output dir (``DIR/vae``), a VAE dir itself, or a Hub repo's ``vae`` subfolder."""
    root = Path(name_or_path)
    if not root.exists():
        try:
            name_or_path = local_or_hub(name_or_path, flag)
        except FileNotFoundError:
            raise FileNotFoundError(f"{flag} {name_or_path}: no such directory, so no vae/config.json or config.json "
                                    "there. Pass the VAE stage's output dir.") from None
    check_stage_dirs({flag: ("vae", name_or_path)})
    if (root / "vae" / "config.json").is_file():
        return AutoencoderKL.from_pretrained(root / "vae")
    if (root / "config.json").is_file():
        return AutoencoderKL.from_pretrained(root)
    if root.exists():
        raise FileNotFoundError(f"{flag} {name_or_path}: no vae/config.json or config.json there. Pass the VAE "
                                "stage's output dir.")
    with hub_lookup(name_or_path, flag):
        return AutoencoderKL.from_pretrained(name_or_path, subfolder="vae")


def validate_vae_config(model_config: dict, resolution: int | None = None) -> None:
    """Fail early, with a message saying what to change, when the parts of a VAE config do not fit together."""
    kwargs = autoencoder_kwargs(model_config)
    channels = kwargs.get("block_out_channels")
    if not isinstance(channels, (list, tuple)) or not channels or not all(isinstance(c, int) and c > 0 for c in channels):
        raise ValueError(f"model.autoencoder.block_out_channels must be a non-empty list of positive ints, got {channels!r}.")
    for key in ("down_block_types", "up_block_types"):
        if len(kwargs[key]) != len(channels):
            raise ValueError(
                f"model.autoencoder.{key} has {len(kwargs[key])} entries but block_out_channels has {len(channels)}: "
                f"give one block type per channel entry (or drop {key} to use the defaults)."
            )
    groups = kwargs.get("norm_num_groups", 32)
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(
            f"model.autoencoder.norm_num_groups={groups} does not divide block_out_channels {bad}: "
            f"pick channel counts that are multiples of {groups} or a smaller norm_num_groups."
        )
    latent_channels = kwargs.get("latent_channels", 4)
    if not isinstance(latent_channels, int) or latent_channels < 1:
        raise ValueError(f"model.autoencoder.latent_channels must be a positive int, got {latent_channels!r}.")
    for key in ("in_channels", "out_channels"):
        if kwargs.get(key, 3) != 3:
            raise ValueError(f"model.autoencoder.{key} must be 3 (RGB images), got {kwargs[key]}.")
    if resolution is not None:
        factor = 2 ** (len(channels) - 1)
        if not isinstance(resolution, int) or resolution <= 0 or resolution % factor:
            lower, upper = (resolution // factor) * factor, (resolution // factor + 1) * factor
            suggestion = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            raise ValueError(
                f"--resolution {resolution} is not divisible by the VAE's downsampling factor f = {factor} "
                f"(2 ** (len(block_out_channels) - 1) with block_out_channels={list(channels)}): use --resolution "
                f"{suggestion}, or change the number of blocks in block_out_channels."
            )
    discriminator = model_config.get("discriminator", {})
    unknown = set(discriminator) - {"base_channels", "num_layers"}
    if unknown:
        raise ValueError(f"Unknown model.discriminator keys {sorted(unknown)}; allowed: base_channels, num_layers.")


def build_vae(model_config: dict, resolution: int | None = None) -> AutoencoderKL:
    """A freshly initialised ``AutoencoderKL`` from a stage config's ``model`` section (validated first)."""
    validate_vae_config(model_config, resolution)
    kwargs = autoencoder_kwargs(model_config)
    if resolution is not None:
        kwargs["sample_size"] = resolution
    return AutoencoderKL(**kwargs)


# ----------------------------------------------------------------------------------------------- processes


def num_processes() -> int:
    """The number of processes of the ``torch.distributed`` run this process belongs to (1 outside one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SumOverProcesses(torch.autograd.Function):
    """y = sum_p x_p on every process p. Every y depends on every x_q, so the backward pass is the same sum:
    dx_q = sum_p dy_p (the adjoint of an all-reduce is an all-reduce)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """sum_p tensor_p over the processes of a distributed run, differentiable (``tensor`` itself in one process).
    Every process must call it at the same point."""
    return _SumOverProcesses.apply(tensor) if num_processes() > 1 else tensor


def mean_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """(1 / n) sum_p tensor_p: what DDP makes of n processes' gradients (``tensor`` itself in one process)."""
    return sum_over_processes(tensor) / num_processes() if num_processes() > 1 else tensor


# ----------------------------------------------------------------------------------------------- discriminator


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithm 1) whose training statistics are
    those of the global batch, every process's rows together::

        mu_c = sum_{p,n,h,w} x / M,   sigma_c^2 = sum_{p,n,h,w} (x - mu_c)^2 / M,   M = (global batch) * H * W
        y = (x - mu_c) / sqrt(sigma_c^2 + eps) * gamma_c + beta_c

    and whose running statistics move towards mu and the unbiased M / (M - 1) sigma^2, as in ``nn.BatchNorm2d``.
    The sums are differentiable (``sum_over_processes``), so the gradient is that of the global batch, as with
    ``torch.nn.SyncBatchNorm`` (which runs on GPUs only). In a single process, or in eval mode, it is
    ``nn.BatchNorm2d`` itself: same weights, buffers and outputs.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or num_processes() == 1:
            return super().forward(input)
        local_count = input.new_tensor([input.numel() // input.shape[1]])
        sums = sum_over_processes(torch.cat([input.sum((0, 2, 3)), local_count]))  # [C + 1]
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = input - mean.view(1, -1, 1, 1)
        variance = sum_over_processes(centred.square().sum((0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(variance * count / (count - 1), momentum)
        output = centred * torch.rsqrt(variance + self.eps).view(1, -1, 1, 1)
        if self.affine:
            output = output * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return output



class PatchDiscriminator(ModelMixin, ConfigMixin):
    """PatchGAN discriminator as in pix2pix / LDM's ``NLayerDiscriminator``: one real/fake logit per patch.

    conv4x4/2 -> LeakyReLU(0.2), then ``num_layers - 1`` x [conv4x4/2 -> BatchNorm -> LeakyReLU] with doubling
    channels (capped at 8x), one conv4x4/1 -> BatchNorm -> LeakyReLU, and a conv4x4/1 to one channel. Weights
    are drawn from N(0, 0.02) (BatchNorm scales from N(1, 0.02)) as in LDM's ``weights_init``. The batch norms are
    ``GlobalBatchNorm2d``: in a multi-process run every process must call the discriminator at the same point.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for n in range(1, num_layers + 1):
            out_channels = base_channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(channels, out_channels, 4, stride, 1, bias=False), GlobalBatchNorm2d(out_channels),
                       nn.LeakyReLU(0.2)]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def build_discriminator(model_config: dict) -> PatchDiscriminator:
    return PatchDiscriminator(**model_config.get("discriminator", {}))


# ----------------------------------------------------------------------------------------------- loss terms


def kl_loss(posterior, num_pixel_values: int) -> torch.Tensor:
    """L_KL = (1/B) sum KL(q(z|x) || N(0, I)) / D: LDM's KL term per pixel value (see the module docstring)."""
    return posterior.kl().mean() / num_pixel_values


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """L_G = -mean D(x_hat)."""
    return -logits_fake.mean()


def discriminator_factor(global_step: int, disc_start: int) -> float:
    """1.0 once ``global_step >= disc_start`` (the PatchGAN is on), else 0.0."""
    return 1.0 if global_step >= disc_start else 0.0


def adaptive_weight(rec_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 1.0) -> torch.Tensor:
    """LDM's adaptive GAN weight, detached::

        lambda = clamp(||grad_w L_rec|| / (||grad_w L_G|| + 1e-4), 0, 1e4) * disc_weight

    with ``w = last_layer`` (the decoder's last conv weight), so the adversarial gradient reaching the decoder's
    output has the size of the reconstruction gradient. In a run of n processes with equal batches both gradients
    are first averaged over the processes (``mean_over_processes``, DDP's average of the per-process means), so
    lambda is the one of the global batch and the same on every process, not a ratio of local gradient norms.
    """
    rec_grad = mean_over_processes(torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0])
    generator_grad = mean_over_processes(torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0])
    weight = rec_grad.norm() / (generator_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return torch.clamp(weight, 0.0, ADAPTIVE_WEIGHT_MAX).detach() * disc_weight


def decoder_last_layer(vae: AutoencoderKL) -> torch.Tensor:
    return vae.decoder.conv_out.weight


class AutoencoderLoss:
    """The whole LDM autoencoder objective of the module docstring, as one object.

    ``autoencoder_loss`` gives L_AE for the autoencoder's update and ``discriminator_loss`` L_D for the
    discriminator's; both return ``(loss, parts)`` with the terms to log. The PatchGAN terms are on from
    ``disc_start``; LPIPS is on when ``lpips`` is given.
    """

    def __init__(self, discriminator: nn.Module, kl_weight: float, disc_start: int, disc_weight: float,
                 lpips: nn.Module | None = None, perceptual_weight: float = 1.0):
        self.discriminator, self.lpips = discriminator, lpips
        self.kl_weight, self.disc_start, self.disc_weight = kl_weight, disc_start, disc_weight
        self.perceptual_weight = perceptual_weight

    def gan_on(self, global_step: int) -> float:
        return discriminator_factor(global_step, self.disc_start)

    def autoencoder_loss(self, pixel_values: torch.Tensor, reconstruction: torch.Tensor, posterior,
                         last_layer: torch.Tensor, global_step: int) -> tuple[torch.Tensor, dict]:
        """L_AE = L_rec + kl_weight · L_KL + disc_factor · lambda · L_G."""
        rec_loss = F.l1_loss(reconstruction, pixel_values)
        if self.lpips is not None:
            rec_loss = rec_loss + self.perceptual_weight * self.lpips(pixel_values, reconstruction).mean()
        kl = kl_loss(posterior, pixel_values[0].numel())
        loss = rec_loss + self.kl_weight * kl
        parts = {"rec_loss": rec_loss, "kl_loss": kl}
        gan_on = self.gan_on(global_step)
        if gan_on:
            self.discriminator.requires_grad_(False)
            g_loss = generator_adversarial_loss(self.discriminator(reconstruction))
            self.discriminator.requires_grad_(True)
            gan_weight = adaptive_weight(rec_loss, g_loss, last_layer, self.disc_weight)
            loss = loss + gan_on * gan_weight * g_loss
            parts.update(g_loss=g_loss, gan_weight=gan_weight)
        return loss, parts

    def discriminator_loss(self, discriminator: nn.Module, pixel_values: torch.Tensor, reconstruction: torch.Tensor,
                           global_step: int) -> tuple[torch.Tensor, dict]:
        """L_D on real images and detached reconstructions, through ``discriminator`` (the prepared module)."""
        logits_real, logits_fake = discriminator(torch.cat([pixel_values, reconstruction.detach()])).chunk(2)
        d_loss = self.gan_on(global_step) * hinge_discriminator_loss(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}


# ----------------------------------------------------------------------------------------------- LPIPS


VGG16_LPIPS_LAYERS = (  # torchvision vgg16().features up to relu5_3; LPIPS taps relu1_2, 2_2, 3_3, 4_3, 5_3
    (3, 64), (64, 64), "tap", "pool", (64, 128), (128, 128), "tap", "pool", (128, 256), (256, 256), (256, 256), "tap",
    "pool", (256, 512), (512, 512), (512, 512), "tap", "pool", (512, 512), (512, 512), (512, 512), "tap",
)


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018, VGG16 variant, v0.1) for images in [-1, 1]::

        LPIPS(x, y) = sum_l mean_{h,w} sum_c w_lc * (f_l(x) / ||f_l(x)||_c - f_l(y) / ||f_l(y)||_c)^2

    with f_l the VGG16 relu1_2 ... relu5_3 features of ``(x - shift) / scale``. The weights are not bundled and
    never downloaded: ``load_lpips`` reads them from one local file with torchvision's VGG16 keys
    ``features.<i>.weight/bias`` plus the LPIPS heads ``lin<l>.model.1.weight`` (the ``lpips`` package's layout).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        features: list[nn.Module] = []
        self.taps: list[int] = []
        for layer in VGG16_LPIPS_LAYERS:
            if layer == "tap":
                self.taps.append(len(features) - 1)
            elif layer == "pool":
                features.append(nn.MaxPool2d(2, 2))
            else:
                features += [nn.Conv2d(*layer, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*features)
        tap_channels = [64, 128, 256, 512, 512]
        for index, channels in enumerate(tap_channels):
            self.add_module(f"lin{index}", nn.Module())
            getattr(self, f"lin{index}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distances, shape [B]."""
        distance = 0.0
        features_x, features_y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        tap = 0
        for index, layer in enumerate(self.features):
            features_x, features_y = layer(features_x), layer(features_y)
            if index in self.taps:
                nx = features_x / (features_x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                ny = features_y / (features_y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                head = getattr(self, f"lin{tap}").model[1]
                distance = distance + head((nx - ny) ** 2).mean(dim=(1, 2, 3))
                tap += 1
        return distance


def load_lpips(path: str | os.PathLike | None) -> LPIPS | None:
    """LPIPS with weights from the local file ``path`` (.safetensors, or a .pth read with weights_only=True).

    Returns None, after logging one message that says why the perceptual term is off, when ``path`` is not
    given or does not exist. Nothing is ever downloaded.
    """
    if not path:
        logger.warning("Perceptual (LPIPS) term is off: no --lpips_weights file was given (weights are never "
                       "downloaded). The reconstruction loss is L1 only.")
        return None
    path = Path(path)
    if not path.is_file():
        logger.warning("Perceptual (LPIPS) term is off: --lpips_weights %s does not exist (weights are never "
                       "downloaded). The reconstruction loss is L1 only.", path)
        return None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state_dict = load_file(str(path))
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = LPIPS()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k not in ("shift", "scale")]
    if missing or unexpected:
        raise ValueError(
            f"--lpips_weights {path} does not hold LPIPS-VGG16 weights: missing {missing[:4]}, unexpected "
            f"{list(unexpected)[:4]}. Expected torchvision VGG16 'features.<i>.*' keys and 'lin<l>.model.1.weight'."
        )
    logger.info("Perceptual (LPIPS) term is on, weights from %s.", path)
    return model


# ----------------------------------------------------------------------------------------------- metrics


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB: 10 * log10(data_range^2 / mean((x - y)^2)), inputs [B, C, H, W]."""
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian ``size x size`` window, the outer product of a 1-D Gaussian with itself."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with a Gaussian window, averaged over channels and valid positions::

        SSIM = ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

    mu, sigma^2 and sigma_xy are Gaussian-weighted (11x11, sigma 1.5) local statistics, C1 = (k1 L)^2,
    C2 = (k2 L)^2 with L = data_range; only windows fully inside the image are used (as in the paper's code).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim expects two [B, C, H, W] tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim needs images of at least {window_size}x{window_size} pixels, got {tuple(x.shape[-2:])}.")
    channels = x.shape[1]
    window = gaussian_window(window_size, sigma).to(x.device).expand(channels, 1, window_size, window_size)
    x, y = x.double(), y.double()

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov_xy = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1] image space, clamped."""
    return ((images + 1) / 2).clamp(0, 1)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, pixel_values: torch.Tensor) -> torch.Tensor:
    """Deterministic reconstruction through the posterior mean: decode(mean of q(z | x)), in [-1, 1] space."""
    return vae.decode(vae.encode(pixel_values).latent_dist.mode()).sample


@torch.no_grad()
def reconstruction_metrics(vae: AutoencoderKL, batches: Iterable[torch.Tensor]) -> dict:
    """Mean per-image PSNR (dB) and SSIM of ``reconstruct`` over the batches, on images mapped to [0, 1]."""
    was_training = vae.training
    vae.eval()
    psnrs, ssims = [], []
    for pixel_values in batches:
        original, reconstruction = to_unit_range(pixel_values), to_unit_range(reconstruct(vae, pixel_values))
        psnrs.append(psnr(original, reconstruction))
        ssims.append(ssim(original, reconstruction))
    vae.train(was_training)
    psnrs, ssims = torch.cat(psnrs), torch.cat(ssims)
    return {"psnr": psnrs.clamp(max=100.0).mean().item(), "ssim": ssims.mean().item(), "num_images": len(psnrs)}


# ----------------------------------------------------------------------------------------------- scaling factor


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, batches: Iterable[torch.Tensor], sample: bool = True,
                      generator: torch.Generator | None = None) -> dict:
    """Mean and standard deviation over all elements of the latents of ``batches``.

    The latents are samples z ~ q(z | x) (``latent_dist.sample``), what the UNet stage trains on, as Stable
    Diffusion did when it chose its scale; ``sample=False`` uses the posterior mean. Sums are in float64.
    """
    was_training = vae.training
    vae.eval()
    total = total_sq = 0.0
    count = 0
    for pixel_values in batches:
        posterior = vae.encode(pixel_values).latent_dist
        latents = (posterior.sample(generator=generator) if sample else posterior.mode()).double()
        total += latents.sum().item()
        total_sq += (latents**2).sum().item()
        count += latents.numel()
    vae.train(was_training)
    if count < 2:
        raise ValueError("latent_statistics needs at least one non-empty batch.")
    mean = total / count
    variance = max(total_sq / count - mean**2, 0.0) * count / (count - 1)
    return {"mean": mean, "std": math.sqrt(variance), "num_elements": count}


# ----------------------------------------------------------------------------------------------- training helpers


def posterior_sample(posterior, noise: torch.Tensor) -> torch.Tensor:
    """z = mean + std * eps: the reparameterised sample of q(z | x) = N(mean, std^2) (Kingma & Welling 2013,
    arXiv:1312.6114, eq. 10), Diffusers' ``DiagonalGaussianDistribution.sample`` with the noise given."""
    return posterior.mean + posterior.std * noise.to(posterior.mean)


class AutoencoderWithPosterior(nn.Module):
    """``AutoencoderKL`` whose forward returns ``(reconstruction, posterior)``, so that the KL term can be taken
    through one forward call (what DistributedDataParallel needs to synchronise gradients).

    The reconstruction decodes z = mean + std * ``latent_noise`` (``posterior_sample``); the training script draws
    the noise for the global batch with ``StageTrainer.global_randn``.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, pixel_values: torch.Tensor, latent_noise: torch.Tensor):
        posterior = self.vae.encode(pixel_values).latent_dist
        return self.vae.decode(posterior_sample(posterior, latent_noise)).sample, posterior


def pixel_batches(dataset, batch_size: int, max_samples: int | None = None) -> Iterable[torch.Tensor]:
    """The dataset's ``pixel_values`` in item order, in batches, the first ``max_samples`` items at most (for latent
    statistics and metrics). Works on streams too (no ``len``)."""
    from ldm_pipeline.data import collate_examples

    seen = 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_examples):
        if max_samples is not None and seen >= max_samples:
            return
        pixels = batch["pixel_values"][: None if max_samples is None else max_samples - seen]
        seen += len(pixels)
        yield pixels


def image_grid(rows: list[torch.Tensor]):
    """A PIL image with one row per ``[N, 3, H, W]`` tensor in [-1, 1] (e.g. originals above reconstructions)."""
    from PIL import Image

    pixels = torch.stack([torch.cat(list(to_unit_range(row.float().cpu())), dim=-1) for row in rows])  # [R, 3, H, N*W]
    pixels = torch.cat(list(pixels), dim=-2)  # [3, R*H, N*W]
    array = (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)
