"""Tests of ``--workers N``: an exact shared budget, resuming, samplers, errors."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import optuna
import pytest
import torch
from conftest import tiny_spec_data
from optuna.trial import TrialState

from modelsel.errors import DataError
from modelsel.parallel import (
    WorkerError,
    WorkerOrders,
    _Shared,
    _wait,
    trial_loop,
    worker_main,
    worker_sampler,
    worker_threads,
)
from modelsel.spec import parse_spec
from modelsel.storage import open_storage
from modelsel.study import run_study


def test_two_workers_reach_exactly_the_budget_and_resume(fast_tmp: Path) -> None:
    spec = parse_spec(tiny_spec_data(name="parallel"))
    first = run_study(spec, output_dir=fast_tmp, n_trials=3, workers=2, progress=False, build_report=False)
    assert (first.n_complete + first.n_pruned, first.n_trained_this_run, first.n_failed) == (3, 3, 0)
    study = optuna.load_study(study_name="parallel", storage=first.storage_url)
    # Each worker samples its own configurations (no duplicated first draws).
    params = [tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False)]
    assert len(set(params)) == len(params) == 3
    second = run_study(spec, output_dir=fast_tmp, n_trials=5, workers=2, progress=False, build_report=False)
    assert (second.n_complete + second.n_pruned, second.n_trained_this_run, second.n_failed) == (5, 2, 0)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == len(states) == 5
    assert second.test is not None  # the selected trial was retrained and tested once


def test_slots_are_claimed_exactly_once() -> None:
    shared = _Shared(multiprocessing.get_context("spawn"), 3)
    assert [shared.claim() for _ in range(5)] == [True, True, True, False, False]
    unlimited = _Shared(multiprocessing.get_context("spawn"), None)
    assert all(unlimited.claim() for _ in range(10))
    unlimited.stop.set()
    assert not unlimited.claim()


def test_worker_samplers_are_seeded_apart() -> None:
    spec = parse_spec(tiny_spec_data(sampler="tpe"))
    first, second = worker_sampler(spec, 0), worker_sampler(spec, 1)
    assert isinstance(first, optuna.samplers.TPESampler)
    assert first._constant_liar
    draws = []
    for sampler in (first, second):
        study = optuna.create_study(sampler=sampler)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
        draws.append([t.params["x"] for t in study.trials])
    assert draws[0] != draws[1]


def test_one_thread_per_cpu_worker() -> None:
    assert worker_threads(torch.device("cpu"), 2) == 1
    assert worker_threads(torch.device("cuda"), 2) >= 1


def test_a_failing_worker_reports_one_line(fast_tmp: Path) -> None:
    shared = _Shared(multiprocessing.get_context("spawn"), 1)
    spec = parse_spec(tiny_spec_data(name="missing"))
    url = f"sqlite:///{fast_tmp / 'nothing.db'}"
    shared.orders.put(WorkerOrders(url, 1, None, "cpu", torch.get_num_threads()))
    with pytest.raises(SystemExit):
        worker_main(3, spec.to_json(), shared)
    assert shared.stop.is_set()
    with pytest.raises(WorkerError, match=r"^worker 3: KeyError: ") as info:
        _wait([], shared)
    assert "\n" not in str(info.value)


def test_two_workers_cover_a_sweep_grid_exactly_once(fast_tmp: Path) -> None:
    sweep = {"width": [4, 8], "lr": [0.01, 0.05]}
    spec = parse_spec(tiny_spec_data(name="psweep", search=None, sampler=None, sweep=sweep))
    outcome = run_study(spec, output_dir=fast_tmp, workers=2, progress=False, build_report=False)
    study = optuna.load_study(study_name="psweep", storage=outcome.storage_url)
    cells = sorted((t.params["width"], t.params["lr"]) for t in study.get_trials(deepcopy=False))
    assert cells == [(4, 0.01), (4, 0.05), (8, 0.01), (8, 0.05)]


def test_grid_workers_share_one_cell_order() -> None:
    spec = parse_spec(tiny_spec_data(search=None, sampler=None, sweep={"width": [4, 8, 16], "lr": [0.01, 0.05]}))
    grids = [worker_sampler(spec, w)._all_grids for w in range(3)]
    assert grids[0] == grids[1] == grids[2]


def test_workers_started_early_are_stopped_when_the_run_fails_its_checks(fast_tmp: Path) -> None:
    # The pool starts before the data is checked; a failed check must leave no process
    # running and nothing written.
    spec = parse_spec(
        tiny_spec_data(name="early", dataset={**tiny_spec_data()["dataset"], "train_size": 6}, cv={"folds": 4})
    )
    with pytest.raises(DataError, match=r"cv\.folds is 4"):
        run_study(spec, output_dir=fast_tmp / "reports", workers=3, progress=False, build_report=False)
    assert multiprocessing.active_children() == []
    assert not (fast_tmp / "reports").exists()


def test_a_worker_told_to_stop_before_its_orders_writes_nothing(fast_tmp: Path) -> None:
    shared = _Shared(multiprocessing.get_context("spawn"), 1)
    spec = parse_spec(tiny_spec_data(name="stopped"))
    url = f"sqlite:///{fast_tmp / 'never.db'}"
    shared.stop.set()
    shared.orders.put(WorkerOrders(url, 1, None, "cpu", torch.get_num_threads()))
    worker_main(1, spec.to_json(), shared)
    assert not (fast_tmp / "never.db").exists()
    assert shared.errors.empty()


def test_the_worker_loop_leaves_no_trial_running_when_storing_its_failure_is_refused(
    fast_tmp: Path, monkeypatch: pytest.MonkeyPatch, locked_failure_writes: list[int]
) -> None:
    """The loop each worker (the calling process included) runs its trials in: a SIGTERM
    or Ctrl-C whose failed trial cannot be stored at first is stored once the loop stops."""
    import modelsel.objective as objective_module

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(objective_module, "cross_validate", interrupted)
    url = f"sqlite:///{fast_tmp}/loop.db"
    study = optuna.create_study(study_name="loop", storage=open_storage(url), direction="maximize")
    spec = parse_spec(tiny_spec_data(name="loop"))
    shared = _Shared(multiprocessing.get_context("spawn"), 2)
    with pytest.raises((KeyboardInterrupt, AssertionError)):  # Optuna: AssertionError "Should not reach."
        trial_loop(study, spec, device=torch.device("cpu"), target=2, deadline=None, shared=shared)
    assert locked_failure_writes, "storing the interrupted trial as failed was refused"
    assert [t.state for t in optuna.load_study(study_name="loop", storage=url).trials] == [TrialState.FAIL]
