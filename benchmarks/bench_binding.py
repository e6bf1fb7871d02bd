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
  set cosine: the same states taken as a set, as cross-attention takes its keys and values (with no position of
  its own): each state's best cosine with any state of the other caption, averaged both ways; 1.000 means the
  U-Net is given the same conditioning for the two captions, whatever it learns; pooled cosine: the same for the
  pooled output. Near 1 on a swap family while lower on "colour word" means the
  U-Net is given almost the same conditioning for two different scenes.

And a probe of what the U-Net reads (``--num_probe`` captions, half to fit, half to test): a ridge classifier
(least squares to one-hot targets, Hoerl & Kennard 1970) reads the token state of each object word (the mean of
its tokens' states) and predicts

    noun colour   the colour bound to that object: "star" in "a red star and a green box" -> red  (8 classes)
    noun side     where that object is: "cat" in "a cat left of a tree" -> left, "tree" -> right  (4 classes)

A bag-of-words state (each word's state the same whatever the other words' roles) scores about 0.5 on both:
it knows which colours or which relation the caption names, not which goes with this object. 1.0 means every
object word's state carries its own colour or side, which is what cross-attention needs to draw it right.
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
    OBJECT_KINDS,
    RELATIONS,
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
    as_sets = set_cosine(states_a, tokens_a.attention_mask, states_b, tokens_b.attention_mask)
    return {"token_cosine": token.mean().item(), "set_cosine": as_sets.item(), "pooled_cosine": pooled.mean().item()}


def set_cosine(states_a: torch.Tensor, mask_a: torch.Tensor, states_b: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ``½ · [mean_{k in A} max_{l in B} cos(a_k, b_l) + mean_{l in B} max_{k in A} cos(a_k, b_l)]``
    over the unmasked states of each caption ([N, L, H] states, [N, L] masks): 1 when every state of either
    caption has an equal in the other, in any order."""
    cosines = F.normalize(states_a, dim=-1) @ F.normalize(states_b, dim=-1).transpose(1, 2)  # [N, L, L]
    mask_a, mask_b = mask_a.bool(), mask_b.bool()
    best_in_b = cosines.masked_fill(~mask_b[:, None, :], float("-inf")).amax(dim=2)  # [N, L]
    best_in_a = cosines.masked_fill(~mask_a[:, :, None], float("-inf")).amax(dim=1)
    mean = lambda best, mask: best.masked_fill(~mask, 0).sum(dim=1) / mask.sum(dim=1)  # noqa: E731
    return ((mean(best_in_b, mask_a) + mean(best_in_a, mask_b)) / 2).mean()


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


PROBES = {"noun colour": "color_attribution", "noun side": "position"}
SIDES = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
         "below": ("bottom", "top")}
PROBE_CLASSES = {"noun colour": list(COLORS), "noun side": ["left", "right", "top", "bottom"]}
RIDGE = 1e-2


def object_word_targets(caption: str, probe: str) -> list[tuple[int, str]]:
    """``(word index, class)`` for both object words of ``caption``: its colour ("noun colour") or its side of the
    relation ("noun side"). Words are split on spaces, as the tokenizer's pre-tokenizer does for these captions."""
    parsed = parse_caption(caption)
    positions = [index for index, word in enumerate(caption.split()) if word in OBJECT_KINDS]
    labels = parsed["colors"] if probe == "noun colour" else list(SIDES[parsed["relation"]])
    if len(positions) != len(labels):
        raise ValueError(f"{caption!r}: expected {len(labels)} object words of {OBJECT_KINDS}, found {len(positions)}.")
    return list(zip(positions, labels))


@torch.no_grad()
def object_word_states(towers: StageOneTowers, captions: list[str], probe: str) -> tuple[torch.Tensor, list[int]]:
    """``(states [2N, H], labels)``: the mean token state of each object word, and its class index."""
    classes = PROBE_CLASSES[probe]
    tokens = tokenize_prompts(towers.tokenizer, captions)
    states = encode_prompts(towers.text_encoder, tokens.input_ids, tokens.attention_mask)  # [N, L, H]
    rows, labels = [], []
    for index, caption in enumerate(captions):
        word_ids = tokens.word_ids(index)
        for word, label in object_word_targets(caption, probe):
            positions = [position for position, word_id in enumerate(word_ids) if word_id == word]
            rows.append(states[index, positions].mean(dim=0))
            labels.append(classes.index(label))
    return torch.stack(rows), labels


def ridge_probe_accuracy(train_x: torch.Tensor, train_y: list[int], test_x: torch.Tensor, test_y: list[int],
                         num_classes: int, ridge: float = RIDGE) -> float:
    """Test accuracy of ``argmax(x W + b)`` with ``[W; b] = argmin ||[X 1][W; b] - Y||² + ridge · ||W||²`` on
    standardised features (one-hot ``Y``), solved exactly in float64."""
    mean, std = train_x.double().mean(dim=0), train_x.double().std(dim=0).clamp(min=1e-8)
    standardise = lambda x: torch.cat([(x.double() - mean) / std, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # noqa: E731
    features = standardise(train_x)
    targets = F.one_hot(torch.tensor(train_y), num_classes).double()
    penalty = ridge * len(features) * torch.eye(features.shape[1], dtype=torch.float64)
    penalty[-1, -1] = 0.0
    weights = torch.linalg.solve(features.t() @ features + penalty, features.t() @ targets)
    predictions = (standardise(test_x) @ weights).argmax(dim=1)
    return (predictions == torch.tensor(test_y)).double().mean().item()


@torch.no_grad()
def probe_scores(towers: StageOneTowers, num_captions: int = 1000, seed: int = 0) -> dict[str, float]:
    """``{probe: test accuracy}`` of `ridge_probe_accuracy` on the object words of ``num_captions`` captions of the
    probe's category (drawn with ``numpy.random.default_rng([seed, 10 + probe index])``; first half fits)."""
    scores = {}
    for probe_index, (probe, category) in enumerate(PROBES.items()):
        rng = np.random.default_rng([seed, 10 + probe_index])
        captions = [sample_scene(rng, category).caption for _ in range(num_captions)]
        half = num_captions // 2
        train_x, train_y = object_word_states(towers, captions[:half], probe)
        test_x, test_y = object_word_states(towers, captions[half:], probe)
        scores[probe] = ridge_probe_accuracy(train_x, train_y, test_x, test_y, len(PROBE_CLASSES[probe]))
    return scores


COLUMNS = {"image_to_text": "img>txt", "text_to_image": "txt>img", "token_cosine": "tok cos", "set_cosine": "set cos",
           "pooled_cosine": "pool cos"}


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
    probes = [probe for probe in PROBES if all(probe in result.get("probes", {}) for result in rows.values())]
    if probes:
        lines += ["", f"{'token-state probe':<{width}}" + "".join(f" | {probe}" for probe in probes)]
        for name, result in rows.items():
            lines.append(f"{name:<{width}}" + "".join(f" | {result['probes'][probe]:>{len(probe)}.3f}" for probe in probes))
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
    parser.add_argument("--num_probe", type=int, default=1000,
                        help="Captions per token-state probe (half fit, half test); 0 skips the probes.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    if args.num_pairs < 1:
        parser.error(f"argument --num_pairs: must be at least 1, got {args.num_pairs}")
    if args.num_probe != 0 and args.num_probe < 4:
        parser.error(f"argument --num_probe: must be 0 or at least 4, got {args.num_probe}")
    rows = {}
    with torch.no_grad():
        for directory in args.text_encoder:
            towers = load_towers(directory)
            rows[directory] = binding_scores(towers, args.num_pairs, args.seed, args.resolution)
            if args.num_probe:
                rows[directory]["probes"] = probe_scores(towers, args.num_probe, args.seed)
    print(f"{args.num_pairs} pairs per family, seed {args.seed}, {args.resolution} px; accuracy chance 0.5")
    for family in FAMILIES:
        print(f"  {family}: {' / '.join(next(iter(rows.values()))[family]['example'])}")
    print(format_table(rows))
    report = {"settings": {"num_pairs": args.num_pairs, "seed": args.seed, "resolution": args.resolution,
                           "num_probe": args.num_probe},
              "encoders": rows}
    if args.json is not None:
        from ldm_pipeline.durable import write_text_atomic

        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    from ldm_pipeline.errors import run_cli

    run_cli(main, prog="bench_binding.py")
