"""Time to quality: the GenEval-style scores of a main-job run's U-Net snapshots against training minutes.

    python benchmarks/time_to_quality.py --run runs/demo [--num_images 8] [--out docs/time_to_quality.png]

Reads the run's ``summary.json`` (the text-encoder and VAE stages' wall times), ``pipeline/train_log.jsonl``
(the U-Net's elapsed training seconds per step) and the snapshots ``pipeline/snapshots/step-N`` that
``train_unet.py --snapshot_steps`` saved (EMA weights). Each snapshot is scored with ``ldm-eval --unet`` with the
sampler settings of the run's ``eval.json`` on ``--num_images`` images per category; the final pipeline is the
last point. x = minutes of training so far = text-encoder stage + VAE stage + U-Net training seconds at step N
(the U-Net stage's latent caching and start-up are not counted). Prints a table, writes it as JSON beside the
plot, and draws the plot with PIL.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ldm_pipeline.cli_eval import build_parser as eval_parser
from ldm_pipeline.cli_eval import evaluate, sampling_flags
from ldm_pipeline.data.shapes import CATEGORIES

SERIES_COLORS = {"overall": (0, 0, 0), "single_object": (31, 119, 180), "two_objects": (255, 127, 14),
                 "counting": (44, 160, 44), "colors": (214, 39, 40), "position": (148, 103, 189),
                 "color_attribution": (140, 86, 75)}


def snapshot_points(run: Path) -> list[tuple[int, Path | None]]:
    """``(step, unet_dir)`` for every snapshot, oldest first, then ``(final_step, None)`` for the saved pipeline."""
    snapshots = sorted(((int(p.name.split("-")[1]), p) for p in (run / "pipeline" / "snapshots").glob("step-*")),
                       key=lambda item: item[0])
    final_step = json.loads((run / "pipeline" / "unet_metrics.json").read_text())["train_steps"]
    return [(step, path) for step, path in snapshots if step < final_step] + [(final_step, None)]


def elapsed_minutes(run: Path) -> dict[int, float]:
    """Training minutes at each U-Net step: earlier stages' wall time + the U-Net's elapsed training time."""
    stages = json.loads((run / "summary.json").read_text())["seconds_per_stage"]
    before = stages.get("text_encoder", 0.0) + stages.get("vae", 0.0)
    log = [json.loads(line) for line in (run / "pipeline" / "train_log.jsonl").read_text().splitlines() if line]
    return {record["step"]: (before + record["elapsed_s"]) / 60 for record in log}


def draw_plot(rows: list[dict], path: Path, title: str) -> None:
    """Score (0..1) against training minutes, one line per category plus the overall mean."""
    width, height, left, right, top, bottom = 760, 440, 60, 190, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    x_max = max(row["minutes"] for row in rows) * 1.05
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_xy(minutes: float, score: float) -> tuple[float, float]:
        return left + plot_w * minutes / x_max, top + plot_h * (1 - score)

    for tick in range(0, 11, 2):
        y = top + plot_h * (1 - tick / 10)
        draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        draw.text((left - 30, y - 7), f"{tick / 10:.1f}", fill="black", font=font)
    step = max(1, round(x_max / 8))
    for minute in range(0, int(x_max) + 1, step):
        x, _ = to_xy(minute, 0)
        draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill="black")
        draw.text((x - 6, top + plot_h + 8), str(minute), fill="black", font=font)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    draw.text((left + plot_w // 2 - 60, height - 22), "training minutes", fill="black", font=font)
    draw.text((left, 12), title, fill="black", font=font)
    for index, (name, color) in enumerate(SERIES_COLORS.items()):
        points = [to_xy(row["minutes"], row["scores"][name]) for row in rows]
        draw.line(points, fill=color, width=3 if name == "overall" else 2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        legend_y = top + 10 + 20 * index
        draw.line([(width - right + 15, legend_y + 7), (width - right + 40, legend_y + 7)], fill=color, width=3)
        draw.text((width - right + 46, legend_y), name, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="Output dir of training/run_demo.py.")
    parser.add_argument("--num_images", type=int, default=8, help="Images per category for each point.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/time_to_quality.png")
    args = parser.parse_args(argv)
    run = Path(args.run)
    summary = json.loads((run / "summary.json").read_text())
    eval_config = json.loads((Path(summary["config_dir"]) / "eval.json").read_text())
    minutes = elapsed_minutes(run)

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for step, unet_dir in snapshot_points(run):
            eval_argv = ["--model", str(run / "pipeline"), "--out", str(Path(scratch) / f"step-{step}"),
                         "--num_images", str(args.num_images), "--seed", str(args.seed), *sampling_flags(eval_config)]
            if unet_dir is not None:
                eval_argv += ["--unet", str(unet_dir)]
            report = evaluate(eval_parser().parse_args(eval_argv))
            row = {"step": step, "minutes": round(minutes[step], 2), "scores": report["scores"], "fid": report["fid"]}
            rows.append(row)
            print(f"step {step:5d}  {row['minutes']:6.2f} min  overall {row['scores']['overall']:.3f}  "
                  + "  ".join(f"{c} {row['scores'][c]:.2f}" for c in CATEGORIES) + f"  FID {row['fid']:.2f}", flush=True)

    out = Path(args.out)
    draw_plot(rows, out, f"{run}: GenEval-style scores ({args.num_images} images/category) vs training minutes")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"Wrote {out} and {out.with_suffix('.json')}")
    return rows


if __name__ == "__main__":
    main()
