"""Regenerate the ``ldm-serve`` screenshots of docs/serving.md from a served pipeline, in headless Chromium.

    python docs/make_screenshots.py --model runs/demo/pipeline      # after `make demo`, from the repository root

Serves ``--model`` on a free port of 127.0.0.1 (as ``ldm-serve`` does, its own ``ldm-eval`` report included),
opens the page in Chromium through Playwright with a fresh profile, types ``--prompt`` and the sampling settings,
generates, and writes two screenshots:

- ``--desktop`` (docs/serve_demo.png): the whole page at 1200 px wide after the images came back;
- ``--phone`` (docs/serve.png): the top of the same page at 420 px wide.

It prints the settings and each image's seed, so that a caption can say exactly what is shown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ldm_pipeline.errors import run_cli
from ldm_pipeline.pipeline_latent_diffusion import LatentDiffusionPipeline
from ldm_pipeline.serve import ImageServer, create_app, serving_in_thread

DOCS = Path(__file__).resolve().parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Pipeline directory to serve (e.g. runs/demo/pipeline).")
    parser.add_argument("--prompt", default="a red star left of a blue box")
    parser.add_argument("--num_images", type=int, default=4)
    parser.add_argument("--scheduler", default="dpm++", help="A scheduler name, or '' for the pipeline's saved one.")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--desktop", type=Path, default=DOCS / "serve_demo.png")
    parser.add_argument("--phone", type=Path, default=DOCS / "serve.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from playwright.sync_api import expect, sync_playwright

    model_dir = Path(args.model)
    server = ImageServer(LatentDiffusionPipeline.from_pretrained(model_dir), model=args.model)
    with serving_in_thread(create_app(server, model_dir), server) as url, sync_playwright() as playwright, \
            tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=args.chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1200, "height": 800})
        page = browser.new_page()
        page.goto(url)
        expect(page.locator("#facts dt").first).to_be_visible()
        page.fill("#prompt", args.prompt)
        page.fill("#num_images", str(args.num_images))
        page.select_option("#scheduler", args.scheduler)
        page.fill("#steps", str(args.steps))
        page.fill("#guidance_scale", f"{args.guidance_scale:g}")
        page.fill("#seed", str(args.seed))
        page.press("#prompt", "Control+Enter")
        expect(page.locator("#gallery img")).to_have_count(args.num_images, timeout=600_000)
        page.evaluate("document.activeElement.blur()")
        page.screenshot(path=str(args.desktop), full_page=True)
        page.set_viewport_size({"width": 420, "height": 1000})
        page.screenshot(path=str(args.phone))
        seeds = page.locator("#gallery figcaption span").all_inner_texts()
        browser.close()
    print(f"{args.desktop}, {args.phone}: {args.model}, prompt {args.prompt!r}, {args.num_images} images, "
          f"scheduler {args.scheduler or 'saved'}, {args.steps} steps, guidance {args.guidance_scale:g}; "
          + "; ".join(seeds))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:], prog="make_screenshots.py")
