"""The Optuna objective: sample a configuration, cross-validate it, record everything.

Each trial stores, as user attributes, the per-fold scores, the fold-mean and per-fold
per-epoch curves, gradient norms, weight statistics, parameter count and timings, so
that the storage alone is enough to rebuild every table, plot and report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import optuna
import torch

from modelsel.cv import CVResult, cross_validate, fold_indices, fold_mean_curve, make_fold_data, mean_std
from modelsel.diagnostics import GradientStats, mean_weight_stats
from modelsel.models import mlp_param_count
from modelsel.regimes import baseline_error, classify, numbers_from_attrs
from modelsel.spec import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    StudySpec,
    SweepSpec,
    with_params,
)
from modelsel.training import Callback, Diverged, FoldData, History

if TYPE_CHECKING:
    from modelsel.data import Dataset

#: Per-epoch value reported to Optuna for each objective that can be pruned on.
_CURVE_OF_OBJECTIVE = {"val_accuracy": "val_metric", "val_loss": "val_loss"}
SWEEP_SEED_PARAM = "seed"


def rounded(value: Any, digits: int = 6) -> Any:
    """Round floats (also inside lists/dicts) to ``digits`` significant digits for storage."""
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0.0:
            return value if math.isfinite(value) else str(value)
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def sweep_grid(spec: StudySpec) -> dict[str, list[Any]]:
    """The GridSampler search space of a sweep spec (a ``seed`` axis when ``repeats`` > 1)."""
    assert isinstance(spec.sweep, SweepSpec), "a list of sweep grids runs one study per grid"
    grid: dict[str, list[Any]] = {axis: list(values) for axis, values in spec.sweep.axes.items()}
    if spec.sweep.repeats > 1:
        grid[SWEEP_SEED_PARAM] = [spec.seed + r for r in range(spec.sweep.repeats)]
    return grid


def grid_search_space(spec: StudySpec) -> dict[str, list[Any]]:
    """The finite grid of a ``sampler: grid`` search (categorical or stepped distributions)."""
    grid: dict[str, list[Any]] = {}
    for key, dist in spec.search.items():
        if isinstance(dist, CategoricalDistribution):
            grid[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution):
            grid[key] = list(range(dist.low, dist.high + 1, dist.step))
        else:
            assert dist.step is not None
            count = math.floor((dist.high - dist.low) / dist.step + 1e-9) + 1
            grid[key] = [rounded(dist.low + i * dist.step, 12) for i in range(count)]
    return grid


def suggest_params(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """Sample this trial's values of the searched (or swept) fields."""
    if spec.sweep is not None:
        return {axis: trial.suggest_categorical(axis, values) for axis, values in sweep_grid(spec).items()}
    params: dict[str, Any] = {}
    for key, dist in spec.search.items():
        if isinstance(dist, IntDistribution):
            params[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, FloatDistribution):
            params[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            params[key] = trial.suggest_categorical(key, dist.choices)
    return params


class PruningCallback(Callback):
    """Reports the fold-mean validation value to Optuna and prunes on its word.

    Every epoch is reported for runs of up to ``max_reports`` epochs; longer runs report
    every ``ceil(epochs / max_reports)``-th epoch and the last, since each report is a
    storage write (the full per-epoch curves are stored with the trial anyway).
    """

    def __init__(self, trial: optuna.Trial, objective: str, *, epochs: int, max_reports: int = 100) -> None:
        self.trial = trial
        self.curve = _CURVE_OF_OBJECTIVE.get(objective, "val_loss")
        self.every = max(1, math.ceil(epochs / max_reports))
        self.last_epoch = epochs - 1
        self.can_prune = not isinstance(trial.study.pruner, optuna.pruners.NopPruner)

    def on_epoch_end(self, epoch: int, histories: Sequence[History]) -> None:
        if (epoch + 1) % self.every and epoch != self.last_epoch:
            return
        value = fold_mean_curve(histories, self.curve)[epoch]
        self.trial.report(value, epoch)
        # Pruning after the last epoch would discard a finished result and save nothing.
        if self.can_prune and epoch != self.last_epoch and self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_epoch", epoch + 1)
            self.trial.set_user_attr("curves", rounded(_partial_curves(histories)))
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} (fold-mean {self.curve} {value:.4g})")


def _partial_curves(histories: Sequence[History]) -> dict[str, list[float]]:
    return {
        name: fold_mean_curve(histories, name)
        for name in ("train_loss", "val_loss", "train_metric", "val_metric")
    }


