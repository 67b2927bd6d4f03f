"""Tests of modelsel.objective: what each trial records, pruning, divergence and invalid configurations."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import tiny_spec_data
from optuna.trial import TrialState

import modelsel.objective as objective_module
from modelsel.data import load_dataset
from modelsel.errors import SpecError
from modelsel.objective import FoldPairedPruner, StudyObjective, grid_search_space, rounded, suggest_params
from modelsel.spec import StudySpec, parse_spec
from modelsel.study import run_study

CPU = torch.device("cpu")


def _load(spec: StudySpec) -> Any:
    return load_dataset(spec.dataset, seed=spec.seed)


def optimize_in_memory(spec: StudySpec, n_trials: int, *, objectives: list[str] | None = None) -> optuna.Study:
    """Run the objective in an in-memory study (no storage, no report)."""
    objectives = objectives or ["val_accuracy"]
    directions = ["maximize" if o == "val_accuracy" else "minimize" for o in objectives]
    study = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler(seed=0))
    objective = StudyObjective(spec, load_dataset=_load, objectives=objectives, device=CPU)
    study.optimize(objective, n_trials=n_trials)
    return study


@pytest.fixture(scope="module")
def tiny_study() -> optuna.Study:
    spec = parse_spec(tiny_spec_data(model={"depth": 2, "width": 8}, training={"epochs": 3, "batch_size": 32}))
    return optimize_in_memory(spec, 2)


def test_complete_trials_store_fold_scores_curves_and_diagnostics(tiny_study: optuna.Study) -> None:
    trials = tiny_study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2
    for trial in trials:
        attrs = trial.user_attrs
        assert len(attrs["fold_val_metric"]) == 2 and len(attrs["fold_val_loss"]) == 2
        assert attrs["val_metric_mean"] == pytest.approx(sum(attrs["fold_val_metric"]) / 2, rel=1e-5)
        std = abs(attrs["fold_val_metric"][0] - attrs["fold_val_metric"][1]) / math.sqrt(2)
        assert attrs["val_metric_std"] == pytest.approx(std, rel=1e-4, abs=1e-9)
        assert trial.values[0] == pytest.approx(attrs["val_metric_mean"], rel=1e-5)
        assert attrs["metric_name"] == "accuracy"
        assert {"train_loss_mean", "train_metric_mean", "val_loss_mean", "val_loss_std"} <= set(attrs)
        for name in ("train_loss", "val_loss", "train_metric", "val_metric"):
            assert len(attrs["curves"][name]) == 3
            assert [len(c) for c in attrs["fold_curves"][name]] == [3, 3]
        assert attrs["final_epochs"] == [3, 3]
        assert attrs["stopped_early"] == [False, False]
        assert attrs["fold_epochs"] == 6
        assert attrs["fit_seconds"] > 0
        assert set(attrs["grad_norms"]) == {"hidden1", "hidden2", "output"}
        assert all(len(v) == 3 and all(x > 0 for x in v) for v in attrs["grad_norms"].values())
        assert set(attrs["weight_stats"]) == {"hidden1", "hidden2", "output"}
        assert {"sq_norm", "near_zero_share"} <= set(attrs["weight_stats"]["output"])
        width = trial.params["width"]
        assert attrs["n_params"] == (8 * width + width) + (width * width + width) + (width * 2 + 2)
        assert attrs["n_train"] == 160
        assert attrs["device"] == "cpu"


def test_the_fold_mean_curve_is_reported_each_epoch(tiny_study: optuna.Study) -> None:
    for trial in tiny_study.get_trials(states=(TrialState.COMPLETE,)):
        reported = [trial.intermediate_values[e] for e in (1, 2, 3)]
        assert reported == pytest.approx(trial.user_attrs["curves"]["val_metric"], rel=1e-5)


def test_searched_values_reach_the_trained_model(tiny_study: optuna.Study) -> None:
    for trial in tiny_study.trials:
        assert 4 <= trial.params["width"] <= 16
        assert 0.001 <= trial.params["lr"] <= 0.1
    # Two random widths give two parameter counts (width enters the count).
    counts = {t.user_attrs["n_params"] for t in tiny_study.trials}
    widths = {t.params["width"] for t in tiny_study.trials}
    assert len(counts) == len(widths)


def test_suggest_params_and_grid_space() -> None:
    spec = parse_spec(
        tiny_spec_data(
            search={
                "depth": {"type": "int", "low": 1, "high": 5, "step": 2},
                "dropout": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1},
                "activation": ["relu", "tanh"],
            },
            sampler="grid",
        )
    )
    assert grid_search_space(spec) == {
        "depth": [1, 3, 5],
        "dropout": [0.0, 0.1, 0.2, 0.3],
        "activation": ["relu", "tanh"],
    }
    study = optuna.create_study()
    trial = study.ask()
    params = suggest_params(trial, spec)
    assert params["depth"] in (1, 3, 5) and params["activation"] in ("relu", "tanh")
    assert 0.0 <= params["dropout"] <= 0.3


def test_rounded_keeps_six_significant_digits_and_names_non_finite_values() -> None:
    assert rounded({"a": [1.23456789, 0.0], "b": (2.5e-9 / 3,)}) == {"a": [1.23457, 0.0], "b": [8.33333e-10]}
    assert rounded(float("nan")) == "nan" and rounded(float("inf")) == "inf"
    assert rounded(3) == 3 and rounded("x") == "x"


def test_regression_objective_minimizes_validation_loss() -> None:
    spec = parse_spec(
        {
            "name": "reg",
            "dataset": {"name": "polynomial", "n_train": 40, "n_test": 10, "max_degree": 4},
            "model": {"depth": 0},
            "training": {"epochs": 2, "batch_size": 8, "optimizer": "sgd", "lr": 0.01},
            "search": {"lr": [0.01, 0.02]},
            "cv": {"folds": 2},
        }
    )
    study = optimize_in_memory(spec, 2, objectives=["val_loss"])
    for trial in study.trials:
        assert trial.state == TrialState.COMPLETE
        assert trial.user_attrs["metric_name"] == "rmse"
        assert trial.values[0] == pytest.approx(trial.user_attrs["val_loss_mean"], rel=1e-5)
        rmse = [math.sqrt(v) for v in trial.user_attrs["fold_val_loss"]]
        assert trial.user_attrs["fold_val_metric"] == pytest.approx(rmse, rel=1e-4)


def test_multi_objective_values_in_order() -> None:
    spec = parse_spec(tiny_spec_data(objectives=["val_accuracy", "n_params"]))
    study = optimize_in_memory(spec, 1, objectives=["val_accuracy", "n_params"])
    (trial,) = study.trials
    assert trial.values[0] == pytest.approx(trial.user_attrs["val_metric_mean"], rel=1e-5)
    assert trial.values[1] == trial.user_attrs["n_params"]
    assert trial.intermediate_values == {}  # no pruning reports with several objectives


def _good_then_hopeless_lr(fast_tmp: Path, pruner: Any) -> dict[float, optuna.trial.FrozenTrial]:
    """A 2-trial grid search with ``pruner``: lr 0.1, then 1e-5; its trials by lr."""
    spec = parse_spec(
        tiny_spec_data(
            seed=1,  # GridSampler(seed=1) runs lr 0.1 first, so 1e-5 meets a finished rival
            # One trial at a time on every device (auto stacks a grid's trials on CUDA, and a
            # stack has no finished rival to compare with).
            training={"epochs": 3, "batch_size": 32, "stack_trials": 1},
            sampler="grid",
            search={"lr": [0.1, 0.00001]},
            pruner=pruner,
            budget={"n_trials": 2},
        )
    )
    url = f"sqlite:///{fast_tmp}/s.db"
    run_study(spec, storage=url, output_dir=fast_tmp, progress=False, build_report=False)
    return {t.params["lr"]: t for t in optuna.load_study(study_name="tiny", storage=url).trials}


def test_report_steps_count_epochs_so_min_resource_one_prunes_after_the_first(fast_tmp: Path) -> None:
    # Successive halving's min_resource is at least 1: with 0-based steps it could never
    # judge a trial before its second epoch.
    by_lr = _good_then_hopeless_lr(
        fast_tmp, {"name": "successive_halving", "options": {"min_resource": 1, "reduction_factor": 2}}
    )
    assert sorted(by_lr[0.1].intermediate_values) == [1, 2, 3]
    slow = by_lr[0.00001]
    assert slow.number == 1
    assert slow.state == TrialState.PRUNED
    assert slow.user_attrs["pruned_at_epoch"] == 1 and list(slow.intermediate_values) == [1]


def test_pruned_trials_record_the_epoch_and_partial_curves(fast_tmp: Path) -> None:
    spec = parse_spec(
        tiny_spec_data(
            training={"epochs": 3, "batch_size": 32},
            search={"lr": [0.1, 0.05, 0.00001]},
            pruner={"name": "median", "options": {"n_startup_trials": 1, "n_warmup_steps": 0}},
            budget={"n_trials": 4},
        )
    )
    url = f"sqlite:///{fast_tmp}/s.db"
    outcome = run_study(spec, storage=url, output_dir=fast_tmp, progress=False, build_report=False)
    study = optuna.load_study(study_name="tiny", storage=url)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "the near-zero learning rate should be pruned after the first trial"
    assert outcome.n_pruned == len(pruned) and outcome.n_complete + outcome.n_pruned == 4
    for trial in pruned:
        epoch = trial.user_attrs["pruned_at_epoch"]
        assert 1 <= epoch < 3
        assert max(trial.intermediate_values) == epoch
        assert len(trial.user_attrs["curves"]["val_metric"]) == epoch
        assert trial.user_attrs["fold_epochs"] == epoch * spec.cv.folds
        assert "fold_val_metric" not in trial.user_attrs
        # Known from the first batch: the gradient-flow section counts pruned trials too.
        assert set(trial.user_attrs["grad_norms"]) == set(study.trials[0].user_attrs["grad_norms"])
        assert set(trial.user_attrs["preactivation_grad_norms"]) == set(trial.user_attrs["grad_norms"])
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        assert "pruned_at_epoch" not in trial.user_attrs


class _PruneFromTheSecondEpoch(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return (trial.last_step or 0) >= 2


def test_a_trial_whose_folds_have_all_stopped_early_is_not_pruned_after_its_last_epoch() -> None:
    # min_delta 100: every fold stops after its second epoch, the trial's last. Pruning it
    # there threw away a finished result (stored as pruned, no fold curves, not selectable).
    spec = parse_spec(
        tiny_spec_data(training={"epochs": 6, "batch_size": 32, "early_stopping": {"patience": 1, "min_delta": 100}})
    )
    study = optuna.create_study(direction="maximize", pruner=_PruneFromTheSecondEpoch())
    study.optimize(StudyObjective(spec, load_dataset=_load, objectives=["val_accuracy"], device=CPU), n_trials=1)
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert list(trial.intermediate_values) == [1, 2]
    assert trial.user_attrs["fold_epochs"] == 2 * spec.cv.folds


def _paired_verdicts(
    pruner: FoldPairedPruner, direction: str, cases: list[list[float]], *, step: int = 1
) -> list[bool]:
    """The pruner's verdict on running trials with these per-fold values at ``step``,
    against one finished trial whose per-fold curves over 3 epochs are fixed."""
    study = optuna.create_study(direction=direction, pruner=pruner)
    best = [[0.5, 0.8, 0.9], [0.6, 0.7, 0.8], [0.4, 0.85, 0.9]]
    study.add_trial(
        optuna.trial.create_trial(value=0.87, user_attrs={"fold_curves": {"val_metric": best, "val_loss": best}})
    )
    verdicts = []
    for values in cases:
        trial = study.ask()
        trial.report(sum(values) / len(values), step)
        trial.set_user_attr(FoldPairedPruner.ATTRIBUTE, {"curve": "val_metric", "epoch": step, "values": values})
        verdicts.append(trial.should_prune())
        study.tell(trial, state=TrialState.FAIL)
    return verdicts


def test_the_fold_paired_pruner_prunes_a_trial_worse_than_the_best_on_every_fold() -> None:
    # Best trial after epoch 1: folds 0.5, 0.6, 0.4 (higher is better when maximizing).
    verdicts = _paired_verdicts(
        FoldPairedPruner(),
        "maximize",
        [
            [0.45, 0.55, 0.35],  # worse on every fold
            [0.45, 0.65, 0.35],  # better on one fold
            [0.49, 0.59, 0.50],  # worse on two folds only
            [0.45, math.nan, 0.35],  # a NaN never counts as worse
        ],
    )
    assert verdicts == [True, False, False, False]
    # After epoch 3 the best trial's third values count; when minimizing, lower is better.
    assert _paired_verdicts(FoldPairedPruner(), "maximize", [[0.85, 0.75, 0.85]], step=3) == [True]
    assert _paired_verdicts(FoldPairedPruner(), "minimize", [[0.45, 0.55, 0.35], [0.55, 0.65, 0.45]]) == [False, True]
    # A later epoch than the best trial ran compares with its last value.
    assert _paired_verdicts(FoldPairedPruner(), "maximize", [[0.85, 0.75, 0.85]], step=5) == [True]
    # Options: a margin, fewer folds, warm-up epochs.
    assert _paired_verdicts(FoldPairedPruner(margin=0.1), "maximize", [[0.45, 0.55, 0.35], [0.3, 0.4, 0.2]]) == [
        False,
        True,
    ]
    assert _paired_verdicts(FoldPairedPruner(min_worse_folds=2), "maximize", [[0.45, 0.65, 0.35]]) == [True]
    assert _paired_verdicts(FoldPairedPruner(n_warmup_steps=2), "maximize", [[0.1, 0.1, 0.1]]) == [False]
    assert _paired_verdicts(FoldPairedPruner(n_startup_trials=2), "maximize", [[0.1, 0.1, 0.1]]) == [False]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"margin": -0.1}, "margin must be >= 0"),
        ({"min_worse_folds": 0}, "min_worse_folds must be >= 1"),
        ({"min_worse_folds": 3}, "min_worse_folds 3 is more than the 2 folds of cv.folds"),
        ({"n_startup_trials": 0}, "n_startup_trials must be >= 1"),
        ({"folds": 3}, "unexpected keyword argument 'folds'"),
    ],
)
def test_bad_fold_paired_pruner_options_are_spec_errors(options: dict[str, Any], message: str) -> None:
    from modelsel.search import make_pruner

    spec = parse_spec(tiny_spec_data(pruner={"name": "fold_paired", "options": options}))
    with pytest.raises(SpecError, match=message):
        make_pruner(spec)


def test_a_search_with_the_fold_paired_pruner_prunes_a_hopeless_learning_rate(fast_tmp: Path) -> None:
    by_lr = _good_then_hopeless_lr(fast_tmp, "fold_paired")
    best, slow = by_lr[0.1], by_lr[0.00001]
    assert best.state == TrialState.COMPLETE and slow.state == TrialState.PRUNED
    assert slow.user_attrs["pruned_at_epoch"] == 1
    at_step = slow.user_attrs[FoldPairedPruner.ATTRIBUTE]
    assert at_step["epoch"] == 1 and at_step["curve"] == "val_metric"
    assert all(v < b[0] for v, b in zip(at_step["values"], best.user_attrs["fold_curves"]["val_metric"], strict=True))


def diverging_spec(**changes: Any) -> StudySpec:
    data: dict[str, Any] = {
        "name": "diverge",
        "dataset": {"name": "polynomial", "n_train": 60, "n_test": 20},
        "model": {"depth": 0},
        "training": {"epochs": 3, "batch_size": 16, "optimizer": "sgd"},
        "search": {"lr": [0.01, 1000.0]},
        "sampler": "grid",
        "cv": {"folds": 2},
        "budget": {"n_trials": 2},
    }
    data.update(changes)
    return parse_spec(data)


def _diverged_epoch(trial: optuna.trial.FrozenTrial) -> int:
    """The epoch (1-based) a diverged trial's ``fail_reason`` names."""
    found = re.search(r" at epoch (\d+)", trial.user_attrs["fail_reason"])
    assert found, trial.user_attrs["fail_reason"]
    return int(found.group(1))


