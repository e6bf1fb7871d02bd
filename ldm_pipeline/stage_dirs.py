"""What a stage output directory holds, so that one passed to the wrong flag is named as such.

    check_stage_dirs({"--text_encoder": ("text_encoder", "runs/vae"), "--vae": ("vae", "runs/te")})
    # ValueError: --text_encoder runs/vae holds a VAE stage output (vae/), which belongs to --vae; --vae runs/te
    # holds a text stage output (text_encoder/, tokenizer/), which belongs to --text_encoder. Swap them.

Without it, a VAE directory read as a text encoder fails deep in ``transformers`` ("Should have a model_type key").
Only ``config.json`` files are read; nothing in the directory is executed.
"""

from __future__ import annotations

import json
from pathlib import Path

KIND_FLAGS = {"text_encoder": "--text_encoder", "vae": "--vae"}


def stage_dir_contents(directory: Path) -> tuple[str, str | None]:
    """``(description, kind)`` of a local directory: kind ``"text_encoder"`` or ``"vae"`` for a stage output or a
    model of that kind, ``"pipeline"`` for a pipeline (it holds both), None for anything else."""
    if (directory / "model_index.json").is_file():
        return "a pipeline (model_index.json)", "pipeline"
    if (directory / "text_encoder").is_dir() and (directory / "tokenizer").is_dir():
        return "a text stage output (text_encoder/, tokenizer/)", "text_encoder"
    if (directory / "vae" / "config.json").is_file():
        return "a VAE stage output (vae/)", "vae"
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else None
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and config.get("_class_name") == "AutoencoderKL":
        return "a VAE (an AutoencoderKL config.json)", "vae"
    if isinstance(config, dict) and config.get("model_type"):
        return f"a {config['model_type']} model (config.json)", "text_encoder"
    if isinstance(config, dict) and config.get("_class_name"):
        return f"a {config['_class_name']} (config.json)", None
    return "no text_encoder/ and tokenizer/, vae/, model_index.json or config.json", None


def check_stage_dirs(dirs: dict[str, tuple[str, str | Path | None]]) -> None:
    """``{flag: (expected kind, path)}``: a local directory that holds another stage's output is a ValueError saying
    what it holds and which flag it belongs to (both, when two were swapped). Hub names and missing paths are left
    to the loaders."""
    wrong, flags_by_kind = [], {kind: flag for flag, (kind, _) in dirs.items()}
    for flag, (kind, path) in dirs.items():
        if path is None or not Path(path).is_dir():
            continue
        description, holds = stage_dir_contents(Path(path))
        if holds in (kind, "pipeline"):
            continue
        if holds in KIND_FLAGS:
            wrong.append(f"{flag} {path} holds {description}, which belongs to "
                         f"{flags_by_kind.get(holds, KIND_FLAGS[holds])}")
        else:
            wrong.append(f"{flag} {path} holds {description}: pass the {kind.replace('_', ' ')} stage's output "
                         "directory")
    if wrong:
        advice = " Swap them." if len(wrong) == 2 and all("belongs to" in w for w in wrong) else ""
        raise ValueError("; ".join(wrong) + "." + advice)
