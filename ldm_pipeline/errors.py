"""One clear line for every failure at a command's entry point; the traceback on request.

Every console script and training script runs its ``main`` through :func:`run_cli`:

    if __name__ == "__main__":
        run_cli(main, prog="train_vae.py")

An exception that reaches the entry point is printed as a single line, ``PROG: error: MESSAGE``, and the process
exits with status 2 (1 for an internal error). ``--verbose`` on the command line, or ``LDM_VERBOSE=1`` in the
environment, re-raises it with its full traceback instead. Library code raises ordinary exceptions
(``ValueError``, ``FileNotFoundError``, ...) whose message names the file, row, flag or value and says what to do.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Sequence

VERBOSE_FLAG = "--verbose"
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
OS_ADVICE = {
    errno.ENOSPC: "free disk space, then run the same command again",
    errno.EACCES: "choose a writable location",
    errno.EPERM: "choose a writable location",
    errno.EROFS: "choose a writable location",
}


class ConfigError(ValueError):
    """A config file or command-line value that the schema rejects."""


def describe_os_error(error: OSError) -> str:
    """``REASON (FILE): ADVICE.`` for an ``OSError``: the system's reason (or the project's own message), the file,
    and what to do when the message does not say it already."""
    reason = error.strerror or str(error)
    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    advice = OS_ADVICE.get(error.errno)
    if advice is None or advice.split(",")[0] in reason:
        return f"{reason}{where}"
    return f"{reason}{where}: {advice}."


def is_disk_full(error: BaseException) -> bool:
    """True when ``error`` (or an exception it was raised from) is a full disk."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def error_line(error: BaseException) -> str:
    """The one line printed for ``error``."""
    if isinstance(error, OSError) and error.errno in OS_ADVICE:
        return describe_os_error(error)
    if is_disk_full(error):
        return ("No space left on device while writing: free disk space, then resume the same command (finished "
                "checkpoints are kept).")
    first_line = " ".join((str(error).strip() or type(error).__name__).splitlines())
    if isinstance(error, USER_ERRORS + (OSError,)):
        return first_line
    return f"{type(error).__name__}: {first_line}"


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None,
            prog: str | None = None) -> None:
    """Call ``main(argv)`` (``argv`` defaults to ``sys.argv[1:]`` without ``--verbose``) and turn an exception
    into one line on stderr and a non-zero exit status, unless ``--verbose`` or ``LDM_VERBOSE=1`` asks for the
    traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = VERBOSE_FLAG in argv or os.environ.get("LDM_VERBOSE", "") not in ("", "0")
    argv = [arg for arg in argv if arg != VERBOSE_FLAG]
    prog = prog or os.path.basename(sys.argv[0])
    try:
        main(argv)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:  # the entry point is the one place that turns every failure into a message
        if verbose:
            raise
        internal = not isinstance(error, USER_ERRORS + (OSError,))
        hint = f" (run with {VERBOSE_FLAG} for the traceback)" if internal else ""
        print(f"{prog}: error: {error_line(error)}{hint}", file=sys.stderr, flush=True)
        raise SystemExit(1 if internal else 2) from None
