"""The Optuna objective: sample a configuration, cross-validate it, record everything.

Each trial stores, as user attributes, the per-fold scores, the fold-mean and per-fold
per-epoch curves, gradient norms, weight statistics, parameter count and timings, so
that the storage alone is enough to rebuild every table, plot and report.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
import torch

from modelsel.cv import (
    CVResult,
    cross_validate,
    fold_indices,
    fold_mean_curve,
    fold_values_at,
    make_fold_data,
    mean_std,
)
from modelsel.diagnostics import GradientStats, mean_weight_stats
from modelsel.models import mlp_param_count
from modelsel.regimes import baseline_error, classify, numbers_from_attrs
from modelsel.results import best_trial
from modelsel.spec import (
    SWEEP_SEED_PARAM,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    StudySpec,
    SweepSpec,
    with_params,
)
from modelsel.stacked import StackedTrainer, StackJob, stack_signature
from modelsel.training import Callback, Diverged, FoldData, History, describe_device, step_flops, thread_policy

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from modelsel.data import Dataset
    from modelsel.models import MLP

#: Per-epoch value reported to Optuna for each objective that can be pruned on.
_CURVE_OF_OBJECTIVE = {"val_accuracy": "val_metric", "val_loss": "val_loss"}

#: ``training.stack_trials: auto`` on the CPU stacks the trials of a sweep or grid (up to
#: 8) when every cell's model takes at most this many FLOPs per member and step (see
#: :func:`~modelsel.training.step_flops`) and there is no dropout and no pruner, else
#: trains them one at a time. Measured on
#: the 2-core AMD EPYC (AVX2), 1 thread, Adam, batch 64 (``benchmarks/engine_probe.py
#: --synthetic ... --members``), samples/s of 40 stacked members (8 trials x 5 folds) over 5:
#:
#: ==================  ==========  ==================
#: model               MFLOP/step  40 over 5 members
#: ==================  ==========  ==================
#: digits 64-64-64-10         3.4  1.42x
#: 784-16-10                  4.9  1.33x (20: 1.34-1.61x)
#: 784-64-10                   20  1.37x (20: 1.02-1.23x)
#: 784-128-10                  39  1.17x
#: 784-256-10                  78  0.79-1.02x
#: ==================  ==========  ==================
#:
#: A digits sweep of 8 cells (width 16/64, depth 2, 4 weight decays, 20 epochs) searched
#: in 5.5-5.9 s stacked against 7.5-9.0 s one trial at a time, with identical values.
STACK_TRIALS_MAX_STEP_FLOPS = 16_000_000


def rounded(value: Any, *, digits: int = 6) -> Any:
    """Round floats (also inside lists/dicts) to ``digits`` significant digits for storage."""
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0.0:
            return value if math.isfinite(value) else str(value)
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits=digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits=digits) for v in value]
    return value


def gradient_attrs(stats: GradientStats) -> dict[str, dict[str, list[Any]]]:
    """The trial attributes of a trial's gradient statistics, rounded for storage:
    ``grad_norms`` (each layer's weight gradient) and ``preactivation_grad_norms`` (the
    loss's gradient with respect to each layer's output), fold means per epoch."""
    return {
        "grad_norms": rounded(stats.fold_mean()),
        "preactivation_grad_norms": rounded(stats.fold_mean(preactivation=True)),
    }


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
            grid[key] = [rounded(dist.low + i * dist.step, digits=12) for i in range(count)]
    return grid


def study_grid(spec: StudySpec) -> dict[str, list[Any]]:
    """The GridSampler search space of a sweep or of a ``sampler: grid`` search."""
    return sweep_grid(spec) if spec.sweep is not None else grid_search_space(spec)


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

    The step of each report is the number of epochs trained (1 after the first epoch),
    so a pruner's resource options count epochs: ``min_resource: 1`` for successive
    halving or Hyperband lets a trial be judged after one epoch, ``max_resource`` is
    ``training.epochs``, and ``n_warmup_steps: 2`` keeps the median pruner off until two
    epochs are done. Every epoch is reported for runs of up to ``max_reports`` epochs; longer runs report
    every ``ceil(epochs / max_reports)``-th epoch and the last, since each report is a
    storage write (the full per-epoch curves are stored with the trial anyway).
    """

    def __init__(
        self,
        trial: optuna.Trial,
        objective: str,
        *,
        epochs: int,
        max_reports: int = 100,
        gradient_stats: GradientStats | None = None,
    ) -> None:
        self.trial = trial
        self.gradient_stats = gradient_stats  # stored with a pruned trial too: known from the first batch
        self.curve = _CURVE_OF_OBJECTIVE.get(objective, "val_loss")
        self.every = max(1, math.ceil(epochs / max_reports))
        self.last_epoch = epochs - 1
        self.can_prune = not isinstance(trial.study.pruner, optuna.pruners.NopPruner)
        self.stores_fold_values = isinstance(trial.study.pruner, FoldPairedPruner)

    def on_epoch_end(self, epoch: int, histories: Sequence[History]) -> None:
        # The trial's last epoch: the spec's last, or the one after which every fold has stopped early.
        last = epoch == self.last_epoch or all(h.stopped_early for h in histories)
        if (epoch + 1) % self.every and not last:
            return
        per_fold = fold_values_at(histories, self.curve, epoch)
        value = statistics.fmean(per_fold)
        self.trial.report(value, epoch + 1)
        # Pruning after the last epoch would discard a finished result and save nothing.
        if not self.can_prune or last:
            return
        if self.stores_fold_values and len(per_fold) == len(histories):
            self.trial.set_user_attr(
                FoldPairedPruner.ATTRIBUTE, {"curve": self.curve, "epoch": epoch + 1, "values": rounded(per_fold)}
            )
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_epoch", epoch + 1)
            self.trial.set_user_attr("fold_epochs", sum(h.epochs_run for h in histories))
            self.trial.set_user_attr("curves", rounded(_partial_curves(histories)))
            if self.gradient_stats is not None:
                for name, norms in gradient_attrs(self.gradient_stats).items():
                    self.trial.set_user_attr(name, norms)
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} (fold-mean {self.curve} {value:.4g})")


