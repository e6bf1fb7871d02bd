"""Evaluation on the user's own data, judged by the stage-1 towers trained on that data.

    report = evaluate_on_user_data(pipe, towers, heldout_dataset, train_dataset, out="runs/mine/eval")

For the first ``num_images`` held-out items (default: all) the pipeline generates one image per caption, seeded.
Then, in the image tower's space:

1. prompt alignment (``alignment.py``): cosine and caption retrieval of the generations, beside the real held-out
   images (ceiling) and shuffled captions (floor);
2. FID and precision/recall (``feature_metrics.py``) of the generations against the real held-out images, and
   of as many training images against the same held-out images (what a model that samples the data scores);
3. memorization (``memorization.py``): each generation's nearest training image in pixels and in features,
   flagged when closer than the held-out images' 5th percentile.

Datasets are those of ``ldm_pipeline.data.build_dataset``: items ``{"pixel_values": [3, H, W] in [-1, 1],
"caption": str, "index": int}``. Images are generated at the held-out images' size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ldm_pipeline.data import collate_examples
from ldm_pipeline.evaluation.alignment import StageOneTowers, prompt_alignment
from ldm_pipeline.evaluation.feature_metrics import DEFAULT_K, fidelity_and_diversity
from ldm_pipeline.evaluation.fid import inception_fid
from ldm_pipeline.evaluation.images import labelled_grid, sample_images, to_model_range, to_pil_images
from ldm_pipeline.evaluation.memorization import (
    DEFAULT_PERCENTILE,
    SPACES,
    memorization_summary,
    nearest_training_images,
)
from ldm_pipeline.schedulers import SAMPLING_DEFAULTS

NUM_CLOSEST_PAIRS = 8
TRAIN_BATCH_SIZE = 64


def unit_range_pixels(pixel_values: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> [N, 3·H·W] float32 in [0, 1] (the pixel space of memorization)."""
    return ((pixel_values.float() + 1) / 2).clamp(0, 1).flatten(1).numpy()


class TrainingSetScan:
    """Iterates ``({"pixels", "features"}, indices)`` over the training set for ``nearest_training_images``,
    keeping the features of its first ``keep_features`` images in ``kept_features`` [K, F]."""

    def __init__(self, towers: StageOneTowers, train_dataset, max_images: int | None, keep_features: int):
        count = len(train_dataset) if max_images is None else min(max_images, len(train_dataset))
        self.towers, self.keep_features = towers, keep_features
        self.loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train_dataset, range(count)),
                                                  batch_size=TRAIN_BATCH_SIZE, collate_fn=collate_examples)
        self.num_images = count
        self.kept_features = np.zeros((0, 0), np.float32)

    def __iter__(self):
        kept = []
        for batch in self.loader:
            _, features = self.towers.embed_images(batch["pixel_values"])
            kept.append(features[: max(0, self.keep_features - sum(len(k) for k in kept))].numpy())
            yield {"pixels": unit_range_pixels(batch["pixel_values"]), "features": features.numpy()}, batch["index"].numpy()
        self.kept_features = np.concatenate(kept)


