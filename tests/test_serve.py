"""ldm-serve: the request handler against direct pipeline calls, PNG metadata, the queue, error messages, the model
card and evaluation report, the command line, and the page end to end in a headless Chromium (skipped where
none is installed)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.errors import run_cli
from ldm_pipeline.schedulers import SCHEDULERS
from ldm_pipeline.serve import (
    DEFAULT_HOST,
    GenerationSettings,
    ImageServer,
    create_app,
    find_eval_report,
    main as serve_main,
)

from conftest import make_tiny_pipeline

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SIZE_ERROR = "`width`=15 must be a positive multiple of 2"


@pytest.fixture(scope="module")
def server():
    return ImageServer(make_tiny_pipeline(), model="tiny")


def direct_images(pipe, seeds, scheduler=None, **kwargs) -> np.ndarray:
    """[N, H, W, 3] uint8 of one direct pipeline call with one CPU generator per image."""
    if scheduler:
        pipe.set_scheduler(scheduler)
    images = pipe(num_images_per_prompt=len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
                  **kwargs).images
    return np.stack([np.asarray(image) for image in images])


def pixels(generated) -> np.ndarray:
    return np.stack([np.asarray(g.image) for g in generated])


def read_events(response) -> list[dict]:
    return [json.loads(block[len("data: "):]) for block in response.text.split("\n\n") if block.startswith("data: ")]


# ---------------------------------------------------------------------------------------------- the handler


def test_images_equal_a_direct_pipeline_call_with_the_same_seeds(server):
    settings = GenerationSettings(prompt="a red cat", negative_prompt="blue", num_images=3, scheduler="euler",
                                  steps=4, guidance_scale=3.0, seed=7, height=12, width=20)
    generated = server.generate(settings)
    expected = direct_images(make_tiny_pipeline(), [7, 8, 9], "euler", prompt="a red cat", negative_prompt="blue",
                             num_inference_steps=4, guidance_scale=3.0, height=12, width=20)
    np.testing.assert_array_equal(pixels(generated), expected)
    assert generated[0].image.size == (20, 12)
    assert pixels(generated).std() > 0

    # image i alone: its recorded seed and num_images 1 make it again (batched arithmetic may differ by one level)
    alone = direct_images(make_tiny_pipeline(), [int(generated[1].metadata["seed"])], "euler", prompt="a red cat",
                          negative_prompt="blue", num_inference_steps=4, guidance_scale=3.0, height=12, width=20)
    assert np.abs(alone[0].astype(int) - expected[1].astype(int)).max() <= 1


def test_saved_scheduler_and_default_size_are_used_when_not_chosen(server):
    server.generate(GenerationSettings(prompt="a cat", scheduler="ddpm", steps=2, seed=0))
    generated = server.generate(GenerationSettings(prompt="two stars", steps=3, guidance_scale=1.0, seed=11))
    assert type(server.pipe.scheduler).__name__ == "DDIMScheduler"
    expected = direct_images(make_tiny_pipeline(), [11], prompt="two stars", num_inference_steps=3, guidance_scale=1.0)
    np.testing.assert_array_equal(pixels(generated), expected)
    assert generated[0].metadata["scheduler"] == "DDIMScheduler"
    assert generated[0].metadata["size"] == "16x16"


def test_random_seed_is_recorded_and_makes_the_same_image_again(server):
    first = server.generate(GenerationSettings(prompt="a box", steps=2, seed=None))
    seed = int(first[0].metadata["seed"])
    again = server.generate(GenerationSettings.from_form({"prompt": "a box", "steps": "2", "seed": str(seed)}))
    np.testing.assert_array_equal(pixels(first), pixels(again))


def test_png_metadata_round_trips_as_text_chunks(server):
    settings = GenerationSettings(prompt="a red cat left of a tree", negative_prompt="blue ✗", num_images=2,
                                  scheduler="dpm++", steps=3, guidance_scale=4.5, seed=123, height=16, width=8)
    generated = server.generate(settings)
    for index, image in enumerate(generated):
        data = image.png_bytes()
        decoded = Image.open(io.BytesIO(data))
        assert decoded.text == {
            "prompt": "a red cat left of a tree", "negative_prompt": "blue ✗", "seed": str(123 + index),
            "steps": "3", "guidance_scale": "4.5", "scheduler": "dpm++", "size": "8x16", "model": "tiny",
        }
        np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), np.asarray(image.image))
        assert b"tEXtprompt\x00a red cat left of a tree" in data
        assert b"iTXtnegative_prompt" in data  # not Latin-1: PNG's international text chunk


def test_requests_wait_their_turn_in_arrival_order(server):
    events: list[tuple[str, dict]] = []
    queued = {name: threading.Event() for name in ("first", "second", "third")}
    first_started = threading.Event()

    def record(name):
        def on_event(event):
            events.append((name, event))
            queued[name].set()
            if name == "first" and event["type"] == "progress":
                first_started.set()
                time.sleep(0.05)  # give the others every chance to run alongside
        return on_event

    def request(name, steps):
        thread = threading.Thread(target=server.generate,
                                  args=(GenerationSettings("a cat", steps=steps, seed=1), record(name)))
        thread.start()
        assert queued[name].wait(30)
        return thread

    threads = [request("first", 4)]
    assert first_started.wait(30)
    threads += [request("second", 2), request("third", 3)]
    for thread in threads:
        thread.join(60)

    order = [name for name, event in events if event["type"] == "progress"]
    assert order == ["first"] * 4 + ["second"] * 2 + ["third"] * 3
    assert [event["ahead"] for _, event in events if event["type"] == "queued"] == [0, 1, 2]


def test_guidance_interval_reaches_the_pipeline_and_the_png(server):
    settings = GenerationSettings.from_form({"prompt": "a red cat", "steps": "4", "guidance_scale": "3",
                                             "seed": "5", "scheduler": "euler", "guidance_interval": "0.5, inf"})
    assert settings.guidance_interval == (0.5, float("inf"))
    generated = server.generate(settings)
    expected = direct_images(make_tiny_pipeline(), [5], "euler", prompt="a red cat", num_inference_steps=4,
                             guidance_scale=3.0, guidance_interval=(0.5, float("inf")))
    every_step = direct_images(make_tiny_pipeline(), [5], "euler", prompt="a red cat", num_inference_steps=4,
                               guidance_scale=3.0)
    np.testing.assert_array_equal(pixels(generated), expected)
    assert not np.array_equal(expected, every_step)
    assert generated[0].metadata["guidance_interval"] == "0.5 inf"
    assert Image.open(io.BytesIO(generated[0].png_bytes())).text["guidance_interval"] == "0.5 inf"
    assert GenerationSettings.from_form({"prompt": "a cat", "guidance_interval": [1, "inf"]}).guidance_interval \
        == (1.0, float("inf"))
    assert GenerationSettings.from_form({"prompt": "a cat", "guidance_interval": " "}).guidance_interval is None
    for bad in ("1", "1 2 3", "low high", 7):
        with pytest.raises(ValueError, match="guidance_interval must be two noise levels"):
            GenerationSettings.from_form({"prompt": "a cat", "guidance_interval": bad})


def test_settings_that_are_not_numbers_name_the_field():
    with pytest.raises(ValueError, match="steps must be a whole number, got 'ten'"):
        GenerationSettings.from_form({"prompt": "a cat", "steps": "ten"})
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        GenerationSettings.from_form({"prompt": "a cat", "guidance_scale": "nan"})
    with pytest.raises(ValueError, match="seed must be from 0 to"):
        GenerationSettings.from_form({"prompt": "a cat", "seed": "-5"})
    assert GenerationSettings.from_form({"prompt": "a cat", "seed": "Random", "width": "", "num_images": "2"}) == \
        GenerationSettings(prompt="a cat", num_images=2, seed=None, width=None)


# ---------------------------------------------------------------------------------------------- HTTP


def test_http_stream_gives_progress_then_images_with_metadata(server):
    from starlette.testclient import TestClient

    client = TestClient(create_app(server))
    response = client.post("/api/generate", json={"prompt": "a red cat", "num_images": "2", "steps": "3",
                                                  "seed": "5", "scheduler": "", "width": "", "height": ""})
    events = read_events(response)
    assert [e["type"] for e in events] == ["queued", "progress", "progress", "progress", "done"]
    assert [(e["step"], e["total"]) for e in events[1:4]] == [(1, 3), (2, 3), (3, 3)]
    images = events[-1]["images"]
    expected = direct_images(make_tiny_pipeline(), [5, 6], prompt="a red cat", num_inference_steps=3,
                             guidance_scale=5.0)
    for image, expected_pixels in zip(images, expected):
        png = Image.open(io.BytesIO(base64.b64decode(image["src"].removeprefix("data:image/png;base64,"))))
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), expected_pixels)
        assert png.text == image["metadata"]
    assert [image["filename"] for image in images] == ["ldm_5.png", "ldm_6.png"]


def test_bad_settings_come_back_as_the_pipelines_own_message(server):
    from starlette.testclient import TestClient

    with pytest.raises(ValueError) as pipeline_error:
        make_tiny_pipeline()("a cat", width=15, num_inference_steps=2)
    client = TestClient(create_app(server))
    cases = {
        "width": ({"prompt": "a cat", "width": "15", "steps": "2"}, str(pipeline_error.value)),
        "steps": ({"prompt": "a cat", "steps": "0"}, "`num_inference_steps` must be a positive integer, got 0."),
        "scheduler": ({"prompt": "a cat", "scheduler": "fast"}, "Unknown scheduler 'fast': choose one of ddpm"),
        "limit": ({"prompt": "a cat", "num_images": "9"}, "num_images is 9; this server makes at most 8"),
        "interval": ({"prompt": "a cat", "steps": "2", "guidance_interval": "2 1"},
                     "`guidance_interval` (2.0, 1.0) must satisfy 0 <= σ_lo < σ_hi"),
    }
    for name, (form, message) in cases.items():
        response = client.post("/api/generate", json=form)
        assert response.status_code == 200, name
        error = read_events(response)[-1]
        assert error["type"] == "error" and error["message"].startswith(message), (name, error)
        assert "Traceback" not in response.text
    assert client.post("/api/generate", content=b"[1, 2]").json()["message"].startswith("The request body must be")


MODEL_CARD = """---
license: apache-2.0
---
# Tiny shapes model