def test_a_diverging_trial_is_pruned_with_a_reason_and_the_study_goes_on(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/d.db"
    outcome = run_study(diverging_spec(), storage=url, output_dir=fast_tmp, progress=False, build_report=False)
    study = optuna.load_study(study_name="diverge", storage=url)
    by_lr = {t.params["lr"]: t for t in study.trials}
    assert set(by_lr) == {0.01, 1000.0}
    diverged = by_lr[1000.0]
    assert diverged.state == TrialState.PRUNED
    reason = diverged.user_attrs["fail_reason"]
    assert re.fullmatch(r"diverged: fold [01] at epoch \d+: training loss is (nan|inf)", reason), reason
    # Counted up to the epoch that diverged, every fold in full: 2 folds.
    assert diverged.user_attrs["fold_epochs"] == 2 * _diverged_epoch(diverged)
    assert "grad_norms" in diverged.user_attrs and "preactivation_grad_norms" in diverged.user_attrs
    assert by_lr[0.01].state == TrialState.COMPLETE
    assert outcome.best_params == {"lr": 0.01}
    assert outcome.test is not None and math.isfinite(outcome.test["test_loss"])


def test_batch_norm_on_folds_of_one_sample_is_pruned_with_a_reason() -> None:
    # 2 training samples in 2 folds: train_models refuses batch norm there, which ended the run.
    spec = parse_spec(
        {
            "name": "tiny-bn",
            "dataset": {"name": "polynomial", "train_size": 2, "n_test": 10},
            "model": {"depth": 1, "width": 4, "batch_norm": True},
            "training": {"epochs": 1, "batch_size": 8},
            "cv": {"folds": 2},
        }
    )
    study = optuna.create_study()
    study.optimize(StudyObjective(spec, load_dataset=_load, objectives=["val_loss"], device=CPU), n_trials=1)
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs["fail_reason"] == (
        "invalid configuration: model.batch_norm needs 2 training samples per fold or more; a fold has 1"
    )


def test_an_invalid_combination_of_values_is_pruned_with_a_reason() -> None:
    # degree 10 needs max_degree >= 11: valid alone, invalid together with max_degree 5.
    spec = parse_spec(
        {
            "name": "combo",
            "dataset": {"name": "polynomial", "n_train": 40, "n_test": 10},
            "model": {"depth": 0},
            "training": {"epochs": 1, "batch_size": 8, "optimizer": "sgd", "lr": 0.01},
            "search": {"degree": [1, 10], "max_degree": [5, 20]},
            "sampler": "grid",
            "cv": {"folds": 2},
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"degree": [1, 10], "max_degree": [5, 20]}))
    study.optimize(StudyObjective(spec, load_dataset=_load, objectives=["val_loss"], device=CPU), n_trials=4)
    states = {(t.params["degree"], t.params["max_degree"]): t for t in study.trials}
    invalid = states[(10, 5)]
    assert invalid.state == TrialState.PRUNED
    assert invalid.user_attrs["fail_reason"].startswith("invalid configuration: ")
    assert "max_degree" in invalid.user_attrs["fail_reason"]
    assert all(t.state == TrialState.COMPLETE for key, t in states.items() if key != (10, 5))


