"""Loading a saved pipeline: plain Diffusers (``DiffusionPipeline.from_pretrained``) in a fresh process that never
imports ldm_pipeline itself, with and without ``trust_remote_code``; no code run from a directory; pipelines
saved earlier with the training ``DDPMScheduler`` still load and sample as they did."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from conftest import make_tiny_pipeline
from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.diffusion import build_noise_scheduler

PROMPT = "a red cat"
NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}


def sample(pipe, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "guidance_scale": 3.0, **kwargs}
    return pipe(PROMPT, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture(scope="module")
def ddpm_pipeline():
    """A pipeline as ``train_unet.py`` saved it before DPM-Solver++ became the saved sampler: the training
    ``DDPMScheduler`` (``build_noise_scheduler``, ``clip_sample=False``)."""
    return make_tiny_pipeline("clip", scheduler=build_noise_scheduler(NOISE_SCHEDULE))


@pytest.fixture(scope="module")
def ddpm_pipeline_dir(ddpm_pipeline, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ddpm_pipeline")
    ddpm_pipeline.save_pretrained(directory)
    return directory


def test_plain_diffusers_loads_the_pipeline_in_a_fresh_process(tiny_pipeline_dir, ddpm_pipeline_dir, tmp_path):
    """``from diffusers import DiffusionPipeline; DiffusionPipeline.from_pretrained(dir)`` with ldm-pipeline only
    installed: the installed start-up hook lets Diffusers find the class, which is imported from the package (the
    directories hold no code) and samples the same images as ``LatentDiffusionPipeline.from_pretrained``."""
    assert not list(tiny_pipeline_dir.rglob("*.py")) and not list(ddpm_pipeline_dir.rglob("*.py"))
    loads = {"plain": (tiny_pipeline_dir, {}), "trust_remote_code": (tiny_pipeline_dir, {"trust_remote_code": True}),
             "ddpm": (ddpm_pipeline_dir, {})}
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import torch
        import diffusers
        from diffusers import DiffusionPipeline

        assert "ldm_pipeline" not in sys.modules
        assert diffusers.DDIMScheduler.__name__ == "DDIMScheduler" and not hasattr(diffusers, "NoSuchPipeline")
        for name, (directory, kwargs) in {({k: (str(d), kw) for k, (d, kw) in loads.items()})!r}.items():
            pipe = DiffusionPipeline.from_pretrained(directory, **kwargs)
            pipe.set_progress_bar_config(disable=True)
            images = pipe({PROMPT!r}, num_inference_steps=2, guidance_scale=3.0, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images
            np.save(name + ".npy", images)
            print(name, type(pipe).__module__, type(pipe).__name__, type(pipe.scheduler).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, (
        f"{result.stderr[-3000:]}\n(is ldm-pipeline installed from this checkout, with its "
        "ldm_pipeline_diffusers.pth? `make install`)")
    printed = dict((line.split(" ", 1)) for line in result.stdout.splitlines())
    assert printed == {
        "plain": "ldm_pipeline.pipeline_latent_diffusion LatentDiffusionPipeline DDIMScheduler",
        "trust_remote_code": "ldm_pipeline.pipeline_latent_diffusion LatentDiffusionPipeline DDIMScheduler",
        "ddpm": "ldm_pipeline.pipeline_latent_diffusion LatentDiffusionPipeline DDPMScheduler",
    }
    for name, (directory, _) in loads.items():
        expected = sample(LatentDiffusionPipeline.from_pretrained(directory))
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), expected, err_msg=name)


def test_diffusion_pipeline_in_process_builds_the_registered_class(tiny_pipeline_dir):
    """Once ldm_pipeline is imported the class is an attribute of ``diffusers``: the generic loader builds it."""
    import diffusers

    assert diffusers.LatentDiffusionPipeline is LatentDiffusionPipeline
    loaded = DiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    assert type(loaded) is LatentDiffusionPipeline
    np.testing.assert_array_equal(sample(loaded), sample(LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)))


def test_code_in_an_older_pipeline_directory_is_never_run(tiny_pipeline_dir, tmp_path):
    """Older saves wrote ``["pipeline_latent_diffusion", "LatentDiffusionPipeline"]`` and a .py file beside it; a
    downloaded directory of that form (here with a file that would leave a marker) loads with
    ``LatentDiffusionPipeline.from_pretrained`` without running it, and Diffusers' generic loader refuses to run
    it unless ``trust_remote_code=True`` is passed."""
    directory = tmp_path / "old_style"
    shutil.copytree(tiny_pipeline_dir, directory)
    marker = tmp_path / "code_was_run"
    (directory / "pipeline_latent_diffusion.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    model_index = json.loads((directory / "model_index.json").read_text())
    model_index["_class_name"] = ["pipeline_latent_diffusion", "LatentDiffusionPipeline"]
    (directory / "model_index.json").write_text(json.dumps(model_index))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(directory)
    loaded = LatentDiffusionPipeline.from_pretrained(directory)
    assert not marker.exists()
    np.testing.assert_array_equal(sample(loaded), sample(LatentDiffusionPipeline.from_pretrained(tiny_pipeline_dir)))


def test_pipelines_saved_with_the_ddpm_scheduler_load_and_sample_as_before(ddpm_pipeline, ddpm_pipeline_dir):
    """The saved DDPMScheduler is what the loaded pipeline samples with (it is not swapped for the new default),
    with the same configuration and the same images for the same arguments; ``set_scheduler("dpm++")``, which
    ldm-generate and ldm-eval apply by default, keeps its noise schedule."""
    loaded = LatentDiffusionPipeline.from_pretrained(ddpm_pipeline_dir)
    assert type(loaded.scheduler) is DDPMScheduler and loaded.scheduler.config.clip_sample is False
    for key, value in ddpm_pipeline.scheduler.config.items():
        if key != "_use_default_values":
            assert loaded.scheduler.config[key] == value, key
    np.testing.assert_array_equal(sample(loaded, num_inference_steps=4), sample(ddpm_pipeline, num_inference_steps=4))
    loaded.set_scheduler("dpm++")
    torch.testing.assert_close(loaded.scheduler.alphas_cumprod, ddpm_pipeline.scheduler.alphas_cumprod)
    assert sample(loaded).std() > 0
