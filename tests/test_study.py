"""Tests of modelsel.study: budgets and resuming, spec changes, the one-time test score,
reproducibility, selection and the checks that run before anything is written."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import files_under, tiny_spec_data
from optuna.trial import TrialState

from modelsel.errors import DataError, SpecError, StorageError, UserError
from modelsel.results import (
    best_trial,
    best_value_text,
    fold_epochs_spent,
    retrain_epochs,
    stored_spec,
    trial_fold_epochs,
    trials_within_fold_epochs,
)
from modelsel.search import make_pruner, make_sampler
from modelsel.signals import quiet_interrupted_trial_logs
from modelsel.spec import StudySpec, parse_spec, trial_fold_epochs_cap
from modelsel.study import (
    _open_study,
    _optimize,
    check_resumable,
    check_run,
    data_file_fingerprint,
    load_study,
    preflight,
    run_study,
    study_budget,
    summarize,
)


def tiny(**changes: Any) -> StudySpec:
    return parse_spec(tiny_spec_data(**changes))


def run(spec: StudySpec, url: str, fast_tmp: Path, **kwargs: Any) -> Any:
    kwargs.setdefault("build_report", False)
    return run_study(spec, storage=url, output_dir=fast_tmp / "reports", progress=False, **kwargs)


def finished(url: str, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=url)
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


# ------------------------------------------------------------------ budgets


def test_n_trials_is_a_total_across_runs(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/s.db"
    first = run(tiny(), url, fast_tmp, n_trials=2)
    assert first.n_trained_this_run == 2 and first.n_complete == 2
    second = run(tiny(), url, fast_tmp, n_trials=3)
    assert second.n_trained_this_run == 1
    assert second.n_complete + second.n_pruned == 3
    assert sorted(t.number for t in finished(url)) == [0, 1, 2]
    again = run(tiny(), url, fast_tmp, n_trials=3)
    assert again.n_trained_this_run == 0
    assert len(finished(url)) == 3
    # A smaller budget than what is stored trains nothing either.
    assert run(tiny(), url, fast_tmp, n_trials=2).n_trained_this_run == 0


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_search_draws_new_configurations(fast_tmp: Path, sampler: str) -> None:
    # Seeded as in its first run, the sampler drew that run's configurations again.
    url = f"sqlite:///{fast_tmp}/s.db"
    run(tiny(sampler=sampler), url, fast_tmp, n_trials=2)
    run(tiny(sampler=sampler), url, fast_tmp, n_trials=4)
    params = [t.params for t in finished(url)]
    assert len(params) == 4
    assert all(later not in params[:2] for later in params[2:])
    # ... and the same ones again for the same stored trials: resumes are reproducible.
    other = f"sqlite:///{fast_tmp}/t.db"
    run(tiny(sampler=sampler), other, fast_tmp, n_trials=2)
    run(tiny(sampler=sampler), other, fast_tmp, n_trials=4)
    assert [t.params for t in finished(other)] == params


def test_a_resumed_run_stores_its_budget_and_description(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/s.db"
    run(tiny(budget={"n_trials": 1}), url, fast_tmp)
    run(tiny(budget={"n_trials": 2}, description="the second run's words"), url, fast_tmp)
    stored = stored_spec(optuna.load_study(study_name="tiny", storage=url))
    assert (stored["budget"]["n_trials"], stored["description"]) == (2, "the second run's words")


BLOWN = {"train_loss_first": 4.2e6, "train_loss_last": 32.3, "train_loss_peak": 4.2e6}
#: A loss that rose by dropout's noise at a learning rate too small to learn: "diverged"
#: by the diverge_ratio rule, but nothing blew up.
ROSE = {"train_loss_first": 0.6929, "train_loss_last": 0.6999}


def _trial(values: list[float], regime: str, evidence: dict[str, float], **params: int) -> optuna.trial.FrozenTrial:
    distributions = {k: optuna.distributions.IntDistribution(0, 1000) for k in params}
    return optuna.trial.create_trial(
        values=values,
        params=params,
        distributions=distributions,
        user_attrs={"regime": regime, "regime_evidence": evidence},
    )


def test_selection_leaves_out_trials_whose_training_blew_up() -> None:
    # A finite blow-up completes with a number at chance: a study of only such trials
    # selected one and scored the test split with it (test loss 1.5e6).
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial([0.30], "diverged", BLOWN))
    study.add_trial(_trial([0.20], "underfit", {}))
    chosen = best_trial(study)
    assert chosen is not None and chosen.number == 1
    assert best_value_text(study) == "best 0.2"  # the progress bar shows the selection's value
    only_blown = optuna.create_study(direction="maximize")
    only_blown.add_trial(_trial([0.30], "diverged", BLOWN))
    assert best_trial(only_blown) is None and best_value_text(only_blown) == ""
    # A loss that merely rose is still selected (it was, with the advice to lower a rate
    # that was already far too small).
    rose = optuna.create_study(direction="maximize")
    rose.add_trial(_trial([0.50], "diverged", ROSE))
    chosen = best_trial(rose)
    assert chosen is not None and chosen.number == 0
    # Several objectives: the Pareto front of the trials left (trial 0 dominated both).
    pareto = optuna.create_study(directions=["maximize", "minimize"])
    pareto.add_trial(_trial([0.9, 10.0], "diverged", BLOWN))
    pareto.add_trial(_trial([0.8, 50.0], "good", {}))
    pareto.add_trial(_trial([0.7, 20.0], "good", {}))
    pareto.add_trial(_trial([0.6, 60.0], "good", {}))  # dominated by trial 1
    chosen = best_trial(pareto)
    assert chosen is not None and chosen.number == 1


def test_a_sweep_cell_with_a_seed_that_blew_up_is_ranked_by_all_its_seeds() -> None:
    # Leaving the blown-up seed out ranked width 8 on its one lucky seed (0.95) above
    # width 4 (0.80 on both), while sweep.csv's best cell (all seeds) was width 4.
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial([0.80], "good", {}, width=4, seed=0))
    study.add_trial(_trial([0.80], "good", {}, width=4, seed=1))
    study.add_trial(_trial([0.45], "diverged", BLOWN, width=8, seed=0))
    study.add_trial(_trial([0.95], "good", {}, width=8, seed=1))
    chosen = best_trial(study)
    assert chosen is not None and chosen.params == {"width": 4, "seed": 0}
    # A cell ranked best is retrained from a seed that did not blow up.
    study.add_trial(_trial([0.99], "diverged", BLOWN, width=16, seed=0))
    study.add_trial(_trial([0.99], "good", {}, width=16, seed=1))
    chosen = best_trial(study)
    assert chosen is not None and chosen.params == {"width": 16, "seed": 1}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_left_running_by_a_killed_process_is_failed_by_a_later_run_at_its_budget(fast_tmp: Path) -> None:
    # Optuna fails stale trials only when a trial starts: a study at its budget, which
    # trains nothing, kept the trial of a SIGKILLed process running for good.
    import sqlite3

    url = f"sqlite:///{fast_tmp}/s.db"
    run(tiny(budget={"n_trials": 1}), url, fast_tmp)
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)
    killed = optuna.load_study(study_name="tiny", storage=storage).ask()
    storage.record_heartbeat(killed._trial_id)
    storage.remove_session()
    with sqlite3.connect(fast_tmp / "s.db") as db:  # its process died an hour ago
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour')")
    outcome = run(tiny(budget={"n_trials": 1}), url, fast_tmp)
    assert outcome.n_trained_this_run == 0
    states = [t.state for t in optuna.load_study(study_name="tiny", storage=url).get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL]


@pytest.mark.parametrize(
    ("widths", "finished_first", "stopped", "suggested"),
    [
        ([4, 8, 12, 16], 2, 1, True),  # the stopped cell and one never started are left
        ([4, 8, 12], 1, 1, True),  # one cell left beside the stopped one (GridSampler's last-cell check)
        ([4, 8, 12, 16], 2, 2, True),  # every cell started: GridSampler stops the study after each trial
        # Trials asked to be stacked beside a leader hold their cell (grid_id) before they
        # suggest anything; stopped then, they fail without parameters.
        ([4, 8, 12, 16, 20], 1, 3, False),
    ],
)
def test_a_sweep_cell_stopped_by_ctrl_c_is_trained_when_the_sweep_is_resumed(
    fast_tmp: Path, widths: list[int], finished_first: int, stopped: int, suggested: bool
) -> None:
    # Optuna's GridSampler counts a failed trial's cell as visited: the cell was never
    # trained, and a later run trained a finished cell twice.
    url = f"sqlite:///{fast_tmp}/s.db"
    sweep = tiny(search=None, sampler=None, sweep={"width": widths}, training={"epochs": 2, "stack_trials": 1})
    run(sweep, url, fast_tmp, n_trials=finished_first)
    study = optuna.load_study(study_name="tiny", storage=url, sampler=make_sampler(sweep))
    for _ in range(stopped):  # the next cells, as Ctrl-C leaves them
        study.sampler = make_sampler(sweep)
        trial = study.ask()
        if suggested:
            trial.suggest_categorical("width", widths)
        study.sampler = optuna.samplers.RandomSampler()  # GridSampler would stop a study outside optimize
        study.tell(trial, state=TrialState.FAIL)
    outcome = run(sweep, url, fast_tmp)
    assert outcome.n_trained_this_run == len(widths) - finished_first
    assert sorted(t.params["width"] for t in finished(url)) == widths
    assert not optuna.load_study(study_name="tiny", storage=url).get_trials(states=(TrialState.WAITING,))
    # A finished sweep trains nothing more.
    assert run(sweep, url, fast_tmp).n_trained_this_run == 0


def test_a_study_whose_creator_stopped_before_describing_it_is_taken_over(
    fast_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C between Optuna's create_study and modelsel's description of the study left
    # a study every later run refused as "created from a different spec".
    import modelsel.study as study_module

    monkeypatch.setattr(study_module, "_NEW_STUDY_WAIT_S", 0.2)
    url = f"sqlite:///{fast_tmp}/s.db"
    optuna.create_study(study_name="tiny", storage=url, direction="maximize")
    outcome = run(tiny(budget={"n_trials": 1}), url, fast_tmp)
    assert outcome.n_complete == 1
    assert "spec" in optuna.load_study(study_name="tiny", storage=url).user_attrs
    # A study with trials but no description was not made by modelsel: refused, untouched.
    other = optuna.create_study(study_name="other", storage=url, direction="maximize")
    other.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(UserError, match=r"study .other. in .* was not created by modelsel"):
        run(tiny(name="other"), url, fast_tmp)
    assert len(optuna.load_study(study_name="other", storage=url).trials) == 1


@pytest.mark.parametrize("same_spec", [True, False])
def test_a_run_waits_for_the_description_of_a_study_another_process_just_created(
    fast_tmp: Path, same_spec: bool
) -> None:
    # Another process has created the study and writes what it measures a moment later:
    # this run must compare its spec with that one, not take the study over.
    import threading

    import modelsel.study as study_module

    url = f"sqlite:///{fast_tmp}/s.db"
    spec = tiny(budget={"n_trials": 1})
    theirs = spec if same_spec else tiny(budget={"n_trials": 1}, model={"depth": 2, "width": 4})
    created = optuna.create_study(study_name="tiny", storage=url, direction="maximize")

    def describe_a_moment_later() -> None:
        time.sleep(0.5)
        objectives = ["val_accuracy"]
        study_module._describe_study(
            created, theirs, study_module.spec_fingerprint(theirs), objectives, "classification"
        )

    other = threading.Thread(target=describe_a_moment_later)
    other.start()
    try:
        if same_spec:
            assert run(spec, url, fast_tmp).n_complete == 1
        else:
            with pytest.raises(UserError, match="was created from a different spec"):
                run(spec, url, fast_tmp)
    finally:
        other.join()


def test_a_study_stored_with_1e_4_as_text_says_why_its_unchanged_spec_differs(fast_tmp: Path) -> None:
    # Older versions read 1e-4 in a spec as the text '1e-4'; now it is a number, so the
    # same file no longer matches the study it created, and the message did not say why.
    url = f"sqlite:///{fast_tmp}/s.db"
    run(tiny(search={"weight_decay": [0, "1e-4"]}, budget={"n_trials": 1}), url, fast_tmp)
    with pytest.raises(UserError, match=r"differs in: search\.weight_decay\.choices\) \(if the spec file is unch"):
        run(tiny(search={"weight_decay": [0, 1e-4]}, budget={"n_trials": 2}), url, fast_tmp)
    with pytest.raises(UserError) as other:
        run(tiny(search={"weight_decay": [0, 1e-3]}, budget={"n_trials": 2}), url, fast_tmp)
    assert "quote it" not in str(other.value)


def test_a_run_counts_only_the_trials_it_ran(fast_tmp: Path) -> None:
    # Another process adding trials to the same study meanwhile was counted as this run's.
    spec = tiny()
    study = _open_study(spec, f"sqlite:///{fast_tmp}/s.db", create_parent=False, task="classification")
    elsewhere = optuna.load_study(study_name="tiny", storage=f"sqlite:///{fast_tmp}/s.db")

    def another_process_adds_a_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        elsewhere.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))

    cpu = torch.device("cpu")
    ran = _optimize(study, spec, target=2, timeout=None, device=cpu, on_trial=another_process_adds_a_trial)
    assert ran == 2
    assert len(study.trials) == 4


def test_a_long_resumed_study_seeds_its_sampler_below_2_to_the_32() -> None:
    # seed + 104729 x stored trials passed Optuna's limit after ~41,000 trials.
    sampler = make_sampler(tiny(seed=2**31 - 1), seed_offset=104_729 * 50_000)
    assert isinstance(sampler, optuna.samplers.RandomSampler)


def test_spec_budget_is_used_without_an_override(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/s.db"
    outcome = run(tiny(budget={"n_trials": 2}), url, fast_tmp)
    assert outcome.n_trained_this_run == 2 and len(finished(url)) == 2
    assert study_budget(tiny(budget={"n_trials": 7})) == 7
    assert study_budget(tiny(budget={"n_trials": 7}), n_trials=3) == 3


def test_n_trials_stops_a_sweep_early_and_a_later_run_goes_on(fast_tmp: Path) -> None:
    # A sweep's budget is its grid; --n-trials used to be ignored there.
    url = f"sqlite:///{fast_tmp}/s.db"
    sweep = tiny(search=None, sampler=None, sweep={"width": [4, 8], "lr": [0.01, 0.1]}, budget={"n_trials": 30})
    assert study_budget(sweep) == 4 and study_budget(sweep, n_trials=9) == 4
    assert run(sweep, url, fast_tmp, n_trials=1).n_trained_this_run == 1
    assert run(sweep, url, fast_tmp).n_trained_this_run == 3
    assert len({(t.params["width"], t.params["lr"]) for t in finished(url)}) == 4


def test_a_fold_epoch_budget_caps_the_compute_and_tops_up_on_resume(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/s.db"
    # One trial at its longest: 2 epochs x 2 folds. 3.5 trials' worth fits 3 whole ones.
    spec = tiny(budget={"n_trials": None, "fold_epochs": 14})
    first = run(spec, url, fast_tmp)
    study = optuna.load_study(study_name="tiny", storage=url)
    assert first.n_trained_this_run == 3
    assert [t.user_attrs["fold_epochs"] for t in study.trials] == [4, 4, 4]
    assert (first.fold_epochs, first.fold_epochs_budget) == (12, 14)
    assert fold_epochs_spent(study, spec.cv.folds) == 12 and trials_within_fold_epochs(study, spec) == 0
    # The budget is a total over runs: a larger one tops the study up, the same one trains nothing.
    assert run(spec, url, fast_tmp).n_trained_this_run == 0
    more = run(tiny(budget={"n_trials": None, "fold_epochs": 20}), url, fast_tmp)
    assert more.n_trained_this_run == 2 and more.fold_epochs == 20
    # With both budgets the first one reached ends the search.
    both = run(tiny(budget={"n_trials": 6, "fold_epochs": 40}), url, fast_tmp)
    assert both.n_trained_this_run == 1 and both.n_complete == 6


def test_a_grid_search_trains_each_cell_once_whatever_its_trial_budget(fast_tmp: Path) -> None:
    # With n_trials above the cells, the trials stacked beside the first were handed
    # cells again by GridSampler, and a later run trained repeats up to n_trials.
    url = f"sqlite:///{fast_tmp}/s.db"
    spec = tiny(
        training={"epochs": 2, "stack_trials": 8},
        search={"width": [2, 4, 8]},
        sampler="grid",
        pruner="none",
        budget={"n_trials": 10},
    )
    assert run(spec, url, fast_tmp).n_trained_this_run == 3
    assert run(spec, url, fast_tmp).n_trained_this_run == 0
    assert sorted(t.params["width"] for t in finished(url)) == [2, 4, 8]


def test_a_pruned_trial_counts_the_epochs_it_trained_against_a_fold_epoch_budget(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/s.db"
    spec = tiny(
        seed=1,  # GridSampler(seed=1) runs lr 0.1 first, so 1e-5 meets a finished rival
        training={"epochs": 4, "batch_size": 32, "stack_trials": 1},
        search={"lr": [0.1, 0.00001]},
        sampler="grid",
        pruner={"name": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}},
        budget={"n_trials": None, "fold_epochs": 18},  # one trial at its longest: 4 x 2 = 8
    )
    outcome = run(spec, url, fast_tmp)
    study = optuna.load_study(study_name="tiny", storage=url)
    good, hopeless = sorted(study.trials, key=lambda t: -t.params["lr"])
    assert good.state == TrialState.COMPLETE and trial_fold_epochs(good, 2) == 8
    assert hopeless.state == TrialState.PRUNED
    assert trial_fold_epochs(hopeless, 2) == 2 * hopeless.user_attrs["pruned_at_epoch"] < 8
    assert outcome.fold_epochs == fold_epochs_spent(study, spec.cv.folds) < 16
    # What pruning saved leaves room for a third trial (two unpruned ones would leave none).
    assert trials_within_fold_epochs(study, spec) == 1


def test_an_interrupted_trial_counts_the_epochs_of_its_last_report() -> None:
    # A 120-epoch trial reports every 2nd epoch: the step is the epochs trained, and the
    # number of reports only half of them.
    stopped = optuna.trial.create_trial(
        state=TrialState.FAIL, intermediate_values={epoch: 0.5 for epoch in range(2, 115, 2)}
    )
    assert trial_fold_epochs(stopped, 3) == 114 * 3
    assert trial_fold_epochs(optuna.trial.create_trial(state=TrialState.FAIL), 3) == 0


def test_a_fold_epoch_budget_below_one_trial_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match=r"budget\.fold_epochs \(3\) is less than one trial at its longest \(2 epochs"):
        tiny(budget={"fold_epochs": 3})
    searched = tiny_spec_data(budget={"fold_epochs": 10})
    searched["search"]["epochs"] = {"type": "int", "low": 1, "high": 6}
    with pytest.raises(SpecError, match=r"6 epochs × 2 folds = 12\); give at least 12"):
        parse_spec(searched)
    swept = tiny_spec_data(search=None, sampler=None, sweep={"training.epochs": [1, 3]}, budget={"fold_epochs": 6})
    assert trial_fold_epochs_cap(parse_spec(swept)) == 6


def test_finished_study_reuses_the_stored_test_result(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/s.db"
    first = run(tiny(), url, fast_tmp)
    assert first.test is not None
    assert first.test["trial_number"] == first.best_trial_number
    assert 0.0 <= first.test["test_metric"] <= 1.0
    assert first.test["n_test"] == 40
    stored = optuna.load_study(study_name="tiny", storage=url).user_attrs["test_result"]
    assert stored == first.test
    second = run(tiny(), url, fast_tmp)
    assert second.n_trained_this_run == 0
    # A retrain would measure a new fit_seconds; the stored result comes back unchanged.
    assert second.test == first.test


def test_a_changed_spec_is_refused_on_resume(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/s.db"
    run(tiny(budget={"n_trials": 1}), url, fast_tmp)
    changed = tiny(training={"epochs": 3, "batch_size": 32, "lr": 0.01}, budget={"n_trials": 2})
    with pytest.raises(UserError) as info:
        run(changed, url, fast_tmp)
    message = str(info.value)
    assert "\n" not in message
    assert "study 'tiny'" in message and "differs in: training.epochs" in message
    assert "rename the study, use another --storage" in message
    assert len(finished(url)) == 1  # nothing ran
    search = tiny_spec_data()["search"]
    search["width"]["high"] = 32
    with pytest.raises(UserError, match=r"differs in: search\.width\.high\)"):
        run(tiny(search=search), url, fast_tmp)


def test_an_edited_csv_file_is_refused_on_resume(fast_tmp: Path) -> None:
    # The stored spec names the file by its path only: an edited file resumed the study,
    # mixing trials trained on other data and scored against another test split.
    path = fast_tmp / "data.csv"
    rows = [f"{i * 0.1:.1f},{i % 3},{i % 2}" for i in range(40)]
    original = "a,b,y\n" + "\n".join(rows) + "\n"
    path.write_text(original, encoding="utf-8")
    data = {"dataset": {"name": "csv", "path": str(path), "target": "y"}, "search": None}
    data["training"] = {"epochs": 1, "batch_size": 32, "lr": 0.01}
    url = f"sqlite:///{fast_tmp}/s.db"
    run(tiny(**data, budget={"n_trials": 1}), url, fast_tmp)
    stored = optuna.load_study(study_name="tiny", storage=url).user_attrs
    assert stored["data_file"]["size"] == len(original.encode())
    path.write_text(original.replace("0.5,2,1", "0.5,2,0"), encoding="utf-8")  # one label, same size
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    more = tiny(**data, budget={"n_trials": 2})
    with pytest.raises(UserError) as info:
        run(more, url, fast_tmp)
    message = str(info.value)
    assert "\n" not in message and "study 'tiny'" in message and f"dataset.path {path}" in message
    assert "restore the file" in message and "new name or another --storage" in message
    assert optuna.load_study(study_name="tiny", storage=url).user_attrs == stored  # nothing written
    assert len(finished(url)) == 1
    with pytest.raises(UserError, match=r"other contents of dataset\.path"):
        check_resumable([more], url)  # a multi-grid sweep checks its grids before it runs any
    path.write_text(original, encoding="utf-8")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert run(more, url, fast_tmp).n_trained_this_run == 1
    assert data_file_fingerprint(tiny()) is None  # other datasets: no file, nothing stored or checked


def test_budget_description_and_storage_may_change_on_resume(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/s.db"
    run(tiny(budget={"n_trials": 1}), url, fast_tmp)
    outcome = run(tiny(budget={"n_trials": 2}, description="now with a longer text", storage=url), url, fast_tmp)
    assert outcome.n_trained_this_run == 1


def test_the_device_may_be_overridden_on_resume(fast_tmp: Path) -> None:
    # --device says where to train, not what is measured: resuming elsewhere must work.
    url = f"sqlite:///{fast_tmp}/s.db"
    run(tiny(budget={"n_trials": 1}), url, fast_tmp)
    outcome = run(tiny(budget={"n_trials": 2}), url, fast_tmp, device="cpu")
    assert outcome.n_trained_this_run == 1


# ------------------------------------------------------------ reproducibility


def test_same_spec_and_seed_give_the_same_trials_in_two_storages(fast_tmp: Path) -> None:
    results = []
    for name in ("a", "b"):
        url = f"sqlite:///{fast_tmp}/{name}.db"
        outcome = run(tiny(), url, fast_tmp)
        trials = finished(url)
        results.append(
            (
                [t.params for t in trials],
                [t.values for t in trials],
                [t.user_attrs["fold_val_loss"] for t in trials],
                {k: v for k, v in (outcome.test or {}).items() if k != "fit_seconds"},
            )
        )
    assert results[0] == results[1]


def test_another_seed_gives_other_trials(fast_tmp: Path) -> None:
    a = run(tiny(), f"sqlite:///{fast_tmp}/a.db", fast_tmp)
    b = run(tiny(seed=1), f"sqlite:///{fast_tmp}/b.db", fast_tmp)
    assert a.best_params != b.best_params


# ------------------------------------------------------------------ selection


def test_outcome_summarizes_the_best_trial(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/s.db"
    outcome = run(tiny(budget={"n_trials": 3}), url, fast_tmp)
    study = optuna.load_study(study_name="tiny", storage=url)
    best = max(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.values[0])
    assert outcome.best_trial_number == best.number
    assert outcome.best_params == best.params
    assert outcome.cv_mean == best.user_attrs["val_metric_mean"]
    assert outcome.cv_std == best.user_attrs["val_metric_std"]
    assert outcome.objectives == ["val_accuracy"] and outcome.metric_name == "accuracy"
    assert outcome.storage_url == url
    assert outcome.dashboard_command == f"optuna-dashboard {url}"
    assert (outcome.n_complete, outcome.n_pruned, outcome.n_failed) == (3, 0, 0)
    assert study.user_attrs["objectives"] == ["val_accuracy"]
    assert study.user_attrs["task"] == "classification"
    assert parse_spec(json.loads(study.user_attrs["spec_full"])) == tiny(budget={"n_trials": 3})
    shown = summarize(load_study("tiny", url), url)
    assert shown.best_trial_number == outcome.best_trial_number
    assert (shown.cv_mean, shown.test) == (outcome.cv_mean, outcome.test)


def test_a_sweep_with_repeats_selects_the_best_cell_not_the_luckiest_seed() -> None:
    # Width 64's first seed is the best single trial, but width 16 is better over both seeds.
    study = optuna.create_study(direction="maximize")
    distributions = {
        "width": optuna.distributions.CategoricalDistribution([16, 64]),
        "seed": optuna.distributions.CategoricalDistribution([0, 1]),
    }
    for width, seed, value in [(64, 0, 0.95), (64, 1, 0.80), (16, 1, 0.91), (16, 0, 0.90)]:
        study.add_trial(
            optuna.trial.create_trial(params={"width": width, "seed": seed}, distributions=distributions, value=value)
        )
    selected = best_trial(study)
    assert selected is not None and selected.params == {"width": 16, "seed": 0}  # that cell's first seed


def test_multi_objective_selects_the_pareto_trial_best_on_the_first_objective(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/s.db"
    spec = tiny(objectives=["val_accuracy", "n_params"], sampler="nsga2", budget={"n_trials": 3})
    outcome = run(spec, url, fast_tmp)
    study = optuna.load_study(study_name="tiny", storage=url)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    selected = best_trial(study)
    assert selected is not None and selected.number == outcome.best_trial_number
    assert selected in study.best_trials
    assert selected.values[0] == max(t.values[0] for t in study.best_trials)
    assert outcome.test is not None and outcome.test["trial_number"] == selected.number


def test_retrain_epochs_follow_early_stopping() -> None:
    trial = optuna.trial.create_trial(value=0.5, user_attrs={"final_epochs": [2, 3, 5]})
    stopping = tiny(training={"epochs": 9, "early_stopping": 2})
    assert retrain_epochs(trial, stopping) == 3
    assert retrain_epochs(trial, tiny(training={"epochs": 9})) == 9


def test_load_study_lists_the_stored_studies(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/s.db"
    run(tiny(budget={"n_trials": 1}), url, fast_tmp)
    assert load_study("tiny", url).study_name == "tiny"
    with pytest.raises(UserError, match=r"no study named 'other' in .*studies there: tiny"):
        load_study("other", url)


# ------------------------------------------------------ nothing written on bad input


def test_too_many_folds_fails_before_anything_is_written(fast_tmp: Path) -> None:
    spec = tiny(
        dataset={**tiny_spec_data()["dataset"], "train_size": 6},
        cv={"folds": 4},
    )
    with pytest.raises(DataError, match=r"cv\.folds is 4"):
        run_study(spec, output_dir=fast_tmp / "reports", progress=False)
    assert files_under(fast_tmp) == []


def test_a_bad_storage_url_fails_before_anything_is_written(fast_tmp: Path) -> None:
    with pytest.raises(StorageError, match="not supported"):
        run_study(tiny(), storage="mongodb://host/db", output_dir=fast_tmp / "reports", progress=False)
    with pytest.raises(StorageError, match="does not exist"):
        run_study(tiny(), storage=f"sqlite:///{fast_tmp}/missing/s.db", output_dir=fast_tmp / "reports", progress=False)
    assert files_under(fast_tmp) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"sampler": {"name": "random", "options": {"foo": 1}}},
        {"pruner": {"name": "percentile", "options": {"percentile": 150}}},
        {"pruner": {"name": "fold_paired", "options": {"min_worse_folds": 5}}},
        # These pass the constructors and used to fail inside the first trial, with a traceback.
        {"sampler": {"name": "tpe", "options": {"n_startup_trials": "x"}}},
        {"pruner": {"name": "hyperband", "options": {"max_resource": 0}}},
        # ... or only once the sampler's random start-up trials are done, with a traceback
        # after trials were stored.
        {"sampler": {"name": "tpe", "options": {"gamma": 5}}},
        {"sampler": {"name": "tpe", "options": {"n_startup_trials": 2, "n_ei_candidates": 0}}},
        {"sampler": {"name": "cmaes", "options": {"n_startup_trials": 2, "popsize": -3}}},
        {"sampler": {"name": "tpe", "options": {"seed": 5}}},
        {"pruner": {"name": "hyperband", "options": {"reduction_factor": 1}}},
        # These were accepted: the options were ignored, or Hyperband ran with min above max.
        {"pruner": {"name": "none", "options": {"n_startup_trials": 3}}},
        {"pruner": {"name": "hyperband", "options": {"min_resource": 5, "max_resource": 2}}},
        # A sampler that accepted an option and failed on it as the first trial ended.
        {"sampler": {"name": "tpe", "options": {"constraints_func": "x"}}},
        {"sampler": {"name": "nsga2", "options": {"constraints_func": "x"}}},
        # The grid sampler's options were ignored without a word.
        {"sampler": {"name": "grid", "options": {"foo": 1}}, "search": {"lr": [0.1, 0.01]}},
        # ... in a grid search too, whose sampler is not probed.
        {
            "pruner": {"name": "hyperband", "options": {"reduction_factor": 1}},
            "sampler": "grid",
            "search": {"lr": [0.1, 0.01]},
        },
    ],
)
@pytest.mark.filterwarnings("ignore:`gamma` has been deprecated:FutureWarning")  # Optuna's, for a bad option
@pytest.mark.filterwarnings("ignore:`constraints_func` has been deprecated:FutureWarning")
def test_bad_sampler_or_pruner_options_fail_before_anything_is_written(
    fast_tmp: Path, changes: dict[str, Any]
) -> None:
    with pytest.raises(SpecError, match=r"(sampler|pruner)\.options"):
        run_study(tiny(**changes), output_dir=fast_tmp / "reports", progress=False)
    assert files_under(fast_tmp) == []


def test_hyperbands_max_resource_is_the_longest_trials_epochs() -> None:
    # It was training.epochs: with epochs searched up to 3 and training.epochs 1, a
    # 1-epoch trial could never be pruned and every 3-epoch one was judged after epoch 1.
    spec = tiny(training={"epochs": 1}, search={"epochs": [1, 3], "lr": [0.1, 0.01]}, pruner="hyperband")
    assert make_pruner(spec)._max_resource == 3
    assert make_pruner(tiny(training={"epochs": 2}, pruner="hyperband"))._max_resource == 2
    # A searched epochs replaces training.epochs (20 here) in every trial: no trial trains 20.
    epochs = {"type": "int", "low": 2, "high": 5}
    searched = tiny(training={"epochs": 20}, search={"epochs": epochs}, pruner="hyperband")
    assert make_pruner(searched)._max_resource == 5


def test_a_sampler_that_cannot_run_the_study_is_blamed_not_its_options() -> None:
    # The message said "sampler.options" when no option was given.
    spec = tiny(objectives=["val_accuracy", "n_params"], sampler="cmaes")
    message = r"^sampler: optuna's CmaEsSampler cannot run this study \(ValueError: .*multi-objective"
    with pytest.raises(SpecError, match=message):
        check_run(spec)


def test_the_default_storage_and_report_go_under_the_output_folder(fast_tmp: Path) -> None:
    outcome = run_study(tiny(budget={"n_trials": 1}), output_dir=fast_tmp / "reports", progress=False)
    folder = fast_tmp / "reports" / "tiny"
    assert outcome.storage_url == f"sqlite:///{(folder / 'study.db').resolve()}"
    assert outcome.report_path == folder / "report.html"
    assert {p.name for p in folder.iterdir()} >= {"study.db", "report.html", "trials.csv"}


def test_val_accuracy_on_a_regression_csv_fails_before_anything_is_written(fast_tmp: Path) -> None:
    # The task of a CSV is only known from its target column, so this is caught at run time.
    rows = "\n".join(f"{i},{i % 7 * 0.5},{i * 0.37:.2f}" for i in range(60))
    (fast_tmp / "data.csv").write_text("a,b,target\n" + rows + "\n", encoding="utf-8")
    spec = tiny(
        dataset={"name": "csv", "path": str(fast_tmp / "data.csv"), "target": "target"},
        objectives=["val_accuracy"],
        search=None,
    )
    with pytest.raises(SpecError, match="val_accuracy needs a classification dataset; use val_loss"):
        run_study(spec, output_dir=fast_tmp / "reports", progress=False)
    assert [p.name for p in files_under(fast_tmp)] == ["data.csv"]


def test_a_budget_is_required() -> None:
    with pytest.raises(SpecError, match="budget: give n_trials, timeout or fold_epochs"):
        run_study(tiny(budget={"n_trials": None}), storage="sqlite:////nonexistent/x.db", progress=False)


def test_workers_must_be_positive(fast_tmp: Path) -> None:
    with pytest.raises(UserError, match="--workers must be at least 1"):
        run_study(tiny(), output_dir=fast_tmp, workers=0, progress=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # These created the study and trained nothing (0, -5) or ran 3 trials (2.5), without an error.
        ({"n_trials": 0}, "n_trials (--n-trials) must be a whole number of at least 1, got 0"),
        ({"n_trials": 2.5}, "n_trials (--n-trials) must be a whole number of at least 1, got 2.5"),
        ({"timeout": -5}, "timeout (--timeout) must be a finite number of seconds above 0, got -5"),
        ({"timeout": float("nan")}, "timeout (--timeout) must be a finite number of seconds above 0, got nan"),
    ],
)
def test_run_options_from_python_are_checked_before_anything_is_written(
    fast_tmp: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        run_study(tiny(), output_dir=fast_tmp / "reports", progress=False, **options)
    assert files_under(fast_tmp) == []


def test_bad_sampler_and_pruner_options_are_spec_errors() -> None:
    with pytest.raises(SpecError, match=r"sampler\.options"):
        make_sampler(tiny(sampler={"name": "tpe", "options": {"n_startup": 3}}))
    with pytest.raises(SpecError, match=r"pruner\.options"):
        make_pruner(tiny(pruner={"name": "median", "options": {"warmup": 3}}))
    assert isinstance(make_sampler(tiny(sampler="random")), optuna.samplers.RandomSampler)
    assert isinstance(make_pruner(tiny(pruner="hyperband")), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner(tiny()), optuna.pruners.NopPruner)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_trial_stopped_by_ctrl_c_is_logged_as_one_line_without_its_traceback() -> None:
    """Optuna logs it as a failure with the KeyboardInterrupt's traceback and a second line;
    other failures keep their traceback."""
    quiet_interrupted_trial_logs()
    quiet_interrupted_trial_logs()  # idempotent
    assert len(logging.getLogger("optuna.study._optimize").filters) == 1
    records = _Records()
    optuna_logger = logging.getLogger("optuna")
    optuna_logger.addHandler(records)
    try:
        study = optuna.create_study()

        def stopped(trial: optuna.Trial) -> float:
            raise KeyboardInterrupt

        def broken(trial: optuna.Trial) -> float:
            raise ValueError("a bug")

        with pytest.raises(KeyboardInterrupt):
            study.optimize(stopped, n_trials=1)
        with pytest.raises(ValueError):
            study.optimize(broken, n_trials=1)
    finally:
        optuna_logger.removeHandler(records)
    lines = [(r.getMessage(), r.exc_info is not None) for r in records.records if r.levelno >= logging.WARNING]
    assert lines[0] == ("Trial 0 stopped by Ctrl-C or SIGTERM.", False)
    assert lines[1][0].startswith("Trial 1 failed with parameters: {} because of the following error: ValueError")
    assert lines[1][1] is True
    assert lines[2][0] == "Trial 1 failed with value None."
    assert len(lines) == 3
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]


def test_ctrl_c_in_a_storage_connection_pool_logs_no_traceback(fast_tmp: Path) -> None:
    """SQLAlchemy logs an interrupt that lands while a connection returns to its pool with
    a traceback (then lets it propagate); other pool errors keep theirs."""
    import sqlalchemy

    quiet_interrupted_trial_logs()
    pool_logger = sqlalchemy.create_engine(f"sqlite:///{fast_tmp}/pool.db").pool.logger
    records = _Records()
    pool_logger.addHandler(records)
    try:
        for error in (KeyboardInterrupt(), OSError("disk I/O error")):
            try:
                raise error
            except BaseException:
                pool_logger.error("Exception during reset or similar", exc_info=True)
    finally:
        pool_logger.removeHandler(records)
    assert [r.exc_info[1] for r in records.records if r.exc_info] == [error]


def test_a_trial_whose_failure_could_not_be_stored_after_ctrl_c_is_not_left_running(
    fast_tmp: Path, monkeypatch: pytest.MonkeyPatch, locked_failure_writes: list[int]
) -> None:
    """Optuna stores an interrupted trial as failed; when that write fails too (a locked
    SQLite file), the run drops its connections and stores it again before it stops."""
    import modelsel.objective as objective_module

    calls: list[int] = []
    cross_validate = objective_module.cross_validate

    def interrupted_second_time(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return cross_validate(*args, **kwargs)

    monkeypatch.setattr(objective_module, "cross_validate", interrupted_second_time)
    url = f"sqlite:///{fast_tmp}/locked.db"
    with pytest.raises((KeyboardInterrupt, AssertionError)):  # Optuna: AssertionError "Should not reach."
        run(tiny(budget={"n_trials": 3}), url, fast_tmp)
    assert locked_failure_writes, "storing the interrupted trial as failed was refused"
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]


def test_a_trial_that_ctrl_c_stops_before_its_objective_runs_is_not_left_running(
    fast_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between creating a trial and calling the objective, Optuna runs the sampler's
    set-up; an interrupt there is not Optuna's to store, so the run stores it."""
    before_trial = optuna.samplers.RandomSampler.before_trial
    calls: list[int] = []

    def interrupted_second_time(self: Any, study: optuna.Study, trial: Any) -> None:
        if study.study_name != "tiny":  # the sampler check's throwaway study, before the run
            return before_trial(self, study, trial)
        calls.append(trial.number)
        if len(calls) == 2:
            raise KeyboardInterrupt
        before_trial(self, study, trial)

    monkeypatch.setattr(optuna.samplers.RandomSampler, "before_trial", interrupted_second_time)
    url = f"sqlite:///{fast_tmp}/asked.db"
    with pytest.raises(KeyboardInterrupt):
        run(tiny(budget={"n_trials": 3}), url, fast_tmp)
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]