def evaluate_on_user_data(pipe, towers: StageOneTowers, heldout_dataset, train_dataset=None, out=None,
                          num_images: int | None = None, seed: int = 0,
                          num_inference_steps: int = SAMPLING_DEFAULTS.num_inference_steps,
                          guidance_scale: float = SAMPLING_DEFAULTS.guidance_scale, batch_size: int = 16,
                          k: int = DEFAULT_K,
                          percentile: float = DEFAULT_PERCENTILE, max_train_images: int | None = None,
                          grid_images: int = 16, model_name: str = "pipeline", report_fields: dict | None = None,
                          inception=None, guidance_interval: tuple[float, float] | None = None
                          ) -> dict:
    """Generate for held-out captions and measure alignment, fidelity/diversity (and the Inception FID when an
    ``inception`` network is given) and memorization (module
    docstring). ``train_dataset=None`` skips memorization and the training-image reference. With ``out`` it
    writes ``report.json``, ``report.md``, ``judgements.json``, ``samples/``, ``grid_samples.png`` and
    ``memorization_{pixels,features}.png``; ``report_fields`` are added to the report. Returns the report."""
    count = len(heldout_dataset) if num_images is None else min(num_images, len(heldout_dataset))
    if count < 2:
        raise ValueError(f"Evaluation needs at least 2 held-out images, got {count}: raise --num_images or "
                         "--num_validation_samples.")
    items = [heldout_dataset[i] for i in range(count)]
    captions = [item["caption"] for item in items]
    real = torch.stack([item["pixel_values"] for item in items])  # [N, 3, H, W]
    resolution = real.shape[-1]

    start = time.perf_counter()
    generated_images = sample_images(pipe, captions, seed, num_inference_steps, guidance_scale, batch_size, resolution,
                                     guidance_interval=guidance_interval)
    generation_seconds = time.perf_counter() - start
    generated = to_model_range(generated_images)
    generated_embeds, generated_features = towers.embed_images(generated)
    real_embeds, real_features = towers.embed_images(real)

    alignment = prompt_alignment(towers, generated_embeds, real_embeds, captions, seed)
    k = min(k, count - 1)
    fidelity = fidelity_and_diversity(real_features.numpy(), generated_features.numpy(), k)
    if inception is not None:
        real_images = to_pil_images(((real + 1) / 2).permute(0, 2, 3, 1).numpy())  # [N, H, W, 3] in [0, 1]
        fidelity["inception_fid"] = inception_fid(inception, generated_images, real_images)

    memorization, reference, nearest = None, None, None
    if train_dataset is not None:
        queries = {"pixels": np.concatenate([unit_range_pixels(generated), unit_range_pixels(real)]),
                   "features": torch.cat([generated_features, real_features]).numpy()}
        scan = TrainingSetScan(towers, train_dataset, max_train_images, keep_features=count)
        found = nearest_training_images(queries, scan)
        nearest = {space: {key: value[:count] for key, value in found[space].items()} for space in SPACES}
        heldout_nearest = {space: {key: value[count:] for key, value in found[space].items()} for space in SPACES}
        memorization = memorization_summary(nearest, heldout_nearest, percentile)
        if len(scan.kept_features) > k:
            reference = {**fidelity_and_diversity(real_features.numpy(), scan.kept_features, k),
                         "num_train_images": len(scan.kept_features)}

    report = {
        "model": model_name,
        "num_images": count,
        "num_distinct_captions": alignment["num_captions"],
        "alignment": {name: {key: value for key, value in scores.items() if key not in ("cosines", "ranks")}
                      for name, scores in alignment.items() if name != "num_captions"},
        "fidelity": fidelity,
        "fidelity_train_vs_heldout": reference,
        "memorization": None if memorization is None else {
            "percentile": percentile,
            "num_train_images": scan.num_images,
            **{space: {key: value for key, value in memorization[space].items() if key != "flags"} for space in SPACES},
        },
        "settings": {"seed": seed, "steps": num_inference_steps, "guidance_scale": guidance_scale,
                     "guidance_interval": guidance_interval,
                     "batch_size": batch_size, "resolution": resolution,
                     "scheduler": pipe.scheduler.__class__.__name__ if hasattr(pipe, "scheduler") else None,
                     "text_projection": towers.projection_source,
                     "generation_seconds": round(generation_seconds, 2)},
        **(report_fields or {}),
    }
    judgements = per_image_judgements(captions, alignment["generated"], nearest, memorization)
    if out is not None:
        write_outputs(Path(out), report, judgements, generated_images, train_dataset, grid_images)
    return report


def per_image_judgements(captions: list[str], generated_alignment: dict, nearest: dict | None,
                         memorization: dict | None) -> list[dict]:
    """One record per generated image: its caption, cosine, caption rank and nearest training images."""
    judgements = []
    for i, caption in enumerate(captions):
        rank = generated_alignment["ranks"][i]
        record = {"index": i, "sample": f"samples/{i:06d}.png", "caption": caption,
                  "cosine": generated_alignment["cosines"][i], "caption_rank": rank, "top1": rank <= 1,
                  "top5": rank <= 5}
        if nearest is not None:
            record["nearest_train"] = {space: {"index": int(nearest[space]["index"][i]),
                                               "distance": float(nearest[space]["distance"][i]),
                                               "flagged": bool(memorization[space]["flags"][i])} for space in SPACES}
        judgements.append(record)
    return judgements


