"""Images for evaluation: seeded sampling from a pipeline, conversions, and labelled grids."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

NOISE_SEED_STRIDE = 1_000_003
CELL = 128
LABEL_HEIGHT = 40


def to_pil_images(arrays: np.ndarray) -> list[Image.Image]:
    """[N, H, W, 3] floats in [0, 1] -> uint8 RGB PIL images."""
    return [Image.fromarray((array * 255).round().clip(0, 255).astype(np.uint8)) for array in arrays]


def to_model_range(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> FloatTensor [N, 3, H, W] with ``x / 127.5 - 1`` in [-1, 1]."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1


def sample_images(pipe, prompts: Sequence[str], seed: int, num_inference_steps: int, guidance_scale: float,
                  batch_size: int, resolution: int | None = None, desc: str = "generating",
                  guidance_interval: tuple[float, float] | None = None) -> list[Image.Image]:
    """One image per prompt, ``batch_size`` per pipeline call, image ``k`` from noise seeded
    ``seed * NOISE_SEED_STRIDE + k`` (so the images do not depend on the batch size); a tqdm bar counts them.
    ``guidance_interval`` is passed to the pipeline (None: guidance at every step)."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    with tqdm(total=len(prompts), desc=desc, unit="image") as progress:
        for first in range(0, len(prompts), batch_size):
            batch = list(prompts[first : first + batch_size])
            generators = [torch.Generator("cpu").manual_seed(seed * NOISE_SEED_STRIDE + k)
                          for k in range(first, first + len(batch))]
            output = pipe(prompt=batch, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          guidance_interval=guidance_interval, height=resolution, width=resolution, generator=generators, output_type="np").images
            images += to_pil_images(output)
            progress.update(len(batch))
    return images


def _draw_verdict(draw: ImageDraw.ImageDraw, x: int, y: int, correct: bool) -> None:
    """A green tick or a red cross in a 14 x 14 square at (x, y) (drawn, not a font glyph)."""
    if correct:
        draw.line([(x + 1, y + 7), (x + 5, y + 12), (x + 13, y + 2)], fill=(20, 150, 40), width=3)
    else:
        draw.line([(x + 2, y + 2), (x + 12, y + 12)], fill=(210, 30, 30), width=3)
        draw.line([(x + 12, y + 2), (x + 2, y + 12)], fill=(210, 30, 30), width=3)


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def labelled_grid(images: Sequence[Image.Image], labels: Sequence[str],
                  verdicts: Sequence[bool | None] | None = None, columns: int = 4) -> Image.Image:
    """Images (upscaled to ``CELL`` px) in rows of ``columns``, each over its label (two lines at most) and,
    where ``verdicts`` gives True/False, a green tick or red cross."""
    verdicts = verdicts if verdicts is not None else [None] * len(images)
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * CELL, max(rows, 1) * (CELL + LABEL_HEIGHT)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    for index, (image, label, verdict) in enumerate(zip(images, labels, verdicts)):
        x, y = (index % columns) * CELL, (index // columns) * (CELL + LABEL_HEIGHT)
        grid.paste(image.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST), (x, y))
        indent = 3
        if verdict is not None:
            _draw_verdict(draw, x + 3, y + CELL + 4, verdict)
            indent = 20
        for line_index, line in enumerate(_wrap(label, font, CELL - indent - 2, draw)[:2]):
            draw.text((x + indent, y + CELL + 3 + 16 * line_index), line, fill=(0, 0, 0), font=font)
    return grid
