"""``ldm-serve``: a local generation page for a trained pipeline directory.

    pip install -e .[serve]
    ldm-serve --model runs/demo/pipeline            # then open http://127.0.0.1:7860

The page takes a prompt and a negative prompt, the number of images, the scheduler (``ldm_pipeline.schedulers``),
steps, guidance scale, seed (or "random") and image size (multiples of the VAE factor), shows a progress bar while
sampling and the images as a grid, each downloadable as a PNG whose tEXt chunks hold its settings. Beside it: the
pipeline's model card (``README.md`` in the directory) and its ``ldm-eval`` report, when there are.

One pipeline is loaded once and shared by every request; requests wait their turn in a queue (one sampling loop at
a time), and settings the pipeline rejects come back to the page as the pipeline's own error message.

Image ``i`` of a request with seed ``s`` is drawn from ``torch.Generator("cpu").manual_seed(s + i)`` (one generator
per image, as in ``ldm-eval``), so every image's PNG records the seed that makes it again on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import math
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm_pipeline.config import CommandParser
from ldm_pipeline.errors import error_line, run_cli
from ldm_pipeline.pipeline_latent_diffusion import LatentDiffusionPipeline
from ldm_pipeline.schedulers import SCHEDULERS

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("serve_static")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_SEED = 2**32 - 1
REPORT_NAMES = ("report.md", "report.json")
INSTALL_HINT = "ldm-serve needs the serve extra: pip install -e .[serve]"

ProgressCallback = Callable[[dict], None]


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class GenerationSettings:
    """What the page sends: ``scheduler`` "" keeps the pipeline's saved scheduler, ``seed`` None draws one,
    ``height``/``width`` None take the pipeline's default size, ``guidance_interval`` None guides every step."""

    prompt: str
    negative_prompt: str = ""
    num_images: int = 1
    scheduler: str = ""
    steps: int = 20
    guidance_scale: float = 5.0
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    guidance_interval: tuple[float, float] | None = None

    @classmethod
    def from_form(cls, form: Mapping[str, Any]) -> "GenerationSettings":
        """Parse the page's fields (strings or numbers); a field that is not a number says which and why.
        Ranges are left to the pipeline, which names the argument it rejects."""
        return cls(
            prompt=str(form.get("prompt", "")),
            negative_prompt=str(form.get("negative_prompt", "") or ""),
            num_images=parse_int(form, "num_images", 1),
            scheduler=str(form.get("scheduler", "") or "").strip(),
            steps=parse_int(form, "steps", cls.steps),
            guidance_scale=parse_float(form, "guidance_scale", cls.guidance_scale),
            seed=parse_seed(form.get("seed")),
            height=parse_int(form, "height", None),
            width=parse_int(form, "width", None),
            guidance_interval=parse_interval(form.get("guidance_interval")),
        )


def parse_number(form: Mapping[str, Any], name: str, default, integer: bool):
    """``form[name]`` as an int (``integer``) or a finite float; ``default`` when it is absent or blank."""
    value = form.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    kind = "a whole number" if integer else "a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind}, got {value!r}.") from None
    if integer and not number.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}.")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return int(number) if integer else number


def parse_int(form: Mapping[str, Any], name: str, default: int | None) -> int | None:
    return parse_number(form, name, default, integer=True)


def parse_float(form: Mapping[str, Any], name: str, default: float) -> float:
    return parse_number(form, name, default, integer=False)