class FoldPairedPruner(optuna.pruners.BasePruner):
    """Prunes a trial once it is worse than the best finished trial on every fold.

    Every trial of a study trains on the same folds, so they can be compared fold by
    fold: after each epoch the trial's validation value on every fold is compared with
    the best finished trial's on the same fold after as many epochs (its last, if it
    stopped earlier). The trial is pruned when it is worse by more than ``margin`` on at
    least ``min_worse_folds`` folds (default: all of them). So a trial is pruned only
    when its deficit is consistent across folds, not when it trails on average (the
    median and percentile pruners rank fold means): between two equally good
    configurations, 5 of 5 folds worse happens by chance with probability 1/32, 4 of 5
    with 6/32. It is the cautious choice: it lets close rivals of the best finish, and
    saves less compute than ranking pruners (see ``benchmarks/results.md``).

    The values come from :class:`PruningCallback`, which stores them in the trial's
    user attribute ``fold_values_at_step`` when the study uses this pruner; the best
    trial's come from its ``fold_curves``. Only one-objective studies prune.

    Parameters
    ----------
    margin
        How much worse than the best trial a fold's value must be (accuracy or loss units).
    min_worse_folds
        How many folds must be worse; ``None`` means all.
    n_startup_trials
        Finished (complete) trials before any pruning.
    n_warmup_steps
        Epochs a trial trains before it may be pruned.
    """

    ATTRIBUTE = "fold_values_at_step"

    def __init__(
        self,
        *,
        margin: float = 0.0,
        min_worse_folds: int | None = None,
        n_startup_trials: int = 1,
        n_warmup_steps: int = 1,
    ) -> None:
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if min_worse_folds is not None and min_worse_folds < 1:
            raise ValueError(f"min_worse_folds must be >= 1, got {min_worse_folds}")
        if n_startup_trials < 1:
            raise ValueError(f"n_startup_trials must be >= 1 (pruning needs a finished trial), got {n_startup_trials}")
        if n_warmup_steps < 0:
            raise ValueError(f"n_warmup_steps must be >= 0, got {n_warmup_steps}")
        self.margin = margin
        self.min_worse_folds = min_worse_folds
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """Whether ``trial`` is worse than the best finished trial on enough folds."""
        step = trial.last_step
        current = trial.user_attrs.get(self.ATTRIBUTE)
        if step is None or step < self.n_warmup_steps or not current or current.get("epoch") != step:
            return False
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < self.n_startup_trials:
            return False
        best = best_trial(study)  # the selection's: not a trial whose training blew up
        if best is None:
            return False
        best_curves = (best.user_attrs.get("fold_curves") or {}).get(current["curve"])
        values = current["values"]
        if not best_curves or len(best_curves) != len(values) or not all(best_curves):
            return False
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        worse = 0
        for value, curve in zip(values, best_curves, strict=True):
            reference = curve[min(step, len(curve)) - 1]
            gap = (reference - value) if maximize else (value - reference)
            worse += gap > self.margin  # NaN compares False: never prunes on it
        return worse >= (self.min_worse_folds or len(values))