# ------------------------------------------------------------------- stacked trials


GRID_OF_8 = {"width": [4, 8], "weight_decay": [0.0, 0.001, 0.01, 0.1]}


def stacked_sweep_spec(stack_trials: int | str, sweep: dict[str, Any] | None = None, **changes: Any) -> StudySpec:
    data = tiny_spec_data(
        name="stacked",
        search=None,
        sampler=None,
        sweep=sweep or GRID_OF_8,
        training={"epochs": 3, "batch_size": 32, "lr": 0.01, "stack_trials": stack_trials},
        budget={"n_trials": 8},
    )
    data.update(changes)
    return parse_spec(data)


def _by_cell(study: optuna.Study) -> dict[tuple[Any, ...], optuna.trial.FrozenTrial]:
    return {tuple(sorted(t.params.items())): t for t in study.trials}


@pytest.mark.parametrize(
    ("sweep", "cells"),
    [(GRID_OF_8, 8), ({"train_size": [120, 160], "repeats": 2}, 4)],
    ids=["width-weight_decay", "train_size-seed"],
)
def test_stacked_sweep_trials_match_trials_trained_alone(fast_tmp: Path, sweep: dict[str, Any], cells: int) -> None:
    runs = {}
    for stack in (1, 8):
        url = f"sqlite:///{fast_tmp}/s{stack}.db"
        spec = stacked_sweep_spec(stack, sweep=sweep, budget={"n_trials": cells})
        run_study(spec, storage=url, output_dir=fast_tmp, progress=False, build_report=False)
        runs[stack] = _by_cell(optuna.load_study(study_name="stacked", storage=url))
    assert len(runs[1]) == len(runs[8]) == cells, "every cell of the grid runs exactly once"
    stacked_trials = list(runs[8].values())
    # Trained together: every trial started before any finished (alone, one after another).
    assert max(t.datetime_start for t in stacked_trials) <= min(t.datetime_complete for t in stacked_trials)
    alone_trials = sorted(runs[1].values(), key=lambda t: t.number)
    assert alone_trials[1].datetime_start >= alone_trials[0].datetime_complete
    for cell, alone in runs[1].items():
        stacked = runs[8][cell]
        assert stacked.state == alone.state == TrialState.COMPLETE
        assert stacked.value == pytest.approx(alone.value, abs=1e-6)
        for name in ("fold_val_loss", "fold_train_loss"):
            assert stacked.user_attrs[name] == pytest.approx(alone.user_attrs[name], rel=1e-4, abs=1e-6)
        assert stacked.user_attrs["curves"]["val_loss"] == pytest.approx(
            alone.user_attrs["curves"]["val_loss"], rel=1e-4, abs=1e-6
        )
        assert stacked.user_attrs["regime"] == alone.user_attrs["regime"]
        assert stacked.intermediate_values == pytest.approx(alone.intermediate_values, abs=1e-6)
        assert stacked.user_attrs["grad_norms"].keys() == alone.user_attrs["grad_norms"].keys()
        signal = alone.user_attrs["preactivation_grad_norms"]
        assert stacked.user_attrs["preactivation_grad_norms"].keys() == signal.keys()
        for layer, norms in signal.items():
            assert stacked.user_attrs["preactivation_grad_norms"][layer] == pytest.approx(norms, rel=1e-4, abs=1e-7)