def closest_pairs_grid(judgements: list[dict], generated_images, train_dataset, space: str):
    """The ``NUM_CLOSEST_PAIRS`` generations nearest to a training image in ``space``, each beside that image."""
    closest = sorted(judgements, key=lambda j: j["nearest_train"][space]["distance"])[:NUM_CLOSEST_PAIRS]
    images, labels = [], []
    for judgement in closest:
        match = judgement["nearest_train"][space]
        train_image = to_pil_images(((train_dataset[match["index"]]["pixel_values"] + 1) / 2).clamp(0, 1)
                                    .permute(1, 2, 0)[None].numpy())[0]
        images += [generated_images[judgement["index"]], train_image]
        flag = " (flagged)" if match["flagged"] else ""
        labels += [f"generated {judgement['index']}: d={match['distance']:.4f}{flag}", f"train {match['index']}"]
    return labelled_grid(images, labels, columns=4)


def write_outputs(out: Path, report: dict, judgements: list[dict], generated_images, train_dataset,
                  grid_images: int) -> None:
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for judgement, image in zip(judgements, generated_images):
        image.save(out / judgement["sample"])
    shown = judgements[:grid_images]
    labelled_grid([generated_images[j["index"]] for j in shown], [j["caption"] for j in shown],
                  [j["top1"] for j in shown]).save(out / "grid_samples.png")
    if train_dataset is not None:
        for space in SPACES:
            closest_pairs_grid(judgements, generated_images, train_dataset, space).save(out / f"memorization_{space}.png")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "judgements.json").write_text(json.dumps(judgements, indent=1) + "\n")
    (out / "report.md").write_text(markdown_report(report))


def markdown_report(report: dict) -> str:
    """``report.md``: the alignment table with its ceiling and floor, fidelity/diversity, memorization."""
    alignment = report["alignment"]
    lines = [f"# ldm-eval on user data: {report['model']}", "",
             f"{report['num_images']} held-out captions ({report['num_distinct_captions']} distinct), one image each.",
             "", "## Prompt alignment (stage-1 towers)", "",
             "| images | cosine to caption | caption retrieval top-1 | top-5 |", "|---|---:|---:|---:|"]
    for name, label in (("generated", "generated"), ("real", "real held-out (ceiling)"),
                        ("shuffled", "real, shuffled captions (floor)")):
        scores = alignment[name]
        lines.append(f"| {label} | {scores['cosine']:.3f} | {scores['top1']:.3f} | {scores['top5']:.3f} |")
    chance = alignment["generated"]
    lines += [f"| chance | | {chance['chance_top1']:.3f} | {chance['chance_top5']:.3f} |", "",
              "The U-Net was conditioned on this same text encoder: the score shows agreement with what the encoder "
              "tells apart, not correctness the encoder cannot see. Compare it with the ceiling and the floor.", "",
              "## Fidelity and diversity (image-tower features)", "",
              "| images vs real held-out | FID | precision | recall |", "|---|---:|---:|---:|"]
    fidelity = report["fidelity"]
    lines.append(f"| generated | {fidelity['fid']:.3f} | {fidelity['precision']:.3f} | {fidelity['recall']:.3f} |")
    reference = report.get("fidelity_train_vs_heldout")
    if reference:
        lines.append(f"| {reference['num_train_images']} training images (reference) | {reference['fid']:.3f} | "
                     f"{reference['precision']:.3f} | {reference['recall']:.3f} |")
    lines += ["", f"Precision/recall: k-NN manifolds with k = {fidelity['k']} (Kynkäänniemi et al., 2019)."]
    memorization = report.get("memorization")
    if memorization:
        lines += ["", "## Memorization (nearest training image)", "",
                  f"Threshold: the {memorization['percentile']:g}th percentile of the real held-out images' "
                  f"nearest-training distance; searched {memorization['num_train_images']} training images.", "",
                  "| space | threshold | generations flagged | held-out at threshold | median distance generated | "
                  "median distance held-out |", "|---|---:|---:|---:|---:|---:|"]
        for space in SPACES:
            row = memorization[space]
            lines.append(f"| {space} | {row['threshold']:.4f} | {row['share_generated']:.3f} | "
                         f"{row['share_heldout']:.3f} | {row['median_distance_generated']:.4f} | "
                         f"{row['median_distance_heldout']:.4f} |")
    lines.append("")
    if report.get("inception_fid_note"):
        lines.append(f"- {report['inception_fid_note']}")
    lines.append("- settings: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()))
    return "\n".join(lines) + "\n"