def _partial_curves(histories: Sequence[History]) -> dict[str, list[float]]:
    return {
        name: fold_mean_curve(histories, name)
        for name in ("train_loss", "val_loss", "train_metric", "val_metric")
    }


@dataclass
class _PreparedTrial:
    """A trial's resolved spec, data and recorders, ready to train."""

    trial: optuna.Trial
    spec: StudySpec
    dataset: Dataset
    folds: list[FoldData]
    baseline: Any
    n_params: int
    gradient_stats: GradientStats
    callbacks: list[Callback]


class _TrialSlice(Callback):
    """One trial's view of a stacked model that trains several trials.

    Passes the hooks of the trial's own members (``positions`` in the stack's job order)
    to the trial's callbacks, with fold indices from 0; when the trial is pruned or one
    of its folds diverges, takes its members out of the stack.
    """

    def __init__(self, prepared: _PreparedTrial, positions: range) -> None:
        self.prepared = prepared
        self.positions = positions
        self.trainer: StackedTrainer | None = None
        self.pruned: optuna.TrialPruned | None = None
        self.done = False
        self.wants_grads = any(c.wants_grads for c in prepared.callbacks)

    def on_train_begin(self, models: Sequence[MLP]) -> None:
        own = [models[p] for p in self.positions]
        for callback in self.prepared.callbacks:
            callback.on_train_begin(own)

    def on_grads_computed(self, member: int, model: MLP, epoch: int) -> None:
        if self.done or member not in self.positions:
            return
        for callback in self.prepared.callbacks:
            if callback.wants_grads:
                callback.on_grads_computed(member - self.positions.start, model, epoch)

    def on_preactivation_grads(self, member: int, model: MLP, epoch: int, norms: Sequence[float]) -> None:
        if self.done or member not in self.positions:
            return
        for callback in self.prepared.callbacks:
            if callback.wants_grads:
                callback.on_preactivation_grads(member - self.positions.start, model, epoch, norms)

    def on_epoch_end(self, epoch: int, histories: Sequence[History]) -> None:
        if self.done or epoch >= self.prepared.spec.training.epochs:
            return
        assert self.trainer is not None
        if any(self.trainer.divergence(p) is not None for p in self.positions):
            self._stop()
            return
        own = [histories[p] for p in self.positions]
        if not any(len(h.val_loss) > epoch or len(h.train_loss) > epoch for h in own):
            return  # every fold stopped early before this epoch
        try:
            for callback in self.prepared.callbacks:
                callback.on_epoch_end(epoch, own)
        except optuna.TrialPruned as exc:
            self.pruned = exc
            self._stop()

    def _stop(self) -> None:
        assert self.trainer is not None
        self.done = True
        self.trainer.stop_members(list(self.positions))


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
    budget_left
        How many trials the study may still start, so that trials stacked beside a
        running one (``training.stack_trials``) stay within the budget; None: no limit.
    on_companion_told
        Called with each stacked companion trial once it is told (e.g. progress bars).
    """

    def __init__(
        self,
        spec: StudySpec,
        *,
        load_dataset: Any,
        objectives: Sequence[str],
        device: torch.device,
        budget_left: Callable[[optuna.Study], int] | None = None,
        on_companion_told: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        self.spec = spec
        self.load_dataset = load_dataset
        self.objectives = list(objectives)
        self.device = device
        self._folds: dict[tuple[Any, ...], list[FoldData]] = {}
        self.budget_left = budget_left
        self.on_companion_told = on_companion_told

    @functools.cached_property
    def device_label(self) -> str:
        """Where the trials train, as each trial stores it (asked of CUDA once, on first use)."""
        return describe_device(self.device)

    def _fold_data(self, spec: StudySpec, dataset: Dataset) -> list[FoldData]:
        # Fold tensors depend on the data subset and the split seed only; reuse them across trials.
        key = (spec.dataset.model_dump_json(), spec.seed, spec.cv.model_dump_json())
        if key not in self._folds:
            if len(self._folds) >= 2:
                self._folds.pop(next(iter(self._folds)))
            splits = fold_indices(dataset, spec.cv, seed=spec.seed, train_size=spec.dataset.train_size)
            self._folds[key] = make_fold_data(dataset, splits, device=self.device)
        return self._folds[key]

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        companions = self._ask_companions(trial)
        if companions:
            return self._run_with_companions(trial, companions)
        prepared = self._prepare(trial)
        try:
            result = cross_validate(
                prepared.spec,
                prepared.dataset,
                folds=prepared.folds,
                callbacks=prepared.callbacks,
                device=self.device,
            )
        except Diverged as exc:
            raise self._diverged(prepared, exc) from None
        return self._finish(prepared, result)

    # ------------------------------------------------------------------ one trial

    def _prepare(self, trial: optuna.Trial) -> _PreparedTrial:
        """Sample the trial's configuration, load its data and record what is known up front.

        Raises ``optuna.TrialPruned`` for a configuration the spec cannot build.
        """
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
        trial.set_user_attr("device", self.device_label)
        baseline = rounded(baseline_error(dataset.y_train, dataset.task))
        trial.set_user_attr("baseline_error", baseline)
        # Known up front, so that a trial pruned before its record tells what its loss was.
        trial.set_user_attr("metric_name", "accuracy" if dataset.task == "classification" else "rmse")
        gradient_stats = GradientStats()
        callbacks: list[Callback] = [gradient_stats]
        if len(self.objectives) == 1 and self.objectives[0] in _CURVE_OF_OBJECTIVE:
            callbacks.append(
                PruningCallback(
                    trial, self.objectives[0], epochs=trial_spec.training.epochs, gradient_stats=gradient_stats
                )
            )
        folds = self._fold_data(trial_spec, dataset)
        smallest = min(f.n_train for f in folds)
        if trial_spec.model.normalizes_batches and smallest < 2:
            # train_models refuses it; here it is this configuration's problem, not the run's.
            reason = (
                "invalid configuration: model.batch_norm needs 2 training samples per fold or more; "
                f"a fold has {smallest}"
            )
            trial.set_user_attr("fail_reason", reason)
            raise optuna.TrialPruned(reason)
        return _PreparedTrial(
            trial=trial,
            spec=trial_spec,
            dataset=dataset,
            folds=folds,
            baseline=baseline,
            n_params=n_params,
            gradient_stats=gradient_stats,
            callbacks=callbacks,
        )

    @staticmethod
    def _diverged(prepared: _PreparedTrial, exc: Diverged) -> optuna.TrialPruned:
        """Record a diverged trial; the exception to end it with."""
        trial = prepared.trial
        # Within a trial the diverged member is a fold (the engines' message says "member").
        reason = f"diverged: fold {exc.member} at epoch {exc.epoch + 1}: {exc.reason}"
        trial.set_user_attr("fail_reason", reason)
        trial.set_user_attr("regime", "diverged")
        trial.set_user_attr("regime_reason", f"training diverged: {exc.reason}")
        for name, norms in gradient_attrs(prepared.gradient_stats).items():
            trial.set_user_attr(name, norms)
        # Counted up to the epoch that diverged, as if every fold trained all of it (a cap's view).
        trial.set_user_attr("fold_epochs", (exc.epoch + 1) * len(prepared.folds))
        trial.set_user_attr("pruned_at_epoch", exc.epoch + 1)
        return optuna.TrialPruned(reason)

    def _finish(self, prepared: _PreparedTrial, result: CVResult) -> float | list[float]:
        """Store a finished trial's record and return its objective value(s)."""
        record = trial_record(result, prepared.gradient_stats)
        numbers = numbers_from_attrs({**record, "baseline_error": prepared.baseline})
        if numbers is not None:
            # The label from the trial's own numbers; a sweep's report relabels with its neighbours.
            verdict = classify(numbers, thresholds=self.spec.regimes)
            record.update(regime=verdict.regime, regime_reason=verdict.reason, regime_evidence=verdict.evidence)
        for key, value in rounded(record).items():
            prepared.trial.set_user_attr(key, value)
        values = [self._objective_value(name, result, prepared.n_params) for name in self.objectives]
        return values[0] if len(values) == 1 else values

    # ------------------------------------------------------------------ stacked trials

    def stack_limit(self) -> int:
        """How many trials may train as one stacked model (``training.stack_trials``).

        Only sweeps and grid searches stack trials: their cells are fixed in advance, so
        asking several at once changes nothing about which configurations run (a
        model-based sampler would sample the later ones without the earlier results).
        """
        if self.spec.sweep is None and self.spec.sampler.name != "grid":
            return 1
        setting = self.spec.training.stack_trials
        if setting == "auto":
            if self.device.type == "cuda":
                return 8
            # On the CPU only where it pays and changes no trial's outcome: trials of one
            # stack cannot be compared by a pruner (none of them has finished yet).
            return 8 if self.spec.pruner.name == "none" and self._grid_is_small else 1
        return int(setting)

    @functools.cached_property
    def _grid_is_small(self) -> bool:
        """Whether every cell of the grid is a small model without dropout (``stack_trials: auto`` on CPU).

        Small: one member's training step is at most :data:`STACK_TRIALS_MAX_STEP_FLOPS`,
        where the step's fixed costs (Python, dispatch, the optimizer's per-tensor calls)
        outweigh its GEMMs, so that stacking more members divides them further. Dropout
        excludes a grid because a stack draws one mask stream for all its members, and a
        trial's numbers should not depend on which trials happened to train beside it
        unless the spec asks for it.
        """
        grid = study_grid(self.spec)
        dimensions: dict[str, tuple[int, int]] = {}
        for values in itertools.product(*grid.values()):
            try:
                cell = with_params(self.spec, dict(zip(grid, values, strict=True)))
            except ValueError:
                continue  # an invalid cell is pruned without training
            if cell.model.dropout > 0:
                return False
            key = cell.dataset.model_dump_json()
            if key not in dimensions:
                dataset = self.load_dataset(cell)
                dimensions[key] = (dataset.n_features, dataset.n_outputs)
            n_inputs, n_outputs = dimensions[key]
            flops = step_flops(cell.model, n_inputs=n_inputs, n_outputs=n_outputs, batch_size=cell.training.batch_size)
            if flops > STACK_TRIALS_MAX_STEP_FLOPS:
                return False
        return True

    def _ask_companions(self, trial: optuna.Trial) -> list[optuna.Trial]:
        """Further trials to train beside ``trial``, asked from its study (at most the budget)."""
        limit = self.stack_limit() - 1
        if self.budget_left is not None:
            limit = min(limit, self.budget_left(trial.study) - 1)
        return [trial.study.ask() for _ in range(max(0, limit))]

    def _run_with_companions(self, leader: optuna.Trial, companions: list[optuna.Trial]) -> float | list[float]:
        """Train ``leader`` and ``companions`` (stacked where they share an architecture),
        tell the companions' outcomes to the study and return the leader's value."""
        study = leader.study
        told: set[int] = set()

        def tell(trial: optuna.Trial, outcome: float | list[float] | optuna.TrialPruned) -> None:
            # Each companion is told as soon as its stack is done, so an interrupt or an
            # error in a later stack does not lose it.
            if trial is leader:
                return
            frozen = (
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                if isinstance(outcome, optuna.TrialPruned)
                else study.tell(trial, outcome)
            )
            told.add(trial.number)
            if self.on_companion_told is not None:
                self.on_companion_told(study, frozen)

        try:
            outcomes = self.run_trials([leader, *companions], on_outcome=tell)
        except BaseException:
            for trial in companions:
                if trial.number not in told:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        first = outcomes[0]
        if isinstance(first, optuna.TrialPruned):
            raise first
        return first

    def run_trials(
        self,
        trials: Sequence[optuna.Trial],
        *,
        on_outcome: Callable[[optuna.Trial, float | list[float] | optuna.TrialPruned], None] | None = None,
    ) -> list[float | list[float] | optuna.TrialPruned]:
        """Train several trials, those sharing an architecture as one stacked model.

        Returns, in order, each trial's objective value(s), or the ``optuna.TrialPruned``
        that ends it (pruned, diverged or invalid); nothing is told to the study here.
        ``on_outcome(trial, outcome)`` is called for each trial as soon as it is known (an
        invalid configuration at once, the others when their stack is done). The stack of
        ``trials[0]`` trains last: Optuna records that trial when the objective returns.
        """
        outcomes: dict[int, float | list[float] | optuna.TrialPruned] = {}
        groups: dict[tuple[Any, ...], list[_PreparedTrial]] = {}
        for trial in trials:
            try:
                prepared = self._prepare(trial)
            except optuna.TrialPruned as exc:
                outcomes[trial.number] = exc
                if on_outcome is not None:
                    on_outcome(trial, exc)
                continue
            # Members may train on different data (seeds, training-set sizes), not different
            # shapes. A stack takes as many steps per epoch as its largest member and the
            # others sit out the rest, so sizes more than about 2x apart stack separately.
            batches = max(math.ceil(f.n_train / prepared.spec.training.batch_size) for f in prepared.folds)
            key = (
                stack_signature(prepared.spec.model, prepared.spec.training),
                prepared.dataset.task,
                prepared.dataset.n_features,
                prepared.dataset.n_outputs,
                batches.bit_length(),
            )
            groups.setdefault(key, []).append(prepared)
        leader_last = sorted(groups.values(), key=lambda group: any(p.trial is trials[0] for p in group))
        for group in leader_last:
            outcomes.update(self._train_group(group))
            if on_outcome is not None:
                for prepared in group:
                    on_outcome(prepared.trial, outcomes[prepared.trial.number])
        return [outcomes[t.number] for t in trials]

    def _train_group(self, group: list[_PreparedTrial]) -> dict[int, float | list[float] | optuna.TrialPruned]:
        jobs: list[StackJob] = []
        slices: list[_TrialSlice] = []
        for prepared in group:
            start = len(jobs)
            jobs += [
                StackJob(data=fold, model=prepared.spec.model, training=prepared.spec.training,
                         seed=prepared.spec.seed, index=index)
                for index, fold in enumerate(prepared.folds)
            ]
            slices.append(_TrialSlice(prepared, range(start, len(jobs))))
        first = group[0]
        dataset = first.dataset
        trainer = StackedTrainer(
            jobs,
            task=dataset.task,
            n_outputs=dataset.n_outputs,
            device=self.device,
            callbacks=slices,
            raise_on_divergence=False,
        )
        for part in slices:
            part.trainer = trainer
        with thread_policy(
            first.spec.model,
            first.spec.training,
            n_inputs=dataset.n_features,
            n_outputs=dataset.n_outputs,
            device=self.device,
        ):
            results = trainer.train()
        outcomes: dict[int, float | list[float] | optuna.TrialPruned] = {}
        for part in slices:
            prepared = part.prepared
            number = prepared.trial.number
            diverged = next((results[p].diverged for p in part.positions if results[p].diverged), None)
            if part.pruned is not None:
                outcomes[number] = part.pruned
            elif diverged is not None:
                # Name the fold within the trial, as when the trial trains alone.
                fold = diverged.member - part.positions.start
                outcomes[number] = self._diverged(prepared, Diverged(fold, diverged.epoch, diverged.reason))
            else:
                members = [results[p].member for p in part.positions]
                outcomes[number] = self._finish(prepared, CVResult(members=members, task=dataset.task))
        return outcomes

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
    record.update(gradient_attrs(gradient_stats))
    record["weight_stats"] = mean_weight_stats([m.model for m in result.members])
    return rounded(record)


def load_dataset_for(spec: StudySpec) -> Any:
    from modelsel.data import load_dataset

    return load_dataset(spec.dataset, seed=spec.seed)


def study_objective(
    study: optuna.Study,
    spec: StudySpec,
    *,
    device: torch.device,
    budget_left: Callable[[optuna.Study], int] | None = None,
    on_companion_told: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> StudyObjective:
    """The Optuna objective of ``spec`` for ``study`` (its task read from the study, else the data);
    ``budget_left`` and ``on_companion_told`` as in :class:`~modelsel.objective.StudyObjective`."""
    task = study.user_attrs.get("task") or load_dataset_for(spec).task
    return StudyObjective(
        spec,
        load_dataset=load_dataset_for,
        objectives=spec.resolved_objectives(task),
        device=device,
        budget_left=budget_left,
        on_companion_told=on_companion_told,
    )
