"""The main job: train the three stages on the built-in `shapes` data (or your own), then generate and evaluate.

    python training/run_demo.py --output_dir runs/demo                       # configs/demo, ~20 min on 2 CPU cores
    python training/run_demo.py --config_dir configs/tiny --output_dir /tmp/t   # the same recipe in a minute
    python training/run_demo.py --train_data_dir my_folder --output_dir runs/mine   # your captioned images
    python training/run_demo.py --config_dir configs/gpu_demo --output_dir runs/gpu_demo   # one GPU, ~3 min

Each stage is its own `accelerate launch` of a script in training/, exactly as a user would run it:

    1. train_text_encoder.py  -> OUT/text_encoder_stage/{text_encoder,tokenizer}
    2. train_vae.py           -> OUT/vae_stage/vae
    3. train_unet.py          -> OUT/pipeline  (a LatentDiffusionPipeline directory)
    4. ldm-eval               -> OUT/eval/{report.json,report.md,grids}
    5. ldm-generate           -> OUT/samples/grid.png for "a red cat" and a dozen other prompts
    6. the pipeline's model card (OUT/pipeline/README.md) with the scores, their command and the sample grid

Sampling in steps 4 and 5 uses ``SAMPLING_DEFAULTS`` (DPM-Solver++, 20 steps, guidance 5) unless the config
directory's ``eval.json`` sets ``scheduler``, ``steps`` or ``guidance_scale``.

Each launch is ``accelerate launch -q --config_file configs/accelerate/single_process.yaml``: one process, no
warning about launch defaults, and a failing stage prints its one error line (exit status 1) without the
launcher's traceback.

The data flags of the training scripts (``--train_data_dir``, ``--dataset_name``, ``--caption_column``, ...) are
passed to every stage. With your own data, every stage holds out the same items (``ldm_pipeline.data.split``: by
default a tenth of the data, at most 200; ``--num_held_out_samples`` to change it), printed before the first stage;
``ldm-eval --text_stage`` judges the images generated for all the held-out captions with the text stage's towers
(the shapes scorer only applies to shapes data) and the sample grid shows a dozen of them.

It ends with a summary (time per stage, retrieval accuracy, PSNR, GenEval-style scores, sample grid path, the CPU
threads each training stage used), printed and written to OUT/summary.json and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ldm_pipeline.cli_eval import sampling_flags
from ldm_pipeline.config import CommandParser, DataConfig, add_dataclass_arguments
from ldm_pipeline.errors import run_cli
from ldm_pipeline.model_card import PIPELINE_PLACEHOLDER, write_model_card

REPO = Path(__file__).resolve().parent.parent
LAUNCH_CONFIG = REPO / "configs" / "accelerate" / "single_process.yaml"

NUM_USER_SAMPLE_PROMPTS = 12
SAMPLE_PROMPTS = [
    "a red cat",
    "a blue cat",
    "a green house",
    "a yellow star",
    "a purple heart",
    "two red cats",
    "three blue stars",
    "a cat and a house",
    "a red cat and a blue house",
    "a cat left of a tree",
    "a car above a star",
    "an orange car",
    "four green balls",
]


GPU_CPU_THREADS = 4
DATA_FIELDS = [field.name for field in dataclasses.fields(DataConfig)]
STAGE_NAMES = {"text_encoder": "text encoder", "vae": "VAE", "unet": "U-Net"}

def parse_args(argv=None):
    parser = CommandParser(prog="run_demo.py", description=__doc__)
    parser.add_argument("--config_dir", default=str(REPO / "configs" / "demo"), help="configs/<size> directory.")
    parser.add_argument("--output_dir", default="runs/demo", help="Where every stage's output goes.")
    parser.add_argument("--text_encoder_config", default=None,
                        help="Default: CONFIG_DIR/text_encoder.json (configs/tiny/text_encoder_t5.json: a T5 one).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every stage, the evaluation and the samples.")
    parser.add_argument("--skip_existing", action="store_true",
                        help="Reuse a stage's output when it is already complete in OUTPUT_DIR.")
    parser.add_argument("--num_cpu_threads_per_process", type=int, default=None,
                        help="CPU threads of each training process (accelerate launch's flag). Default: every core "
                             f"on a CPU; {GPU_CPU_THREADS} with a GPU, where the CPU only feeds the GPU and spinning "
                             "threads beside the one that launches kernels slow it down (measure 1, 4 and all: "
                             "docs/gpu.md).")
    parser.add_argument("--train_args", default="", help='Extra flags for every training stage, after the '
                                                         'configs\' (one string, e.g. "--max_train_steps 3").')
    parser.add_argument("--eval_args", default="", help='Extra flags for ldm-eval (e.g. "--num_images 2 --steps 2").')
    add_dataclass_arguments(parser, DataConfig, "data")
    args = parser.parse_args(argv)
    for name in DATA_FIELDS:
        if not hasattr(args, name):
            setattr(args, name, None)
    return args


def data_flags(args: argparse.Namespace) -> list[str]:
    """The data flags given on the command line (and only those), as arguments for every stage; each stage's
    config fills the rest."""
    flags = []
    for name in DATA_FIELDS:
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def uses_own_data(args: argparse.Namespace) -> bool:
    return args.train_data_dir is not None or args.dataset_name is not None


def user_sample_prompts(eval_dir: Path) -> list[str]:
    """The first ``NUM_USER_SAMPLE_PROMPTS`` distinct held-out captions that ``ldm-eval`` generated for."""
    judgements = json.loads((eval_dir / "judgements.json").read_text())
    return list(dict.fromkeys(j["caption"] for j in judgements))[:NUM_USER_SAMPLE_PROMPTS]


def run(command: list[str], log_path: Path) -> float:
    """Run one stage, streaming its output to the console and to a log file; return its wall time."""
    print(f"\n$ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                   env=stage_environment())
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        returncode = process.wait()
    if returncode != 0:
        raise SystemExit(f"Stage failed (exit {returncode}): {shlex.join(command)}\nSee {log_path}.")
    return time.perf_counter() - start


def stage_environment() -> dict[str, str]:
    """The environment of a stage: this checkout's ``ldm_pipeline`` first on the path, whatever is installed."""
    path = [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def cpu_threads_per_process(requested: int | None) -> int:
    """``requested``, else every core without a GPU and ``GPU_CPU_THREADS`` with one."""
    if requested is not None:
        return requested
    import torch

    return min(GPU_CPU_THREADS, os.cpu_count() or 1) if torch.cuda.is_available() else os.cpu_count() or 1


def accelerate_launch(script: str, threads: int) -> list[str]:
    """``accelerate launch -q --config_file configs/accelerate/single_process.yaml``: one process, the launch
    settings named (no warning about defaults), and a failing script's one error line without the launcher's
    traceback. Precision and compilation come from the stage's config (``mixed_precision``, ``torch_compile``)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file", str(LAUNCH_CONFIG),
            "--num_cpu_threads_per_process", str(threads), str(REPO / "training" / script)]


def held_out_split(args: argparse.Namespace) -> str:
    """The line that says what every stage holds out of the user's data; a dataset too small for the held-out size
    asked is refused here, before any stage starts."""
    from ldm_pipeline.data.datasets import data_split_record
    from ldm_pipeline.data.split import describe_split

    given = {name: getattr(args, name) for name in DATA_FIELDS if getattr(args, name) is not None}
    return describe_split(data_split_record(DataConfig(**given)))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv=None) -> dict:
    args = parse_args(argv)
    config_dir = Path(args.config_dir)
    out = Path(args.output_dir).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    text_config = Path(args.text_encoder_config) if args.text_encoder_config else config_dir / "text_encoder.json"
    eval_config = read_json(config_dir / "eval.json")
    seed = ["--seed", str(args.seed)]
    own_data = uses_own_data(args)
    split = held_out_split(args) if own_data else None
    if split:
        print(f"Held out of every stage and evaluated: {split}", flush=True)
    data = data_flags(args)
    threads = cpu_threads_per_process(args.num_cpu_threads_per_process)
    extra = shlex.split(args.train_args)

    text_dir, vae_dir, pipeline_dir = out / "text_encoder_stage", out / "vae_stage", out / "pipeline"
    eval_dir, samples_dir = out / "eval", out / "samples"
    stages = [
        ("text_encoder", text_dir / "tokenizer" / "tokenizer.json",
         accelerate_launch("train_text_encoder.py", threads) + ["--config", str(text_config), "--output_dir",
                                                                str(text_dir)] + data + seed + extra),
        ("vae", vae_dir / "vae" / "config.json",
         accelerate_launch("train_vae.py", threads) + ["--config", str(config_dir / "vae.json"), "--output_dir",
                                                       str(vae_dir)] + data + seed + extra),
        ("unet", pipeline_dir / "model_index.json",
         accelerate_launch("train_unet.py", threads) + ["--config", str(config_dir / "unet.json"), "--text_encoder",
                                                        str(text_dir), "--vae", str(vae_dir), "--output_dir",
                                                        str(pipeline_dir)] + data + seed + extra),
    ]
    sampling = sampling_flags(eval_config)
    evaluation = [sys.executable, "-m", "ldm_pipeline.cli_eval", "--model", str(pipeline_dir), "--out", str(eval_dir)]
    shapes_evaluation = ["--num_images", str(eval_config.get("num_images", 16))] + sampling + seed
    if own_data:
        evaluation += ["--text_stage", str(text_dir)] + data + sampling + seed
    else:
        evaluation += shapes_evaluation
    stages.append(("evaluation", eval_dir / "report.json", evaluation + shlex.split(args.eval_args)))

    def sample_prompts() -> list[str]:
        """The sample grid's prompts: with own data, held-out captions that ldm-eval generated for."""
        return user_sample_prompts(eval_dir) if own_data else SAMPLE_PROMPTS

    def samples_command() -> list[str]:
        return [sys.executable, "-m", "ldm_pipeline.cli_generate", "--model", str(pipeline_dir),
                *[arg for prompt in sample_prompts() for arg in ("--prompt", prompt)],
                "--num_images", "1", "--grid_scale", "4", "--out", str(samples_dir)] + sampling + seed

    stages.append(("samples", samples_dir / "grid.png", samples_command))

    timings = {}
    for name, done_marker, command in stages:
        if args.skip_existing and done_marker.exists():
            print(f"[{name}] already done: {done_marker}")
            continue
        timings[name] = run(command() if callable(command) else command, logs / f"{name}.log")

    # The card shows the GenEval-style scores of the shapes data (own data is judged by the text stage's towers,
    # in OUT/eval/report.md) and the sample grid.
    write_model_card(pipeline_dir, {"text_encoder": text_dir, "vae": vae_dir},
                     configs={"text_encoder": text_config, "vae": config_dir / "vae.json",
                              "unet": config_dir / "unet.json"},
                     eval_report=None if own_data else eval_dir / "report.json",
                     eval_command=shlex.join(["ldm-eval", "--model", PIPELINE_PLACEHOLDER, "--out", "eval",
                                              *shapes_evaluation]),
                     sample_grid=samples_dir / "grid.png", sample_prompts=sample_prompts(),
                     dataset_name=args.dataset_name, train_data_dir=args.train_data_dir)

    summary = {
        "config_dir": str(config_dir),
        "cpu_threads_per_process": threads,
        "data": args.train_data_dir or args.dataset_name or "built-in shapes",
        "held_out": split,
        "seconds_per_stage": {k: round(v, 1) for k, v in timings.items()},
        "total_minutes": round(sum(timings.values()) / 60, 2),
        "text_encoder": read_json(text_dir / "text_encoder_metrics.json"),
        "vae": read_json(vae_dir / "vae_metrics.json"),
        "evaluation": read_json(eval_dir / "report.json"),
        "threads": stage_threads({"text_encoder": text_dir, "vae": vae_dir, "unet": pipeline_dir}),
        "unet_loop_shares": read_json(pipeline_dir / "unet_metrics.json").get("loop_shares"),
        "sample_grid": str(samples_dir / "grid.png"),
        "pipeline": str(pipeline_dir),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(format_summary(summary))
    print("\n" + format_summary(summary))
    return summary


def stage_threads(stage_dirs: dict[str, Path]) -> dict:
    """The ``threads`` figures (``ldm_pipeline.threads.ThreadGovernor.summary``) of each training stage that
    wrote them in its ``<stage>_metrics.json`` (a stage trained on a GPU has none)."""
    figures = {name: read_json(directory / f"{name}_metrics.json").get("threads") for name, directory in
               stage_dirs.items()}
    return {name: threads for name, threads in figures.items() if threads}


def describe_threads(threads: dict) -> str:
    """``2 (auto, 2 cores)`` for a count that never changed, else ``2 -> 1 (auto, 2 cores; 1-2 threads,
    3 changes; seconds at each: 1: 80, 2: 20)``: the first and last count, the range and the time at each."""
    setting = f"{threads['mode']}, {threads['cores']} cores"
    if not threads["changes"]:
        return f"{threads['initial']} ({setting})"
    seconds = ", ".join(f"{n}: {s:.0f}" for n, s in threads["seconds"].items())
    return (f"{threads['initial']} -> {threads['final']} ({setting}; {threads['min']}-{threads['max']} threads, "
            f"{threads['changes']} changes; seconds at each: {seconds})")


def user_data_summary(report: dict) -> list[str]:
    """The summary lines of a ``ldm-eval --text_stage`` report: alignment, fidelity, memorization."""
    alignment = report["alignment"]
    lines = [f"Held-out captions: {report['num_images']} ({report['num_distinct_captions']} distinct), judged by "
             "the text stage's towers.", "", "| images | cosine to caption | retrieval top-1 | top-5 |",
             "|---|---:|---:|---:|"]
    for name, label in (("generated", "generated"), ("real", "real held-out (ceiling)"),
                        ("shuffled", "shuffled captions (floor)")):
        lines.append(f"| {label} | {alignment[name]['cosine']:.3f} | {alignment[name]['top1']:.3f} | "
                     f"{alignment[name]['top5']:.3f} |")
    fidelity = report["fidelity"]
    lines += ["", f"- image-tower FID {fidelity['fid']:.3f}, precision {fidelity['precision']:.3f}, "
                  f"recall {fidelity['recall']:.3f} (k = {fidelity['k']})"]
    memorization = report.get("memorization")
    if memorization:
        lines.append("- memorization: generations closer to a training image than the held-out "
                     f"{memorization['percentile']:g}th percentile: pixels {memorization['pixels']['share_generated']:.3f}, "
                     f"features {memorization['features']['share_generated']:.3f} (held-out: "
                     f"{memorization['pixels']['share_heldout']:.3f}, {memorization['features']['share_heldout']:.3f})")
    return lines


def format_summary(summary: dict) -> str:
    lines = ["# ldm-pipeline demo summary", ""]
    if summary.get("data", "built-in shapes") != "built-in shapes":
        lines += [f"Data: {summary['data']}", ""]
        if summary.get("held_out"):
            lines += [f"Held out of every stage and evaluated: {summary['held_out']}", ""]
    lines += ["| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in summary["seconds_per_stage"].items()]
    lines += [f"| **total** | **{summary['total_minutes'] * 60:.0f}** ({summary['total_minutes']:.1f} min) |", ""]
    text = summary["text_encoder"]
    if "top1" in text:
        lines.append(f"- text encoder: held-out text-to-image retrieval top-1 {text['top1']:.3f}, top-5 {text['top5']:.3f}")
    elif text:
        lines.append("- text encoder: pretrained, not trained here (no retrieval accuracy)")
    vae = summary["vae"]
    if vae:
        lines.append(f"- VAE: held-out PSNR {vae.get('psnr', float('nan')):.2f} dB, SSIM {vae.get('ssim', float('nan')):.3f}")
    report = summary["evaluation"]
    if report.get("alignment"):
        lines += ["", *user_data_summary(report)]
    elif report:
        scores = report.get("scores", {})
        lines += ["", "| category | score |", "|---|---:|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in scores.items()]
        lines.append("")
        if "classifier_accuracy" in report:
            lines.append(f"- scorer's object classifier, held-out accuracy on real renders: {report['classifier_accuracy']:.3f}")
        if report.get("fid") is not None:
            lines.append(f"- FID in the classifier's feature space: {report['fid']:.3f}")
    threads = summary.get("threads")
    if threads:
        lines += ["", "- CPU threads: " + "; ".join(f"{STAGE_NAMES.get(name, name)} {describe_threads(figures)}"
                                                  for name, figures in threads.items())]
    shares = summary.get("unet_loop_shares")
    if shares:
        lines.append(f"- U-Net loop: the step {shares['step']:.1%}, waiting for data {shares['data']:.1%}, work around "
                     f"the step (EMA, logs, checkpoints, snapshots) {shares['around_the_step']:.1%}")
    lines += ["", f"- sample grid: {summary['sample_grid']}", f"- pipeline: {summary['pipeline']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_cli(main, prog="run_demo.py")
