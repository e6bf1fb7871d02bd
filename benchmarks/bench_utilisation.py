"""How close each stage's step runs to what this machine can do: FLOPs counted, time measured, ratio to peak.

    python benchmarks/bench_utilisation.py [--size demo] [--steps 20] [--threads N] [--profile "U-Net, cached"]

For every stage of ``configs/<size>`` (random weights: only the sizes matter for speed) it counts the floating-point
operations of one training step (forward, backward and AdamW; ``torch.utils.flop_counter.FlopCounterMode``, which
counts matrix multiplications and convolutions) and of one sampling step (a classifier-free-guided U-Net call on
the conditional and unconditional batch), times ``--steps`` steps after warm-up, and prints GFLOP per image,
images per second, achieved GFLOP/s and its share of the machine's peak. The peak is measured in the same run:
the best of several 2048 x 2048 fp32 matrix products (2 n^3 FLOPs each) with the same thread count.

Rows: the text encoder's contrastive step, the VAE's autoencoder step (L1 + KL; the PatchGAN is off in the demo),
the U-Net's step on cached latents and text states, the same step with the VAE and text encoder run every step
(the reference loop), and one sampling step at batch 16.

``--profile ROW`` (a substring of a row name) then shows where that step's time goes: ``torch.profiler`` over
``--steps`` steps, the operators grouped by kind (convolutions, matrix products, attention, normalisation,
optimizer, element-wise and other), each with its share of the step's time and of its FLOPs, and the GFLOP/s the
convolutions and matrix products reach on their own.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm_pipeline.data.shapes import ShapesDataset
from ldm_pipeline.diffusion import build_noise_scheduler
from ldm_pipeline.prompt_encoding import encode_prompts, tokenize_prompts
from ldm_pipeline.text_encoder import build_contrastive_model, contrastive_loss, same_caption_matrix, train_tokenizer
from ldm_pipeline.unet import DenoisingObjective, build_unet
from ldm_pipeline.vae import build_vae, kl_loss, vae_scale_factor

REPO = Path(__file__).resolve().parents[1]
PEAK_SIZE = 2048


def matmul_peak_gflops(size: int = PEAK_SIZE, repeats: int = 10, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> float:
    """Best achieved GFLOP/s of a ``size x size`` matrix product (2 size^3 FLOPs) in ``dtype`` on ``device``."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _seconds(function) -> float:
    """Wall seconds of ``function()``, including the GPU work it queued (synchronised before and after)."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    start = time.perf_counter()
    function()
    synchronize()
    return time.perf_counter() - start


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure(name: str, step, batch: int, steps: int, peak: float) -> dict:
    """FLOPs of one ``step`` and its median time over ``steps`` steps after two warm-up steps."""
    flops = count_flops(step)
    for _ in range(2):
        step()
    seconds = statistics.median(_seconds(step) for _ in range(steps))
    gflops = flops / seconds / 1e9
    return {"stage": name, "batch": batch, "gflop_per_step": flops / 1e9, "gflop_per_image": flops / batch / 1e9,
            "seconds_per_step": seconds, "images_per_second": batch / seconds, "gflops": gflops,
            "share_of_peak": gflops / peak}


def stage_config_path(size: str, stage: str) -> Path:
    """``configs/<size>/<stage>.json``."""
    return REPO / "configs" / size / f"{stage}.json"


def training_step(model, loss_fn, optimizer_options: dict | None = None, autocast_dtype: torch.dtype | None = None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **(optimizer_options or {}))
    device_type = next(model.parameters()).device.type

    def step():
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def stage_steps(size: str, sampling_batch: int = 16, batch: int | None = None, optimizer_options: dict | None = None,
                channels_last: bool = False, compile_models: bool = False, device: str | torch.device = "cpu",
                autocast_dtype: torch.dtype | None = None, compile_mode: str | None = None
                ) -> list[tuple[str, object, int]]:
    """``(name, step, batch)`` for each row: one training step of every stage of ``configs/<size>`` (random
    weights), the U-Net step both cached and with the frozen stages run every step, and one guided sampling step.
    ``batch`` replaces the configs' batch sizes (FLOPs per image do not depend on it); ``optimizer_options`` go to
    AdamW (``foreach``, ``fused``); ``channels_last`` stores the convolutional models' weights and image/latent
    inputs in NHWC order; ``compile_models`` wraps the trained models in ``torch.compile`` (``compile_mode``:
    ``reduce-overhead`` replays CUDA graphs); models and inputs live on ``device``; ``autocast_dtype`` (bf16)
    runs the forward passes under autocast."""

    def train_step(model, loss_fn):
        return training_step(model, loss_fn, optimizer_options, autocast_dtype)

    def layout(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(device)
        return tensor.contiguous(memory_format=torch.channels_last) if channels_last else tensor

    def trained(model):
        model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return torch.compile(model, mode=compile_mode) if compile_models else model

    torch.manual_seed(0)
    configs = {name: json.loads(stage_config_path(size, name).read_text())
               for name in ("text_encoder", "vae", "unet")}

    # Stage 1: contrastive step on a batch of captions and images.
    text_config = configs["text_encoder"]
    resolution = text_config["data"]["resolution"]
    shapes = ShapesDataset(512, resolution, seed=0)
    captions = [shapes[i]["caption"] for i in range(512)]
    tokenizer_config = text_config["model"].get("tokenizer", {})
    tokenizer = train_tokenizer(captions, tokenizer_config.get("vocab_size", 512),
                                tokenizer_config.get("model_max_length", 32))
    contrastive = build_contrastive_model(text_config["model"], tokenizer).train()
    contrastive_forward = trained(contrastive)
    text_batch = batch or text_config["training"]["train_batch_size"]
    batch_captions = (captions * (text_batch // len(captions) + 1))[:text_batch]
    tokens = tokenize_prompts(tokenizer, batch_captions).to(device)
    images = layout(torch.rand(text_batch, 3, resolution, resolution) * 2 - 1)
    same = same_caption_matrix(batch_captions).to(device)

    def text_loss():
        output = contrastive_forward(tokens.input_ids, tokens.attention_mask, images)
        return contrastive_loss(output.text_embeds, output.image_embeds, output.logit_scale, same)

    rows = [("text encoder (contrastive)", train_step(contrastive, text_loss), text_batch)]

    # Stage 2: autoencoder step (L1 + KL).
    vae_config = configs["vae"]
    vae_resolution = vae_config["data"]["resolution"]
    vae = build_vae(vae_config["model"], vae_resolution).train()
    vae_forward = trained(vae)
    vae_batch = batch or vae_config["training"]["train_batch_size"]
    pixels = layout(torch.rand(vae_batch, 3, vae_resolution, vae_resolution) * 2 - 1)

    def vae_loss():
        posterior = vae_forward.encode(pixels).latent_dist
        return (vae_forward.decode(posterior.sample()).sample - pixels).abs().mean() + 1e-3 * kl_loss(posterior, pixels[0].numel())

    rows.append(("VAE (L1 + KL)", train_step(vae, vae_loss), vae_batch))

    # Stage 3: denoising step, cached and with the frozen stages every step; one guided sampling step.
    unet_config = configs["unet"]
    unet_resolution = unet_config["data"]["resolution"]
    frozen_vae = copy.deepcopy(vae).eval().requires_grad_(False)
    text_encoder = copy.deepcopy(contrastive.text_encoder).eval().requires_grad_(False)
    unet = build_unet(unet_config["model"], frozen_vae, text_encoder, unet_resolution).train().to(device)
    unet_forward = trained(unet)
    objective = DenoisingObjective(build_noise_scheduler(unet_config["model"].get("noise_scheduler")),
                                   snr_gamma=unet_config["training"].get("snr_gamma"))
    unet_batch = batch or unet_config["training"]["train_batch_size"]
    factor = vae_scale_factor(frozen_vae)
    latent_shape = (unet_batch, frozen_vae.config.latent_channels, unet_resolution // factor, unet_resolution // factor)
    latents = layout(torch.randn(latent_shape))
    unet_tokens = tokenize_prompts(tokenizer, (captions * (unet_batch // len(captions) + 1))[:unet_batch]).to(device)
    prompt_embeds = encode_prompts(text_encoder, unet_tokens.input_ids, unet_tokens.attention_mask)
    generator = torch.Generator(device).manual_seed(0)
    unet_pixels = (torch.rand(unet_batch, 3, unet_resolution, unet_resolution) * 2 - 1).to(device)

    def cached_loss():
        return objective(unet_forward, latents, prompt_embeds, generator)

    def reference_loss():
        with torch.no_grad():
            fresh = frozen_vae.encode(unet_pixels).latent_dist.sample() * frozen_vae.config.scaling_factor
            states = encode_prompts(text_encoder, unet_tokens.input_ids, unet_tokens.attention_mask)
        return objective(unet_forward, layout(fresh), states, generator)

    rows.append(("U-Net, cached latents", train_step(unet, cached_loss), unet_batch))
    rows.append(("U-Net, reference loop", train_step(unet, reference_loss), unet_batch))

    sampling_batch = min(sampling_batch, unet_batch)
    noisy = layout(torch.randn(2 * sampling_batch, *latent_shape[1:]))
    states = torch.cat([prompt_embeds[:sampling_batch]] * 2)
    timestep = torch.tensor(500, device=device)

    @torch.inference_mode()
    def sampling_step():
        unet.eval()
        unet_forward(noisy, timestep, encoder_hidden_states=states)
        unet.train()

    rows.append(("sampling step (guided, cond + uncond)", sampling_step, sampling_batch))
    return rows


OP_KINDS = (  # (kind, substrings of ATen operator names), first match wins
    ("convolution", ("convolution",)),
    ("matrix product", ("addmm", "bmm", "mm", "matmul", "linear")),
    ("attention", ("scaled_dot_product", "softmax", "flash_attention")),
    ("normalisation", ("group_norm", "layer_norm", "batch_norm")),
    ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul", "sqrt")),
)


def op_kind(name: str) -> str:
    """The kind of an ATen operator (``aten::convolution_backward`` -> convolution); "element-wise and other" for
    activations, arithmetic, copies and reductions."""
    parts = name.replace("::", ".").split(".")  # "aten::mm", "aten.mm", "aten.mm.default" -> "mm"
    bare = parts[1] if len(parts) > 1 else parts[0]
    return next((kind for kind, keys in OP_KINDS if any(key in bare for key in keys)), "element-wise and other")


def profile_step(step, steps: int) -> list[dict]:
    """Per ``op_kind``: the self CPU time of its ATen operators over ``steps`` calls of ``step`` (``torch.profiler``)
    and its FLOPs over as many calls (``FlopCounterMode``, which counts matrix products, convolutions and
    attention)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    with FlopCounterMode(display=False) as counter:
        step()
    kinds: dict[str, dict] = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            kind = kinds.setdefault(op_kind(event.key), {"seconds": 0.0, "flops": 0, "top": {}})
            kind["seconds"] += event.self_cpu_time_total / 1e6
            kind["top"][event.key] = kind["top"].get(event.key, 0.0) + event.self_cpu_time_total / 1e6
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        kinds.setdefault(op_kind(str(op)), {"seconds": 0.0, "flops": 0, "top": {}})["flops"] += flops * steps
    return [{"kind": name, "seconds": k["seconds"], "flops": k["flops"],
             "top": sorted(k["top"].items(), key=lambda item: -item[1])[:3]}
            for name, k in sorted(kinds.items(), key=lambda item: -item[1]["seconds"])]


