"""One training run per output directory, and no process of a run left behind by its launcher.

    check_launch(accelerator)                      # every launched process joined this run (ACCELERATE_USE_CPU)
    stop_with_launcher()                           # a worker stops when its launcher is killed
    lock = acquire_run_lock(output_dir, accelerator)   # OUTPUT_DIR/.run.lock, before anything is written
    ...
    lock.release()

``OUTPUT_DIR/.run.lock`` is held with ``flock`` by every process of a run: process 0 takes it exclusively (a second
run into the same directory finds it taken and stops with one line naming the holder's host and process ids),
then shares it with the run's other processes, each of which holds it until it ends. The kernel releases a
``flock`` when its holder dies, so a killed run leaves no lock that blocks the next one; the file keeps the
holders' records (one JSON object per line: host, pid, rank, start time) until the run ends cleanly, so a run
that finds records of a killed run names them as it takes the lock over.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
PR_SET_PDEATHSIG = 1
LAUNCHER_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND")  # set by torchrun / accelerate

_held: list["RunLock"] = []


class RunLockedError(FileExistsError):
    """The output directory is in use by another run."""


# --------------------------------------------------------------------------------------------------- launch


def check_launch(accelerator) -> None:
    """The launcher's ``WORLD_SIZE`` processes must have joined one run. A multi-process config for GPUs
    (``configs/accelerate/cpu_2_processes.yaml`` is one) on a machine without a GPU, and without
    ``ACCELERATE_USE_CPU=1``, starts each process as a run of its own, all writing into the same directory."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes == 1:
        raise ValueError(f"The launcher started {launched} processes but each one runs alone (no GPU here, and "
                         "ACCELERATE_USE_CPU is not set): set ACCELERATE_USE_CPU=1 to join them on the CPU, e.g. "
                         "ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/cpu_2_processes.yaml "
                         "training/...")


def launched_by_a_launcher() -> bool:
    """True in a process started by ``accelerate launch`` or ``torchrun`` (their environment variables)."""
    return any(name in os.environ for name in LAUNCHER_ENV)


def stop_with_launcher(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (the launcher) dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``), so that a ``kill -9`` of ``accelerate launch`` does not leave its workers
    training on beside the next run. Only in launched processes: a script started from a shell is left alone.
    Returns whether the watch is set."""
    if not sys.platform.startswith("linux") or not launched_by_a_launcher():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher died before the watch was set
        print("The launcher of this process is gone: stopping.", file=sys.stderr, flush=True)
        os._exit(1)
    return True


# --------------------------------------------------------------------------------------------------- the lock


class RunLock:
    """A held ``OUTPUT_DIR/.run.lock`` (see the module docstring); ``release()`` at the end of the run."""

    def __init__(self, path: Path, fd: int | None, owner: bool):
        self.path, self.fd, self.owner = path, fd, owner

    def release(self) -> None:
        """Clear the holders' records (process 0: the run ended cleanly) and let the lock go."""
        if self.fd is None:
            return
        try:
            if self.owner:
                os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)
            self.fd = None
            if self in _held:
                _held.remove(self)


def held_run_locks() -> list[RunLock]:
    return list(_held)


def release_run_locks(keep: list[RunLock] | tuple = ()) -> None:
    """Release every lock this process still holds but ``keep``: at exit (a run that stopped on an error ended
    cleanly too: only a killed run leaves its records), and after a run inside a longer-lived process (tests)."""
    for lock in list(_held):
        if lock not in keep:
            lock.release()


atexit.register(release_run_locks)


def holder_record(rank: int) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "rank": rank,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def read_records(fd: int) -> list[dict]:
    """The holders' records of an open lock file (read through ``fd``: opening the file again is not needed)."""
    size = os.fstat(fd).st_size
    text = os.pread(fd, size, 0).decode("utf-8", errors="replace") if size else ""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def describe_holders(records: list[dict]) -> str:
    """``pid 123 (rank 0) on host h, started 2024-01-01 12:00:00; pid 124 (rank 1) ...``."""
    if not records:
        return "a process that left no record"
    return "; ".join(f"pid {r.get('pid')} (rank {r.get('rank')}) on host {r.get('host')}, started {r.get('started')}"
                     for r in records)


def process_is_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _lock_unsupported(error: OSError) -> bool:
    return error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)


def take_exclusive(directory: Path) -> tuple[RunLock | None, str | None]:
    """Process 0's part: ``(lock, None)``, or ``(None, message)`` when another run holds the directory. Records of a
    run that ended without releasing the lock (killed) are named in a warning and replaced by this run's."""
    path = directory / LOCK_FILE
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holders = describe_holders(read_records(fd))
        os.close(fd)
        return None, (f"{directory} is in use by another training run ({holders}; lock file {path}): wait for it "
                      "to finish or stop it, or train into another --output_dir.")
    except OSError as error:
        os.close(fd)
        if not _lock_unsupported(error):
            raise
        logger.warning("Cannot lock %s (%s): a second run into this directory will not be detected.", path, error)
        return RunLock(path, None, owner=True), None
    stale = read_records(fd)
    if stale:
        alive = [r for r in stale if r.get("host") == socket.gethostname() and process_is_alive(r.get("pid"))
                 and r.get("pid") != os.getpid()]
        state = "still running but no longer holding it" if alive else "no longer running"
        print(f"{path} was left by a run that ended without releasing it ({describe_holders(stale)}; {state}): "
              "taking it over.", file=sys.stderr, flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder_record(0)) + "\n").encode(), 0)
    os.fsync(fd)
    try:  # share it with this run's other processes (a run that takes it between the two calls wins)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, f"{directory} was taken by another training run while this one started: train into another --output_dir."
    return RunLock(path, fd, owner=True), None


def take_shared(directory: Path, rank: int) -> RunLock:
    """A further process's part, once process 0 holds the lock: share it and add this process's record."""
    path = directory / LOCK_FILE
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if isinstance(error, BlockingIOError):
            raise RunLockedError(f"{directory} was taken by another training run while this one started: train "
                                 "into another --output_dir.") from None
        if not _lock_unsupported(error):
            raise
        return RunLock(path, None, owner=False)
    with open(path, "a", encoding="utf-8") as records:  # a second descriptor: its close keeps the flock of `fd`
        records.write(json.dumps(holder_record(rank)) + "\n")
    return RunLock(path, fd, owner=False)


def acquire_run_lock(directory: str | os.PathLike, state=None) -> RunLock:
    """Hold ``DIRECTORY/.run.lock`` for this run, in every process of it (``state``: the run's ``Accelerator`` or
    ``PartialState``; None for a single process). Another run holding it is a ``RunLockedError`` in every process,
    naming the holders. Call before the run writes anything into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    num_processes = getattr(state, "num_processes", 1)
    rank = getattr(state, "process_index", 0)
    lock, message = take_exclusive(directory) if rank == 0 else (None, None)
    if num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message], from_process=0)[0]
    if message is not None:
        raise RunLockedError(message)
    if rank != 0:
        lock = take_shared(directory, rank)
    if num_processes > 1:
        state.wait_for_everyone()
    _held.append(lock)
    return lock
