"""What ``ldm-serve`` shows beside its form: the key facts of the served pipeline, its model card and its own
``ldm-eval`` report.

The facts (model name, resolution, parameters, training steps, evaluation scores) are read from the loaded pipeline
and from files in its directory; the card (``README.md``) and the report are rendered from Markdown with raw HTML
escaped. A report is shown only when it evaluated this directory: its ``report.json`` records the ``--model`` path
that ``ldm-eval`` was given, and that path must lead to the served directory (a report of a same-named folder
elsewhere, of real renders, of VAE reconstructions or of another U-Net's ``--unet`` is not this pipeline's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ldm_pipeline.model_card import read_json, read_train_log

REPORT_NAMES = ("report.md", "report.json")
COMPONENT_TITLES = {"text_encoder": "text encoder", "vae": "VAE", "unet": "U-Net"}


def strip_front_matter(markdown: str) -> str:
    """A model card without its YAML front matter (``---`` ... ``---`` at the top, Hub model-card metadata)."""
    if markdown.startswith("---\n"):
        end = markdown.find("\n---", 4)
        if end != -1:
            return markdown[end + 4:].lstrip("\n")
    return markdown


def card_title(markdown: str) -> str | None:
    """The text of the card's first ``# `` heading, if any."""
    for line in strip_front_matter(markdown).splitlines():
        if line.startswith("# "):
            return line[2:].strip() or None
    return None


