"""``ldm-serve``: a local generation page for a trained pipeline directory.

    pip install -e .[serve]
    ldm-serve --model runs/demo/pipeline            # then open http://127.0.0.1:7860

The page takes a prompt and a negative prompt, the number of images, the scheduler (``ldm_pipeline.schedulers``),
steps, guidance scale, seed (or "random") and image size, shows a progress bar (and a Cancel button) while
sampling and the images as a grid, each downloadable as a PNG whose text chunks hold its settings. Beside it: the
pipeline's key facts, its model card (``README.md`` in the directory) and its own ``ldm-eval`` report
(``ldm_pipeline.serve_card``).

One pipeline is loaded once and shared by every request; requests wait their turn in a queue (one sampling loop at
a time). A request is cancelled when its client disconnects (the page's Cancel button, a closed tab) or the server
stops (Ctrl+C). The server's rules, so that no other web page can drive it and no request can hold it for long:

- ``POST /api/generate`` takes JSON only (``Content-Type: application/json``, else 415): a cross-site form or
  ``text/plain`` POST cannot start a generation;
- a request whose ``Origin`` header is present and is not the server's own origin is refused (403) unless
  ``--allow_origin`` names it; on a loopback address the ``Host`` header must name this machine (no DNS rebinding);
- the work of one request is capped from the model (``serve_settings.ServeLimits``): images, steps
  (``num_train_timesteps`` and 250 at most) and sizes (multiples of the VAE factor up to twice the U-Net's trained
  size);
- settings are checked before queueing, and errors are worded with the page's labels (``serve_settings.FIELD_LABELS``).

Image ``i`` of a request with seed ``s`` is drawn from ``torch.Generator("cpu").manual_seed(s + i)`` (one generator
per image, as in ``ldm-eval``), so every image's PNG records the seed that makes it again on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import errno
import io
import ipaddress
import json
import logging
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlsplit

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm_pipeline.config import CommandParser
from ldm_pipeline.cli_generate import resolve_device
from ldm_pipeline.errors import error_line, run_cli
from ldm_pipeline.pipeline_latent_diffusion import LatentDiffusionPipeline
from ldm_pipeline.schedulers import SCHEDULERS
from ldm_pipeline.serve_card import side_panel
from ldm_pipeline.serve_settings import (
    ARGUMENT_LABELS,
    MAX_IMAGES,
    MAX_SEED,
    MAX_STEPS,
    SIDE_OVER_TRAINED,
    GenerationSettings,
    ServeLimits,
)

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("serve_static")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
INSTALL_HINT = "ldm-serve needs the serve extra: pip install -e .[serve]"

ProgressCallback = Callable[[dict], None]


class JobCancelled(Exception):
    """A request stopped before its images were made (its client left, or the server is stopping)."""


def page_message(error: BaseException) -> str:
    """The one line of ``error`` for the page, with the pipeline's argument names (```num_inference_steps```)
    replaced by the page's labels (Steps)."""
    message = str(error) if isinstance(error, JobCancelled) else error_line(error)
    return re.sub(r"`(\w+)`", lambda match: ARGUMENT_LABELS.get(match[1], match[0]), message)


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

    ``model`` is what the PNGs record as the model (the directory as given on the command line); ``limits``
    default to :meth:`ServeLimits.for_pipeline`.
    """

    pipe: LatentDiffusionPipeline
    model: str
    limits: ServeLimits | None = None
    _line: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False)
    _jobs: list[threading.Event] = field(default_factory=list, init=False, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def __post_init__(self):
        self.saved_scheduler = self.pipe.scheduler
        self.limits = self.limits or ServeLimits.for_pipeline(self.pipe)
        self.pipe.set_progress_bar_config(disable=True)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) of the pipeline's own images."""
        return self.pipe.default_height_width()

    @property
    def num_jobs(self) -> int:
        """Requests running or waiting."""
        with self._line:
            return len(self._jobs)

    def stop(self) -> None:
        """Cancel the running and waiting requests (each at its next step) and refuse new ones."""
        self._stopping.set()
        with self._line:
            self._line.notify_all()

    def cancel(self, job: threading.Event) -> None:
        """Cancel one request: the ``cancel`` event given to :meth:`generate`."""
        job.set()
        with self._line:
            self._line.notify_all()

    def _check_cancelled(self, job: threading.Event) -> None:
        if self._stopping.is_set():
            raise JobCancelled("The server is stopping: this request was cancelled.")
        if job.is_set():
            raise JobCancelled("Cancelled.")

    def generate(self, settings: GenerationSettings, on_event: ProgressCallback | None = None,
                 cancel: threading.Event | None = None) -> list[GeneratedImage]:
        """Sample ``settings.num_images`` images for ``settings.prompt``.

        ``on_event`` receives ``{"type": "queued", "ahead": n}`` (requests running or waiting before this one;
        again whenever that number falls, down to 0), then ``{"type": "progress", "step": k, "total": n}`` after every
        scheduler step. ``cancel`` (set it through :meth:`cancel`) stops the request while it waits or at its next
        step with :class:`JobCancelled`. Raises ``ValueError`` for settings beyond the limits or that the
        pipeline rejects.
        """
        emit = on_event or (lambda event: None)
        self.limits.check(settings)
        job = cancel or threading.Event()
        with self._line:
            self._check_cancelled(job)
            self._jobs.append(job)
            try:
                ahead = None
                while ahead != 0:
                    if self._jobs.index(job) != ahead:
                        ahead = self._jobs.index(job)
                        emit({"type": "queued", "ahead": ahead})
                    if ahead:
                        self._line.wait()
                        self._check_cancelled(job)
            except BaseException:
                self._jobs.remove(job)
                self._line.notify_all()
                raise
        try:
            self._check_cancelled(job)
            return self._sample(settings, emit, job)
        finally:
            with self._line:
                self._jobs.remove(job)
                self._line.notify_all()

    def _sample(self, settings: GenerationSettings, emit: ProgressCallback,
                job: threading.Event) -> list[GeneratedImage]:
        pipe = self.pipe
        pipe.scheduler = self.saved_scheduler
        if settings.scheduler:
            pipe.set_scheduler(settings.scheduler)
        scheduler_name = settings.scheduler or type(self.saved_scheduler).__name__
        seed = secrets.randbelow(MAX_SEED + 1) if settings.seed is None else settings.seed
        seeds = [seed + index for index in range(settings.num_images)]

        def report_step(pipeline, step_index, timestep, callback_kwargs):
            self._check_cancelled(job)  # raising here leaves the loop at once, before the VAE decodes
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


