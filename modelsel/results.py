"""What a study's storage says about its trials: counts, the stored spec, the compute
spent and the selection.

Everything here reads the storage alone (no training), so that the orchestration
(:mod:`modelsel.study`), the workers (:mod:`modelsel.parallel`), the sweep analysis
(:mod:`modelsel.sweeps`) and the report (:mod:`modelsel.report`) agree on which trial is
selected, what it stands for and what the study spent.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from modelsel.regimes import trial_blew_up, trial_gradient_flow
from modelsel.spec import (
    SWEEP_SEED_PARAM,
    StudySpec,
    params_key,
    trial_fold_epochs_cap,
    with_params,
)

#: Trials that count towards ``budget.n_trials``.
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


#: Trials whose training counts towards ``budget.fold_epochs`` (a failed trial trained too).
SPENT_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def trial_fold_epochs(trial: FrozenTrial, folds: int) -> int:
    """Fold-epochs ``trial`` trained: the epochs of each of its ``folds`` folds, summed.

    Read from the trial's ``fold_epochs`` attribute (stored when it completes, is pruned or
    diverges); a trial without it (interrupted, or invalid and never trained) counts the
    epochs of its last report, the step of which is the epochs trained, for each fold. (A
    trial of more than 100 epochs reports every ``ceil(epochs / 100)``-th, so fewer epochs
    than that may go uncounted after its last report; counting its reports instead
    counted half of a 120-epoch trial.)
    """
    stored = trial.user_attrs.get("fold_epochs")
    if isinstance(stored, int):
        return stored
    return max(trial.intermediate_values, default=0) * folds


def fold_epochs_spent(study: optuna.Study, folds: int) -> int:
    """Fold-epochs the study's finished and failed trials trained (running ones not counted)."""
    trials = study.get_trials(deepcopy=False, states=SPENT_STATES)
    return sum(trial_fold_epochs(trial, folds) for trial in trials)


def stored_spec(study: optuna.Study) -> dict[str, Any]:
    """The full spec the study's latest run stored (user attribute ``spec_full``, written by
    every run that opens the study); empty when there is none. Raises ``ValueError`` when it
    is not JSON."""
    parsed: dict[str, Any] = json.loads(study.user_attrs.get("spec_full", "") or "{}")
    return parsed


def stored_fold_epochs(study: optuna.Study) -> tuple[int, int | None]:
    """Fold-epochs a stored study's trials trained, and the ``budget.fold_epochs`` of its
    stored spec (None: none), from the storage alone."""
    spec = stored_spec(study)
    return fold_epochs_spent(study, stored_folds(spec)), (spec.get("budget") or {}).get("fold_epochs")


def stored_folds(spec: dict[str, Any]) -> int:
    """``cv.folds`` of a stored spec (:func:`stored_spec`; the default 5 when it has none)."""
    return int((spec.get("cv") or {}).get("folds", 5))


