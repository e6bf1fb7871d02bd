"""ldm-serve: the request handler against direct pipeline calls, PNG metadata, the queue and cancellation, the
server's rules over HTTP, the model's facts, card and own evaluation report, the command line, and the page end to
end in a headless Chromium (skipped where none is installed; a failure with ``LDM_REQUIRE_BROWSER=1``).

Bad input, one test each: settings that are not numbers, unknown settings, a lone UTF-16 surrogate in a prompt,
sizes, steps and image counts beyond the model's limits, an unknown scheduler, a reversed guidance range, a body
that is not JSON or not declared as JSON (415), a cross-origin request (403), a foreign ``Host`` on a loopback
server (403), a busy port, ``--device cuda`` without CUDA, bad ``--allow_origin`` and limit flags, a report of a
same-named folder or of another U-Net.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.errors import run_cli
from ldm_pipeline.schedulers import SCHEDULERS
from ldm_pipeline.serve import (
    DEFAULT_HOST,
    LOOPBACK_NAMES,
    STATIC_DIR,
    ImageServer,
    JobCancelled,
    create_app,
    main as serve_main,
    page_message,
    serving_in_thread,
    uvicorn_server,
)
from ldm_pipeline.serve_card import find_eval_report, format_count, model_facts
from ldm_pipeline.serve_settings import FIELD_LABELS, GenerationSettings, ServeLimits

from conftest import make_tiny_pipeline

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARGUMENT_NAME = re.compile(r"num_images_per_prompt|num_inference_steps|`")


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


def count_unet_calls(pipe, delay: list[float]) -> list[int]:
    """Wrap ``pipe.unet.forward`` to count its calls and sleep ``delay[0]`` seconds in each (a slow model)."""
    calls = [0]
    forward = pipe.unet.forward

    def slow_forward(*args, **kwargs):
        calls[0] += 1
        time.sleep(delay[0])
        return forward(*args, **kwargs)

    pipe.unet.forward = slow_forward
    return calls


def wait_until(condition, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


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
    server.generate(GenerationSettings(prompt="a cat", num_images=1, scheduler="ddpm", steps=2, seed=0))
    generated = server.generate(GenerationSettings(prompt="two stars", num_images=1, steps=3, guidance_scale=1.0,
                                                   seed=11))
    assert type(server.pipe.scheduler).__name__ == "DDIMScheduler"
    expected = direct_images(make_tiny_pipeline(), [11], prompt="two stars", num_inference_steps=3, guidance_scale=1.0)
    np.testing.assert_array_equal(pixels(generated), expected)
    assert generated[0].metadata["scheduler"] == "DDIMScheduler"
    assert generated[0].metadata["size"] == "16x16"


def test_random_seed_is_recorded_and_makes_the_same_image_again(server):
    first = server.generate(GenerationSettings(prompt="a box", num_images=1, steps=2, seed=None))
    seed = int(first[0].metadata["seed"])
    again = server.generate(GenerationSettings.from_form({"prompt": "a box", "num_images": "1", "steps": "2",
                                                          "seed": str(seed)}))
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
                                  args=(GenerationSettings("a cat", num_images=1, steps=steps, seed=1), record(name)))
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
    ahead = {name: [e["ahead"] for n, e in events if n == name and e["type"] == "queued"] for name in queued}
    assert ahead == {"first": [0], "second": [1, 0], "third": [2, 1, 0]}  # told again when the line moves
    assert server.num_jobs == 0


def test_cancelled_requests_stop_at_the_next_step_or_leave_the_queue():
    pipe = make_tiny_pipeline()
    delay = [0.02]
    calls = count_unet_calls(pipe, delay)
    server = ImageServer(pipe, model="tiny")
    running, waiting = threading.Event(), threading.Event()
    outcomes, steps_seen = {}, {"running": 0, "waiting": 0}

    def request(name, job):
        def on_event(event):
            steps_seen[name] += event["type"] == "progress"
        try:
            outcomes[name] = server.generate(GenerationSettings("a cat", num_images=1, steps=200, seed=1), on_event,
                                             job)
        except JobCancelled as error:
            outcomes[name] = str(error)

    threads = [threading.Thread(target=request, args=("running", running))]
    threads[0].start()
    assert wait_until(lambda: steps_seen["running"] >= 2)
    threads.append(threading.Thread(target=request, args=("waiting", waiting)))
    threads[1].start()
    assert wait_until(lambda: server.num_jobs == 2)
    server.cancel(waiting)
    threads[1].join(10)
    assert outcomes["waiting"] == "Cancelled." and steps_seen["waiting"] == 0 and server.num_jobs == 1
    server.cancel(running)
    threads[0].join(10)
    assert outcomes["running"] == "Cancelled." and server.num_jobs == 0
    assert steps_seen["running"] < 50 and calls[0] <= steps_seen["running"] + 1

    delay[0] = 0.0  # the next request runs normally
    assert len(server.generate(GenerationSettings("a cat", num_images=1, steps=2, seed=1))) == 1


def test_guidance_interval_reaches_the_pipeline_and_the_png(server):
    settings = GenerationSettings.from_form({"prompt": "a red cat", "num_images": 1, "steps": "4",
                                             "guidance_scale": "3", "seed": "5", "scheduler": "euler",
                                             "guidance_interval": "0.5, inf"})
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
    for bad in ("1", "1 2 3", "low high", 7, "2 1", "-1 2"):
        with pytest.raises(ValueError, match="Guidance σ range must be two noise levels"):
            GenerationSettings.from_form({"prompt": "a cat", "guidance_interval": bad})


def test_settings_that_are_not_numbers_or_not_text_name_the_pages_field():
    cases = {
        "steps": ({"steps": "ten"}, "Steps must be a whole number, got 'ten'."),
        "guidance": ({"guidance_scale": "nan"}, "Guidance scale must be a finite number, got 'nan'."),
        "images": ({"num_images": "2.5"}, "Images must be a whole number, got '2.5'."),
        "seed": ({"seed": "-5"}, "Seed must be a whole number from 0 to 4294967295, or 'random'; got '-5'."),
        "unknown": ({"num_images_per_prompt": 9}, "Unknown setting 'num_images_per_prompt': the settings are prompt,"),
        "surrogate": ({"prompt": "a \ud800 cat"}, "Prompt holds a lone UTF-16 surrogate (U+D800 at character 3), "
                                                 "which is not text: type or paste it again."),
        "negative surrogate": ({"negative_prompt": "\udfff"}, "Negative prompt holds a lone UTF-16 surrogate"),
        "scheduler": ({"scheduler": "fast"}, "Unknown scheduler 'fast': choose one of ddpm"),
    }
    for name, (fields, message) in cases.items():
        with pytest.raises(ValueError) as error:
            GenerationSettings.from_form({"prompt": "a cat", **fields})
        assert str(error.value).startswith(message), name
    assert GenerationSettings.from_form({"prompt": "a cat", "seed": "Random", "width": "", "num_images": "2"}) == \
        GenerationSettings(prompt="a cat", num_images=2, seed=None, width=None)
    assert GenerationSettings.from_form({"prompt": "a cat", "scheduler": "DPM-Solver++"}).scheduler == "DPM-Solver++"


def test_limits_are_derived_from_the_model_and_worded_with_the_pages_labels():
    pipe = make_tiny_pipeline()  # U-Net sample_size 8, VAE factor 2: trained at 16 px
    limits = ServeLimits.for_pipeline(pipe)
    assert limits == ServeLimits(max_images=8, max_steps=250, max_side=32, size_step=2)
    assert limits.sizes() == list(range(2, 33, 2))
    pipe.scheduler = DDIMScheduler(num_train_timesteps=100, clip_sample=False)
    assert ServeLimits.for_pipeline(pipe).max_steps == 100
    assert ServeLimits.for_pipeline(pipe, max_images=2, max_steps=30, max_side=41) == \
        ServeLimits(max_images=2, max_steps=30, max_side=40, size_step=2)
    with pytest.raises(ValueError, match="--max_side 1 is below the VAE factor 2"):
        ServeLimits.for_pipeline(pipe, max_side=1)
    with pytest.raises(ValueError, match="--max_images must be positive, got 0"):
        ServeLimits.for_pipeline(pipe, max_images=0)

    cases = [
        (dict(num_images=9), "Images must be from 1 to 8 on this server (ldm-serve --max_images), got 9."),
        (dict(num_images=0), "Images must be from 1 to 8"),
        (dict(steps=251), "Steps must be from 1 to 250 on this server (ldm-serve --max_steps), got 251."),
        (dict(steps=0), "Steps must be from 1 to 250"),
        (dict(width=15), "Width must be a multiple of 2 (the VAE factor) from 2 to 32 px on this server (ldm-serve "
                         "--max_side), got 15: use e.g. 16."),
        (dict(height=1024), "Height must be a multiple of 2 (the VAE factor) from 2 to 32 px on this server "
                            "(ldm-serve --max_side), got 1024: use e.g. 32."),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError) as error:
            limits.check(GenerationSettings("a cat", **fields))
        assert str(error.value).startswith(message)
    limits.check(GenerationSettings("a cat", num_images=8, steps=250, width=32, height=2))


def test_pipeline_messages_name_the_pages_fields():
    assert page_message(ValueError("`num_inference_steps` must be a positive integer, got 0.")) == \
        "Steps must be a positive integer, got 0."
    assert page_message(ValueError("`num_images_per_prompt` and `guidance_interval` and `eta`")) == \
        "Images and Guidance σ range and `eta`"
    assert page_message(JobCancelled("Cancelled.")) == "Cancelled."


def test_page_labels_are_the_labels_errors_use():
    html = (STATIC_DIR / "index.html").read_text()
    labels = dict(re.findall(r'<label for="(\w+)">([^<]+)</label>', html))
    assert labels == FIELD_LABELS


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


def test_bad_settings_are_refused_before_queueing_in_one_line_with_the_pages_labels(server):
    from starlette.testclient import TestClient

    client = TestClient(create_app(server))
    cases = {
        "width": ({"prompt": "a cat", "width": "15"}, "Width must be a multiple of 2"),
        "size": ({"prompt": "a cat", "width": "1024", "height": "1024"}, "Width must be a multiple of 2 (the VAE "
                                                                         "factor) from 2 to 32 px"),
        "steps": ({"prompt": "a cat", "steps": "0"}, "Steps must be from 1 to 250"),
        "many steps": ({"prompt": "a cat", "steps": 1000}, "Steps must be from 1 to 250"),
        "images": ({"prompt": "a cat", "num_images": "9"}, "Images must be from 1 to 8"),
        "scheduler": ({"prompt": "a cat", "scheduler": "fast"}, "Unknown scheduler 'fast': choose one of ddpm"),
        "interval": ({"prompt": "a cat", "guidance_interval": "2 1"}, "Guidance σ range must be two noise levels"),
        "unknown": ({"prompt": "a cat", "num_images_per_prompt": 100}, "Unknown setting 'num_images_per_prompt'"),
    }
    for name, (form, message) in cases.items():
        response = client.post("/api/generate", json=form)
        assert response.status_code == 422, name
        error = response.json()
        assert error["type"] == "error" and error["message"].startswith(message), (name, error)
        assert "\n" not in error["message"], (name, error)
        assert name == "unknown" or not ARGUMENT_NAME.search(error["message"]), (name, error)

    # a lone surrogate arrives as JSON's "\ud800" escape: one line, not a server error
    response = client.post("/api/generate", content=b'{"prompt": "a \\ud800 cat"}',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["message"] == ("Prompt holds a lone UTF-16 surrogate (U+D800 at character 3), which is "
                                          "not text: type or paste it again.")
    response = client.post("/api/generate", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert (response.status_code, response.json()["message"]) == (400, "The request body must be a JSON object of "
                                                                       "settings.")
    assert server.num_jobs == 0


def test_only_json_from_the_servers_own_origin_starts_a_generation(server):
    """A web page on another site can send a form or text/plain POST without asking (no CORS preflight):
    refused with 415 before anything runs. A fetch with JSON from another origin: refused with 403."""
    from starlette.testclient import TestClient

    client = TestClient(create_app(server))
    body = json.dumps({"prompt": "a cat", "num_images": 1, "steps": 1})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Origin": "http://evil.example"} if content_type is None else {"Content-Type": content_type}
        response = client.post("/api/generate", content=body, headers=headers)
        assert response.status_code == (403 if content_type is None else 415), content_type
        assert "progress" not in response.text
    assert client.post("/api/generate", content=body, headers={"Content-Type": "text/plain"}).json()["message"] == (
        "POST /api/generate takes JSON: send the settings with Content-Type: application/json (got 'text/plain').")

    json_headers = {"Content-Type": "application/json; charset=utf-8"}
    cross_site = client.post("/api/generate", content=body, headers={**json_headers, "Origin": "http://evil.example"})
    assert cross_site.status_code == 403
    assert cross_site.json()["message"] == ("Cross-origin request from http://evil.example refused: open the page "
                                            "from this server, or start ldm-serve with --allow_origin "
                                            "http://evil.example to let that site use it.")
    assert client.get("/api/info", headers={"Origin": "http://evil.example"}).status_code == 403
    same_site = client.post("/api/generate", content=body, headers={**json_headers, "Origin": "http://testserver"})
    assert [e["type"] for e in read_events(same_site)] == ["queued", "progress", "done"]

    allowed = TestClient(create_app(server, allowed_origins=["https://tools.example.org"]))
    preflight = allowed.options("/api/generate", headers={"Origin": "https://tools.example.org",
                                                           "Access-Control-Request-Method": "POST",
                                                           "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://tools.example.org"
    response = allowed.post("/api/generate", content=body,
                            headers={**json_headers, "Origin": "https://tools.example.org"})
    assert read_events(response)[-1]["type"] == "done"
    assert allowed.post("/api/generate", content=body,
                        headers={**json_headers, "Origin": "http://evil.example"}).status_code == 403

    # on a loopback address, a page whose own name resolves to 127.0.0.1 (DNS rebinding) is not this server
    local = TestClient(create_app(server, trusted_hosts=LOOPBACK_NAMES))
    for host, status in (("evil.example:7860", 403), ("localhost:7860", 200), ("127.0.0.1:7860", 200),
                         ("[::1]:7860", 200)):
        assert local.get("/api/info", headers={"Host": host}).status_code == status, host
    assert server.num_jobs == 0


def raw_request(url: str, body: dict) -> socket.socket:
    """A POST /api/generate on a plain socket, so the test can hang up in the middle of the answer."""
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    payload = json.dumps(body).encode()
    connection.sendall(b"POST /api/generate HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() +
                       b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(payload)).encode() +
                       b"\r\n\r\n" + payload)
    return connection


def read_until(connection: socket.socket, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        chunk = connection.recv(4096)
        assert chunk, received
        received += chunk
    return received


def test_a_client_that_hangs_up_cancels_its_request_running_or_waiting():
    pipe = make_tiny_pipeline()
    calls = count_unet_calls(pipe, [0.02])
    server = ImageServer(pipe, model="tiny")
    with serving_in_thread(create_app(server), server) as url:
        running = raw_request(url, {"prompt": "a cat", "num_images": 1, "steps": 200})
        read_until(running, b'"step": 2,')
        waiting = raw_request(url, {"prompt": "a dog", "num_images": 1, "steps": 200})
        read_until(waiting, b'"ahead": 1')
        assert server.num_jobs == 2
        waiting.close()
        assert wait_until(lambda: server.num_jobs == 1)
        running.close()
        assert wait_until(lambda: server.num_jobs == 0)
        assert calls[0] < 100  # of the 200 steps asked for, with one U-Net call per step
        calls_after = calls[0]
        time.sleep(0.2)
        assert calls[0] == calls_after


def test_ctrl_c_says_it_stops_and_cancels_the_running_request(capsys):
    pipe = make_tiny_pipeline()
    count_unet_calls(pipe, [0.02])
    server = ImageServer(pipe, model="tiny")
    progress, outcome = threading.Event(), []

    def request():
        try:
            server.generate(GenerationSettings("a cat", num_images=1, steps=200),
                            lambda event: event["type"] == "progress" and progress.set())
        except JobCancelled as error:
            outcome.append(str(error))

    thread = threading.Thread(target=request)
    thread.start()
    assert progress.wait(30)
    uvicorn_server(create_app(server), server).handle_exit(signal.SIGINT, None)
    thread.join(10)
    assert outcome == ["The server is stopping: this request was cancelled."]
    assert capsys.readouterr().out == ("ldm-serve: stopping: running and waiting requests are cancelled (Ctrl+C "
                                       "again quits at once).\n")
    with pytest.raises(JobCancelled, match="stopping"):
        server.generate(GenerationSettings("a cat", num_images=1, steps=1))


# ------------------------------------------------------------------------------------ model facts, card, report


MODEL_CARD = """---
license: apache-2.0
---
# Tiny shapes model