def print_profile(name: str, kinds: list[dict], peak: float) -> None:
    total_s = sum(k["seconds"] for k in kinds)
    total_flops = sum(k["flops"] for k in kinds) or 1
    print(f"\nwhere the time of '{name}' goes (torch.profiler, self CPU time of ATen operators):")
    print(f"{'kind':<24}{'time':>8}{'FLOPs':>8}{'GFLOP/s':>9}{'of peak':>9}  largest operators")
    for k in kinds:
        gflops = k["flops"] / k["seconds"] / 1e9 if k["seconds"] and k["flops"] else 0.0
        top = ", ".join(f"{op.split('::')[-1]} {seconds / total_s:.0%}" for op, seconds in k["top"])
        print(f"{k['kind']:<24}{k['seconds'] / total_s:>8.0%}{k['flops'] / total_flops:>8.0%}"
              f"{gflops:>9.1f}{(gflops / peak if gflops else 0):>9.0%}  {top}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="demo", help="configs/<size>/{text_encoder,vae,unet}.json")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per row (the median is reported).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice).")
    parser.add_argument("--sampling_batch", type=int, default=16)
    parser.add_argument("--out", default=None, help="Also write the rows as JSON here.")
    parser.add_argument("--profile", default=None, help="Row (substring of its name) whose time to break down by "
                                                        "operator kind.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops()
    steps = stage_steps(args.size, args.sampling_batch)
    rows = [measure(name, step, batch, args.steps, peak) for name, step, batch in steps]

    print(f"\nconfigs/{args.size}, torch threads {torch.get_num_threads()}, fp32 matmul peak {peak:.1f} GFLOP/s "
          f"({PEAK_SIZE}x{PEAK_SIZE}, best of 10)")
    print(f"{'stage':<40}{'batch':>6}{'GFLOP/img':>11}{'s/step':>9}{'img/s':>9}{'GFLOP/s':>9}{'of peak':>9}")
    for row in rows:
        print(f"{row['stage']:<40}{row['batch']:>6}{row['gflop_per_image']:>11.3f}{row['seconds_per_step']:>9.3f}"
              f"{row['images_per_second']:>9.1f}{row['gflops']:>9.1f}{row['share_of_peak']:>9.0%}")
    profiled = None
    if args.profile:
        name, step, _ = next((row for row in steps if args.profile in row[0]), (None, None, None))
        if name is None:
            parser.error(f"--profile {args.profile!r} matches no row: {', '.join(row[0] for row in steps)}")
        profiled = {"stage": name, "kinds": profile_step(step, args.steps)}
        print_profile(name, profiled["kinds"], peak)
    if args.out:
        Path(args.out).write_text(json.dumps({"peak_gflops": peak, "threads": torch.get_num_threads(), "rows": rows,
                                              "profile": profiled}, indent=2))


if __name__ == "__main__":
    main()
