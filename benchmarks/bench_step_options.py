"""Each training-step option measured alone, side by side in one run: which ones pay on this machine.

    python benchmarks/bench_step_options.py [--size demo] [--steps 20] [--options baseline foreach fused ...]
        [--device cuda]

For every stage of ``configs/<size>`` (the rows of ``bench_utilisation.py``) it times the step with one option
changed from the baseline (AdamW's default, which is the per-parameter loop on CPU tensors and foreach on CUDA
ones; contiguous NCHW tensors; eager mode; fp32 without TF32):

- ``foreach``: AdamW's multi-tensor implementation (``foreach=True``);
- ``fused``: AdamW's fused kernel (``fused=True``);
- ``channels_last``: weights and image/latent inputs in NHWC memory order;
- ``compile``: ``torch.compile`` (inductor) of the trained model; its one-off compile time is printed apart;
- on CUDA (``--device cuda``, the default where there is one) also ``tf32`` (TF32 matrix products and
  convolutions), ``bf16`` (the forward under bf16 autocast) and ``cuda_graphs`` (``torch.compile`` with
  ``mode="reduce-overhead"``, which replays the step's kernels as CUDA graphs).

The training-loop switches of the same names are in ``ldm_pipeline/fast_path.py``.

Prints images/s per stage and option and the ratio to the baseline. The options are kept in the stages only where
the ratio clearly exceeds 1 (see the README's performance section).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_utilisation import _seconds, stage_steps  # noqa: E402
from ldm_pipeline.fast_path import set_tf32  # noqa: E402

OPTIONS = {
    "baseline": {},
    "foreach": {"optimizer_options": {"foreach": True}},
    "fused": {"optimizer_options": {"fused": True}},
    "channels_last": {"channels_last": True},
    "compile": {"compile_models": True},
    "tf32": {},
    "bf16": {"autocast_dtype": torch.bfloat16},
    "cuda_graphs": {"compile_models": True, "compile_mode": "reduce-overhead"},
}
CUDA_ONLY = ("tf32", "bf16", "cuda_graphs")


def time_steps(step, steps: int, warmup: int = 2) -> tuple[float, float]:
    """(seconds of the ``warmup`` first calls, median seconds per step over ``steps`` later calls)."""
    first = sum(_seconds(step) for _ in range(warmup))
    return first, statistics.median(_seconds(step) for _ in range(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="demo")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per row (the median is reported).")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--stages", nargs="+", default=None, help="Row names to keep (substring match).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="Also write the figures as JSON here.")
    args = parser.parse_args()
    if args.device == "cpu" and set(args.options) & set(CUDA_ONLY):
        parser.error(f"--options {' '.join(sorted(set(args.options) & set(CUDA_ONLY)))} need --device cuda.")
    results = {}
    for option in args.options:
        if args.device != "cpu":
            set_tf32(option == "tf32")
        for name, step, batch in stage_steps(args.size, device=args.device, **OPTIONS[option]):
            if args.stages and not any(wanted in name for wanted in args.stages):
                continue
            warmup, seconds = time_steps(step, args.steps)
            results.setdefault(name, {})[option] = {"images_per_second": batch / seconds, "warmup_s": warmup}
            print(f"{option:<14}{name:<40}{batch / seconds:>9.1f} img/s  (first 2 steps {warmup:.1f} s)", flush=True)

    print(f"\nconfigs/{args.size}, {args.device}, torch threads {torch.get_num_threads()}: images/s (ratio to "
          "baseline)")
    print(f"{'stage':<40}" + "".join(f"{option:>18}" for option in args.options))
    for name, by_option in results.items():
        base = by_option.get("baseline", {}).get("images_per_second")
        cells = []
        for option in args.options:
            value = by_option[option]["images_per_second"]
            cells.append(f"{value:>9.1f} ({value / base:.2f}x)" if base else f"{value:>18.1f}")
        print(f"{name:<40}" + "".join(f"{cell:>18}" for cell in cells))
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