def model_info(server: ImageServer, model_dir: Path | None) -> dict[str, Any]:
    """What the page needs to build its form and side panel: defaults, limits, offered sizes, scheduler names,
    the model's key facts, model card and evaluation report (HTML)."""
    height, width = server.default_size
    defaults = dataclasses.asdict(GenerationSettings(prompt=""))
    defaults.update(height=height, width=width, seed="random" if defaults["seed"] is None else defaults["seed"],
                    guidance_interval=" ".join(map(str, defaults["guidance_interval"] or ())))
    return {
        "model": server.model,
        "saved_scheduler": type(server.saved_scheduler).__name__,
        "schedulers": list(SCHEDULERS),
        "defaults": defaults,
        "limits": dataclasses.asdict(server.limits),
        "sizes": server.limits.sizes(),
        **side_panel(server.pipe, model_dir, server.model),
    }


# ---------------------------------------------------------------------------------------------- web app


def image_payload(generated: GeneratedImage) -> dict[str, Any]:
    """One image for the page: a PNG data URL (the downloadable file itself, metadata included) and its settings."""
    encoded = base64.b64encode(generated.png_bytes()).decode("ascii")
    return {"src": f"data:image/png;base64,{encoded}", "metadata": generated.metadata,
            "filename": f"ldm_{generated.metadata['seed']}.png"}