def test_a_later_run_that_selects_another_trial_names_the_trials_tested_before(fast_tmp: Path) -> None:
    # The README said the test split is scored once; a resumed search that changes the
    # selection scores again, and nothing said so.
    url = f"sqlite:///{fast_tmp}/s.db"
    first = run_study(tiny(budget={"n_trials": 1}), storage=url, output_dir=fast_tmp, progress=False)
    assert first.test is not None and first.test["earlier_trials"] == []
    study = optuna.load_study(study_name="tiny", storage=url)
    (trial,) = study.trials
    study.add_trial(
        optuna.trial.create_trial(params={"width": 8, "lr": 0.05}, distributions=trial.distributions, value=1.0)
    )
    second = run_study(tiny(budget={"n_trials": 2}), storage=url, output_dir=fast_tmp, progress=False)
    assert second.best_trial_number == 1
    assert second.test is not None and second.test["trial_number"] == 1
    assert second.test["earlier_trials"] == [0]
    assert second.report_path is not None
    assert "test split also scored for" in second.report_path.read_text(encoding="utf-8")
    # A selection whose retrain diverges scores nothing, and passes the list on.
    wide = {"width": trial.distributions["width"], "lr": optuna.distributions.FloatDistribution(1e-3, 1e31, log=True)}
    study.add_trial(optuna.trial.create_trial(params={"width": 8, "lr": 1e30}, distributions=wide, value=1.0 + 1e-9))
    third = run_study(tiny(budget={"n_trials": 3}), storage=url, output_dir=fast_tmp, progress=False)
    assert third.test is not None and "retrain_diverged" in third.test
    assert third.test["earlier_trials"] == [0, 1]
    study.add_trial(optuna.trial.create_trial(params={"width": 8, "lr": 0.02}, distributions=wide, value=1.0 + 2e-9))
    fourth = run_study(tiny(budget={"n_trials": 4}), storage=url, output_dir=fast_tmp, progress=False)
    assert fourth.test is not None and fourth.test["earlier_trials"] == [0, 1]


def test_a_grid_without_a_valid_cell_fails_before_anything_is_written(fast_tmp: Path) -> None:
    # Each cell was pruned as invalid, and the run exited 0 with an empty study and report.
    spec = tiny(search=None, sampler=None, sweep={"batch_norm": [True], "batch_size": [1]})
    with pytest.raises(SpecError, match=r"no cell of the grid is a valid configuration \(model\.batch_norm needs"):
        run_study(spec, output_dir=fast_tmp / "reports", progress=False)
    assert files_under(fast_tmp) == []
    # One valid cell is enough: the invalid ones are pruned with their reason.
    run_study(
        tiny(search=None, sampler=None, sweep={"batch_norm": [True], "batch_size": [1, 16]}),
        output_dir=fast_tmp / "reports",
        progress=False,
        build_report=False,
    )


def test_a_searched_data_value_that_breaks_the_split_is_named() -> None:
    # The message spoke of dataset.train_size, which the spec did not set to that value.
    data = tiny_spec_data(dataset={**tiny_spec_data()["dataset"], "train_size": 100})
    data["search"] = {"train_size": [3, 60]}
    with pytest.raises(UserError, match=r"^search\.train_size value 3: cv\.folds is 2 but a class has only"):
        preflight(parse_spec(data))
