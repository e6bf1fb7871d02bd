"""Train the object-kind classifier on crops of rendered ``shapes`` objects; writes the shipped weights.

    python -m ldm_pipeline.evaluation.train_classifier            # ~1 min on one CPU core, deterministic

Data: scenes of every category rendered at random resolutions; a share of them degraded (Gaussian blur, pixel
noise) like decoded latents are. Each image goes through the scorer's own `ObjectDetector`; every detected
component whose box matches a rendered object's box (IoU >= 0.5) gives one crop labelled with that object's kind.
Held-out accuracy is measured on clean renders of another seed and split, per resolution, and written to
``weights/object_classifier_metrics.json`` with the ``shapes`` ``GENERATOR_VERSION`` it was trained on (a test
checks it is current: retrain when the renderer changes); training fails if it is below 99%.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from ldm_pipeline.data.shapes import COLORS, GENERATOR_VERSION, OBJECT_KINDS, render_scene, sample_scene, scene_rng
from ldm_pipeline.evaluation.classifier import WEIGHTS_DIR, ObjectClassifier, crop_mask, save_object_classifier
from ldm_pipeline.evaluation.detector import ObjectDetector, box_iou

TRAIN_RESOLUTIONS = (32, 40, 48, 56, 64, 80, 96, 128)
HELD_OUT_RESOLUTIONS = (32, 48, 64, 96, 128)
MIN_ACCURACY = 0.99
METRICS_NAME = "object_classifier_metrics.json"


def degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur (radius up to ``resolution / 64``) and Gaussian pixel noise (std up to 20 levels)."""
    radius = float(rng.uniform(0, 1)) * image.width / 64
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
    noisy = blurred + rng.normal(0, float(rng.uniform(0, 20)), blurred.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def labelled_crops(
    num_images: int,
    seed: int,
    split: str = "train",
    resolutions: tuple[int, ...] = TRAIN_RESOLUTIONS,
    degraded_fraction: float = 0.0,
    crop_size: int = 32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops [N, S, S], kind indices [N] and image resolutions [N] of the detected objects of ``num_images``
    seeded scenes (scene ``i`` from ``scene_rng(seed, i, split)``, category uniform)."""
    detector = ObjectDetector(COLORS)
    crops, kinds, sizes = [], [], []
    for index in range(num_images):
        rng = scene_rng(seed, index, split)
        resolution = int(resolutions[int(rng.integers(len(resolutions)))])
        image, rendered = render_scene(sample_scene(rng), resolution)
        if rng.random() < degraded_fraction:
            image = degrade(image, rng)
        for found in detector(image):
            ious = [box_iou(found.box, obj.box) for obj in rendered]
            best = int(np.argmax(ious))
            if ious[best] >= 0.5:
                crops.append(crop_mask(found.mask, found.box, crop_size))
                kinds.append(OBJECT_KINDS.index(rendered[best].kind))
                sizes.append(resolution)
    return np.stack(crops), np.array(kinds), np.array(sizes)


def accuracy(model: ObjectClassifier, crops: np.ndarray, kinds: np.ndarray) -> float:
    predicted, _ = model.predict(crops)
    return float(np.mean([OBJECT_KINDS.index(kind) for kind in predicted] == kinds))


def held_out_accuracy(model: ObjectClassifier, num_images: int = 1000, seed: int = 7) -> dict:
    """Accuracy on clean renders of the "test" split of ``seed``: overall and per resolution."""
    crops, kinds, sizes = labelled_crops(num_images, seed, "test", HELD_OUT_RESOLUTIONS, 0.0,
                                         model.config.crop_size)
    per_resolution = {str(r): accuracy(model, crops[sizes == r], kinds[sizes == r]) for r in HELD_OUT_RESOLUTIONS}
    degraded_crops, degraded_kinds, _ = labelled_crops(num_images, seed + 1, "test", HELD_OUT_RESOLUTIONS, 1.0,
                                                       model.config.crop_size)
    return {"accuracy": accuracy(model, crops, kinds), "num_objects": int(len(kinds)),
            "per_resolution": per_resolution, "degraded_accuracy": accuracy(model, degraded_crops, degraded_kinds),
            "num_images": num_images, "seed": seed, "split": "test"}


def train(args: argparse.Namespace, evaluate: bool = True) -> tuple[ObjectClassifier, dict]:
    """Train on ``args.num_train_images`` scenes; returns the model and (with ``evaluate``) its held-out metrics."""
    start = time.time()
    torch.manual_seed(args.seed)
    crops, kinds, _ = labelled_crops(args.num_train_images, args.seed, "train", TRAIN_RESOLUTIONS,
                                     args.degraded_fraction)
    data, labels = torch.from_numpy(crops)[:, None], torch.from_numpy(kinds)
    model = ObjectClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, total_steps=args.max_train_steps)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    position = 0
    for step in range(args.max_train_steps):
        if position + args.batch_size > len(order):
            order, position = torch.randperm(len(labels), generator=generator), 0
        batch = order[position : position + args.batch_size]
        position += args.batch_size
        inputs = data[batch]
        shift = torch.randint(-1, 2, (2,), generator=generator)
        inputs = torch.roll(inputs, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
        loss = torch.nn.functional.cross_entropy(model(inputs), labels[batch], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == args.max_train_steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    model.eval()
    print(f"trained in {time.time() - start:.1f} s")
    if not evaluate:
        return model, {}
    metrics = held_out_accuracy(model)
    metrics.update(num_train_objects=int(len(labels)), train_accuracy=accuracy(model, crops, kinds))
    return model, metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=str(WEIGHTS_DIR))
    parser.add_argument("--num_train_images", type=int, default=3000)
    parser.add_argument("--degraded_fraction", type=float, default=0.5)
    parser.add_argument("--max_train_steps", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    model, metrics = train(args)
    metrics["train_seconds"] = round(time.time() - start, 1)
    metrics["shapes_generator_version"] = GENERATOR_VERSION
    metrics["training_args"] = vars(args) | {"output_dir": None}
    print(json.dumps(metrics, indent=2))
    if metrics["accuracy"] < MIN_ACCURACY:
        raise SystemExit(f"held-out accuracy {metrics['accuracy']:.4f} < {MIN_ACCURACY}: weights not saved.")
    save_object_classifier(model, args.output_dir)
    (Path(args.output_dir) / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()