def server_sent_event(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"


def request_host(host_header: str) -> str | None:
    """The host name of a ``Host`` header (``[::1]:7860`` -> ``::1``), lower case; None when malformed."""
    try:
        return urlsplit(f"//{host_header}").hostname
    except ValueError:
        return None


class SameOriginGuard:
    """ASGI middleware: refuse (403, one line) a request whose ``Origin`` header is present and is neither the
    server's own origin (the scheme and ``Host`` of the request) nor in ``allowed_origins``; and, when
    ``trusted_hosts`` is given, a request whose ``Host`` names another machine (a DNS-rebinding page whose own
    name resolves to this server)."""

    def __init__(self, app, allowed_origins: Sequence[str] = (), trusted_hosts: Sequence[str] | None = None):
        self.app = app
        self.allowed_origins = {origin.rstrip("/") for origin in allowed_origins}
        self.trusted_hosts = None if trusted_hosts is None else set(trusted_hosts)

    def refusal(self, scope) -> str | None:
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        host_header = headers.get("host", "")
        if self.trusted_hosts is not None and request_host(host_header) not in self.trusted_hosts:
            return (f"Host {host_header!r} refused: this server listens on this machine only; open it as "
                    f"http://127.0.0.1 or http://localhost.")
        origin = headers.get("origin")
        if origin is None or origin in self.allowed_origins or origin == f"{scope['scheme']}://{host_header}":
            return None
        return (f"Cross-origin request from {origin} refused: open the page from this server, or start ldm-serve "
                f"with --allow_origin {origin} to let that site use it.")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (reason := self.refusal(scope)):
            from starlette.responses import JSONResponse

            await JSONResponse({"type": "error", "message": reason}, status_code=403)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(server: ImageServer, model_dir: Path | None = None, *, allowed_origins: Sequence[str] = (),
               trusted_hosts: Sequence[str] | None = None):
    """The Starlette app: ``GET /`` (the page), ``GET /api/info`` and ``POST /api/generate``.

    ``/api/generate`` takes a JSON object of settings (415 for another ``Content-Type``, 400 for a body that is
    not one, 422 with one line for settings the server refuses before queueing); its response is a stream of
    server-sent events: ``queued``, ``progress`` ..., then ``done`` (the images) or ``error`` (one line: the
    message of the exception, never a traceback). A client that disconnects cancels its request. Every route is
    behind :class:`SameOriginGuard`; ``allowed_origins`` also get CORS headers (Starlette's ``CORSMiddleware``).
    """
    try:
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware
        from starlette.responses import FileResponse, JSONResponse, StreamingResponse
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error}).") from error

    info = model_info(server, model_dir)

    def refuse(message: str, status_code: int):
        return JSONResponse({"type": "error", "message": message}, status_code=status_code)

    async def index(request):
        return FileResponse(STATIC_DIR / "index.html")

    async def get_info(request):
        return JSONResponse(info)

    async def generate(request):
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return refuse(f"POST /api/generate takes JSON: send the settings with Content-Type: application/json "
                          f"(got {media_type or 'none'!r}).", 415)
        try:
            form = json.loads(await request.body())
        except ValueError:
            form = None
        if not isinstance(form, dict):
            return refuse("The request body must be a JSON object of settings.", 400)
        try:
            settings = GenerationSettings.from_form(form)
            server.limits.check(settings)
        except ValueError as error:
            return refuse(page_message(error), 422)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict] = asyncio.Queue()
        job = threading.Event()

        def emit(event: dict) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def run() -> None:
            try:
                images = server.generate(settings, emit, job)
                emit({"type": "done", "images": [image_payload(image) for image in images]})
            except Exception as error:  # every failure reaches the page as one line
                if not isinstance(error, (ValueError, JobCancelled)):
                    logger.exception("Generation failed")
                emit({"type": "error", "message": page_message(error)})

        async def cancel_on_disconnect():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            server.cancel(job)

        async def stream():
            watcher = asyncio.create_task(cancel_on_disconnect())
            loop.run_in_executor(None, run)
            try:
                while True:
                    event = await events.get()
                    yield server_sent_event(event)
                    if event["type"] in ("done", "error"):
                        break
            finally:  # also when the response is cancelled because the client left
                watcher.cancel()
                server.cancel(job)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    cors = [Middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                       allow_headers=["Content-Type"])] if allowed_origins else []
    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/info", get_info),
            Route("/api/generate", generate, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        middleware=cors + [Middleware(SameOriginGuard, allowed_origins=allowed_origins,
                                      trusted_hosts=trusted_hosts)],
    )