def trials_within_fold_epochs(study: optuna.Study, spec: StudySpec) -> int | None:
    """How many more trials ``budget.fold_epochs`` lets start, each counted at its longest
    (:func:`~modelsel.spec.trial_fold_epochs_cap`); None when the spec has no such budget.

    Counting every trial at its longest keeps the study within the cap whatever is pruned.
    """
    budget = spec.budget.fold_epochs
    if budget is None:
        return None
    return max(0, (budget - fold_epochs_spent(study, spec.cv.folds)) // trial_fold_epochs_cap(spec))


def objective_names(study: optuna.Study) -> list[str]:
    """The study's objectives (``value_0``, ``value_1``, … for a study that did not store them)."""
    names: list[str] = study.user_attrs.get("objectives") or [f"value_{i}" for i in range(len(study.directions))]
    return names


def best_value_text(study: optuna.Study) -> str:
    """The progress bar's "best 0.8234": the value the selection ranks the selected trial
    by (one objective; empty before a selection, or for several objectives)."""
    chosen = selection_and_value(study) if len(study.directions) == 1 else None
    if chosen is None:
        return ""
    objective = objective_names(study)[0]
    return f"best {objective_text(objective, chosen[1])}"


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The selected trial: the best one, or for several objectives the Pareto-optimal
    trial that is best on the first objective."""
    selection = selection_and_value(study)
    return None if selection is None else selection[0]


def selection_and_value(
    study: optuna.Study, *, front: Sequence[FrozenTrial] | None = None
) -> tuple[FrozenTrial, float] | None:
    """The selected trial (:func:`best_trial`) and the first objective's value it was
    ranked by: its cell's mean over the completed seeds for a one-objective sweep with
    repeats, else its own value. Trials whose training blew up are not selected
    (:func:`selectable_trials`). ``front``: the study's :func:`pareto_front`, when the
    caller has it already."""
    if len(study.directions) > 1:
        front = pareto_front(study) if front is None else front
        return (front[0], float(front[0].values[0])) if front else None
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if any(SWEEP_SEED_PARAM in t.params for t in complete):
        return _best_cell_trial(complete, study.direction)
    candidates = selectable_trials(complete)
    if not candidates:
        return None
    # Ties go to the earliest trial, as Optuna's best_trial breaks them.
    chosen = min(candidates, key=lambda t: (_signs(study)[0] * t.values[0], t.number))
    return chosen, float(chosen.values[0])


def best_of_selections(values: Sequence[float | None], direction: optuna.study.StudyDirection) -> int | None:
    """Which of several studies' selections ranks best (a multi-grid sweep's maps): the
    index of the best first-objective value (:func:`selection_and_value`) in the studies'
    ``direction`` for it, the first on a tie; None when no study selected a trial."""
    sign = 1 if direction == optuna.study.StudyDirection.MINIMIZE else -1
    scored = [(sign * value, index) for index, value in enumerate(values) if value is not None]
    return min(scored)[1] if scored else None


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The trials a study of several objectives selects from: the completed ones that no
    other dominates, leaving out those whose training blew up (:func:`selectable_trials`,
    before dominance: a blown-up trial dominates nothing). Ordered best first on the first
    objective, ties by trial number, so the first is the selected trial
    (:func:`best_trial`). Empty for a study of one objective."""
    if len(study.directions) == 1:
        return []
    signs = _signs(study)
    complete = selectable_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return sorted(_pareto_front(complete, signs), key=lambda t: (signs[0] * t.values[0], t.number))


def objective_text(objective: str, value: float) -> str:
    """An objective's value as summaries print it: a fold mean to 4 decimals (``0.7439``), a
    parameter count whole (``12345``), else 4 significant digits."""
    if objective.startswith("val_"):
        return f"{value:.4f}"
    if objective == "n_params" and float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"


def _signs(study: optuna.Study) -> list[int]:
    """+1 for each objective the study minimizes, -1 for each it maximizes."""
    return [1 if d == optuna.study.StudyDirection.MINIMIZE else -1 for d in study.directions]


def pruned_causes(trials: Sequence[FrozenTrial]) -> tuple[int, int]:
    """Of the pruned ``trials``, how many diverged in training and how many were invalid
    configurations (by their ``fail_reason``): those a pruner did not stop."""
    reasons = [str(t.user_attrs.get("fail_reason") or "") for t in trials if t.state == TrialState.PRUNED]
    return (
        sum(r.startswith("diverged") for r in reasons),
        sum(r.startswith("invalid configuration") for r in reasons),
    )


def gradient_flow_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """How many of ``trials`` each gradient-flow label has (:func:`modelsel.regimes.trial_gradient_flow`;
    trials without a label, such as linear models, are not counted), as the report counts them."""
    labels = (trial_gradient_flow(t.user_attrs) for t in trials)
    return dict(Counter(flow[0] for flow in labels if flow is not None))