class StudyObjective:
    """Callable Optuna objective for one study spec and its loaded dataset.

    Parameters
    ----------
    spec
        The study spec (search space or sweep, fixed values).
    load_dataset
        Returns the dataset for a trial's resolved spec (``train_size``/``degree`` may vary).
    objectives
        Objective names, in the study's direction order.
    device
        Where to train.
    """

    def __init__(
        self,
        spec: StudySpec,
        *,
        load_dataset: Any,
        objectives: Sequence[str],
        device: torch.device,
    ) -> None:
        self.spec = spec
        self.load_dataset = load_dataset
        self.objectives = list(objectives)
        self.device = device
        self._folds: dict[tuple[Any, ...], list[FoldData]] = {}

    def _fold_data(self, spec: StudySpec, dataset: Dataset) -> list[FoldData]:
        # Fold tensors depend on the data subset and the split seed only; reuse them across trials.
        key = (spec.dataset.model_dump_json(), spec.seed, spec.cv.model_dump_json())
        if key not in self._folds:
            if len(self._folds) >= 2:
                self._folds.pop(next(iter(self._folds)))
            splits = fold_indices(dataset, spec.cv, seed=spec.seed)
            self._folds[key] = make_fold_data(dataset, splits, device=self.device)
        return self._folds[key]

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        params = suggest_params(trial, self.spec)
        try:
            trial_spec = with_params(self.spec, params)
        except ValueError as exc:
            trial.set_user_attr("fail_reason", f"invalid configuration: {exc}")
            raise optuna.TrialPruned(f"invalid configuration: {exc}") from None
        dataset = self.load_dataset(trial_spec)
        n_params = mlp_param_count(trial_spec.model, n_inputs=dataset.n_features, n_outputs=dataset.n_outputs)
        trial.set_user_attr("n_params", n_params)
        trial.set_user_attr("n_train", int(dataset.X_train.shape[0]))
        baseline = rounded(baseline_error(dataset.y_train, dataset.task))
        trial.set_user_attr("baseline_error", baseline)
        gradient_stats = GradientStats()
        callbacks: list[Callback] = [gradient_stats]
        if len(self.objectives) == 1 and self.objectives[0] in _CURVE_OF_OBJECTIVE:
            callbacks.append(PruningCallback(trial, self.objectives[0], epochs=trial_spec.training.epochs))
        try:
            result = cross_validate(
                trial_spec,
                dataset,
                folds=self._fold_data(trial_spec, dataset),
                callbacks=callbacks,
                device=self.device,
            )
        except Diverged as exc:
            trial.set_user_attr("fail_reason", f"diverged: {exc}")
            trial.set_user_attr("regime", "diverged")
            trial.set_user_attr("regime_reason", f"training diverged: {exc.reason}")
            trial.set_user_attr("grad_norms", rounded(gradient_stats.fold_mean()))
            raise optuna.TrialPruned(f"diverged: {exc}") from None
        record = trial_record(result, gradient_stats)
        numbers = numbers_from_attrs({**record, "baseline_error": baseline})
        if numbers is not None:
            # The label from the trial's own numbers; a sweep's report relabels with its neighbours.
            verdict = classify(numbers, self.spec.regimes)
            record.update(regime=verdict.regime, regime_reason=verdict.reason, regime_evidence=verdict.evidence)
        for key, value in rounded(record).items():
            trial.set_user_attr(key, value)
        values = [self._objective_value(name, result, n_params) for name in self.objectives]
        return values[0] if len(values) == 1 else values

    @staticmethod
    def _objective_value(name: str, result: CVResult, n_params: int) -> float:
        if name == "val_accuracy":
            return mean_std(result.fold_val_metric)[0]
        if name == "val_loss":
            return mean_std(result.fold_val_loss)[0]
        if name == "n_params":
            return float(n_params)
        return result.fit_seconds


def trial_record(result: CVResult, gradient_stats: GradientStats) -> dict[str, Any]:
    """Everything a finished trial stores about itself, JSON-ready."""
    histories = result.histories
    record: dict[str, Any] = {}
    for name, values in (
        ("val_loss", result.fold_val_loss),
        ("val_metric", result.fold_val_metric),
        ("train_loss", result.fold_train_loss),
        ("train_metric", result.fold_train_metric),
    ):
        mean, std = mean_std(values)
        record[f"fold_{name}"] = values
        record[f"{name}_mean"] = mean
        record[f"{name}_std"] = std
    record["metric_name"] = "accuracy" if result.task == "classification" else "rmse"
    record["curves"] = result.curves()
    record["fold_curves"] = {
        name: [getattr(h, name) for h in histories]
        for name in ("train_loss", "val_loss", "train_metric", "val_metric")
    }
    record["final_epochs"] = [h.final_epoch + 1 for h in histories]
    record["stopped_early"] = [h.stopped_early for h in histories]
    record["fold_epochs"] = result.fold_epochs
    record["fit_seconds"] = result.fit_seconds
    record["grad_norms"] = gradient_stats.fold_mean()
    record["weight_stats"] = mean_weight_stats([m.model for m in result.members])
    return rounded(record)
