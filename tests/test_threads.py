"""The thread governor: the rule and its hysteresis, /proc/stat parsing, the load measurement, the governor on a
simulated machine, the --num_threads option and the thread figures a stage writes in its metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import run_stage
from ldm_pipeline.config import load_stage_config, stage_config_from_dict
from ldm_pipeline.errors import ConfigError
from ldm_pipeline.threads import (
    CpuSample,
    ThreadGovernor,
    available_cores,
    choose_threads,
    omp_thread_cap,
    others_busy,
    parse_proc_stat,
    read_cpu_sample,
)

REPO = Path(__file__).resolve().parent.parent
TINY_VAE = REPO / "configs" / "tiny" / "vae.json"

PROC_STAT = """\
cpu  1078292 2463 91486 559574 3092 0 589 7436 0 0
cpu0 446338 1301 35684 383263 689 0 101 3745 0 0
cpu1 631953 1162 55801 176311 2403 7 488 3690 0 0
cpu3 100 0 20 5000 40 1 2 3 50 0
intr 5298412 0 0 0 0
ctxt 4203601
procs_running 3
"""
# user + nice + system + irq + softirq + steal of each core line (idle and iowait are not busy; guest is in user)
BUSY_CPU0 = 446338 + 1301 + 35684 + 0 + 101 + 3745
BUSY_CPU1 = 631953 + 1162 + 55801 + 7 + 488 + 3690
BUSY_CPU3 = 100 + 0 + 20 + 1 + 2 + 3


# ----------------------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("cores, others, current, max_threads, expected", [
    # no current count: one thread per free core, max(1, cores - round(others)), halves in favour of threads
    (2, 0.0, None, None, 2),
    (2, 0.5, None, None, 2),
    (2, 0.51, None, None, 1),
    (2, 0.9, None, None, 1),
    (2, 1.7, None, None, 1),
    (2, 5.0, None, None, 1),
    (8, 2.6, None, None, 5),
    (8, 0.0, None, 4, 4),            # OMP_NUM_THREADS caps it
    (1, 0.0, None, None, 1),
    # hysteresis: fewer threads at once ...
    (2, 0.6, 2, None, 1),
    (8, 3.0, 6, None, 5),
    (8, 6.0, 8, None, 2),
    # ... more only with 0.25 of a core to spare
    (2, 0.5, 2, None, 2),
    (2, 0.4, 1, None, 1),
    (2, 0.3, 1, None, 1),
    (2, 0.25, 1, None, 2),
    (2, 0.0, 1, None, 2),
    (8, 2.3, 4, None, 5),            # the rule says 6; with the margin 5
    (8, 2.0, 4, None, 6),
    (8, 0.0, 2, 4, 4),
])
def test_choose_threads_follows_its_rule_with_hysteresis(cores, others, current, max_threads, expected):
    assert choose_threads(cores, others, current, max_threads) == expected


def test_hysteresis_keeps_the_count_in_the_band_and_leaves_it_beyond():
    """On 2 cores a count of 2 holds up to 0.5 busy cores and a count of 1 from 0.25 up: the band between the two
    thresholds keeps either count, so a load that wavers inside it does not flip the count at every check."""
    for others in (0.26, 0.3, 0.4, 0.5):
        assert choose_threads(2, others, current=1) == 1
        assert choose_threads(2, others, current=2) == 2
    assert choose_threads(2, 0.51, current=2) == 1 and choose_threads(2, 0.24, current=1) == 2


def test_omp_num_threads_caps_auto_at_most_to_the_cores():
    assert omp_thread_cap(4, {}) == 4
    assert omp_thread_cap(4, {"OMP_NUM_THREADS": "1"}) == 1
    assert omp_thread_cap(4, {"OMP_NUM_THREADS": "16"}) == 4
    for unusable in ("", "0", "auto", "-2"):
        assert omp_thread_cap(4, {"OMP_NUM_THREADS": unusable}) == 4


def test_available_cores_is_the_affinity_mask():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert available_cores() == expected


# ----------------------------------------------------------------------------------------------- the measurement


def test_proc_stat_busy_jiffies_sum_the_allowed_cores_only():
    assert parse_proc_stat(PROC_STAT) == BUSY_CPU0 + BUSY_CPU1 + BUSY_CPU3  # the aggregate "cpu" line is skipped
    assert parse_proc_stat(PROC_STAT, {0, 1}) == BUSY_CPU0 + BUSY_CPU1
    assert parse_proc_stat(PROC_STAT, {1, 3, 7}) == BUSY_CPU1 + BUSY_CPU3
    assert parse_proc_stat("cpu  1 2 3 4\nintr 5\n") == 0


def test_a_sample_reads_proc_stat_in_seconds(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(PROC_STAT)
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    sample = read_cpu_sample(str(stat))
    assert sample.busy == pytest.approx(parse_proc_stat(PROC_STAT, cpus) / os.sysconf("SC_CLK_TCK"), rel=1e-12)
    fallback = read_cpu_sample(str(tmp_path / "missing"))
    assert fallback.busy is None and fallback.load == pytest.approx(os.getloadavg()[0], abs=1.0)


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="no /proc/stat")
def test_this_machines_counters_are_read():
    sample = read_cpu_sample()
    assert sample.busy is not None and sample.busy > 0 and sample.own > 0


def test_others_busy_is_busy_time_less_own_time_over_wall_time():
    start, end = CpuSample(10.0, 100.0, 3.0), CpuSample(14.0, 106.0, 5.5)
    assert others_busy(start, end) == pytest.approx((6.0 - 2.5) / 4.0)
    assert others_busy(start, CpuSample(14.0, 102.0, 5.5)) == 0.0          # never below 0 (tick rounding)
    assert others_busy(start, start) == 0.0
    no_proc = CpuSample(0.0, None, 1.0)
    assert others_busy(no_proc, CpuSample(2.0, None, 2.0, load=1.7)) == pytest.approx(1.7 - 0.5)  # load average
    assert others_busy(no_proc, CpuSample(2.0, None, 2.0)) == 0.0                                  # nothing known


# ----------------------------------------------------------------------------------------------- the governor


class SimulatedMachine:
    """Counters of a machine where other processes keep ``others`` cores busy and this one ``own_rate`` cores."""

    def __init__(self, others: float = 0.0, own_rate: float = 0.0):
        self.now, self.busy, self.own = 0.0, 0.0, 0.0
        self.others, self.own_rate = others, own_rate
        self.samples = 0

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.busy += (self.others + self.own_rate) * seconds
        self.own += self.own_rate * seconds

    def sample(self) -> CpuSample:
        self.samples += 1
        return CpuSample(self.now, self.busy, self.own)

    def clock(self) -> float:
        return self.now


def governor_on(machine: SimulatedMachine, num_threads: int = 0, cores: int = 2, threads_before: int = 2):
    calls, messages = [], []
    governor = ThreadGovernor(num_threads, cores=cores, max_threads=cores, window=0.3, interval=5.0,
                              sample=machine.sample, clock=machine.clock, sleep=machine.advance,
                              set_threads=calls.append, get_threads=lambda: threads_before, log=messages.append)
    return governor, calls, messages


def test_governor_drops_a_thread_when_load_appears_and_takes_it_back_when_it_goes():
    machine = SimulatedMachine(others=0.0)
    governor, calls, messages = governor_on(machine)
    assert governor.threads == 2 and calls == [2] and machine.now == pytest.approx(0.3)
    machine.own_rate = 2.0                       # training: its own CPU time is not load
    machine.advance(6.0)
    assert governor.maybe_adjust() == 2 and calls == [2]

    machine.others = 0.9
    machine.advance(3.0)
    samples = machine.samples
    assert governor.maybe_adjust() == 2 and machine.samples == samples   # not yet 5 s: no counter read
    machine.own_rate = 1.2
    machine.advance(3.0)
    assert governor.maybe_adjust() == 1 and calls == [2, 1]
    assert messages[-1] == "threads: 2 -> 1 (other processes keep 0.9 of 2 cores busy)"

    machine.others = 0.4                         # inside the hysteresis band: stays
    machine.advance(6.0)
    assert governor.maybe_adjust() == 1 and calls == [2, 1]
    machine.others = 0.1
    machine.advance(6.0)
    assert governor.maybe_adjust() == 2 and calls == [2, 1, 2]
    assert messages[-1] == "threads: 1 -> 2 (other processes keep 0.1 of 2 cores busy)"

    summary = governor.summary()
    assert summary == {"mode": "auto", "initial": 2, "final": 2, "min": 1, "max": 2, "changes": 2, "cores": 2,
                       "seconds": {"1": 12.0, "2": 12.0}}
    governor.close()
    assert calls[-1] == 2


def test_governor_starts_with_fewer_threads_on_a_busy_machine():
    machine = SimulatedMachine(others=1.0)
    governor, calls, messages = governor_on(machine, cores=4)
    assert governor.threads == 3 and calls == [3]
    assert messages == ["threads: auto, 3 of 4 cores (other processes keep 1.0 cores busy; re-checked every 5 s)"]


def test_a_fixed_thread_count_is_never_changed():
    machine = SimulatedMachine(others=1.8)
    governor, calls, messages = governor_on(machine, num_threads=2, threads_before=5)
    assert machine.samples == 0 and machine.now == 0.0 and calls == [2]   # nothing measured, no waiting
    for _ in range(5):
        machine.advance(10.0)
        assert governor.maybe_adjust() == 2
    assert calls == [2] and messages == [] and machine.samples == 0
    assert governor.summary() == {"mode": "fixed", "initial": 2, "final": 2, "min": 2, "max": 2, "changes": 0,
                                  "cores": 2, "seconds": {"2": 50.0}}
    governor.close()
    assert calls == [2, 5]


def test_a_negative_thread_count_is_refused():
    with pytest.raises(ValueError, match="--num_threads -1"):
        ThreadGovernor(-1)


# ----------------------------------------------------------------------------------------------- the option


def test_num_threads_option_parses_and_is_not_part_of_the_run_fingerprint():
    base = ["--config", str(TINY_VAE)]
    assert load_stage_config("vae", base).training.num_threads == 0
    fixed = load_stage_config("vae", base + ["--num_threads", "3"])
    assert fixed.training.num_threads == 3
    assert fixed.fingerprint() == load_stage_config("vae", base).fingerprint()
    config = json.loads(TINY_VAE.read_text())
    config["training"]["num_threads"] = 2
    assert stage_config_from_dict("vae", config).training.num_threads == 2


def test_a_bad_num_threads_flag_names_the_flag():
    with pytest.raises(ConfigError, match="--num_threads = -1 is out of range: it must be >= 0"):
        load_stage_config("vae", ["--config", str(TINY_VAE), "--num_threads", "-1"])


@pytest.mark.parametrize("value, message", [
    ("auto", "training.num_threads must be an integer, got 'auto'"),
    (1.5, "training.num_threads must be an integer, got 1.5"),
    (-2, "training.num_threads = -2 is out of range"),
])
def test_a_bad_num_threads_in_a_config_names_the_key(value, message):
    config = json.loads(TINY_VAE.read_text())
    config["training"]["num_threads"] = value
    with pytest.raises(ConfigError, match=message):
        stage_config_from_dict("vae", config, path="vae.json")


# ----------------------------------------------------------------------------------------------- a stage run


@pytest.mark.parametrize("num_threads", [0, 1])
def test_a_stage_writes_its_thread_figures_and_gives_the_count_back(tmp_path, num_threads):
    before = torch.get_num_threads()
    metrics = run_stage("vae", ["--config", str(TINY_VAE), "--output_dir", str(tmp_path), "--max_train_steps", "2",
                                "--report_to", "none", "--num_threads", str(num_threads)])
    threads = json.loads((tmp_path / "vae_metrics.json").read_text())["threads"]
    assert threads == metrics["threads"] and threads["cores"] == available_cores()
    if num_threads:
        assert {k: v for k, v in threads.items() if k != "seconds"} == {
            "mode": "fixed", "initial": 1, "final": 1, "min": 1, "max": 1, "changes": 0, "cores": available_cores()}
    else:
        cap = omp_thread_cap(available_cores())
        assert threads["mode"] == "auto" and 1 <= threads["min"] <= threads["initial"] <= threads["max"] <= cap
    assert sum(threads["seconds"].values()) >= metrics["train_seconds_this_run"] - 0.05
    assert torch.get_num_threads() == before


def test_the_demo_summary_lists_the_threads_of_each_stage_that_recorded_them(tmp_path):
    from training import run_demo

    steady = {"mode": "auto", "initial": 2, "final": 2, "min": 2, "max": 2, "changes": 0, "cores": 2,
              "seconds": {"2": 100.0}}
    changing = {"mode": "auto", "initial": 2, "final": 1, "min": 1, "max": 2, "changes": 3, "cores": 2,
                "seconds": {"1": 80.2, "2": 20.1}}
    dirs = {name: tmp_path / name for name in ("text_encoder", "vae", "unet")}
    for name, threads in (("text_encoder", steady), ("vae", None), ("unet", changing)):  # vae: trained on a GPU
        dirs[name].mkdir()
        metrics = {"train_steps": 10, **({"threads": threads} if threads else {})}
        (dirs[name] / f"{name}_metrics.json").write_text(json.dumps(metrics))
    threads = run_demo.stage_threads(dirs)
    assert threads == {"text_encoder": steady, "unet": changing}
    summary = {"seconds_per_stage": {}, "total_minutes": 0.0, "text_encoder": {}, "vae": {}, "evaluation": {},
               "threads": threads, "sample_grid": "grid.png", "pipeline": "pipeline"}
    assert ("- CPU threads: text encoder 2 (auto, 2 cores); U-Net 2 -> 1 (auto, 2 cores; 1-2 threads, 3 changes; "
            "seconds at each: 1: 80, 2: 20)") in run_demo.format_summary(summary).splitlines()
