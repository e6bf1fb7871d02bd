"""Does the recipe draw word orders it never saw? Train with some relation and colour-binding orders held out,
then score those orders against the trained ones.

    python benchmarks/bench_word_order.py --output_dir runs/word_order                 # configs/demo, ~25 min
    python benchmarks/bench_word_order.py --output_dir runs/word_order --seed 1        # another training seed
    python benchmarks/bench_word_order.py --output_dir runs/word_order --skip_training  # score a finished run again

1. Trains the whole recipe (`training/run_demo.py`, every stage) on the built-in shapes data with
   ``--shapes_held_out_orders F`` (default 0.25): that fraction of the position and colour-attribution meanings
   never appears in training, while each one's reverse does ("a cat left of a tree" held out, "a tree left of a
   cat" trained; "a red star and a green box" held out, "a green star and a red box" trained;
   `ldm_pipeline.data.shapes.is_held_out_order`).
2. Scores the pipeline with ``ldm-eval --word_orders held_out`` and ``--word_orders trained`` (position and
   colour attribution, ``--num_images`` per category, each ``--sampling_seeds``), with the config set's sampling
   settings (``eval.json``).
3. Prints per category the trained and held-out scores and their difference, mean over the sampling seeds, and
   writes ``OUTPUT_DIR/word_order.json``.

A text encoder that gives a caption and its reverse the same conditioning (a bag of words) draws every held-out
order reversed: its held-out score falls towards 0 while the trained score stays. One that encodes word order
scores held-out orders near the trained level (the target: within 0.05).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CATEGORIES = ("position", "color_attribution")
TARGET_GAP = 0.05


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="bench_word_order.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Run directory (the recipe's outputs and the scores).")
    parser.add_argument("--config_dir", default=str(REPO / "configs" / "demo"), help="configs/<size> directory.")
    parser.add_argument("--seed", type=int, default=0, help="Training seed of every stage.")
    parser.add_argument("--held_out_orders", type=float, default=0.25,
                        help="Fraction of the relation and colour-binding orders held out of training (at most 0.5).")
    parser.add_argument("--num_images", type=int, default=64, help="Images per category and sampling seed.")
    parser.add_argument("--sampling_seeds", type=int, nargs="+", default=[0, 1], help="Seeds of the prompts and noise.")
    parser.add_argument("--skip_training", action="store_true",
                        help="Score OUTPUT_DIR/pipeline as it is (it must have been trained with the same "
                             "--held_out_orders and --seed).")
    parser.add_argument("--run_demo_args", nargs=argparse.REMAINDER, default=[],
                        help="Further flags for training/run_demo.py (e.g. --text_encoder_config FILE); last.")
    return parser.parse_args(argv)


def run(command: list[str]) -> None:
    print(f"$ {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def evaluate(args, pipeline: Path, word_orders: str, sampling_seed: int, out: Path) -> dict:
    """``ldm-eval`` of ``pipeline`` on the ``word_orders`` prompts of `CATEGORIES`; its report's scores."""
    from ldm_pipeline.cli_eval import sampling_flags  # what eval.json leaves out takes the sampling defaults

    eval_config = json.loads((Path(args.config_dir) / "eval.json").read_text())
    run([sys.executable, "-m", "ldm_pipeline.cli_eval", "--model", str(pipeline), "--out", str(out),
         "--categories", *CATEGORIES, "--word_orders", word_orders,
         "--shapes_held_out_orders", str(args.held_out_orders), "--data_seed", "0",
         "--num_images", str(args.num_images), "--seed", str(sampling_seed), *sampling_flags(eval_config)])
    return json.loads((out / "report.json").read_text())["scores"]


def format_table(scores: dict) -> str:
    """``scores[word_orders][seed][category]`` -> one row per category: trained, held out (mean over seeds; the
    seeds' values in brackets) and the difference."""
    lines = ["| category | trained orders | held-out orders | held out - trained |", "|---|---:|---:|---:|"]
    for category in (*CATEGORIES, "overall"):
        cells = {}
        for orders in ("trained", "held_out"):
            values = [by_seed[category] for by_seed in scores[orders].values()]
            cells[orders] = (sum(values) / len(values), values)
        gap = cells["held_out"][0] - cells["trained"][0]
        lines.append(f"| {category} | " + " | ".join(
            f"{mean:.3f} ({' / '.join(f'{v:.3f}' for v in values)})" for mean, values in cells.values())
            + f" | {gap:+.3f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    if not args.skip_training:
        run([sys.executable, str(REPO / "training" / "run_demo.py"), "--config_dir", args.config_dir,
             "--output_dir", str(out), "--seed", str(args.seed), "--skip_existing",
             "--shapes_held_out_orders", str(args.held_out_orders), *args.run_demo_args])
    pipeline = out / "pipeline"
    if not (pipeline / "model_index.json").is_file():
        raise FileNotFoundError(f"{pipeline} holds no pipeline: train it first (run without --skip_training).")
    scores = {orders: {seed: evaluate(args, pipeline, orders, seed, out / "word_order" / f"{orders}_seed{seed}")
                       for seed in args.sampling_seeds}
              for orders in ("trained", "held_out")}
    table = format_table(scores)
    gap = (sum(s["overall"] for s in scores["held_out"].values())
           - sum(s["overall"] for s in scores["trained"].values())) / len(args.sampling_seeds)
    verdict = f"held-out orders {'within' if gap >= -TARGET_GAP else 'NOT within'} {TARGET_GAP} of the trained level"
    print(f"\n{out}: {args.held_out_orders:g} of the orders held out, training seed {args.seed}, "
          f"{args.num_images} images per category and sampling seed\n\n{table}\n\n{verdict} ({gap:+.3f})")
    report = {"settings": {"config_dir": args.config_dir, "seed": args.seed, "held_out_orders": args.held_out_orders,
                           "num_images": args.num_images, "sampling_seeds": args.sampling_seeds},
              "scores": scores, "overall_gap": gap}
    (out / "word_order.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    from ldm_pipeline.errors import run_cli

    run_cli(main, prog="bench_word_order.py")
