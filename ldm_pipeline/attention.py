"""Which attention kernel runs: xFormers' memory-efficient attention where it can, else PyTorch's SDPA."""

from __future__ import annotations

import torch
from diffusers.utils import is_xformers_available


def xformers_unavailable_reason(device: torch.device | str | None) -> str | None:
    """None when xFormers attention can run for a model on ``device``; otherwise why not. Either way the
    fallback, PyTorch's ``scaled_dot_product_attention``, is also memory-efficient."""
    if not is_xformers_available():
        return "xformers is not installed (pip install -e .[xformers])"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if device is None:
        return "there is no U-Net"
    if torch.device(device).type != "cuda":
        return f"the model is on {torch.device(device).type}, xFormers needs CUDA (call .to('cuda') first)"
    return None


def enable_memory_efficient_attention(model: torch.nn.Module | None, log) -> bool:
    """Turn on xFormers attention in ``model`` (a Diffusers model or pipeline) when possible (True); otherwise
    ``log`` one line saying why not and keep PyTorch's SDPA (False)."""
    device = getattr(model, "device", None) if model is not None else None
    reason = xformers_unavailable_reason(device)
    if reason is None:
        model.enable_xformers_memory_efficient_attention()
        return True
    log(f"xFormers memory-efficient attention is not enabled: {reason}. Keeping PyTorch scaled_dot_product_attention "
        "(SDPA).")
    return False
