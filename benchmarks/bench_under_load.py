"""Training speed while another process keeps a core busy: auto threads against a fixed thread count.

    python benchmarks/bench_under_load.py [--size demo] [--unet_steps 12] [--vae_steps 40] [--fixed_threads N]
        [--nice 0] [--no_pin] [--check] [--out FILE]

Two steps of configs/<size>: the U-Net step on cached latents (random config-sized text encoder and VAE, as in
bench_unet_training.py) and the VAE step, each trained by its script (``training/train_unet.py``,
``training/train_vae.py``, run in this process) with ``--num_threads 0`` (auto, ``ldm_pipeline.threads``) and with
``--num_threads N`` (default: every core this process may use, which is PyTorch's own choice), first alone, then
while a busy loop runs: a Python subprocess ``while True: pass`` started here, pinned to the last core this
process may use (``os.sched_setaffinity``; ``--no_pin`` leaves it to the scheduler, as a user's program would be)
at ``--nice`` (0: a normal program; 19: a background job). The busy loop is always stopped, its process group
killed, also on an error or Ctrl-C (and it stops by itself when this process dies).

Images/s = batch / seconds per step after the first step (``elapsed_s`` of OUT/train_log.jsonl). For each row
it prints images/s alone and under load, the slow-down (alone / under load) and the thread counts the run used.
Target: auto under load at most 2.5 times slower than auto alone (``--check``: exit status 1 otherwise).
Every figure depends on the machine and what else runs on it; the "other load" line says how busy it was before.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_unet_training import build_random_stages, steady_seconds_per_step  # noqa: E402
from ldm_pipeline.threads import available_cores, omp_thread_cap, others_busy, read_cpu_sample  # noqa: E402
from ldm_pipeline.trainer import run_in_process  # noqa: E402
from training import train_unet, train_vae  # noqa: E402

MAX_SLOWDOWN = 2.5
BUSY_LOOP = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(1_000_000):
        pass
"""


@contextlib.contextmanager
def busy_core(pin: bool, nice: int):
    """A busy-loop Python process for the duration of the block, in a process group of its own that is killed on
    the way out (normally, on an error, on Ctrl-C); it also ends by itself once this process is gone."""
    process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(os.getpid())], start_new_session=True)
    try:
        where = "not pinned"
        if pin and hasattr(os, "sched_setaffinity"):
            core = max(os.sched_getaffinity(0))
            os.sched_setaffinity(process.pid, {core})
            where = f"pinned to core {core}"
        if nice:
            os.setpriority(os.PRIO_PROCESS, process.pid, nice)
        time.sleep(0.5)
        yield f"busy loop (pid {process.pid}) {where}, nice {nice}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def measure_other_load(seconds: float = 1.0) -> float:
    """Cores other processes keep busy over ``seconds`` (``ldm_pipeline.threads.others_busy``)."""
    start = read_cpu_sample()
    time.sleep(seconds)
    return others_busy(start, read_cpu_sample())