def render_markdown(text: str) -> str:
    """HTML of a Markdown text (CommonMark plus tables; raw HTML in the text is escaped, not rendered)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


# ---------------------------------------------------------------------------------------------- the report


def report_evaluates(report_json: Path, model_dir: Path) -> bool:
    """True when ``report_json`` (an ``ldm-eval`` report) evaluated the pipeline in ``model_dir``.

    Its ``model`` is the ``--model`` path as ``ldm-eval`` was given it: absolute, or relative to the directory
    ``ldm-eval`` ran in. A relative path is read from the current directory when it leads to a directory there,
    else from the nearest folder above the report where it does. The report belongs to ``model_dir`` when that
    directory is ``model_dir`` itself and no ``--unet`` replaced the pipeline's U-Net."""
    try:
        report = json.loads(report_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(report, dict) or report.get("unet") or not isinstance(report.get("model"), str):
        return False
    recorded = Path(report["model"])
    bases = [Path()] if recorded.is_absolute() else [Path.cwd(), *report_json.resolve().parents]
    evaluated = next((base / recorded for base in bases if (base / recorded).is_dir()), None)
    return evaluated is not None and os.path.samefile(evaluated, model_dir)


def find_eval_report(model_dir: Path) -> Path | None:
    """The newest ``ldm-eval`` report of the pipeline in ``model_dir``: ``report.md`` (else ``report.json``) in
    ``model_dir``, a folder under it, or a folder next to it (``runs/demo/eval`` for ``runs/demo/pipeline``),
    whose ``report.json`` evaluated this pipeline (:func:`report_evaluates`); reports under ``model_dir`` first."""

    def own_reports(folders):
        found = []
        for folder in folders:
            if report_evaluates(folder / "report.json", model_dir):
                found.append(next(folder / name for name in REPORT_NAMES if (folder / name).is_file()))
        return found

    def newest(reports):
        return max(reports, key=lambda path: path.stat().st_mtime) if reports else None

    under = own_reports([model_dir] + sorted(p for p in model_dir.iterdir() if p.is_dir()))
    if under:
        return newest(under)
    return newest(own_reports(sorted(p for p in model_dir.parent.iterdir() if p.is_dir() and p != model_dir)))


# ---------------------------------------------------------------------------------------------- key facts


def format_count(count: int) -> str:
    """``1.75 M``, ``24.6 k``, ``812``: a parameter count to three significant figures."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return str(count)


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters of each component the pipeline has (``text_encoder``, ``vae``, ``unet``)."""
    return {name: sum(p.numel() for p in component.parameters())
            for name in COMPONENT_TITLES if (component := getattr(pipe, name, None)) is not None}


def unet_training_steps(model_dir: Path) -> int | None:
    """The U-Net's optimizer steps: ``train_steps`` of ``unet_metrics.json``, else the last ``train_log.jsonl``
    step; None when the directory has neither."""
    metrics = read_json(model_dir / "unet_metrics.json") or {}
    if isinstance(metrics.get("train_steps"), int):
        return metrics["train_steps"]
    log = read_train_log(model_dir / "train_log.jsonl")
    return log[-1].get("step") if log else None


def score_facts(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline figures of an ``ldm-eval`` report: GenEval-style scores and FID (built-in prompts), or
    caption alignment and FID (``--text_stage``, the user's own data)."""
    facts = []
    scores = report.get("scores")
    if isinstance(scores, dict) and "overall" in scores:
        facts.append(("GenEval-style overall", f"{scores['overall']:.3f}"))
        facts.append(("Categories", " · ".join(f"{name} {score:.3f}" for name, score in scores.items()
                                               if name != "overall")))
    generated = (report.get("alignment") or {}).get("generated")
    if isinstance(generated, dict):
        facts.append(("Caption alignment", f"cosine {generated['cosine']:.3f}, retrieval top-1 "
                                           f"{generated['top1']:.3f}"))
    fid = report.get("fid", (report.get("fidelity") or {}).get("fid"))
    if isinstance(fid, (int, float)):
        facts.append(("FID", f"{fid:.3f}"))
    return facts


def model_facts(pipe, model_dir: Path | None, fallback_name: str, report_json: Path | None) -> list[tuple[str, str]]:
    """(label, value) rows for the side panel: name (the card's title, else the directory name), resolution,
    parameters, U-Net training steps, and the scores of the pipeline's own report when there is one."""
    card = model_dir / "README.md" if model_dir is not None else None
    name = card_title(card.read_text(encoding="utf-8")) if card is not None and card.is_file() else None
    height, width = pipe.default_height_width()
    counts = parameter_counts(pipe)
    facts = [
        ("Name", name or (model_dir.name if model_dir is not None else fallback_name)),
        ("Resolution", f"{width}×{height} px"),
        ("Parameters", f"{format_count(sum(counts.values()))} (" + ", ".join(
            f"{COMPONENT_TITLES[component]} {format_count(count)}" for component, count in counts.items()) + ")"),
    ]
    steps = unet_training_steps(model_dir) if model_dir is not None else None
    if steps is not None:
        facts.append(("U-Net training", f"{steps:,} steps"))
    if report_json is not None and report_json.is_file():
        try:
            facts += score_facts(read_json(report_json))
        except (TypeError, ValueError, KeyError):  # a report of another format: its page section still shows it
            pass
    return facts


def side_panel(pipe, model_dir: Path | None, fallback_name: str) -> dict[str, Any]:
    """``facts`` (label, value pairs), ``model_card_html``, ``report_html`` and ``report_path`` (relative to the
    pipeline directory's parent) for the page; the HTML entries are None where there is nothing to show."""
    panel = {"model_card_html": None, "report_html": None, "report_path": None}
    report = find_eval_report(model_dir) if model_dir is not None else None
    panel["facts"] = model_facts(pipe, model_dir, fallback_name, report.with_name("report.json") if report else None)
    if model_dir is not None and (model_dir / "README.md").is_file():
        card = (model_dir / "README.md").read_text(encoding="utf-8")
        panel["model_card_html"] = render_markdown(strip_front_matter(card))
    if report is not None:
        text = report.read_text(encoding="utf-8")
        panel["report_html"] = render_markdown(text if report.suffix == ".md" else f"```json\n{text}\n```")
        panel["report_path"] = str(report.relative_to(model_dir.parent))
    return panel
