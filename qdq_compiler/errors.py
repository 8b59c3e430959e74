"""User-facing errors: each becomes one line on stderr and a non-zero exit code."""


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
