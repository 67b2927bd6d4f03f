"""Signals that stop a run: Ctrl-C (SIGINT) and SIGTERM in the calling process, SIGTERM in ``--workers`` processes.

Each becomes a KeyboardInterrupt, which unwinds the trial in training so that Optuna stores
it as failed and every finished trial stays. Python swallows an exception raised while a
finalizer runs (a weakref callback of SQLAlchemy's ORM, a ``__del__``: "Exception ignored
in ..."), so a signal that lands there would be lost and the run would go on;
:func:`interrupt_on` sends such a signal again once the finalizer has returned.
"""

from __future__ import annotations

import contextlib
import os
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