def selectable_trials(complete: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Of ``complete`` (completed trials), those selection may pick: not those whose
    training blew up (:func:`modelsel.regimes.trial_blew_up`: a finite blow-up completes
    with a number at chance)."""
    return [t for t in complete if not trial_blew_up(t.user_attrs)]


def _pareto_front(trials: Sequence[FrozenTrial], signs: Sequence[int]) -> list[FrozenTrial]:
    """The trials no other trial dominates (``signs``: +1 to minimize an objective, -1 to
    maximize it), as Optuna's ``best_trials`` but over the given trials."""

    keys = [tuple(s * v for s, v in zip(signs, t.values, strict=True)) for t in trials]

    def dominated(b: tuple[float, ...]) -> bool:
        return any(a != b and all(x <= y for x, y in zip(a, b, strict=True)) for a in keys)

    return [t for t, key in zip(trials, keys, strict=True) if not dominated(key)]


def _cell_key(trial: FrozenTrial) -> tuple[tuple[str, str], ...]:
    """A trial's sweep cell: its parameters but the ``seed`` of a repeat."""
    return params_key({k: v for k, v in trial.params.items() if k != SWEEP_SEED_PARAM})


def _seed_order(trial: FrozenTrial) -> tuple[Any, int]:
    return trial.params.get(SWEEP_SEED_PARAM, 0), trial.number


def cell_trials(study: optuna.Study, trial: FrozenTrial) -> list[FrozenTrial]:
    """The completed trials that the selection of ``trial`` stands for, in seed order:
    every seed of its cell in a one-objective sweep with repeats (selected by their mean),
    else ``[trial]`` (several objectives select one trial, seed and all)."""
    if SWEEP_SEED_PARAM not in trial.params or len(study.directions) > 1:
        return [trial]
    cell = _cell_key(trial)
    same = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if _cell_key(t) == cell]
    return sorted(same, key=_seed_order) or [trial]


def selected_params(study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
    """The parameters that name the selection of ``trial``: without the repeat ``seed``
    where a one-objective sweep selects cells (:func:`cell_trials`)."""
    by_cell = len(study.directions) == 1
    return {k: v for k, v in trial.params.items() if k != SWEEP_SEED_PARAM or not by_cell}


def cell_score(trials: Sequence[FrozenTrial], curve: str) -> tuple[float | None, float | None]:
    """Mean and sample std of the fold values ``fold_<curve>`` (``val_metric``, ``val_loss``)
    pooled over ``trials`` (the seeds of a cell); one trial's own stored mean and std."""
    if len(trials) == 1:
        attrs = trials[0].user_attrs
        return attrs.get(f"{curve}_mean"), attrs.get(f"{curve}_std")
    values = [float(v) for t in trials for v in t.user_attrs.get(f"fold_{curve}") or []]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _best_cell_trial(
    complete: Sequence[FrozenTrial], direction: optuna.study.StudyDirection
) -> tuple[FrozenTrial, float] | None:
    """For a sweep with repeats (a ``seed`` parameter): the first seed's trial of the cell
    whose value, averaged over its completed seeds, is best, and that mean (None when
    there is none). The best single seed of any cell would select by the luck of a seed
    (and, for data drawn from the seed, compare trials on different data). A seed that
    blew up counts in its cell's mean (it makes its cell worse, as in ``sweep.csv``); a
    cell whose every seed blew up is not selected, and the trial a cell is retrained
    from is its first seed that did not blow up."""
    cells: dict[tuple[tuple[str, str], ...], list[FrozenTrial]] = {}
    for trial in complete:
        cells.setdefault(_cell_key(trial), []).append(trial)
    kept = {key: selectable_trials(trials) for key, trials in cells.items()}
    means = {key: statistics.fmean(float(t.values[0]) for t in trials) for key, trials in cells.items() if kept[key]}
    if not means:
        return None
    sign = 1 if direction == optuna.study.StudyDirection.MINIMIZE else -1
    best = min(means, key=lambda key: (sign * means[key], min(t.number for t in cells[key])))
    return min(kept[best], key=_seed_order), means[best]


def retrain_epochs(trial: FrozenTrial, spec: StudySpec) -> int:
    """Epochs for the final retrain: the folds' mean best epoch under early stopping."""
    final_epochs = trial.user_attrs.get("final_epochs")
    if spec.training.early_stopping is not None and final_epochs:
        return max(1, round(statistics.fmean(final_epochs)))
    return spec.training.epochs


def pending_retrain(study: optuna.Study, spec: StudySpec) -> tuple[FrozenTrial, StudySpec, int] | None:
    """The selected trial, its configuration and retrain epochs, while it has no stored
    test score (None without a selection, or once its score is stored)."""
    selected = best_trial(study)
    if selected is None:
        return None
    stored = study.user_attrs.get("test_result")
    if stored is not None and stored.get("trial_number") == selected.number:
        return None
    trial_spec = with_params(spec, selected.params)
    return selected, trial_spec, retrain_epochs(selected, trial_spec)
