"""Silencing the C++ libraries' logs (LiteRT, the MLIR exporter, absl, oneDNN), which go straight
to file descriptor 2 with no API to turn them down. G3N_LITERT_LOGS=1 keeps them all."""

from __future__ import annotations

import contextlib
import os
import sys


def native_logs_wanted() -> bool:
    return os.environ.get("G3N_LITERT_LOGS") == "1"


@contextlib.contextmanager
def native_stderr_to_devnull(keep_python_stderr: bool = False):
    """Point file descriptor 2 at /dev/null for the block. With `keep_python_stderr`, Python's
    sys.stderr writes to a copy of the real descriptor meanwhile, so g3n's own progress, warnings
    and errors still show while only the native noise is dropped."""
    sys.stderr.flush()
    saved = os.dup(2)
    previous = python_stderr = None
    if keep_python_stderr:
        python_stderr = os.fdopen(os.dup(2), "w", buffering=1)
        previous, sys.stderr = sys.stderr, python_stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        if python_stderr is not None:
            python_stderr.flush()
            sys.stderr = previous
            python_stderr.close()
        os.dup2(saved, 2)
        os.close(saved)


def quiet_native_logs():
    """LiteRT's C++ side logs accelerator and plugin discovery (dozens of INFO / WARNING lines)
    while models load; errors still arrive as Python exceptions."""
    return contextlib.nullcontext() if native_logs_wanted() else native_stderr_to_devnull()


def quiet_native_teardown() -> None:
    """LiteRT logs every accelerator it destroys at process exit to file descriptor 2. A command
    calls this once everything it has to say is printed."""
    if native_logs_wanted():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
