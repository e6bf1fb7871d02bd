"""How many intra-op CPU threads a training stage uses: chosen from the cores other processes leave free.

PyTorch splits every CPU op across its intra-op threads and waits for the slowest one (an OpenMP barrier). When
another process keeps one of the cores busy, the thread that shares its core with it holds every op back: on a
2-core machine the demo VAE step takes 66 ms with 2 threads alone, 92 ms with 1 thread, but 213 ms with 2 threads
while another process (even at ``nice 19``) runs, and 85 ms with 1 thread then. A fixed ``OMP_WAIT_POLICY=PASSIVE``
avoids the collapse but doubles the step time on an idle machine. So the thread count follows the load instead:

    governor = ThreadGovernor(num_threads=0)   # measures 0.3 s, calls torch.set_num_threads
    for step in ...:
        ...
        governor.maybe_adjust()                # cheap; re-measures at most every 5 s, from counters (no sleep)
    governor.summary()                         # {"mode": "auto", "initial": 1, "min": 1, "max": 2, ...}
    governor.close()                           # the thread count of before

The load of other processes over a window is the busy CPU time of the cores this process may run on
(``/proc/stat``: user + nice + system + irq + softirq + steal, per core) minus this process's own CPU time, divided
by the wall time: ``others_busy = (Δbusy - Δown) / Δwall`` cores. Processes this one starts (DataLoader workers)
count as others: they take cores too. Without ``/proc/stat`` the 1-minute load average less this process's CPU
rate is used, and without either the machine is taken as idle.

A changed thread count can change the order of floating-point sums (a parallel reduction is split differently),
so two runs, or a run and its resume, agree bit for bit only with a fixed ``--num_threads N``; with ``auto`` they
agree to float tolerance.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger(__name__)

PROC_STAT = "/proc/stat"
CORE_LINE = re.compile(r"^cpu(\d+)\s+(.*)$")
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (idle = 3 and iowait = 4 are not busy)
START_WINDOW_S = 0.3
CHECK_INTERVAL_S = 5.0
UP_MARGIN = 0.25


def available_cores() -> int:
    """The number of CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def allowed_cpus() -> set[int] | None:
    """The indices of the CPUs this process may run on, or None where the platform does not say."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def omp_thread_cap(cores: int, environ=os.environ) -> int:
    """The most threads ``auto`` may use: ``cores``, lowered to ``OMP_NUM_THREADS`` when that is set to a positive
    integer (``accelerate launch`` sets it to cores / processes; a user may set it to share the machine)."""
    text = environ.get("OMP_NUM_THREADS", "").strip()
    return min(cores, int(text)) if text.isdigit() and int(text) > 0 else cores


def parse_proc_stat(text: str, cpus: set[int] | None = None) -> int:
    """Busy jiffies summed over the per-core ``cpuN`` lines of ``/proc/stat`` whose N is in ``cpus`` (all when
    None): user + nice + system + irq + softirq + steal. Guest time is already part of user and nice (proc(5))."""
    busy = 0
    for line in text.splitlines():
        match = CORE_LINE.match(line)
        if match is None or (cpus is not None and int(match.group(1)) not in cpus):
            continue
        fields = [int(value) for value in match.group(2).split()]
        busy += sum(fields[i] for i in BUSY_FIELDS if i < len(fields))
    return busy


@dataclass(frozen=True)
class CpuSample:
    """Counters at one moment: ``wall`` (monotonic seconds), ``busy`` (CPU-seconds all processes spent on our
    cores so far; None without /proc/stat), ``own`` (this process's CPU-seconds, all threads) and ``load``
    (the 1-minute load average, only read when ``busy`` is None)."""

    wall: float
    busy: float | None
    own: float
    load: float | None = None


def read_cpu_sample(proc_stat: str = PROC_STAT) -> CpuSample:
    """The counters of :class:`CpuSample` now, from ``/proc/stat``, ``time.process_time`` and the load average."""
    wall, own = time.monotonic(), time.process_time()
    try:
        with open(proc_stat, encoding="ascii") as f:
            busy = parse_proc_stat(f.read(), allowed_cpus()) / os.sysconf("SC_CLK_TCK")
        return CpuSample(wall, busy, own)
    except (OSError, ValueError):
        pass
    try:
        return CpuSample(wall, None, own, os.getloadavg()[0])
    except (AttributeError, OSError):
        return CpuSample(wall, None, own)


def others_busy(start: CpuSample, end: CpuSample) -> float:
    """Cores that other processes kept busy between two samples: ``(Δbusy - Δown) / Δwall``, at least 0.
    Without busy counters: the load average at ``end`` less this process's CPU rate; without that, 0."""
    seconds = end.wall - start.wall
    if seconds <= 0:
        return 0.0
    own_rate = (end.own - start.own) / seconds
    if start.busy is not None and end.busy is not None:
        return max(0.0, (end.busy - start.busy) / seconds - own_rate)
    if end.load is not None:
        return max(0.0, end.load - own_rate)
    return 0.0


def choose_threads(cores: int, others: float, current: int | None = None, max_threads: int | None = None,
                   margin: float = UP_MARGIN) -> int:
    """The thread count for ``cores`` cores of which other processes keep ``others`` busy.

    The rule: one thread per core left free, ``threads = clamp(⌊cores - others + ½⌋, 1, max_threads)``, that is
    ``max(1, cores - round(others))`` with halves rounded in favour of more threads. With hysteresis around a
    ``current`` count: fewer threads as soon as the rule says so (too many threads under load cost several times
    the step time), more only when the rule still says so with ``margin`` cores less free (``⌊cores - others -
    margin + ½⌋``; too few cost at most the idle core). So on 2 cores, 2 threads drop to 1 above 0.5 busy cores
    and 1 thread returns to 2 at 0.25 or below; in between the count stays.
    """
    cap = max(1, min(cores, max_threads or cores))

    def rule(free: float) -> int:
        return min(cap, max(1, math.floor(free + 0.5)))

    plain = rule(cores - others)
    if current is None or plain <= current:
        return plain
    return max(min(current, cap), rule(cores - others - margin))


class ThreadGovernor:
    """Sets ``torch.set_num_threads`` for a training run and keeps it matched to the load (module docstring).

    ``num_threads`` ``N >= 1`` fixes N threads for the whole run (never changed; bit-for-bit reproducible).
    ``0`` is auto: at start the load of other processes is measured for ``window`` seconds and
    :func:`choose_threads` picks the count, between 1 and ``max_threads`` (default: the cores this process may use,
    lowered to ``OMP_NUM_THREADS`` when set); :meth:`maybe_adjust`, called every step, re-measures from the
    counters accumulated since the last check at most every ``interval`` seconds and changes the count with a
    one-line log message. ``sample``, ``clock``, ``sleep``, ``set_threads`` and ``get_threads`` can be replaced
    (tests use a simulated machine).
    """

    def __init__(self, num_threads: int = 0, *, cores: int | None = None, max_threads: int | None = None,
                 window: float = START_WINDOW_S, interval: float = CHECK_INTERVAL_S,
                 sample: Callable[[], CpuSample] = read_cpu_sample, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 set_threads: Callable[[int], None] = torch.set_num_threads,
                 get_threads: Callable[[], int] = torch.get_num_threads,
                 log: Callable[[str], None] = logger.info):
        if num_threads < 0:
            raise ValueError(f"--num_threads {num_threads}: pass 0 (auto) or a positive thread count.")
        self.fixed = num_threads > 0
        self.cores = cores or available_cores()
        self.max_threads = max_threads or omp_thread_cap(self.cores)
        self.interval = interval
        self._sample, self._clock, self._set_threads, self._log = sample, clock, set_threads, log
        self._threads_before = get_threads()
        self.others = 0.0
        if self.fixed:
            threads = num_threads
        else:
            self._last = sample()
            sleep(window)
            self._measure()
            threads = choose_threads(self.cores, self.others, max_threads=self.max_threads)
            log(f"threads: auto, {threads} of {self.cores} cores (other processes keep {self.others:.1f} cores "
                f"busy; re-checked every {interval:g} s)")
        set_threads(threads)
        self.threads = self.initial = self.min = self.max = threads
        self.changes = 0
        self.seconds: dict[int, float] = {}
        self._since = clock()

    def _measure(self) -> None:
        sample = self._sample()
        self.others = others_busy(self._last, sample)
        self._last = sample

    def _count_time(self) -> None:
        now = self._clock()
        self.seconds[self.threads] = self.seconds.get(self.threads, 0.0) + now - self._since
        self._since = now

    def maybe_adjust(self) -> int:
        """The thread count, re-chosen from the load since the last check when ``interval`` seconds have passed."""
        if self.fixed or self._clock() - self._last.wall < self.interval:
            return self.threads
        self._measure()
        threads = choose_threads(self.cores, self.others, self.threads, self.max_threads)
        if threads != self.threads:
            self._log(f"threads: {self.threads} -> {threads} (other processes keep {self.others:.1f} of "
                      f"{self.cores} cores busy)")
            self._count_time()
            self._set_threads(threads)
            self.threads = threads
            self.min, self.max = min(self.min, threads), max(self.max, threads)
            self.changes += 1
        return self.threads

    def summary(self) -> dict:
        """The thread counts of the run so far, for ``<stage>_metrics.json``: ``mode`` (auto or fixed),
        ``initial``, ``final``, ``min``, ``max``, ``changes`` and ``seconds`` spent at each count."""
        self._count_time()
        return {"mode": "fixed" if self.fixed else "auto", "initial": self.initial, "final": self.threads,
                "min": self.min, "max": self.max, "changes": self.changes, "cores": self.cores,
                "seconds": {str(n): round(s, 2) for n, s in sorted(self.seconds.items())}}

    def close(self) -> None:
        """Give back the thread count found at creation (a run inside a longer process leaves it as it was)."""
        self._set_threads(self._threads_before)
