"""Tests of modelsel.objective: what each trial records, pruning, divergence and invalid configurations."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import tiny_spec_data
from optuna.trial import TrialState

from modelsel.data import load_dataset
from modelsel.objective import StudyObjective, grid_search_space, rounded, suggest_params
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


def test_the_fold_mean_curve_is_reported_each_epoch(tiny_study: optuna.Study) -> None:
    for trial in tiny_study.get_trials(states=(TrialState.COMPLETE,)):
        reported = [trial.intermediate_values[e] for e in range(3)]
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
        assert max(trial.intermediate_values) == epoch - 1
        assert len(trial.user_attrs["curves"]["val_metric"]) == epoch
        assert "fold_val_metric" not in trial.user_attrs
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        assert "pruned_at_epoch" not in trial.user_attrs


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


def test_a_diverging_trial_is_pruned_with_a_reason_and_the_study_goes_on(fast_tmp: Path) -> None:
    url = f"sqlite:///{fast_tmp}/d.db"
    outcome = run_study(diverging_spec(), storage=url, output_dir=fast_tmp, progress=False, build_report=False)
    study = optuna.load_study(study_name="diverge", storage=url)
    by_lr = {t.params["lr"]: t for t in study.trials}
    assert set(by_lr) == {0.01, 1000.0}
    diverged = by_lr[1000.0]
    assert diverged.state == TrialState.PRUNED
    assert diverged.user_attrs["fail_reason"].startswith("diverged: member ")
    assert "grad_norms" in diverged.user_attrs
    assert by_lr[0.01].state == TrialState.COMPLETE
    assert outcome.best_params == {"lr": 0.01}
    assert outcome.test is not None and math.isfinite(outcome.test["test_loss"])


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
