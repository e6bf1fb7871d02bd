"""Files that survive a kill or a full disk: what training, the latent cache and the logs write.

- ``atomic_file`` / ``write_text_atomic`` / ``write_json_atomic``: write under a temporary name beside the target,
  fsync, rename over it: a reader sees the old file or the whole new one, never a torn one;
- ``atomic_directory``: the same for a directory (a checkpoint, a snapshot);
- ``check_writable``: prove a directory writable before any work is done;
- ``raise_if_disk_full``: name a full disk as such (PyTorch's serializer says only ``unexpected pos``);
- ``read_jsonl`` / ``JsonlLogger``: an append-only JSON-lines log whose torn last line is dropped on reading.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path

from ldm_pipeline.errors import is_disk_full

logger = logging.getLogger(__name__)

MIN_FREE_BYTES = 64 << 20

# --------------------------------------------------------------------------------------------------- files


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` (and the directories themselves) to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(root)


def fsync_directory(path) -> None:
    """Flush a directory's entries (a rename into it, a new file) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_file(path: Path, writer: str | int) -> Path:
    """The temporary name ``atomic_file`` writes ``path`` under: ``.NAME.partial-WRITER`` (WRITER: the process id)."""
    return path.with_name(f".{path.name}.partial-{writer}")


def remove_partial_files(path: Path) -> None:
    """Delete what killed writers of ``path`` left behind (``atomic_file``'s temporary files)."""
    for partial in path.parent.glob(partial_file(path, "*").name):
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` to write; on success it is fsynced and renamed over ``path``, so
    readers see the old file or the whole new one, never a torn one. On failure the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_file(path, os.getpid())
    try:
        yield partial
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    fsync_directory(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as partial:
        partial.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a temporary sibling directory; on success it is fsynced and renamed to ``final`` (replacing it)."""
    partial = final.with_name(f".partial-{final.name}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        fsync_tree(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    fsync_directory(final.parent)


def check_writable(directory: str | os.PathLike, what: str) -> Path:
    """Create ``directory`` and prove it writable before any work is done (not after an hour of it)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(errno.EACCES, f"{what} {directory} is not writable ({error.strerror}): choose a "
                                            "writable location") from None
    return directory


def raise_if_disk_full(error: BaseException, directory: Path, what: str) -> None:
    """Turn a failed write into "No space left on device" when that is what happened (PyTorch's serializer
    reports a full disk only as ``unexpected pos``)."""
    free = shutil.disk_usage(directory).free if directory.exists() else MIN_FREE_BYTES
    if is_disk_full(error) or "unexpected pos" in str(error) or free < MIN_FREE_BYTES:
        raise OSError(errno.ENOSPC, f"No space left on device while writing {what} ({free >> 20} MiB free): free "
                                    "disk space, then resume with --resume_from_checkpoint latest (earlier "
                                    "checkpoints are intact)", str(directory)) from error


# --------------------------------------------------------------------------------------------------- logs


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log. A torn last line (a kill or a full disk during an append) is dropped
    with a warning; a damaged line before it is an error naming the line."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("Dropping the torn last line %d of %s (an interrupted write).", number, path)
                continue
            raise ValueError(f"{path} line {number} is not JSON: delete that line (the log is only a record; "
                             "checkpoints do not depend on it) and resume again.") from None
    return records


class JsonlLogger:
    """Append one JSON object per line to a file (main process only); the file survives resumes. A resumed run
    starts from the records up to its checkpoint's step; a record it logs again for one of those steps (the final
    validation of a run killed after its last checkpoint) replaces the earlier one with the same fields."""

    def __init__(self, path: str | os.PathLike, accelerator, start_step: int = 0):
        self.path = Path(path)
        self.enabled = accelerator.is_main_process
        self.start_step = start_step
        self.previous: list[dict] = []
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate_after(start_step)

    def _truncate_after(self, step: int) -> None:
        """Drop records of steps > ``step`` left by an interrupted run, so a resume does not duplicate them."""
        if step == 0:
            self.path.unlink(missing_ok=True)
            return
        self.previous = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.previous))

    def log(self, **record) -> None:
        if not self.enabled:
            return
        if self.start_step and record.get("step", self.start_step + 1) <= self.start_step:
            fields = sorted(set(record) - {"elapsed_s"})
            kept = [r for r in read_jsonl(self.path)
                    if not (r.get("step") == record["step"] and sorted(set(r) - {"elapsed_s"}) == fields)]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept + [record]))
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