def train(main, argv: list[str], output_dir: Path) -> dict:
    """Run a stage script quietly; its metrics with ``images_per_second`` over the steps after the first."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        metrics = run_in_process(main, argv + ["--output_dir", str(output_dir)])
    batch = int(argv[argv.index("--train_batch_size") + 1])
    return {**metrics, "images_per_second": batch / steady_seconds_per_step(output_dir)}


def thread_range(threads: dict) -> str:
    """``1`` for a count that never changed, else ``2->1 (1-2)``: first -> last (lowest-highest)."""
    low, high = threads["min"], threads["max"]
    return str(low) if low == high else f"{threads['initial']}->{threads['final']} ({low}-{high})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="demo", help="configs/<size>/{unet,vae,text_encoder}.json")
    parser.add_argument("--unet_steps", type=int, default=12, help="U-Net steps per run (the first is warm-up).")
    parser.add_argument("--vae_steps", type=int, default=40, help="VAE steps per run (the first is warm-up).")
    parser.add_argument("--unet_batch_size", type=int, default=None, help="Default: the config's.")
    parser.add_argument("--vae_batch_size", type=int, default=None, help="Default: the config's.")
    parser.add_argument("--fixed_threads", type=int, default=available_cores(),
                        help="The fixed thread count compared with auto (default: every available core).")
    parser.add_argument("--nice", type=int, default=0, help="Niceness of the busy loop (0-19).")
    parser.add_argument("--no_pin", action="store_true", help="Do not pin the busy loop to one core.")
    parser.add_argument("--check", action="store_true",
                        help=f"Exit 1 when auto under load is more than {MAX_SLOWDOWN}x slower than alone.")
    parser.add_argument("--out", default=None, help="Also write the figures as JSON here.")
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated benchmark still stops its busy loop

    configs = REPO / "configs" / options.size
    unet_config = json.loads((configs / "unet.json").read_text())
    vae_config = json.loads((configs / "vae.json").read_text())
    unet_batch = options.unet_batch_size or unet_config["training"]["train_batch_size"]
    vae_batch = options.vae_batch_size or vae_config["training"]["train_batch_size"]
    quiet = ["--checkpointing_steps", str(10**9), "--report_to", "none", "--mixed_precision", "no",
             "--num_validation_samples", "16"]
    modes = {"auto": "0", f"fixed {options.fixed_threads}": str(options.fixed_threads)}
    other_load = measure_other_load()

    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text_dir, vae_dir = build_random_stages(options.size, root, unet_config["data"]["resolution"])
        stages = {
            "U-Net step": (train_unet.main, ["--config", str(configs / "unet.json"), "--text_encoder", str(text_dir),
                                             "--vae", str(vae_dir), "--cache_dir", str(root / "cache"),
                                             "--max_train_steps", str(options.unet_steps),
                                             "--train_batch_size", str(unet_batch),
                                             "--num_train_samples", str(options.unet_steps * unet_batch),
                                             "--validation_prompts", "a red cat",
                                             "--validation_num_inference_steps", "1"] + quiet),
            "VAE step": (train_vae.main, ["--config", str(configs / "vae.json"),
                                          "--max_train_steps", str(options.vae_steps),
                                          "--train_batch_size", str(vae_batch),
                                          "--num_train_samples", str(options.vae_steps * vae_batch),
                                          "--scaling_factor_max_samples", str(vae_batch)] + quiet),
        }

        def run_all(load: str) -> None:
            for stage, (script, argv) in stages.items():
                for mode, num_threads in modes.items():
                    row = f"{stage}, {mode}"
                    output_dir = root / "runs" / f"{stage}-{mode}-{load}".replace(" ", "_").replace(",", "")
                    results.setdefault(row, {})[load] = train(script, argv + ["--num_threads", num_threads],
                                                              output_dir)

        run_all("alone")
        with busy_core(pin=not options.no_pin, nice=options.nice) as busy:
            run_all("busy")

    cap = omp_thread_cap(available_cores())
    print(f"\nTraining under load, configs/{options.size}, {available_cores()} cores (auto uses at most {cap}); "
          f"other load before the runs: {other_load:.2f} cores; under load: {busy}")
    print(f"{'row':<26}{'alone img/s':>13}{'busy img/s':>12}{'slow-down':>11}   threads alone / busy")
    for row, runs in results.items():
        alone, busy_run = runs["alone"], runs["busy"]
        runs["slowdown"] = alone["images_per_second"] / busy_run["images_per_second"]
        print(f"{row:<26}{alone['images_per_second']:>13.1f}{busy_run['images_per_second']:>12.1f}"
              f"{runs['slowdown']:>10.2f}x   {thread_range(alone['threads'])} / "
              f"{thread_range(busy_run['threads'])}")
    auto_rows = {row: runs["slowdown"] for row, runs in results.items() if row.endswith("auto")}
    failed = {row: slowdown for row, slowdown in auto_rows.items() if slowdown > MAX_SLOWDOWN}
    print(f"target: auto under load at most {MAX_SLOWDOWN}x slower than alone: "
          + ", ".join(f"{row} {slowdown:.2f}x {'FAIL' if row in failed else 'ok'}"
                      for row, slowdown in auto_rows.items()))
    if options.out:
        Path(options.out).write_text(json.dumps({"other_load": other_load, "busy": busy, "rows": results}, indent=2,
                                                default=str))
    return 1 if options.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