A random 16 px pipeline of the test suite: CLIP text encoder (2 layers, width 32), `AutoencoderKL` (f = 2,
4 latent channels), cross-attention U-Net. Prompts use the `shapes` grammar: *a red cat left of a blue house*.
"""
REPORT_ROWS = {"single object": 1.0, "two objects": 0.688, "counting": 0.625, "colors": 1.0, "position": 0.438,
               "color attribution": 0.125}


def make_model_dir(tmp_path: Path, source: Path, card: str = MODEL_CARD) -> Path:
    """``tmp/run/pipeline`` (a copy of ``source`` with a model card), ``tmp/run/eval`` (its ldm-eval report) and
    ``tmp/run/vae_eval`` (a report of something else, newer)."""
    model_dir = tmp_path / "run" / "pipeline"
    shutil.copytree(source, model_dir)
    (model_dir / "README.md").write_text(card)
    rows = "".join(f"| {category} | {score:.3f} | 16 |\n" for category, score in REPORT_ROWS.items())
    for folder, model in (("eval", "runs/x/pipeline"), ("vae_eval", "VAE reconstructions (runs/x/vae)")):
        (tmp_path / "run" / folder).mkdir()
        (tmp_path / "run" / folder / "report.json").write_text(json.dumps({"model": model, "unet": None}))
        (tmp_path / "run" / folder / "report.md").write_text(
            f"# ldm-eval: {model}\n\n| category | score | images |\n|---|---:|---:|\n{rows}"
            "| **overall** | **0.646** | 96 |\n")
        time.sleep(0.01)
    return model_dir


def test_page_shows_model_card_and_the_pipelines_own_report(tmp_path, tiny_pipeline_dir, server):
    from starlette.testclient import TestClient

    model_dir = make_model_dir(tmp_path, tiny_pipeline_dir, MODEL_CARD + "\nUnsafe: <script>alert(1)</script>\n")
    client = TestClient(create_app(server, model_dir))
    assert 'id="settings"' in client.get("/").text
    assert client.get("/static/serve.js").status_code == 200
    info = client.get("/api/info").json()
    assert info["schedulers"] == list(SCHEDULERS)
    assert (info["height"], info["width"], info["vae_scale_factor"]) == (16, 16, 2)
    assert info["model_card_html"].startswith("<h1>Tiny shapes model</h1>")
    assert "license" not in info["model_card_html"]
    assert "<script>" not in info["model_card_html"] and "&lt;script&gt;" in info["model_card_html"]
    assert info["report_path"] == str(Path("eval") / "report.md")
    assert "<strong>0.646</strong></td>" in info["report_html"]


def test_eval_report_under_the_pipeline_comes_first(tmp_path, tiny_pipeline_dir):
    model_dir = make_model_dir(tmp_path, tiny_pipeline_dir)
    assert find_eval_report(model_dir) == tmp_path / "run" / "eval" / "report.md"
    (model_dir / "eval").mkdir()
    (model_dir / "eval" / "report.json").write_text("{}")
    assert find_eval_report(model_dir) == model_dir / "eval" / "report.json"
    shutil.rmtree(model_dir / "eval")
    shutil.rmtree(tmp_path / "run" / "eval")
    assert find_eval_report(model_dir) is None


# ---------------------------------------------------------------------------------------------- command line


def test_command_loads_the_pipeline_once_and_listens_on_localhost(tiny_pipeline_dir, monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    serve_main(["--model", str(tiny_pipeline_dir), "--port", "8123"])
    (app, kwargs), = calls
    assert DEFAULT_HOST == "127.0.0.1" and kwargs["host"] == "127.0.0.1" and kwargs["port"] == 8123
    from starlette.testclient import TestClient

    assert TestClient(app).get("/api/info").json()["model"] == str(tiny_pipeline_dir)


def test_command_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(serve_main, ["--model", str(tmp_path)], prog="ldm-serve")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"ldm-serve: error: {tmp_path} holds no pipeline: there is no "
                                       "model_index.json in it. Pass the directory written by "
                                       "LatentDiffusionPipeline.save_pretrained (the U-Net stage's --output_dir).\n")


# ---------------------------------------------------------------------------------------------- in a browser


@pytest.fixture
def running_server(tmp_path, tiny_pipeline_dir):
    """The page for a copy of the tiny pipeline (with a model card and report) on 127.0.0.1, a free port."""
    import uvicorn

    model_dir = make_model_dir(tmp_path, tiny_pipeline_dir)
    server = ImageServer(LatentDiffusionPipeline.from_pretrained(model_dir), model="run/pipeline")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uvicorn_server = uvicorn.Server(uvicorn.Config(create_app(server, model_dir), log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    uvicorn_server.should_exit = True
    thread.join(10)
    sock.close()


def browser_api():
    """Playwright's sync API, or a skip saying what to install (a failure where ``LDM_REQUIRE_BROWSER`` is set, as
    in ``.ci/run``)."""
    missing = None
    if not CHROMIUM.is_file():
        missing = f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does) to test the page in a browser"
    try:
        from playwright import sync_api
    except ImportError:
        missing = missing or "playwright is not installed: pip install -e .[dev]"
    if missing and os.environ.get("LDM_REQUIRE_BROWSER"):
        pytest.fail(missing)
    if missing:
        pytest.skip(missing)
    return sync_api


def test_page_in_a_headless_browser(running_server, tmp_path):
    sync_api = browser_api()

    with sync_api.sync_playwright() as playwright, tempfile.TemporaryDirectory() as user_data_dir:
        browser = playwright.chromium.launch_persistent_context(
            user_data_dir, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1200, "height": 760})
        page = browser.new_page()
        page.goto(running_server)
        sync_api.expect(page.locator("#scheduler option")).to_have_count(len(SCHEDULERS) + 1)
        sync_api.expect(page.locator("#model-card")).to_contain_text("Tiny shapes model")
        sync_api.expect(page.locator("#report")).to_contain_text("0.646")
        assert page.input_value("#width") == "16"

        page.fill("#prompt", "a red cat left of a blue house")
        page.fill("#num_images", "3")
        page.select_option("#scheduler", "dpm++")
        page.fill("#steps", "4")
        page.fill("#seed", "42")
        page.fill("#width", "24")
        page.click("#generate-button")
        images = page.locator("#gallery img")
        sync_api.expect(images).to_have_count(3, timeout=60_000)
        sizes = images.evaluate_all("images => images.map(image => [image.naturalWidth, image.naturalHeight])")
        assert sizes == [[24, 16]] * 3
        assert page.locator("#progress").evaluate("bar => [bar.value, bar.max]") == [4, 4]
        link = page.locator("#gallery a").first
        assert link.get_attribute("download") == "ldm_42.png"
        png = Image.open(io.BytesIO(base64.b64decode(link.get_attribute("href").split(",", 1)[1])))
        assert png.text["prompt"] == "a red cat left of a blue house" and png.text["scheduler"] == "dpm++"
        assert png.size == (24, 16)
        screenshot = tmp_path / "serve.png"
        page.screenshot(path=str(screenshot), full_page=True)
        if os.environ.get("LDM_SERVE_SCREENSHOT"):
            shutil.copyfile(screenshot, os.environ["LDM_SERVE_SCREENSHOT"])

        page.fill("#width", "15")
        page.click("#generate-button")
        sync_api.expect(page.locator("#error")).to_be_visible(timeout=30_000)
        sync_api.expect(page.locator("#error")).to_contain_text(SIZE_ERROR)
        assert "Traceback" not in page.content()
        browser.close()