def test_trials_of_very_different_training_sizes_train_in_separate_stacks(
    fast_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stacks: list[list[int]] = []

    class RecordingTrainer(objective_module.StackedTrainer):
        def __init__(self, jobs: Any, **options: Any) -> None:
            stacks.append(sorted(job.data.X_train.shape[0] for job in jobs))
            super().__init__(jobs, **options)

    monkeypatch.setattr(objective_module, "StackedTrainer", RecordingTrainer)
    # 2 folds of batch 32: 20 rows take 1 batch an epoch; 60 and 80 rows take 2 and 3.
    spec = stacked_sweep_spec(8, sweep={"train_size": [40, 120, 160]}, budget={"n_trials": 3})
    run_study(spec, storage=f"sqlite:///{fast_tmp}/z.db", output_dir=fast_tmp, progress=False, build_report=False)
    assert sorted(stacks) == [[20, 20], [60, 60, 80, 80]]


def test_an_interrupt_in_a_later_stack_keeps_the_trials_of_earlier_stacks(
    fast_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []

    class InterruptedSecondStack(objective_module.StackedTrainer):
        def train(self) -> Any:
            started.append(len(self.jobs))
            if len(started) == 2:
                raise KeyboardInterrupt
            return super().train()

    monkeypatch.setattr(objective_module, "StackedTrainer", InterruptedSecondStack)
    url = f"sqlite:///{fast_tmp}/i.db"
    with pytest.raises(KeyboardInterrupt):
        run_study(stacked_sweep_spec(8), storage=url, output_dir=fast_tmp, progress=False, build_report=False)
    assert started == [8, 8], "two stacks of 4 trials x 2 folds: width 4 and width 8"
    trials = optuna.load_study(study_name="stacked", storage=url).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete) == 4 and len(failed) == 4
    assert len({t.params["width"] for t in complete}) == 1, "the first stack's trials are all stored"
    # The trial Optuna asked for trains in the last stack; its companions were asked beside it.
    assert min(t.number for t in trials) in {t.number for t in failed}


def test_stacked_trials_whose_failure_could_not_be_stored_are_not_left_running(
    fast_tmp: Path, monkeypatch: pytest.MonkeyPatch, locked_failure_writes: list[int]
) -> None:
    """As above, but every write of a failure is refused once (a locked SQLite file): the
    companions this process asked and the trial Optuna asked are all stored as failed."""

    class InterruptedSecondStack(objective_module.StackedTrainer):
        stacks = 0

        def train(self) -> Any:
            InterruptedSecondStack.stacks += 1
            if InterruptedSecondStack.stacks == 2:
                raise KeyboardInterrupt
            return super().train()

    monkeypatch.setattr(objective_module, "StackedTrainer", InterruptedSecondStack)
    url = f"sqlite:///{fast_tmp}/locked.db"
    with pytest.raises((KeyboardInterrupt, AssertionError)):  # Optuna: AssertionError "Should not reach."
        run_study(stacked_sweep_spec(8), storage=url, output_dir=fast_tmp, progress=False, build_report=False)
    assert locked_failure_writes, "a failure write was refused"
    states = [t.state for t in optuna.load_study(study_name="stacked", storage=url).trials]
    assert states.count(TrialState.COMPLETE) == 4
    assert states.count(TrialState.FAIL) == 4, states


def grid_search_spec(stack_trials: int) -> StudySpec:
    return parse_spec(
        tiny_spec_data(
            name="grid-stack",
            search={"width": [4, 8], "weight_decay": [0.0, 0.001, 0.01, 0.1]},
            sampler="grid",
            training={"epochs": 2, "batch_size": 32, "lr": 0.05, "stack_trials": stack_trials},
            budget={"n_trials": 8},
        )
    )


def test_stacked_trials_stay_within_the_budget_and_a_rerun_tops_up(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/b.db"
    first = run_study(
        grid_search_spec(8), storage=url, output_dir=fast_tmp, n_trials=3, progress=False, build_report=False
    )
    assert first.n_complete == 3 and first.n_trained_this_run == 3
    assert len(optuna.load_study(study_name="grid-stack", storage=url).trials) == 3
    # stack_trials is a run-only setting: the study resumes with another value and tops up.
    second = run_study(grid_search_spec(2), storage=url, output_dir=fast_tmp, progress=False, build_report=False)
    study = optuna.load_study(study_name="grid-stack", storage=url)
    assert second.n_complete == 8 and second.n_trained_this_run == 5 and len(study.trials) == 8
    assert len(_by_cell(study)) == 8, "no cell ran twice"


def test_a_diverging_trial_in_a_stack_is_pruned_and_its_neighbours_complete(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/d.db"
    spec = diverging_spec(
        search={},
        sweep={"lr": [0.01, 1000.0, 0.02]},
        training={"epochs": 3, "batch_size": 16, "optimizer": "sgd", "stack_trials": 3},
        budget={"n_trials": 3},
    )
    run_study(spec, storage=url, output_dir=fast_tmp, progress=False, build_report=False)
    study = optuna.load_study(study_name="diverge", storage=url)
    by_lr = {t.params["lr"]: t for t in study.trials}
    assert by_lr[1000.0].state == TrialState.PRUNED
    assert by_lr[1000.0].user_attrs["regime"] == "diverged"
    # The fold is named within its trial (2 folds), not by its place in the stack of 6.
    assert by_lr[1000.0].user_attrs["fail_reason"].split(" at epoch")[0] in ("diverged: fold 0", "diverged: fold 1")
    assert by_lr[1000.0].user_attrs["fold_epochs"] == 2 * _diverged_epoch(by_lr[1000.0])
    for lr in (0.01, 0.02):
        assert by_lr[lr].state == TrialState.COMPLETE
        assert by_lr[lr].user_attrs["fold_epochs"] == 6


class _PruneTinyLearningRates(optuna.pruners.BasePruner):
    """Prunes every trial with a learning rate below 1e-3 at its first report."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return bool(trial.params["lr"] < 1e-3)


def test_a_pruned_trial_leaves_the_stack_and_records_its_partial_curves() -> None:
    lrs = [0.1, 0.05, 0.00001, 0.08]
    spec = parse_spec(
        tiny_spec_data(
            name="prune-stack",
            search=None,
            sampler=None,
            sweep={"lr": lrs},
            training={"epochs": 4, "batch_size": 32, "stack_trials": 4},
        )
    )
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.GridSampler({"lr": lrs}, seed=0), pruner=_PruneTinyLearningRates()
    )
    objective = StudyObjective(spec, load_dataset=_load, objectives=["val_accuracy"], device=CPU)
    objective.budget_left = lambda s: 4 - len(s.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
    study.optimize(objective, n_trials=1)  # one trial asked by optimize, three beside it
    assert len(study.trials) == 4
    by_lr = {t.params["lr"]: t for t in study.trials}
    assert set(by_lr) == set(lrs)
    pruned = by_lr[0.00001]
    assert pruned.state == TrialState.PRUNED
    assert pruned.user_attrs["pruned_at_epoch"] == 1
    assert pruned.user_attrs["fold_epochs"] == 2  # 1 epoch x 2 folds
    assert len(pruned.user_attrs["curves"]["val_metric"]) == 1
    assert "fold_val_metric" not in pruned.user_attrs
    for lr in (0.1, 0.05, 0.08):
        assert by_lr[lr].state == TrialState.COMPLETE
        assert by_lr[lr].user_attrs["fold_epochs"] == 8
        assert sorted(by_lr[lr].intermediate_values) == [1, 2, 3, 4]


def test_stack_trials_is_checked_and_only_grids_stack() -> None:
    with pytest.raises(SpecError, match="stack_trials"):
        parse_spec(tiny_spec_data(training={"stack_trials": 0}))
    searched = parse_spec(tiny_spec_data(training={"stack_trials": 8}))
    assert StudyObjective(searched, load_dataset=_load, objectives=["val_accuracy"], device=CPU).stack_limit() == 1
    auto = stacked_sweep_spec("auto")
    assert StudyObjective(
        auto, load_dataset=_load, objectives=["val_accuracy"], device=torch.device("cuda")
    ).stack_limit() == 8


def _auto_limit_on_cpu(sweep: dict[str, Any], pruner: str = "none", **model: Any) -> int:
    spec = stacked_sweep_spec("auto", sweep=sweep, model={"depth": 1, "width": 8, **model}, pruner=pruner)
    return StudyObjective(spec, load_dataset=_load, objectives=["val_accuracy"], device=CPU).stack_limit()


def test_stack_trials_auto_on_cpu_stacks_small_models_without_dropout() -> None:
    assert _auto_limit_on_cpu(GRID_OF_8) == 8
    assert _auto_limit_on_cpu({"weight_decay": [0.0, 0.01], "repeats": 2}) == 8
    # One cell too large (6 x 32 x (8 x 4096 + 4096 x 2) = 7.9 MFLOP per step at width 4096 is
    # below the limit; depth 2 adds 4096 x 4096 weights, 3.2 GFLOP): every trial trains alone.
    assert _auto_limit_on_cpu({"width": [4, 4096], "depth": [1, 2]}) == 1
    assert _auto_limit_on_cpu({"width": [4, 4096]}) == 8
    # Dropout, fixed or swept, keeps the trials apart: their masks would depend on the stack.
    assert _auto_limit_on_cpu(GRID_OF_8, dropout=0.2) == 1
    assert _auto_limit_on_cpu({"dropout": [0.0, 0.5]}) == 1
    # A pruner keeps them apart too: trials of one stack cannot be compared, none has finished.
    assert _auto_limit_on_cpu(GRID_OF_8, pruner="median") == 1
    # An explicit number is taken as it is.
    explicit = stacked_sweep_spec(3, model={"depth": 1, "width": 8, "dropout": 0.2})
    assert StudyObjective(explicit, load_dataset=_load, objectives=["val_accuracy"], device=CPU).stack_limit() == 3