# ---------------------------------------------------------------------------------------------- serving


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_listener(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` (0: a free port), or one line saying why not: called before the URL is
    printed, so a busy port never shows a URL that belongs to another server."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise ValueError(f"--host {host} is not an address of this machine ({error.strerror}).") from None
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise ValueError(f"Port {port} on {host} is in use (another ldm-serve?): stop that server, or choose "
                             f"another port with --port (e.g. --port {port + 1}).") from None
        if error.errno == errno.EADDRNOTAVAIL:
            raise ValueError(f"--host {host} is not an address of this machine.") from None
        if error.errno == errno.EACCES:
            raise ValueError(f"Port {port} needs administrator rights: choose --port 1024 or above.") from None
        raise
    return listener


def uvicorn_server(app, image_server: ImageServer, announce: bool = True):
    """A ``uvicorn.Server`` for ``app`` whose Ctrl+C (or SIGTERM) cancels the running and waiting requests and,
    with ``announce``, says so; a second Ctrl+C quits at once."""
    import uvicorn

    class StoppingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if announce and not self.should_exit:
                print("ldm-serve: stopping: running and waiting requests are cancelled (Ctrl+C again quits at "
                      "once).", flush=True)
            image_server.stop()
            super().handle_exit(sig, frame)

    return StoppingServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))


@contextlib.contextmanager
def serving_in_thread(app, image_server: ImageServer, host: str = DEFAULT_HOST) -> Iterator[str]:
    """Serve ``app`` from a background thread on a free port of ``host``; yields the URL. Leaving the block
    cancels running requests and stops the server (for tests and the screenshot script)."""
    listener = bind_listener(host, 0)
    server = uvicorn_server(app, image_server, announce=False)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://{host}:{listener.getsockname()[1]}"
    finally:
        server.handle_exit(None, None)
        thread.join(30)
        listener.close()


# ---------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="ldm-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Pipeline directory (LatentDiffusionPipeline.save_pretrained).")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"Address to listen on (default {DEFAULT_HOST}: this machine only).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Port (default {DEFAULT_PORT}).")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: cuda if available).")
    parser.add_argument("--max_images", type=int, default=None,
                        help=f"Most images one request may ask for (default {MAX_IMAGES}).")
    parser.add_argument("--max_steps", type=int, default=None,
                        help=f"Most sampling steps one request may ask for (default {MAX_STEPS}, or the "
                             "scheduler's num_train_timesteps when fewer).")
    parser.add_argument("--max_side", type=int, default=None,
                        help=f"Largest image height or width in pixels (default {SIDE_OVER_TRAINED} times the "
                             "U-Net's trained size, unet.config.sample_size * the VAE factor).")
    parser.add_argument("--allow_origin", action="append", default=[], metavar="ORIGIN",
                        help="Let pages of this origin (e.g. https://tools.example.org) use the server; repeat for "
                             "several. Default: only the server's own page.")
    return parser


def import_uvicorn():
    try:
        import uvicorn
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error}).") from error
    return uvicorn


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import_uvicorn()
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {args.port}.")
    for flag in ("max_images", "max_steps", "max_side"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ValueError(f"--{flag} must be positive, got {getattr(args, flag)}.")
    for origin in args.allow_origin:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"--allow_origin {origin!r} is not an origin: write scheme://host[:port], e.g. "
                             "https://tools.example.org.")
    device = resolve_device(args.device)
    listener = bind_listener(args.host, args.port)
    try:
        model_dir = Path(args.model)
        pipe = LatentDiffusionPipeline.from_pretrained(model_dir).to(device)
        limits = ServeLimits.for_pipeline(pipe, args.max_images, args.max_steps, args.max_side)
        server = ImageServer(pipe, model=args.model, limits=limits)
        app = create_app(server, model_dir if model_dir.is_dir() else None, allowed_origins=args.allow_origin,
                         trusted_hosts=(*LOOPBACK_NAMES, args.host.lower()) if is_loopback(args.host) else None)
        host, port = listener.getsockname()[:2]
        shown_host = f"[{host}]" if ":" in host else host
        print(f"ldm-serve: {args.model} on http://{shown_host}:{port} (Ctrl+C stops)", flush=True)
        run_server(app, server, listener)
    finally:
        listener.close()


def run_server(app, server: ImageServer, listener: socket.socket) -> None:
    """Serve until Ctrl+C, which cancels the running request; then say the server stopped."""
    try:
        uvicorn_server(app, server).run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it handled, once it has shut down
        pass
    print("ldm-serve: stopped.", flush=True)


def cli() -> None:
    """Console entry point: ``main`` with errors as one line (``--verbose`` for the traceback)."""
    run_cli(main, prog="ldm-serve")


if __name__ == "__main__":
    cli()
