"""Shared fixtures: one torch thread, quiet Optuna, and tiny study specs that train in seconds."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml

# The CPU cores are shared: with other processes busy, several intra-op threads are far
# slower than one. Set at import so that collection-time work is covered too.
torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)

#: A study that trains in about a second: 200 synthetic samples, 2 folds, 2 epochs.
TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "description": "a tiny study for the tests",
    "seed": 0,
    "dataset": {
        "name": "synthetic-classification",
        "n_samples": 200,
        "n_features": 8,
        "n_informative": 4,
        "n_redundant": 0,
        "n_classes": 2,
    },
    "model": {"depth": 1, "width": 8},
    "training": {"epochs": 2, "batch_size": 32, "lr": 0.01},
    "search": {
        "width": {"type": "int", "low": 4, "high": 16},
        "lr": {"type": "log", "low": 0.001, "high": 0.1},
    },
    "cv": {"folds": 2},
    "sampler": "random",
    "pruner": "none",
    "budget": {"n_trials": 2},
}


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Keep every test on one intra-op thread (also after a library changed it)."""
    torch.set_num_threads(1)


@contextlib.contextmanager
def fast_folder(fallback: Path) -> Iterator[Path]:
    """A fresh empty folder in memory (/dev/shm) when available, else ``fallback``.

    SQLite commits to a disk-backed folder cost an fsync each, which makes up about
    half the time of a tiny study on a busy machine; the tests that run studies use this.
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 512 * 2**20):
        yield fallback
        return
    folder = Path(tempfile.mkdtemp(prefix="modelsel-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def fast_tmp(tmp_path: Path) -> Iterator[Path]:
    """Like ``tmp_path``, in memory where possible (see :func:`fast_folder`)."""
    with fast_folder(tmp_path) as folder:
        yield folder


def tiny_spec_data(**changes: Any) -> dict[str, Any]:
    """A deep copy of :data:`TINY_SPEC` with top-level keys replaced (None removes a key)."""
    data = copy.deepcopy(TINY_SPEC)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[..., Path]:
    """Write a spec mapping (default: the tiny spec) as YAML under ``tmp_path``; return its path."""

    def write(data: dict[str, Any] | None = None, *, filename: str = "spec.yaml", **changes: Any) -> Path:
        content = tiny_spec_data(**changes) if data is None else data
        path = tmp_path / filename
        path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
        return path

    return write


def files_under(path: Path) -> list[Path]:
    """Every file and folder under ``path`` (empty when it does not exist)."""
    return sorted(path.rglob("*")) if path.exists() else []


class SignalsInItsFinalizer:
    """An object whose finalizer receives ``signum`` while it runs: the KeyboardInterrupt
    that the handler raises there is swallowed by Python ("Exception ignored in ...")."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def __del__(self) -> None:
        os.kill(os.getpid(), self.signum)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # the handler raises KeyboardInterrupt in here
            pass


@pytest.fixture
def locked_failure_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Storing a trial as failed raises "database is locked" until this thread's storage
    session is closed, as when Ctrl-C left its connection mid-transaction.

    Returns the ids of the trials whose failure writes were refused.
    """
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState
    from sqlalchemy.exc import OperationalError

    refused: list[int] = []
    locked = [True]
    set_trial_state_values, remove_session = RDBStorage.set_trial_state_values, RDBStorage.remove_session

    def refusing_failures(self: Any, trial_id: int, state: TrialState, values: Any = None) -> bool:
        if state == TrialState.FAIL and locked[0]:
            refused.append(trial_id)
            raise OperationalError("UPDATE trials SET state=?", {}, Exception("database is locked"))
        return set_trial_state_values(self, trial_id, state, values)

    def unlocking(self: Any) -> None:
        locked[0] = False
        remove_session(self)

    monkeypatch.setattr(RDBStorage, "set_trial_state_values", refusing_failures)
    monkeypatch.setattr(RDBStorage, "remove_session", unlocking)
    return refused
