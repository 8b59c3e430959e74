"""User-facing errors: each becomes one line on stderr and a non-zero exit code."""
from __future__ import annotations

import contextlib
import signal
import threading


class QdqcError(Exception):
    """A failure the user can act on (bad model, unwritable output, failed pass)."""

    exit_code = 1


class UsageError(QdqcError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = 2


class ModelError(QdqcError):
    """The input model cannot be read or is outside what qdqc supports."""


class PassError(QdqcError):
    """A pass failed or left the graph invalid."""


class QdqcNote(UserWarning):
    """Something qdqc did on the user's behalf that they should know about (the CLI prints `qdqc: note: ...`)."""


class Interrupted(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so temporary files are removed and the output is never half written."""

    exit_code = 143

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")


@contextlib.contextmanager
def on_termination():
    """While the body runs, SIGTERM raises `Interrupted` in the main thread (Python's default would end
    the process without running cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
