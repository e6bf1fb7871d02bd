"""Model cards (``README.md`` in the Hub's format) for a saved pipeline or a stage output, and a Hub upload helper.

    write_model_card("runs/demo/pipeline",
                     stage_dirs={"text_encoder": "runs/demo/text_encoder_stage", "vae": "runs/demo/vae_stage"},
                     eval_report="runs/demo/eval/report.json", sample_grid="runs/demo/samples/grid.png")
    push_to_hub("runs/demo/pipeline", "user/ldm-shapes", token=None, private=False)

The card's YAML metadata comes from ``huggingface_hub.ModelCardData`` (``library_name``, ``pipeline_tag``, ``tags``,
``license``, ``datasets`` for a Hub dataset, ``base_model`` when a stage started from a pretrained model, else the
tag ``trained-from-scratch``). The text: a title naming the model (the Hub repo id, else the output directory's
name, or its parent's for the stage-named folders that ``training/run_demo.py`` writes), a usage snippet that
works for whoever reads it (the Hub repo id, else a ``path/to/pipeline`` placeholder: never a path of the machine
that wrote it), the ``ldm-eval`` scores with their command and settings, a sample grid copied beside the card, and
each stage's training (steps, minutes, held-out metrics, config) read from the files the stages write:
``text_encoder_metrics.json``, ``vae_metrics.json``, ``unet_metrics.json`` and ``train_log.jsonl``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ldm_pipeline.schedulers import SAMPLING_DEFAULTS

STAGES = ("text_encoder", "vae", "unet")
METRICS_FILES = {stage: f"{stage}_metrics.json" for stage in STAGES}
TRAIN_LOG = "train_log.jsonl"
SAMPLES_FILE = "samples.png"
STAGE_TITLES = {"text_encoder": "Text encoder", "vae": "VAE (AutoencoderKL)", "unet": "U-Net (UNet2DConditionModel)"}
MODEL_KINDS = {"pipeline": "text-to-image model", "text_encoder": "text encoder", "vae": "VAE", "unet": "U-Net"}
STAGE_DIR_NAMES = ("pipeline", "text_encoder_stage", "vae_stage")  # training/run_demo.py's output folders
PIPELINE_PLACEHOLDER = "path/to/pipeline"
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


def evaluation_section(report: dict[str, Any], command: str | None = None) -> str:
    """The GenEval-style scores of an ``ldm-eval`` ``report.json``, with the command that made it and its settings."""
    scores = report.get("scores", {})
    lines = ["## Evaluation", "", "GenEval-style scores (`ldm-eval`, each image judged from its pixels):", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += ["| category | score |", "|---|---:|"]
    lines += [f"| {category} | {score:.3f} |" for category, score in scores.items()]
    lines.append("")
    if report.get("num_images"):
        lines.append(f"- images: {report['num_images']}")
    if report.get("fid") is not None:
        lines.append(f"- classifier FID: {report['fid']:.3f}")
    if report.get("inception_fid") is not None:
        lines.append(f"- Inception FID: {report['inception_fid']:.3f}")
    settings = report.get("settings")
    if settings:
        lines.append("- settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()))
    return "\n".join(lines) + "\n"


def samples_section(sample_grid: str | Path, directory: Path, prompts: Sequence[str] = ()) -> str:
    """Copy ``sample_grid`` into ``directory`` as ``samples.png`` and show it, captioned with its ``prompts``
    (one grid row each, as ``ldm-generate`` lays them out)."""
    if not Path(sample_grid).is_file():
        raise FileNotFoundError(f"sample grid {sample_grid}: no such image.")
    shutil.copyfile(sample_grid, directory / SAMPLES_FILE)
    lines = ["## Samples", "", f"![samples]({SAMPLES_FILE})", ""]
    if prompts:
        lines += ["One row per prompt, top to bottom: " + ", ".join(f'"{prompt}"' for prompt in prompts) + ".", ""]
    return "\n".join(lines)


def model_name(directory: Path, hub_model_id: str | None) -> str:
    """The name a card's title gives the model: the Hub repo id, else the output directory's name, or its parent's
    when the directory is one of the stage-named folders of ``training/run_demo.py`` (``runs/demo/pipeline``:
    ``demo``)."""
    if hub_model_id:
        return hub_model_id
    directory = Path(directory).resolve()
    return directory.parent.name if directory.name in STAGE_DIR_NAMES and directory.parent.name else directory.name


def hub_dataset_id(dataset_name: str | None) -> str | None:
    """``dataset_name`` when it names a Hub dataset (a valid repo id that is not a local path), else None."""
    if not dataset_name or Path(dataset_name).expanduser().exists():
        return None
    try:
        validate_repo_id(dataset_name)
    except HFValidationError:
        return None
    return dataset_name


def data_description(dataset_name: str | None, train_data_dir: str | None) -> str:
    """How the card names the training data: a Hub dataset with its link, a local folder by its name only, or the
    built-in shapes data."""
    hub_id = hub_dataset_id(dataset_name)
    if hub_id:
        return f"the Hub dataset [`{hub_id}`](https://huggingface.co/datasets/{hub_id})"
    local = dataset_name or train_data_dir
    if local:
        return f"local data (`{Path(local).name}`)"
    return "the built-in `shapes` dataset"


def usage_section(repo_id: str | None, scheduler_name: str | None) -> str:
    """Loading with plain Diffusers and with the checking loader; ``repo_id`` None shows a placeholder path."""
    where = repo_id or PIPELINE_PLACEHOLDER
    sampler = f"the saved {scheduler_name}, " if scheduler_name else ""
    lines = [
        "## Usage", "", "```python", "# pip install ldm-pipeline", "from diffusers import DiffusionPipeline", "",
        f'pipe = DiffusionPipeline.from_pretrained("{where}")    # a LatentDiffusionPipeline',
        f'image = pipe("a red cat").images[0]    # {sampler}{SAMPLING_DEFAULTS.num_inference_steps} steps, '
        f"guidance {SAMPLING_DEFAULTS.guidance_scale:g}",
        "```", "",
    ]
    if repo_id is None:
        lines += [f"`{PIPELINE_PLACEHOLDER}` stands for the directory that holds this card: put its path there.", ""]
    lines += [
        "Installing `ldm-pipeline` registers `LatentDiffusionPipeline` with Diffusers; no code is run from the model "
        "directory. `from ldm_pipeline import LatentDiffusionPipeline; "
        f'LatentDiffusionPipeline.from_pretrained("{where}")` loads the same pipeline and checks the directory first '
        "(component classes, complete weight files, stages that fit together).", "",
    ]
    return "\n".join(lines)


def saved_scheduler_name(directory: Path) -> str | None:
    """The class of the scheduler saved in the pipeline ``directory`` (``scheduler/scheduler_config.json``)."""
    config = read_json(directory / "scheduler" / "scheduler_config.json")
    return config.get("_class_name") if config else None


def write_model_card(
    directory: str | Path,
    stage_dirs: Mapping[str, str | Path] | None = None,
    *,
    eval_report: str | Path | None = None,
    eval_command: str | None = None,
    sample_grid: str | Path | None = None,
    sample_prompts: Sequence[str] = (),
    base_models: Mapping[str, str] | None = None,
    configs: Mapping[str, str | Path] | None = None,
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    license: str = "apache-2.0",
    tags: Sequence[str] = (),
    hub_model_id: str | None = None,
) -> Path:
    """Write ``directory/README.md`` and return its path.

    ``directory`` is a saved pipeline (it has ``model_index.json``: a text-to-image card) or one stage's output
    (the card of that stage). Each stage's metrics are read from ``stage_dirs[stage]`` or, when not given, from
    ``directory`` itself. ``base_models`` maps a stage to the pretrained model it started from (absent: trained
    from scratch); ``configs`` maps a stage to its config JSON (shown in the card). ``eval_report`` is an
    ``ldm-eval`` ``report.json`` (its GenEval-style scores), ``eval_command`` the command that wrote it;
    ``sample_grid`` an image, copied into ``directory`` as ``samples.png``, with one row per ``sample_prompts``.
    ``dataset_name`` / ``train_data_dir`` are the data flags of the training run: only a Hub dataset goes into the
    ``datasets`` metadata. ``hub_model_id`` (``user/name``) names the model and is what the usage snippet loads.
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
    kind = "pipeline" if is_pipeline else summaries[0]["stage"]
    used_bases = [base_models[s["stage"]] for s in summaries if s["stage"] in base_models]
    hub_dataset = hub_dataset_id(dataset_name)
    card_data = ModelCardData(
        library_name="diffusers" if is_pipeline else STAGE_LIBRARIES[kind],
        pipeline_tag="text-to-image" if is_pipeline else None,
        license=license,
        tags=list(dict.fromkeys(["ldm-pipeline", "latent-diffusion", *(["text-to-image"] if is_pipeline else []),
                                 *([] if used_bases else ["trained-from-scratch"]), *tags])),
        base_model=used_bases or None,
        datasets=[hub_dataset] if hub_dataset else None,
    )

    description = "text-to-image latent diffusion pipeline" if is_pipeline else STAGE_TITLES[kind]
    origin = "starting from " + ", ".join(used_bases) if used_bases else "every stage trained from scratch"
    body = [f"# ldm-pipeline {MODEL_KINDS[kind]}: {model_name(directory, hub_model_id)}", "",
            f"A {description} trained with ldm-pipeline on {data_description(dataset_name, train_data_dir)}, "
            f"{origin}.", ""]
    if is_pipeline:
        body.append(usage_section(hub_model_id, saved_scheduler_name(directory)))
    if eval_report is not None:
        report = read_json(Path(eval_report))
        if report is None:
            raise FileNotFoundError(f"--eval_report {eval_report}: no such file (an ldm-eval report.json).")
        body.append(evaluation_section(report, eval_command))
    if sample_grid is not None:
        body.append(samples_section(sample_grid, directory, sample_prompts))
    if summaries:
        body += ["## Training", ""] + [stage_section(s, base_models.get(s["stage"])) for s in summaries]

    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body))
    path = directory / "README.md"
    card.save(path)
    return path


def create_hub_repo(hub_model_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the model repo ``hub_model_id`` if needed; returns its full id (``user/name``), the one a card's
    usage snippet should load."""
    return HfApi(token=token).create_repo(hub_model_id, private=private, exist_ok=True, repo_type="model").repo_id


def push_to_hub(folder: str | Path, hub_model_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the model repo ``hub_model_id`` (if needed) and upload ``folder`` to it, without training state
    (``checkpoints/``, ``logs/``, caches, snapshots, validation grids). Returns the commit URL."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory: nothing to upload to {hub_model_id}.")
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} has no README.md: call write_model_card({str(folder)!r}) first.")
    repo_id = create_hub_repo(hub_model_id, token=token, private=private)
    commit = HfApi(token=token).upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                              ignore_patterns=HUB_IGNORE_PATTERNS,
                                              commit_message="Upload with ldm-pipeline")
    return str(getattr(commit, "commit_url", commit))
