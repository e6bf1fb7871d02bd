"""Does the in-domain prompt-alignment score rank U-Net snapshots as the GenEval-style score does?

    python benchmarks/alignment_vs_geneval.py --run runs/demo [--num_images 8] [--num_captions 96]

For every U-Net snapshot of a main-job run (``pipeline/snapshots/step-N``, then the final pipeline; see
``benchmarks/time_to_quality.py``) it computes the GenEval-style overall score (``ldm-eval``, ``--num_images`` per
category) and the stage-1 prompt alignment of ``ldm-eval --text_stage`` (mean cosine and caption retrieval top-1
of images generated for ``--num_captions`` held-out shapes captions, judged by ``OUT/text_encoder_stage``). It
prints both per snapshot and their Spearman rank correlations (``scipy.stats.spearmanr``), and writes the rows
as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from scipy.stats import spearmanr

from ldm_pipeline.cli_eval import build_parser as eval_parser
from ldm_pipeline.cli_eval import evaluate, sampling_flags

from time_to_quality import snapshot_points  # noqa: E402  (benchmarks/ is the script's directory)

ALIGNMENT_KEYS = ("cosine", "top1")


def rank_correlations(rows: list[dict]) -> dict[str, float]:
    """Spearman's ρ between the GenEval overall score and each alignment figure across snapshots."""
    if len(rows) < 3:
        raise ValueError(f"A rank correlation needs at least 3 snapshots, got {len(rows)}: train with "
                         "--snapshot_steps to keep more.")
    overall = [row["geneval_overall"] for row in rows]
    return {key: float(spearmanr(overall, [row["alignment"][key] for row in rows]).statistic) for key in ALIGNMENT_KEYS}


def eval_arguments(run: Path, out: Path, unet_dir: Path | None, eval_config: dict, seed: int) -> list[str]:
    """The ``ldm-eval`` arguments shared by both scores: the run's pipeline, the snapshot's U-Net, its sampler."""
    arguments = ["--model", str(run / "pipeline"), "--out", str(out), "--seed", str(seed),
                 *sampling_flags(eval_config)]
    return arguments + (["--unet", str(unet_dir)] if unet_dir is not None else [])


def alignment_arguments(run: Path, config_dir: Path, num_captions: int) -> list[str]:
    """``--text_stage`` and the shapes data flags of the run's U-Net config (its held-out captions)."""
    data = json.loads((config_dir / "unet.json").read_text())["data"]
    return ["--text_stage", str(run / "text_encoder_stage"), "--num_train_samples", str(data["num_train_samples"]),
            "--num_validation_samples", str(max(num_captions, data.get("num_validation_samples", 0))),
            "--num_images", str(num_captions), "--max_train_images", "1"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="Output dir of training/run_demo.py.")
    parser.add_argument("--num_images", type=int, default=8, help="GenEval images per category for each point.")
    parser.add_argument("--num_captions", type=int, default=96, help="Held-out captions for the alignment score.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/alignment_vs_geneval.json")
    args = parser.parse_args(argv)
    run = Path(args.run)
    config_dir = Path(json.loads((run / "summary.json").read_text())["config_dir"])
    eval_config = json.loads((config_dir / "eval.json").read_text())

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for step, unet_dir in snapshot_points(run):
            common = eval_arguments(run, Path(scratch) / f"geneval-{step}", unet_dir, eval_config, args.seed)
            geneval = evaluate(eval_parser().parse_args(common + ["--num_images", str(args.num_images)]))
            common = eval_arguments(run, Path(scratch) / f"alignment-{step}", unet_dir, eval_config, args.seed)
            aligned = evaluate(eval_parser().parse_args(common + alignment_arguments(run, config_dir, args.num_captions)))
            row = {"step": step, "geneval_overall": geneval["scores"]["overall"],
                   "alignment": aligned["alignment"]["generated"], "alignment_ceiling": aligned["alignment"]["real"]}
            rows.append(row)
            print(f"step {step:5d}  GenEval overall {row['geneval_overall']:.3f}  alignment cosine "
                  f"{row['alignment']['cosine']:.3f}  top-1 {row['alignment']['top1']:.3f}", flush=True)

    correlations = rank_correlations(rows)
    print("Spearman rank correlation with the GenEval overall score: "
          + ", ".join(f"{key} {value:.3f}" for key, value in correlations.items()))
    result = {"rows": rows, "spearman": correlations}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    from ldm_pipeline.errors import run_cli

    run_cli(main, prog="alignment_vs_geneval.py")