def parse_interval(value: Any) -> tuple[float, float] | None:
    """None for an empty field; otherwise two noise levels ``σ_lo σ_hi`` ("1 inf", "0.3, 5" or a JSON pair).
    Their range is left to the pipeline."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    parts = value.replace(",", " ").split() if isinstance(value, str) else value
    try:
        low, high = (float(part) for part in parts)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two noise levels 'σ_lo σ_hi' (e.g. '1 inf'), or empty to "
                         f"guide every step; got {value!r}.") from None
    return low, high


def parse_seed(value: Any) -> int | None:
    """None for "random" or an empty field; otherwise an integer in [0, 2**32 - 1]."""
    if value is None or str(value).strip().lower() in ("", "random", "-1"):
        return None
    try:
        seed = int(str(value).strip())
    except ValueError:
        raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED} or 'random', got {value!r}.") from None
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be from 0 to {MAX_SEED} (or 'random'), got {seed}.")
    return seed


# ---------------------------------------------------------------------------------------------- images


@dataclass
class GeneratedImage:
    """One image and the settings that made it (``metadata``: the PNG's tEXt chunks)."""

    image: Image.Image
    metadata: dict[str, str]

    def png_bytes(self) -> bytes:
        """The image as PNG with one text chunk per ``metadata`` entry (tEXt; iTXt where not Latin-1)."""
        info = PngInfo()
        for key, value in self.metadata.items():
            info.add_text(key, value)
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()


def image_metadata(settings: GenerationSettings, seed: int, scheduler: str, size: tuple[int, int],
                   model: str) -> dict[str, str]:
    """The PNG text chunks of one image: ``prompt, negative_prompt, seed, steps, guidance_scale, scheduler,
    size`` ("WIDTHxHEIGHT") and ``model``, and ``guidance_interval`` ("σ_lo σ_hi") when one was set."""
    interval = {} if settings.guidance_interval is None else {
        "guidance_interval": " ".join(str(bound) for bound in settings.guidance_interval)}
    return {
        "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt,
        "seed": str(seed),
        "steps": str(settings.steps),
        "guidance_scale": str(settings.guidance_scale),
        "scheduler": scheduler,
        "size": f"{size[0]}x{size[1]}",
        "model": model,
        **interval,
    }


# ---------------------------------------------------------------------------------------------- the shared pipeline


@dataclass(eq=False)
class ImageServer:
    """One pipeline shared by every request; :meth:`generate` runs one request at a time, in arrival order.

    ``model`` is what the PNGs record as the model (the directory as given on the command line).
    """

    pipe: LatentDiffusionPipeline
    model: str
    max_images: int = 8
    max_side: int = 1024
    _line: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False)
    _next_ticket: int = field(default=0, init=False, repr=False)
    _serving: int = field(default=0, init=False, repr=False)

    def __post_init__(self):
        self.saved_scheduler = self.pipe.scheduler
        self.pipe.set_progress_bar_config(disable=True)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) of the pipeline's own images."""
        return self.pipe.default_height_width()

    def check_limits(self, settings: GenerationSettings) -> None:
        """The server's own limits (the pipeline checks everything else)."""
        if settings.num_images > self.max_images:
            raise ValueError(f"num_images is {settings.num_images}; this server makes at most {self.max_images} "
                             "images per request (ldm-serve --max_images).")
        for name in ("height", "width"):
            size = getattr(settings, name)
            if size is not None and size > self.max_side:
                raise ValueError(f"{name} is {size}; this server makes images of at most {self.max_side} px a side "
                                 "(ldm-serve --max_side).")

    def generate(self, settings: GenerationSettings, on_event: ProgressCallback | None = None) -> list[GeneratedImage]:
        """Sample ``settings.num_images`` images for ``settings.prompt``.

        ``on_event`` receives ``{"type": "queued", "ahead": n}`` (requests running or waiting before this one),
        then ``{"type": "progress", "step": k, "total": n}`` after every scheduler step. Raises the pipeline's
        ``ValueError`` for settings it rejects.
        """
        emit = on_event or (lambda event: None)
        self.check_limits(settings)
        with self._line:
            ticket = self._next_ticket
            self._next_ticket += 1
            emit({"type": "queued", "ahead": ticket - self._serving})
            self._line.wait_for(lambda: self._serving == ticket)
        try:
            return self._sample(settings, emit)
        finally:
            with self._line:
                self._serving += 1
                self._line.notify_all()

    def _sample(self, settings: GenerationSettings, emit: ProgressCallback) -> list[GeneratedImage]:
        pipe = self.pipe
        pipe.scheduler = self.saved_scheduler
        if settings.scheduler:
            pipe.set_scheduler(settings.scheduler)
        scheduler_name = settings.scheduler or type(self.saved_scheduler).__name__
        seed = secrets.randbelow(MAX_SEED + 1) if settings.seed is None else settings.seed
        seeds = [seed + index for index in range(max(settings.num_images, 0))]

        def report_step(pipeline, step_index, timestep, callback_kwargs):
            emit({"type": "progress", "step": step_index + 1, "total": pipeline.num_timesteps})
            return {}

        images = pipe(
            prompt=settings.prompt,
            negative_prompt=settings.negative_prompt or None,
            num_images_per_prompt=settings.num_images,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            guidance_interval=settings.guidance_interval,
            height=settings.height,
            width=settings.width,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            callback_on_step_end=report_step,
        ).images
        return [
            GeneratedImage(image, image_metadata(settings, image_seed, scheduler_name, image.size, self.model))
            for image, image_seed in zip(images, seeds)
        ]


# ---------------------------------------------------------------------------------------------- model card and report


def strip_front_matter(markdown: str) -> str:
    """A model card without its YAML front matter (``---`` ... ``---`` at the top, Hub model-card metadata)."""
    if markdown.startswith("---\n"):
        end = markdown.find("\n---", 4)
        if end != -1:
            return markdown[end + 4:].lstrip("\n")
    return markdown


def find_eval_report(model_dir: Path) -> Path | None:
    """The newest ``ldm-eval`` report of the pipeline in ``model_dir``: ``report.md`` (or ``report.json``) in
    ``model_dir`` or a folder under it, else in a folder next to it (``runs/demo/eval`` for ``runs/demo/pipeline``)
    whose ``report.json`` names this pipeline (not ``--real``, ``--vae`` or another U-Net's ``--unet``)."""

    def reports_in(folders):
        found = []
        for folder in folders:
            for name in REPORT_NAMES:
                if (folder / name).is_file():
                    found.append(folder / name)
                    break
        return found

    def evaluates_this_pipeline(report: Path) -> bool:
        json_path = report.with_name("report.json")
        if not json_path.is_file():
            return False
        try:
            report_json = json.loads(json_path.read_text())
        except (OSError, ValueError):
            return False
        return Path(str(report_json.get("model", ""))).name == model_dir.name and not report_json.get("unet")

    def newest(reports):
        return max(reports, key=lambda path: path.stat().st_mtime) if reports else None

    under = reports_in([model_dir] + sorted(p for p in model_dir.iterdir() if p.is_dir()))
    if under:
        return newest(under)
    siblings = sorted(p for p in model_dir.parent.iterdir() if p.is_dir() and p != model_dir)
    return newest([report for report in reports_in(siblings) if evaluates_this_pipeline(report)])


