"""Signals that stop a run: Ctrl-C (SIGINT) and SIGTERM in the calling process, SIGTERM in ``--workers`` processes.

Each becomes a KeyboardInterrupt, which unwinds the trial in training so that Optuna stores
it as failed and every finished trial stays. Python swallows an exception raised while a
finalizer runs (a weakref callback of SQLAlchemy's ORM, a ``__del__``: "Exception ignored
in ..."), so a signal that lands there would be lost and the run would go on;
:func:`interrupt_on` sends such a signal again once the finalizer has returned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

#: How long after a swallowed signal it is sent again (the finalizer returns long before).
RESEND_DELAY_S = 0.05


@contextlib.contextmanager
def interrupt_on(signum: int) -> Iterator[threading.Event]:
    """Within the block, signal ``signum`` raises KeyboardInterrupt and sets the yielded event.

    A KeyboardInterrupt swallowed by a finalizer is not reported as "Exception ignored";
    the signal is sent to this process again instead. Outside the block the previous
    handler and ``sys.unraisablehook`` are back, and resends not yet made are cancelled.
    Call it from the main thread (Python runs signal handlers there only).
    """
    received = threading.Event()
    resends: list[threading.Timer] = []

    def on_signal(signum: int, frame: Any) -> None:
        received.set()
        raise KeyboardInterrupt

    def on_unraisable(unraisable: Any) -> None:
        # Only this block's own signal is sent again: with blocks nested for several
        # signals, the hook of the block whose signal arrived resends it.
        if (
            received.is_set()
            and unraisable.exc_type is not None
            and issubclass(unraisable.exc_type, KeyboardInterrupt)
        ):
            # From another thread, a moment later: raised here, it would only be swallowed again.
            again = threading.Timer(RESEND_DELAY_S, os.kill, args=(os.getpid(), signum))
            again.daemon = True
            again.start()
            resends.append(again)
        else:
            previous_hook(unraisable)

    previous_hook = sys.unraisablehook
    previous_handler = signal.signal(signum, on_signal)
    sys.unraisablehook = on_unraisable
    try:
        yield received
    finally:
        for again in resends:
            again.cancel()  # the block is over: nothing left to interrupt
        sys.unraisablehook = previous_hook
        signal.signal(signum, previous_handler)


class _InterruptedTrialLog(logging.Filter):
    """Turns Optuna's log of a trial that Ctrl-C stopped into one line.

    Optuna logs such a trial as a failure with the KeyboardInterrupt's whole traceback
    (from deep inside the training loop), then "Trial N failed with value None."; a
    user who pressed Ctrl-C needs neither. Other failures are left as they are.
    """

    _FAILED = re.compile(r"Trial (\d+) failed with ")

    def __init__(self) -> None:
        super().__init__()
        self.interrupted: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        match = self._FAILED.match(message)
        if match is None:
            return True
        number = match.group(1)
        if _logs_an_interrupt(record):
            self.interrupted.add(number)
            record.msg, record.args = f"Trial {number} stopped by Ctrl-C or SIGTERM.", ()
            record.exc_info, record.exc_text = None, None
            return True
        return not (number in self.interrupted and message.endswith("failed with value None."))


class _InterruptedPoolLog(logging.Filter):
    """Drops SQLAlchemy's "Exception during reset or similar" when the exception is the
    interrupt itself: Ctrl-C landed while a connection went back to its pool. SQLAlchemy
    logs it with a traceback, then lets it propagate; the user pressed Ctrl-C."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _logs_an_interrupt(record)


def _logs_an_interrupt(record: logging.LogRecord) -> bool:
    """Whether the record carries a KeyboardInterrupt's traceback."""
    exc_type = record.exc_info[0] if record.exc_info else None
    return exc_type is not None and issubclass(exc_type, KeyboardInterrupt)


#: The loggers of the connection pools of the storages' engines (SQLite files and servers).
_POOL_LOGGERS = ("sqlalchemy.pool.impl.QueuePool", "sqlalchemy.pool.impl.NullPool")


def quiet_interrupted_trial_logs() -> None:
    """Log a trial stopped by Ctrl-C as one line, without its traceback, and drop the
    traceback SQLAlchemy logs when Ctrl-C lands in its connection pool (idempotent)."""
    filters: list[tuple[str, type[logging.Filter]]] = [("optuna.study._optimize", _InterruptedTrialLog)]
    filters += [(name, _InterruptedPoolLog) for name in _POOL_LOGGERS]
    for name, kind in filters:
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
