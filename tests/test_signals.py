"""A signal that stops a run is never lost, even when it lands in a finalizer."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import pytest
from conftest import SignalsInItsFinalizer

from modelsel.signals import RESEND_DELAY_S, interrupt_on


def test_the_signal_raises_keyboard_interrupt_and_sets_the_event() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with interrupt_on(signal.SIGTERM) as received:
        assert not received.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert received.is_set()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_that_a_finalizer_swallowed_is_sent_again() -> None:
    hook_before = sys.unraisablehook
    started = time.monotonic()
    with interrupt_on(signal.SIGTERM) as received, pytest.raises(KeyboardInterrupt):
        SignalsInItsFinalizer(signal.SIGTERM)  # dropped at once: its finalizer runs here
        time.sleep(5)  # without the resend, nothing interrupts this
    assert received.is_set()
    assert time.monotonic() - started < 4
    assert sys.unraisablehook is hook_before


def test_a_resend_still_pending_when_the_block_ends_is_cancelled() -> None:
    late: list[int] = []

    def record(signum: int, frame: Any) -> None:
        late.append(signum)

    outer = signal.signal(signal.SIGTERM, record)
    try:
        with interrupt_on(signal.SIGTERM):
            SignalsInItsFinalizer(signal.SIGTERM)  # swallowed; the block ends before the resend
        time.sleep(RESEND_DELAY_S * 6)
        assert late == []
    finally:
        signal.signal(signal.SIGTERM, outer)


def test_other_unraisable_exceptions_still_reach_the_previous_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[type[BaseException] | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.exc_type))

    class Broken:
        def __del__(self) -> None:
            raise ValueError("a bug in a finalizer")

    with interrupt_on(signal.SIGTERM):
        Broken()
    assert seen == [ValueError]