def render_markdown(text: str) -> str:
    """HTML of a Markdown text (CommonMark plus tables; raw HTML in the text is escaped, not rendered)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def model_info(server: ImageServer, model_dir: Path | None) -> dict[str, Any]:
    """What the page shows beside the form: defaults, scheduler names, model card and evaluation report (HTML)."""
    height, width = server.default_size
    info = {
        "model": server.model,
        "saved_scheduler": type(server.saved_scheduler).__name__,
        "schedulers": list(SCHEDULERS),
        "vae_scale_factor": server.pipe.vae_scale_factor,
        "height": height,
        "width": width,
        "max_images": server.max_images,
        "max_side": server.max_side,
        "model_card_html": None,
        "report_html": None,
        "report_path": None,
    }
    if model_dir is None:
        return info
    card = model_dir / "README.md"
    if card.is_file():
        info["model_card_html"] = render_markdown(strip_front_matter(card.read_text(encoding="utf-8")))
    report = find_eval_report(model_dir)
    if report is not None:
        text = report.read_text(encoding="utf-8")
        markdown = text if report.suffix == ".md" else f"```json\n{text}\n```"
        info["report_html"] = render_markdown(markdown)
        info["report_path"] = str(report.relative_to(model_dir.parent))
    return info


# ---------------------------------------------------------------------------------------------- web app


def image_payload(generated: GeneratedImage) -> dict[str, Any]:
    """One image for the page: a PNG data URL (the downloadable file itself, metadata included) and its settings."""
    encoded = base64.b64encode(generated.png_bytes()).decode("ascii")
    return {"src": f"data:image/png;base64,{encoded}", "metadata": generated.metadata,
            "filename": f"ldm_{generated.metadata['seed']}.png"}


def server_sent_event(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"


def create_app(server: ImageServer, model_dir: Path | None = None):
    """The Starlette app: ``GET /`` (the page), ``GET /api/info`` and ``POST /api/generate``, whose response is
    a stream of server-sent events: ``queued``, ``progress`` ..., then ``done`` (the images) or ``error`` (one
    line: the message of the exception, never a traceback)."""
    try:
        from starlette.applications import Starlette
        from starlette.responses import FileResponse, JSONResponse, StreamingResponse
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error}).") from error

    info = model_info(server, model_dir)

    async def index(request):
        return FileResponse(STATIC_DIR / "index.html")

    async def get_info(request):
        return JSONResponse(info)

    async def generate(request):
        try:
            form = await request.json()
        except ValueError:
            form = None
        if not isinstance(form, dict):
            return JSONResponse({"type": "error", "message": "The request body must be a JSON object of settings."},
                                status_code=400)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict] = asyncio.Queue()

        def emit(event: dict) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def run() -> None:
            try:
                images = server.generate(GenerationSettings.from_form(form), emit)
                emit({"type": "done", "images": [image_payload(image) for image in images]})
            except Exception as error:  # every failure reaches the page as one line
                if not isinstance(error, ValueError):
                    logger.exception("Generation failed")
                emit({"type": "error", "message": error_line(error)})

        async def stream():
            worker = loop.run_in_executor(None, run)
            while True:
                event = await events.get()
                yield server_sent_event(event)
                if event["type"] in ("done", "error"):
                    break
            await worker

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    return Starlette(routes=[
        Route("/", index),
        Route("/api/info", get_info),
        Route("/api/generate", generate, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ])


# ---------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="ldm-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Pipeline directory (LatentDiffusionPipeline.save_pretrained).")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"Address to listen on (default {DEFAULT_HOST}: this machine only).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Port (default {DEFAULT_PORT}).")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available).")
    parser.add_argument("--max_images", type=int, default=8, help="Most images one request may ask for.")
    parser.add_argument("--max_side", type=int, default=1024, help="Largest image height or width, in pixels.")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error}).") from error
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {args.port}.")
    for flag in ("max_images", "max_side"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag} must be positive, got {getattr(args, flag)}.")

    model_dir = Path(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = LatentDiffusionPipeline.from_pretrained(model_dir).to(device)
    server = ImageServer(pipe, model=args.model, max_images=args.max_images, max_side=args.max_side)
    app = create_app(server, model_dir if model_dir.is_dir() else None)
    print(f"ldm-serve: {args.model} on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def cli() -> None:
    """Console entry point: ``main`` with errors as one line (``--verbose`` for the traceback)."""
    run_cli(main, prog="ldm-serve")


if __name__ == "__main__":
    cli()
