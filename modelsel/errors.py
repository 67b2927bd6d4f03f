"""Errors that reach the user as one line: bad input (exit code 2), and runs stopped by a failure (exit code 1)."""

from __future__ import annotations

from collections.abc import Iterator


class UserError(Exception):
    """Bad input from the user: a spec, a CLI flag, a data path or a storage URL.

    The message is a single line that names what is wrong and how to fix it.
    The CLI prints it as ``error: <message>`` and exits with code 2.
    """


class SpecError(UserError):
    """A study spec that fails validation."""


class DataError(UserError):
    """A dataset that cannot be found, read or understood."""


class StorageError(UserError):
    """A storage URL that is malformed or cannot be reached."""


class RunError(Exception):
    """A run stopped by a failure that is not bad input (a worker process died).

    The message is a single line; the CLI prints it as ``error: <message>`` and exits
    with code 1. Finished trials are kept, and running the command again resumes.
    """


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then every exception it was raised from or while handling (``__cause__``,
    ``__context__``), each once."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [e for e in (current.__context__, current.__cause__) if e is not None]
