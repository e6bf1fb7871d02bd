"""Does the text encoder see binding and word order, or only which words a caption has?

    python benchmarks/bench_binding.py --text_encoder runs/demo/text_encoder_stage [DIR ...] [--num_pairs 200]
        [--seed 0] [--resolution 32] [--json binding.json]

Each DIR is a text-encoder stage output (``tokenizer/``, ``text_encoder/``, ``image_tower/``,
``text_projection.safetensors``). Caption pairs are drawn from the ``shapes`` grammar with ``--seed``, in three
families:

    colour swap     "a red star and a green box"  /  "a green star and a red box"     same words, binding swapped
    position swap   "a cat left of a tree"        /  "a tree left of a cat"           same words, order swapped
    colour word     "a red star and a green box"  /  "a red star and a blue box"      one colour word differs

Contrastive image-text training can ignore the first two (Yuksekgonul et al. 2023, "When and why vision-language
models behave like bags-of-words", ICLR 2023, arXiv:2210.01936); the third is the reference: a change the
encoder is trained to see. Per family and encoder:

- pairwise accuracy, image to text: the image of A (a rendered scene of caption A) scores its caption higher
  than the other, ``cos(v(x_A), t(A)) > cos(v(x_A), t(B))``, with the stage's image tower and projections, over
  both roles (A and B); text to image: ``cos(t(A), v(x_A)) > cos(t(A), v(x_B))``. Chance is 0.5; a
  bag-of-words encoder gets exactly 0.5 on the swap families (its two captions are one text).
- token cosine: the cosine of the two captions' hidden states at each token position (what the U-Net's
  cross-attention reads, `encode_prompts`), averaged over the caption's positions (``<s> ... </s>``) and pairs;
  pooled cosine: the same for the pooled output. Near 1 on a swap family while lower on "colour word" means the
  U-Net is given almost the same conditioning for two different scenes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldm_pipeline.data.datasets import image_to_tensor
from ldm_pipeline.data.shapes import (
    COLORS,
    binding_counterpart,
    grammar_caption,
    parse_caption,
    render_scene,
    sample_scene,
    scene_from_caption,
)
from ldm_pipeline.evaluation.alignment import StageOneTowers, load_stage_one_towers
from ldm_pipeline.prompt_encoding import encode_prompts, tokenize_prompts

FAMILIES = ("colour swap", "position swap", "colour word")
TIE_TOLERANCE = 1e-6


def colour_word_change(caption: str, rng: np.random.Generator) -> str:
    """``caption`` ("color_attribution") with one object's colour, chosen by ``rng``, replaced by a colour the
    caption does not name."""
    parsed = parse_caption(caption)
    colors = list(parsed["colors"])
    unused = [color for color in COLORS if color not in colors]
    colors[int(rng.integers(len(colors)))] = unused[int(rng.integers(len(unused)))]
    return grammar_caption(parsed["category"], parsed["kinds"], colors)


def caption_pairs(family: str, num_pairs: int, seed: int) -> list[tuple[str, str]]:
    """``num_pairs`` pairs ``(A, B)`` of ``family``, drawn from ``numpy.random.default_rng([seed, family index])``."""
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    category = "position" if family == "position swap" else "color_attribution"
    pairs = []
    while len(pairs) < num_pairs:
        caption = sample_scene(rng, category).caption
        other = colour_word_change(caption, rng) if family == "colour word" else binding_counterpart(caption)
        if other is not None:
            pairs.append((caption, other))
    return pairs


def render_captions(captions: list[str], resolution: int, rng: np.random.Generator) -> torch.Tensor:
    """[N, 3, R, R] images in [-1, 1], one `scene_from_caption` render per caption."""
    return torch.stack([image_to_tensor(render_scene(scene_from_caption(caption, rng), resolution)[0])
                        for caption in captions])


def pairwise_accuracy(anchors: torch.Tensor, right: torch.Tensor, wrong: torch.Tensor) -> float:
    """Share of rows with ``<a_i, r_i> > <a_i, w_i>`` (unit vectors [N, P]); differences within `TIE_TOLERANCE`
    (float32 rounding) count one half, so exchanging ``right`` and ``wrong`` gives ``1 - accuracy``."""
    margin = (anchors * right).sum(dim=-1) - (anchors * wrong).sum(dim=-1)
    wins = (margin > TIE_TOLERANCE).double() + 0.5 * (margin.abs() <= TIE_TOLERANCE).double()
    return wins.mean().item()


@torch.no_grad()
def state_cosines(towers: StageOneTowers, captions_a: list[str], captions_b: list[str]) -> dict[str, float]:
    """Mean cosine of the token states (over the positions both captions fill) and of the pooled outputs."""
    tokens_a = tokenize_prompts(towers.tokenizer, captions_a)
    tokens_b = tokenize_prompts(towers.tokenizer, captions_b)
    states_a = encode_prompts(towers.text_encoder, tokens_a.input_ids, tokens_a.attention_mask)  # [N, L, H]
    states_b = encode_prompts(towers.text_encoder, tokens_b.input_ids, tokens_b.attention_mask)
    filled = (tokens_a.attention_mask * tokens_b.attention_mask).float()  # [N, L]
    per_token = F.cosine_similarity(states_a, states_b, dim=-1)  # [N, L]
    token = (per_token * filled).sum(dim=1) / filled.sum(dim=1)
    pooled = F.cosine_similarity(towers.pooled_text(captions_a), towers.pooled_text(captions_b), dim=-1)
    return {"token_cosine": token.mean().item(), "pooled_cosine": pooled.mean().item()}


@torch.no_grad()
def binding_scores(towers: StageOneTowers, num_pairs: int = 200, seed: int = 0, resolution: int = 32) -> dict:
    """``{family: {"image_to_text", "text_to_image", "token_cosine", "pooled_cosine", "num_pairs"}}``."""
    results = {}
    for family in FAMILIES:
        pairs = caption_pairs(family, num_pairs, seed)
        captions_a, captions_b = [a for a, _ in pairs], [b for _, b in pairs]
        rng = np.random.default_rng([seed, FAMILIES.index(family), 1])
        images_a, _ = towers.embed_images(render_captions(captions_a, resolution, rng))  # [N, P]
        images_b, _ = towers.embed_images(render_captions(captions_b, resolution, rng))
        texts_a, texts_b = towers.embed_texts(captions_a), towers.embed_texts(captions_b)  # [N, P]
        image_to_text = (pairwise_accuracy(images_a, texts_a, texts_b) + pairwise_accuracy(images_b, texts_b, texts_a)) / 2
        text_to_image = (pairwise_accuracy(texts_a, images_a, images_b) + pairwise_accuracy(texts_b, images_b, images_a)) / 2
        results[family] = {"image_to_text": image_to_text, "text_to_image": text_to_image,
                           **state_cosines(towers, captions_a, captions_b), "num_pairs": len(pairs),
                           "example": list(pairs[0])}
    return results


COLUMNS = {"image_to_text": "img>txt", "text_to_image": "txt>img", "token_cosine": "tok cos", "pooled_cosine": "pool cos"}


def format_table(rows: dict[str, dict]) -> str:
    """One row per encoder: per family, image-to-text and text-to-image accuracy, token and pooled cosine."""
    group = " ".join(COLUMNS.values())
    width = max(len("encoder"), *(len(name) for name in rows))
    lines = [f"{'':<{width}}" + "".join(f" | {family:^{len(group)}}" for family in FAMILIES),
             f"{'encoder':<{width}}" + f" | {group}" * len(FAMILIES)]
    lines.append("-" * len(lines[-1]))
    for name, result in rows.items():
        lines.append(f"{name:<{width}}" + "".join(
            " | " + " ".join(f"{result[family][key]:>{len(label)}.3f}" for key, label in COLUMNS.items())
            for family in FAMILIES))
    return "\n".join(lines)


def load_towers(directory: str) -> StageOneTowers:
    """`load_stage_one_towers` of a stage output, its errors naming this script's flag."""
    try:
        return load_stage_one_towers(directory)
    except FileNotFoundError as error:
        raise FileNotFoundError(str(error).replace("--text_stage", "--text_encoder", 1)) from error


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench_binding.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text_encoder", nargs="+", required=True, help="Text-encoder stage output dirs.")
    parser.add_argument("--num_pairs", type=int, default=200, help="Caption pairs per family.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the captions and renders.")
    parser.add_argument("--resolution", type=int, default=32, help="Render size: the stage's training resolution.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    if args.num_pairs < 1:
        parser.error(f"argument --num_pairs: must be at least 1, got {args.num_pairs}")
    with torch.no_grad():
        rows = {directory: binding_scores(load_towers(directory), args.num_pairs, args.seed, args.resolution)
                for directory in args.text_encoder}
    print(f"{args.num_pairs} pairs per family, seed {args.seed}, {args.resolution} px; accuracy chance 0.5")
    for family in FAMILIES:
        print(f"  {family}: {' / '.join(next(iter(rows.values()))[family]['example'])}")
    print(format_table(rows))
    report = {"settings": {"num_pairs": args.num_pairs, "seed": args.seed, "resolution": args.resolution},
              "encoders": rows}
    if args.json is not None:
        from ldm_pipeline.trainer import write_text_atomic

        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    from ldm_pipeline.errors import run_cli

    run_cli(main, prog="bench_binding.py")