A random 16 px pipeline of the test suite: CLIP text encoder (2 layers, width 32), `AutoencoderKL` (f = 2,
4 latent channels), cross-attention U-Net. Prompts use the `shapes` grammar: *a red cat left of a blue house*.

```python
pipe = LatentDiffusionPipeline.from_pretrained("runs/tiny/pipeline"); image = pipe("a red cat", num_inference_steps=20, guidance_scale=5.0).images[0]
```

| held-out text-to-image retrieval top-1 | held-out text-to-image retrieval top-5 | held-out pairs | architecture |
|---|---|---|---|
| 0.475 | 0.845 | 200 | clip |
"""
REPORT_ROWS = {"single object": 1.0, "two objects": 0.688, "counting": 0.625, "colors": 1.0, "position": 0.438,
               "color attribution": 0.125}


def write_report(folder: Path, model: str, unet: str | None = None, overall: float = 0.646) -> None:
    """An ``ldm-eval`` report (``report.json`` and ``report.md``) of ``model`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    scores = {**REPORT_ROWS, "overall": overall}
    (folder / "report.json").write_text(json.dumps({"model": model, "unet": unet, "scores": scores, "fid": 12.5}))
    rows = "".join(f"| {category} | {score:.3f} | 16 |\n" for category, score in REPORT_ROWS.items())
    (folder / "report.md").write_text(f"# ldm-eval: {model}\n\n| category | score | images |\n|---|---:|---:|\n{rows}"
                                      f"| **overall** | **{overall:.3f}** | 96 |\n")


def make_model_dir(tmp_path: Path, source: Path, card: str = MODEL_CARD) -> Path:
    """``tmp/run/pipeline`` (a copy of ``source`` with a model card and 120 U-Net steps), ``tmp/run/eval`` (its
    ldm-eval report, run from ``tmp``) and ``tmp/run/vae_eval`` (a report of something else, newer)."""
    model_dir = tmp_path / "run" / "pipeline"
    shutil.copytree(source, model_dir)
    (model_dir / "README.md").write_text(card)
    (model_dir / "unet_metrics.json").write_text(json.dumps({"train_steps": 120, "num_parameters": 1}))
    write_report(tmp_path / "run" / "eval", "run/pipeline")
    time.sleep(0.01)
    write_report(tmp_path / "run" / "vae_eval", "VAE reconstructions (run/vae)", overall=0.9)
    return model_dir


def test_page_shows_the_models_facts_card_and_own_report(tmp_path, tiny_pipeline_dir, server):
    from starlette.testclient import TestClient

    model_dir = make_model_dir(tmp_path, tiny_pipeline_dir, MODEL_CARD + "\nUnsafe: <script>alert(1)</script>\n")
    client = TestClient(create_app(server, model_dir))
    assert 'id="settings"' in client.get("/").text
    assert client.get("/static/serve.js").status_code == 200
    info = client.get("/api/info").json()
    assert info["schedulers"] == list(SCHEDULERS)
    assert info["defaults"] == {"prompt": "", "negative_prompt": "", "num_images": 4, "scheduler": "", "steps": 20,
                                "guidance_scale": 5.0, "seed": "random", "height": 16, "width": 16,
                                "guidance_interval": ""}
    assert info["limits"] == {"max_images": 8, "max_steps": 250, "max_side": 32, "size_step": 2}
    assert info["sizes"] == list(range(2, 33, 2))
    pipe = server.pipe
    counts = [sum(p.numel() for p in module.parameters()) for module in (pipe.text_encoder, pipe.vae, pipe.unet)]
    assert dict(info["facts"]) == {
        "Name": "Tiny shapes model",
        "Resolution": "16×16 px",
        "Parameters": f"{format_count(sum(counts))} (text encoder {format_count(counts[0])}, VAE "
                      f"{format_count(counts[1])}, U-Net {format_count(counts[2])})",
        "U-Net training": "120 steps",
        "GenEval-style overall": "0.646",
        "Categories": "single object 1.000 · two objects 0.688 · counting 0.625 · colors 1.000 · position 0.438 · "
                      "color attribution 0.125",
        "FID": "12.500",
    }
    assert info["model_card_html"].startswith("<h1>Tiny shapes model</h1>")
    assert "license" not in info["model_card_html"]
    assert "<script>" not in info["model_card_html"] and "&lt;script&gt;" in info["model_card_html"]
    assert info["report_path"] == str(Path("eval") / "report.md")
    assert "<strong>0.646</strong></td>" in info["report_html"]


def test_format_count_keeps_three_significant_figures():
    assert [format_count(n) for n in (812, 24_583, 1_750_000, 859_520_964, 2_600_000_000)] == \
        ["812", "24.6 k", "1.75 M", "860 M", "2.6 B"]


def test_only_the_served_pipelines_own_report_is_shown(tmp_path, tiny_pipeline_dir, monkeypatch):
    model_dir = make_model_dir(tmp_path, tiny_pipeline_dir)
    own = tmp_path / "run" / "eval" / "report.md"
    assert find_eval_report(model_dir) == own

    # a same-named folder elsewhere, evaluated from the same place: its report is of run/pipeline, not of it
    other = tmp_path / "copy" / "run" / "pipeline"
    shutil.copytree(model_dir, other)
    write_report(tmp_path / "copy" / "run" / "eval", "run/pipeline")
    monkeypatch.chdir(tmp_path)
    assert find_eval_report(other) is None
    write_report(tmp_path / "copy" / "run" / "eval", str(other))  # its own report, recorded absolute
    assert find_eval_report(other) == tmp_path / "copy" / "run" / "eval" / "report.md"
    write_report(tmp_path / "copy" / "run" / "eval", "copy/run/pipeline")  # relative to the directory it ran in
    assert find_eval_report(other) == tmp_path / "copy" / "run" / "eval" / "report.md"
    write_report(tmp_path / "copy" / "run" / "eval", "copy/run/pipeline", unet="other/unet")  # another U-Net
    assert find_eval_report(other) is None
    facts = dict(model_facts(make_tiny_pipeline(), other, "x", None))
    assert "GenEval-style overall" not in facts and facts["Name"] == "Tiny shapes model"

    # a report under the pipeline comes first, when it is this pipeline's
    write_report(model_dir / "eval", "pipeline")
    assert find_eval_report(model_dir) == model_dir / "eval" / "report.md"
    write_report(model_dir / "eval", "elsewhere/pipeline")
    assert find_eval_report(model_dir) == own
    shutil.rmtree(tmp_path / "run" / "eval")
    assert find_eval_report(model_dir) is None


# ---------------------------------------------------------------------------------------------- command line


def test_command_loads_the_pipeline_once_and_listens_on_localhost(tiny_pipeline_dir, monkeypatch, capsys):
    from starlette.testclient import TestClient

    import ldm_pipeline.serve as serve

    calls = []
    monkeypatch.setattr(serve, "run_server", lambda app, server, listener: calls.append((app, listener.getsockname())))
    serve_main(["--model", str(tiny_pipeline_dir), "--port", "0", "--max_steps", "30"])
    (app, (host, port)), = calls
    assert DEFAULT_HOST == "127.0.0.1" and host == "127.0.0.1" and port > 0
    assert capsys.readouterr().out == f"ldm-serve: {tiny_pipeline_dir} on http://127.0.0.1:{port} (Ctrl+C stops)\n"
    client = TestClient(app, base_url="http://127.0.0.1:7860")
    info = client.get("/api/info").json()
    assert info["model"] == str(tiny_pipeline_dir) and info["limits"]["max_steps"] == 30
    assert client.get("/api/info", headers={"Host": "evil.example"}).status_code == 403


def test_command_errors_are_one_line(tmp_path, tiny_pipeline_dir, capsys):
    def error_of(*argv):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(serve_main, list(argv), prog="ldm-serve")
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # no URL printed
        return captured.err

    assert error_of("--model", str(tmp_path)) == (
        f"ldm-serve: error: {tmp_path} holds no pipeline: there is no model_index.json in it. Pass the directory "
        "written by LatentDiffusionPipeline.save_pretrained (the U-Net stage's --output_dir).\n")

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    assert error_of("--model", str(tiny_pipeline_dir), "--port", str(port)) == (
        f"ldm-serve: error: Port {port} on 127.0.0.1 is in use (another ldm-serve?): stop that server, or choose "
        f"another port with --port (e.g. --port {port + 1}).\n")
    busy.close()

    if not torch.cuda.is_available():
        assert error_of("--model", str(tiny_pipeline_dir), "--device", "cuda").startswith(
            "ldm-serve: error: --device cuda: CUDA is not available on this machine (PyTorch ")
    assert error_of("--model", str(tiny_pipeline_dir), "--allow_origin", "evil.example") == (
        "ldm-serve: error: --allow_origin 'evil.example' is not an origin: write scheme://host[:port], e.g. "
        "https://tools.example.org.\n")
    assert error_of("--model", str(tiny_pipeline_dir), "--max_steps", "0") == \
        "ldm-serve: error: --max_steps must be positive, got 0.\n"


# ---------------------------------------------------------------------------------------------- in a browser


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


def test_page_in_a_headless_browser(tmp_path, tiny_pipeline_dir):
    sync_api = browser_api()
    expect = sync_api.expect
    model_dir = make_model_dir(tmp_path, tiny_pipeline_dir)
    pipe = LatentDiffusionPipeline.from_pretrained(model_dir)
    delay = [0.0]
    calls = count_unet_calls(pipe, delay)
    server = ImageServer(pipe, model="run/pipeline")

    with serving_in_thread(create_app(server, model_dir), server) as url, sync_api.sync_playwright() as playwright, \
            tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as user_data_dir:
        browser = playwright.chromium.launch_persistent_context(
            user_data_dir, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1200, "height": 760})
        page = browser.new_page()
        page.goto(url)
        expect(page.locator("#scheduler option")).to_have_count(len(SCHEDULERS) + 1)
        expect(page.locator("#facts")).to_contain_text("Tiny shapes model")
        facts = page.locator("#facts").inner_text()
        assert "16×16 px" in facts and "120 steps" in facts and "0.646" in facts
        assert page.locator("#width option").evaluate_all("options => options.map(o => +o.value)") == \
            list(range(2, 33, 2))
        assert (page.input_value("#width"), page.input_value("#num_images"), page.input_value("#steps"),
                page.input_value("#seed")) == ("16", "4", "20", "random")
        assert page.get_attribute("#steps", "max") == "250"
        expect(page.locator("#progress")).to_be_hidden()  # idle
        expect(page.locator("#cancel-button")).to_be_hidden()
        expect(page.locator("#history")).to_be_hidden()

        # Ctrl+Enter generates
        page.fill("#prompt", "a red cat left of a blue house")
        page.fill("#num_images", "3")
        page.select_option("#scheduler", "dpm++")
        page.fill("#steps", "4")
        page.fill("#seed", "42")
        page.select_option("#width", "24")
        page.press("#prompt", "Control+Enter")
        images = page.locator("#gallery img")
        expect(images).to_have_count(3, timeout=60_000)
        sizes = images.evaluate_all("images => images.map(image => [image.naturalWidth, image.naturalHeight])")
        assert sizes == [[24, 16]] * 3
        expect(page.locator("#status-text")).to_have_text("3 image(s), seed 42 to 44")
        expect(page.locator("#progress")).to_be_hidden()
        assert page.locator("#progress").evaluate("bar => [bar.value, bar.max]") == [4, 4]
        link = page.locator("#gallery a").first
        assert link.get_attribute("download") == "ldm_42.png"
        png = Image.open(io.BytesIO(base64.b64decode(link.get_attribute("href").split(",", 1)[1])))
        assert png.text["prompt"] == "a red cat left of a blue house" and png.text["scheduler"] == "dpm++"
        assert png.size == (24, 16)

        # reuse seed; a refused setting shows the page's label, with the progress bar and Cancel gone
        page.fill("#seed", "random")
        page.locator("#gallery .reuse-seed").nth(1).click()
        assert page.input_value("#seed") == "43"
        page.fill("#num_images", "99")
        page.click("#generate-button")
        expect(page.locator("#error")).to_have_text("Images must be from 1 to 8 on this server (ldm-serve "
                                                    "--max_images), got 99.")
        expect(page.locator("#progress")).to_be_hidden()
        expect(page.locator("#cancel-button")).to_be_hidden()
        assert page.locator("#generate-button").is_enabled() and "Traceback" not in page.content()

        # history survives a reload: the form comes back as last sent, an entry restores its seed
        page.reload()
        expect(page.locator("#history-list li")).to_have_count(1)
        expect(page.locator("#history-list li")).to_contain_text("seed 42 · 3 image(s) · 4 steps · dpm++ · 24x16")
        assert (page.input_value("#prompt"), page.input_value("#steps"), page.input_value("#width"),
                page.input_value("#seed")) == ("a red cat left of a blue house", "4", "24", "42")
        page.fill("#seed", "random")
        page.locator("#history-list button").first.click()
        assert page.input_value("#seed") == "42"

        # Cancel stops the running job on the server; so does closing the tab
        delay[0] = 0.05
        for stop in ("cancel", "close"):
            tab = page if stop == "cancel" else browser.new_page()
            if stop == "close":
                tab.goto(url)
                expect(tab.locator("#history-list li")).to_have_count(1)
            tab.fill("#num_images", "1")
            tab.fill("#steps", "200")
            before = calls[0]
            tab.click("#generate-button")
            expect(tab.locator("#status-text")).to_have_text(re.compile(r"step \d+ / 200"), timeout=30_000)
            if stop == "cancel":
                tab.click("#cancel-button")
                expect(tab.locator("#status-text")).to_have_text("Cancelled.")
                expect(tab.locator("#progress")).to_be_hidden()
            else:
                tab.close()
            assert wait_until(lambda: server.num_jobs == 0), stop
            assert calls[0] - before < 100, stop
        delay[0] = 0.0

        # phone width: no horizontal scroll, with images, facts, history and the card and report open
        page.set_viewport_size({"width": 420, "height": 900})
        page.fill("#steps", "2")
        page.fill("#num_images", "4")
        page.click("#generate-button")
        expect(images).to_have_count(4, timeout=60_000)
        page.evaluate("document.querySelectorAll('details').forEach(details => details.open = true)")
        assert page.evaluate("document.documentElement.scrollWidth") <= 420
        browser.close()
