"""Model cards (``README.md`` in the Hub's format) for a saved pipeline or a stage output, and a Hub upload helper.

    write_model_card("runs/demo/pipeline",
                     stage_dirs={"text_encoder": "runs/demo/text_encoder_stage", "vae": "runs/demo/vae_stage"},
                     eval_report="runs/demo/eval/report.json", sample_grid="runs/demo/samples/grid.png")
    push_to_hub("runs/demo/pipeline", "user/ldm-shapes", token=None, private=False)

The card's YAML metadata comes from ``huggingface_hub.ModelCardData`` (``library_name``, ``pipeline_tag``, ``tags``,
``license``, ``base_model`` when a stage started from a pretrained model, else the tag ``trained-from-scratch``); the
text lists each stage's training (steps, minutes, held-out metrics, config) read from the files the stages write:
``text_encoder_metrics.json``, ``vae_metrics.json``, ``unet_metrics.json`` and ``train_log.jsonl``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from huggingface_hub import HfApi, ModelCard, ModelCardData

STAGES = ("text_encoder", "vae", "unet")
METRICS_FILES = {stage: f"{stage}_metrics.json" for stage in STAGES}
TRAIN_LOG = "train_log.jsonl"
SAMPLES_FILE = "samples.png"
STAGE_TITLES = {"text_encoder": "Text encoder", "vae": "VAE (AutoencoderKL)", "unet": "U-Net (UNet2DConditionModel)"}
STAGE_LIBRARIES = {"text_encoder": "transformers", "vae": "diffusers", "unet": "diffusers"}
METRIC_NAMES = {
    "top1": "held-out text-to-image retrieval top-1",
    "top5": "held-out text-to-image retrieval top-5",
    "num_pairs": "held-out pairs",
    "psnr": "held-out PSNR (dB)",
    "ssim": "held-out SSIM",
    "scaling_factor": "latent scaling factor",
    "latent_shape": "latent shape",
    "resolution": "resolution (px)",
    "images_per_second": "training images per second",
    "prediction_type": "prediction type",
    "num_parameters": "parameters",
    "architecture": "architecture",
    "pretrained_text_encoder": "copied from",
}
HUB_IGNORE_PATTERNS = ["checkpoints/*", "logs/*", "cache/*", "snapshots/*", "validation/*", "*.lock"]


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl`` (``{step, loss, lr, elapsed_s}`` per line); [] when absent."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_summary(stage: str, directory: Path, config: str | Path | None = None) -> dict[str, Any] | None:
    """What ``stage`` wrote in ``directory``: its metrics, the last ``train_log.jsonl`` record and the config, or
    None when the directory holds no metrics file of that stage."""
    metrics = read_json(directory / METRICS_FILES[stage])
    if metrics is None:
        return None
    log = read_train_log(directory / TRAIN_LOG) if stage == "unet" else []
    seconds = metrics.get("train_seconds_this_run")
    if seconds is None and log:
        seconds = log[-1].get("elapsed_s")
    return {
        "stage": stage,
        "metrics": metrics,
        "steps": metrics.get("train_steps", log[-1]["step"] if log else None),
        "minutes": round(seconds / 60, 1) if seconds is not None else None,
        "final_loss": log[-1].get("loss") if log else None,
        "config": read_json(Path(config)) if config else None,
        "config_path": str(config) if config else None,
    }


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def stage_section(summary: dict[str, Any], base_model: str | None) -> str:
    lines = [f"### {STAGE_TITLES[summary['stage']]}", ""]
    origin = f"started from `{base_model}`" if base_model else "trained from scratch"
    trained = [origin]
    if summary["steps"] is not None:
        trained.append(f"{format_value(summary['steps'])} steps")
    if summary["minutes"] is not None:
        trained.append(f"{summary['minutes']} minutes")
    if summary["final_loss"] is not None:
        trained.append(f"final training loss {format_value(summary['final_loss'])}")
    lines += ["- " + ", ".join(trained), ""]
    shown = [(METRIC_NAMES[key], value) for key, value in summary["metrics"].items() if key in METRIC_NAMES]
    if shown:
        lines += ["| | |", "|---|---|"] + [f"| {name} | {format_value(value)} |" for name, value in shown] + [""]
    if summary["config"] is not None:
        lines += [f"Config (`{Path(summary['config_path']).name}`):", "", "```json",
                  json.dumps(summary["config"], indent=2), "```", ""]
    return "\n".join(lines)


def evaluation_section(report: dict[str, Any]) -> str:
    scores = report.get("scores", {})
    lines = ["## Evaluation", "", "GenEval-style scores (`ldm-eval`, each image judged from its pixels):", "",
             "| category | score |", "|---|---:|"]
    lines += [f"| {category} | {score:.3f} |" for category, score in scores.items()]
    lines.append("")
    if report.get("fid") is not None:
        lines.append(f"- classifier FID: {report['fid']:.3f}")
    if report.get("inception_fid") is not None:
        lines.append(f"- Inception FID: {report['inception_fid']:.3f}")
    settings = report.get("settings")
    if settings:
        lines.append("- settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()))
    return "\n".join(lines) + "\n"


def display_path(directory: Path) -> str:
    """``directory`` relative to the working directory when it lies below it (a card should not carry the
    absolute path of the machine it was written on), else as given."""
    try:
        return str(Path(directory).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(directory)


def usage_section(repo_or_path: str) -> str:
    return "\n".join([
        "## Usage", "", "```python", "from ldm_pipeline import LatentDiffusionPipeline", "",
        f'pipe = LatentDiffusionPipeline.from_pretrained("{repo_or_path}")',
        'image = pipe("a red cat", num_inference_steps=20, guidance_scale=5.0).images[0]', "```", "",
        "Loading runs no code from the model directory; `pip install ldm-pipeline` provides the class.", "",
    ])


def write_model_card(
    directory: str | Path,
    stage_dirs: Mapping[str, str | Path] | None = None,
    *,
    eval_report: str | Path | None = None,
    sample_grid: str | Path | None = None,
    base_models: Mapping[str, str] | None = None,
    configs: Mapping[str, str | Path] | None = None,
    dataset_name: str = "shapes",
    license: str = "apache-2.0",
    tags: Sequence[str] = (),
    hub_model_id: str | None = None,
) -> Path:
    """Write ``directory/README.md`` and return its path.

    ``directory`` is a saved pipeline (it has ``model_index.json``: a text-to-image card) or one stage's output
    (the card of that stage). Each stage's metrics are read from ``stage_dirs[stage]`` or, when not given, from
    ``directory`` itself. ``base_models`` maps a stage to the pretrained model it started from (absent: trained
    from scratch); ``configs`` maps a stage to its config JSON (shown in the card). ``eval_report`` is an
    ``ldm-eval`` ``report.json``; ``sample_grid`` an image, copied into ``directory`` as ``samples.png``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: pass a saved pipeline or a stage's --output_dir.")
    stage_dirs = {stage: Path(path) for stage, path in (stage_dirs or {}).items()}
    base_models, configs = dict(base_models or {}), dict(configs or {})
    summaries = [summary for stage in STAGES
                 if (summary := stage_summary(stage, stage_dirs.get(stage, directory), configs.get(stage)))]
    is_pipeline = (directory / "model_index.json").is_file()
    if not is_pipeline and not summaries:
        raise FileNotFoundError(
            f"{directory} holds neither model_index.json nor a stage metrics file ({', '.join(METRICS_FILES.values())}):"
            " pass a saved pipeline or a stage's --output_dir."
        )
    library = "diffusers" if is_pipeline else STAGE_LIBRARIES[summaries[0]["stage"]]
    used_bases = [base_models[s["stage"]] for s in summaries if s["stage"] in base_models]
    card_data = ModelCardData(
        library_name=library,
        pipeline_tag="text-to-image" if is_pipeline else None,
        license=license,
        tags=list(dict.fromkeys(["ldm-pipeline", "latent-diffusion", *(["text-to-image"] if is_pipeline else []),
                                 *([] if used_bases else ["trained-from-scratch"]), *tags])),
        base_model=used_bases or None,
        datasets=[dataset_name] if "/" in dataset_name else None,
    )

    title = hub_model_id or directory.name
    kind = "text-to-image latent diffusion pipeline" if is_pipeline else STAGE_TITLES[summaries[0]["stage"]]
    body = [f"# {title}", "",
            f"A {kind} trained with ldm-pipeline on the `{dataset_name}` dataset, "
            + ("every stage trained from scratch." if not used_bases else "starting from " + ", ".join(used_bases) + "."),
            ""]
    if is_pipeline:
        body.append(usage_section(hub_model_id or display_path(directory)))
    if summaries:
        body += ["## Training", ""] + [stage_section(s, base_models.get(s["stage"])) for s in summaries]
    if eval_report is not None:
        report = read_json(Path(eval_report))
        if report is None:
            raise FileNotFoundError(f"--eval_report {eval_report}: no such file (an ldm-eval report.json).")
        body.append(evaluation_section(report))
    if sample_grid is not None:
        if not Path(sample_grid).is_file():
            raise FileNotFoundError(f"sample grid {sample_grid}: no such image.")
        shutil.copyfile(sample_grid, directory / SAMPLES_FILE)
        body += ["## Samples", "", f"![samples]({SAMPLES_FILE})", ""]

    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body))
    path = directory / "README.md"
    card.save(path)
    return path


def push_to_hub(folder: str | Path, hub_model_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the model repo ``hub_model_id`` (if needed) and upload ``folder`` to it, without training state
    (``checkpoints/``, ``logs/``, caches, snapshots, validation grids). Returns the commit URL."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory: nothing to upload to {hub_model_id}.")
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} has no README.md: call write_model_card({str(folder)!r}) first.")
    api = HfApi(token=token)
    repo_id = api.create_repo(hub_model_id, private=private, exist_ok=True, repo_type="model").repo_id
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                               ignore_patterns=HUB_IGNORE_PATTERNS, commit_message="Upload with ldm-pipeline")
    return str(getattr(commit, "commit_url", commit))
