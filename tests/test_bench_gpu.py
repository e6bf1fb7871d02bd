"""benchmarks/bench_gpu.py without a GPU: one clear line, and a --dry_run that trains a tiny stage through the same
measurement code and prints figures that agree with each other."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_gpu  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_stops_with_one_line():
    with pytest.raises(SystemExit, match=r"^bench_gpu.py: error: no CUDA device here; .*--dry_run"):
        bench_gpu.main([])


def test_dry_run_trains_the_stage_and_its_figures_agree(capsys):
    results = bench_gpu.main(["--dry_run", "--stages", "unet"])
    figures = results["configs"]["tiny"]["unet"]
    assert figures["batch"] == 8 and figures["gflop_per_image"] > 0
    assert figures["images_per_second"] == pytest.approx(figures["batch"] / figures["wall_ms"] * 1e3)
    assert figures["tflops"] == pytest.approx(figures["gflop_per_image"] * figures["images_per_second"] / 1e3)
    assert figures["share_of_peak"] == pytest.approx(figures["tflops"] / results["peak_tflops"])
    assert 0 <= figures["data_wait_ms"] < figures["wall_ms"]
    assert "tiny      unet" in capsys.readouterr().out
