"""Tests of ``--workers N``: an exact shared budget, resuming, samplers, errors."""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from conftest import files_under, tiny_spec_data
from optuna.trial import TrialState

from modelsel.cv import fit_and_test
from modelsel.errors import DataError
from modelsel.objective import load_dataset_for
from modelsel.parallel import (
    WorkerError,
    WorkerOrders,
    _draft,
    _fail_trials_of_stopped_workers,
    _prepare_before_orders,
    _refresh_bar,
    _Shared,
    _wait,
    _worker_process,
    refit_while_others_search,
    trial_loop,
    worker_main,
    worker_sampler,
    worker_threads,
)
from modelsel.report import ReportDraft
from modelsel.results import best_trial, retrain_epochs
from modelsel.spec import parse_spec, with_params
from modelsel.storage import open_storage
from modelsel.study import run_study
from modelsel.training import resolve_device, torch_threads


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    """Some tests run a worker's entry point in the test process; it ignores SIGINT (the
    calling process handles Ctrl-C), which later Ctrl-C tests in the same process would see."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


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
    # ... and the resumed workers sample apart from the first run's.
    params = [tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False)]
    assert len(set(params)) == 5
    assert second.test is not None  # the selected trial was retrained and tested once


def test_the_retrain_of_a_parallel_run_does_not_depend_on_which_worker_made_it(fast_tmp: Path) -> None:
    # Whether a worker retrained the best trial while another still searched, or the
    # calling process retrained after the search, the test score is that of a retrain
    # with the workers' threads.
    sweep = {"width": [4, 8, 16], "lr": [0.05]}
    spec = parse_spec(tiny_spec_data(name="refit", search=None, sampler=None, sweep=sweep))
    outcome = run_study(spec, output_dir=fast_tmp, workers=2, progress=False, build_report=False)
    study = optuna.load_study(study_name="refit", storage=outcome.storage_url)
    selected = best_trial(study)
    assert selected is not None and outcome.test is not None
    assert outcome.test["trial_number"] == selected.number
    trial_spec = with_params(spec, selected.params)
    device = resolve_device(spec.training.device)  # the run's device: the GPU where there is one
    with torch_threads(worker_threads(device, 2)):
        score = fit_and_test(
            trial_spec, load_dataset_for(trial_spec), epochs=retrain_epochs(selected, trial_spec), device=device
        )
    assert (outcome.test["test_loss"], outcome.test["test_metric"]) == (score.test_loss, score.test_metric)


def test_the_first_worker_out_of_trials_retrains_the_best_so_far_once(fast_tmp: Path) -> None:
    spec = parse_spec(tiny_spec_data(name="early"))
    url = f"sqlite:///{fast_tmp / 'early.db'}"
    run_study(spec, storage=url, n_trials=2, progress=False, build_report=False)
    study = optuna.load_study(study_name="early", storage=url)
    study.set_user_attr("test_result", None)
    cpu = torch.device("cpu")
    shared = _Shared(multiprocessing.get_context("spawn"), 0, workers=2)
    shared.left_search()
    shared.left_search()
    assert refit_while_others_search(study, spec, device=cpu, shared=shared) is None  # no one still searches
    shared = _Shared(multiprocessing.get_context("spawn"), 0, workers=2)
    shared.left_search()
    early = refit_while_others_search(study, spec, device=cpu, shared=shared)
    selected = best_trial(study)
    assert early is not None and selected is not None
    assert (early.trial_number, early.params) == (selected.number, selected.params)
    assert early.fits(selected, retrain_epochs(selected, spec))
    assert not early.fits(selected, retrain_epochs(selected, spec) + 1)
    assert refit_while_others_search(study, spec, device=cpu, shared=shared) is None  # claimed once


def test_a_spawned_worker_sends_its_early_retrain_to_the_calling_process(fast_tmp: Path) -> None:
    spec = parse_spec(tiny_spec_data(name="sent"))
    url = f"sqlite:///{fast_tmp / 'sent.db'}"
    run_study(spec, storage=url, n_trials=1, progress=False, build_report=False)
    optuna.load_study(study_name="sent", storage=url).set_user_attr("test_result", None)
    # Worker 1, a spawned process, finds no slot left while the calling process (the other
    # worker) still searches; its model must come through the pipe before it exits.
    context = multiprocessing.get_context("spawn")
    shared = _Shared(context, 0, workers=2)
    shared.orders.put(WorkerOrders(url, None, None, "cpu", 1))
    worker = context.Process(target=_worker_process, args=(1, spec.to_json(), shared))
    worker.start()
    received = _wait([worker], shared)
    assert worker.exitcode == 0
    early = received.early_refit
    assert early is not None and early.trial_number == 0
    assert received.report_draft is None  # the calling process still searched: no draft yet
    dataset = load_dataset_for(spec)
    assert early.member.model(dataset.X_test[:3]).shape == (3, dataset.n_outputs)


def test_the_last_worker_out_drafts_the_report_while_the_calling_process_retrains(fast_tmp: Path) -> None:
    spec = parse_spec(tiny_spec_data(name="drafted"))
    url = f"sqlite:///{fast_tmp / 'drafted.db'}"
    run_study(spec, storage=url, n_trials=2, progress=False, build_report=False)
    context = multiprocessing.get_context("spawn")
    shared = _Shared(context, 0, workers=2)
    # The calling process left its search first and is retraining early.
    shared.left_search()
    assert shared.claim_early_refit()
    shared.caller_refitting.value = 1
    shared.orders.put(WorkerOrders(url, None, None, "cpu", 1, report=True))
    worker = context.Process(target=_worker_process, args=(1, spec.to_json(), shared))
    worker.start()
    received = _wait([worker], shared, draft=lambda: pytest.fail("the worker drafts"))
    assert worker.exitcode == 0 and received.early_refit is None
    draft = received.report_draft
    assert draft is not None
    assert [section.title for section in draft.sections] == ["Search", "Gradient flow", "Trials"]
    assert len(draft.frame) == 2 and b"trial,state" in draft.files["trials.csv"]


class _StandInWorker:
    """Stands in for a worker process, alive until told to exit."""

    def __init__(self) -> None:
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        time.sleep(min(timeout or 0.0, 0.01))

    def exit(self) -> None:
        self.exitcode = 0


def test_an_idle_calling_process_drafts_the_report_once_every_worker_has_left_its_search() -> None:
    drafted: list[ReportDraft] = []

    def draft() -> ReportDraft:
        drafted.append(ReportDraft(pd.DataFrame(), [], {}))
        return drafted[-1]

    still_searching = _Shared(multiprocessing.get_context("spawn"), 0, workers=2)
    still_searching.left_search()
    worker = _StandInWorker()
    threading.Timer(0.3, worker.exit).start()  # ends its last trial and exits
    assert _wait([worker], still_searching, draft=draft).report_draft is None
    assert drafted == []
    done = _Shared(multiprocessing.get_context("spawn"), 0, workers=2)
    done.left_search()
    done.left_search()
    worker = _StandInWorker()  # retrains early; the calling process drafts meanwhile
    threading.Timer(0.3, worker.exit).start()
    assert _wait([worker], done, draft=draft).report_draft is drafted[0]
    taken = _Shared(multiprocessing.get_context("spawn"), 0, workers=2)
    taken.left_search()
    taken.left_search()
    assert taken.claim_draft()  # a worker drafts it
    worker = _StandInWorker()
    threading.Timer(0.3, worker.exit).start()
    assert _wait([worker], taken, draft=draft).report_draft is None
    assert len(drafted) == 1


def test_a_draft_that_fails_is_left_to_the_report_build(monkeypatch: pytest.MonkeyPatch) -> None:
    # Drafting early must not stop the run before the test score: the report, built
    # after the test, meets the error again and reports it.
    import modelsel.report

    def broken(study: object) -> None:
        raise RuntimeError("no plots today")

    monkeypatch.setattr(modelsel.report, "draft_report", broken)
    assert _draft(optuna.create_study()) is None


def test_a_worker_waiting_for_its_orders_never_downloads_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The calling process downloads (dataset.download: true) in its check of the data; a
    # worker preparing meanwhile must not start a second download into the same folder.
    import modelsel.data

    downloads: list[Path] = []
    monkeypatch.setattr(modelsel.data, "_download_fashion_mnist", lambda root, raw: downloads.append(raw))
    spec = parse_spec(
        tiny_spec_data(dataset={"name": "fashion-mnist", "root": str(tmp_path), "download": True, "train_size": 100})
    )
    _prepare_before_orders(spec, None)
    assert downloads == [] and files_under(tmp_path) == []
    with pytest.raises(DataError):  # the same spec in the calling process does download
        modelsel.data.load_dataset(spec.dataset, seed=0)
    assert downloads == [tmp_path / "FashionMNIST" / "raw"]


def test_two_workers_stay_within_a_fold_epoch_budget(fast_tmp: Path) -> None:
    # One trial at its longest: 2 epochs x 2 folds; 3.75 trials' worth fits 3 whole ones,
    # however the two workers' trials interleave.
    spec = parse_spec(tiny_spec_data(name="capped", budget={"n_trials": None, "fold_epochs": 15}))
    outcome = run_study(spec, output_dir=fast_tmp, workers=2, progress=False, build_report=False)
    assert (outcome.n_complete, outcome.n_trained_this_run, outcome.fold_epochs) == (3, 3, 12)
    study = optuna.load_study(study_name="capped", storage=outcome.storage_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3


def test_fold_epoch_reservations_let_trials_start_only_while_they_fit() -> None:
    shared = _Shared(multiprocessing.get_context("spawn"), None)
    room = 2  # trials the budget still fits, by the storage

    def fits(running: int) -> bool:
        return room > running

    assert shared.reserve(fits) and shared.reserve(fits)
    assert not shared.reserve(fits)  # both places are held by running trials
    shared.unreserve()
    assert shared.reserve(fits)


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


def test_a_worker_notes_its_trial_before_optuna_sets_it_up(fast_tmp: Path) -> None:
    """A worker killed while Optuna sets its new trial up (the sampler, the heartbeat) must
    leave a trial the calling process can fail: the worker notes the trial as soon as the
    storage has it, not when the objective starts (a SIGKILL there once left it RUNNING)."""
    url = f"sqlite:///{fast_tmp}/noted.db"
    study = optuna.create_study(study_name="noted", storage=open_storage(url), direction="maximize")
    shared = _Shared(multiprocessing.get_context("spawn"), 1, workers=2)
    noted_during_set_up: list[tuple[int, int]] = []

    class SetUpWatcher(optuna.samplers.RandomSampler):
        def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            noted_during_set_up.append((trial._trial_id, int(shared.running[1])))
            # what the calling process does once this worker is found killed
            assert _fail_trials_of_stopped_workers(study, shared) == [trial._trial_id]
            raise KeyboardInterrupt  # the worker "dies" here

    study.sampler = SetUpWatcher(seed=0)
    spec = parse_spec(tiny_spec_data(name="noted"))
    with pytest.raises(KeyboardInterrupt):
        trial_loop(study, spec, device=torch.device("cpu"), target=1, deadline=None, shared=shared, worker=1)
    ((trial_id, noted),) = noted_during_set_up
    assert noted == trial_id
    assert [t.state for t in optuna.load_study(study_name="noted", storage=url).trials] == [TrialState.FAIL]


def test_a_worker_that_dies_stops_the_run_at_once() -> None:
    # Every worker checks the stop flag before it claims a trial; the calling process sets
    # it as soon as a worker has died, not only when its own trial ends.
    import threading

    shared = _Shared(multiprocessing.get_context("spawn"), 10, workers=3)
    alive, killed = _StandInWorker(), _StandInWorker()
    done = threading.Event()
    watcher = threading.Thread(target=_refresh_bar, args=(tqdm_stand_in(), 0, shared, done, [alive, killed]))
    watcher.start()
    try:
        time.sleep(0.6)
        assert not shared.stop.is_set()  # running workers, and one that ended normally, stop nothing
        alive.exit()
        time.sleep(0.6)
        assert not shared.stop.is_set()
        killed.exitcode = -9
        deadline = time.monotonic() + 5
        while not shared.stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shared.stop.is_set() and not shared.claim()
    finally:
        done.set()
        watcher.join()


def tqdm_stand_in() -> object:
    """A progress bar that shows nothing."""

    class Bar:
        n = 0

        def refresh(self) -> None:
            pass

    return Bar()
