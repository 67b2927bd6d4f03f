"""Study orchestration: from a spec to a finished, resumable Optuna study.

:func:`run_study` resolves the storage, loads and checks the data (so that bad input
fails before anything is written), creates or resumes the study, tops it up to its
trial budget, retrains the selected configuration on the whole training split, scores
the held-out test split once, and builds the report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from modelsel import __version__
from modelsel.errors import SpecError, UserError
from modelsel.spec import (
    OBJECTIVE_DIRECTIONS,
    SWEEP_SEED_PARAM,
    StudySpec,
    params_key,
    resolve_field,
    trial_fold_epochs_cap,
    with_params,
)
from modelsel.storage import (
    check_output_folder,
    default_storage_url,
    display_url,
    local_path,
    open_storage,
    storage_kind,
    unfinished_trials_failed,
)

if TYPE_CHECKING:
    import torch

    from modelsel.objective import StudyObjective
    from modelsel.parallel import WorkerPool
    from modelsel.report import ReportDraft
    from modelsel.training import TrainedMember

# torch, scikit-learn and the training stack load on first use (inside the functions that
# train or split), so that reading a stored study (`study show`, `report build`) stays quick.

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# Spec sections that may change between runs of one study without changing what it measures.
_RUN_ONLY_KEYS = ("budget", "storage", "description")
# Training keys that say where and how a study runs, not what it measures (they may differ on resume;
# the engines agree within float tolerance).
_RUN_ONLY_TRAINING_KEYS = ("device", "engine", "stack_trials")


@dataclass
class StudyOutcome:
    """What a finished run (or a look at a stored study) reports."""

    study_name: str
    storage_url: str
    objectives: list[str]
    n_complete: int
    n_pruned: int
    n_failed: int
    n_trained_this_run: int = 0
    best_trial_number: int | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    #: The selected trial's objective values, in the spec's order of objectives.
    best_values: list[float] = field(default_factory=list)
    #: The first objective's value the selection ranked the selected trial by: its own
    #: value, or for a sweep with repeats its cell's mean over the completed seeds.
    selection_value: float | None = None
    cv_mean: float | None = None
    cv_std: float | None = None
    metric_name: str = "accuracy"
    test: dict[str, Any] | None = None
    report_path: Path | None = None
    #: Fold-epochs the trials trained (epochs × folds, summed; :func:`trial_fold_epochs`).
    fold_epochs: int = 0
    #: ``budget.fold_epochs`` of the spec the study's latest run stored (None: none).
    fold_epochs_budget: int | None = None
    #: Completed seeds of the selected sweep cell whose folds ``cv_mean``/``cv_std`` pool
    #: (1 but for a sweep with repeats; ``best_params`` then leaves out the seed).
    cell_seeds: int = 1

    @property
    def dashboard_command(self) -> str:
        return f"optuna-dashboard {display_url(self.storage_url)}"


#: A resumed study's sampler is seeded ``seed + stride * (trials already stored)``: seeded
#: as in its first run, a random or TPE sampler would draw that run's configurations again.
_RESUME_SEED_STRIDE = 104_729


def resume_seed_offset(stored_trials: int) -> int:
    """What a run adds to the spec's seed for its sampler, given how many trials the study
    already stores: 0 for a new study, else a step per trial, so that each resume draws
    configurations of its own (and the same ones again for the same stored trials)."""
    return _RESUME_SEED_STRIDE * stored_trials


def make_sampler(spec: StudySpec, *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler a spec names, seeded with the spec's seed plus ``seed_offset`` (see
    :func:`resume_seed_offset`; a grid ignores it: its cells keep their order, and the
    sampler skips the visited ones).

    Raises
    ------
    SpecError
        When ``sampler.options`` are not accepted by the sampler.
    """
    samplers = optuna.samplers
    options = dict(spec.sampler.options)
    name = "grid" if spec.sweep is not None else spec.sampler.name
    if "seed" in options:
        raise SpecError("sampler.options.seed: the sampler is seeded from the spec's seed; set the top-level seed")
    try:
        if name == "grid":
            from modelsel.objective import study_grid

            return samplers.GridSampler(study_grid(spec), seed=spec.seed)
        factory: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
            "tpe": samplers.TPESampler,
            "random": samplers.RandomSampler,
            "gp": samplers.GPSampler,
            "cmaes": samplers.CmaEsSampler,
            "nsga2": samplers.NSGAIISampler,
        }
        # Optuna takes seeds below 2**32; a long-resumed study's offset may pass it.
        return factory[name](seed=(spec.seed + seed_offset) % 2**32, **options)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"sampler.options: {exc}") from None


#: The most trials :func:`check_sampler_and_pruner` sends through its probe study.
_PROBE_MAX_TRIALS = 64


def check_sampler_and_pruner(spec: StudySpec) -> None:
    """Raise a one-line :class:`SpecError` when ``spec``'s sampler or pruner options are bad.

    Some options pass the constructors and fail only when a trial is sampled or judged
    (TPE's ``n_startup_trials: 'x'``, Hyperband's ``max_resource: 0``), and a model-based
    sampler's own options (TPE's ``gamma``, CMA-ES's ``popsize`` or ``x0``) only once its
    random start-up trials are done: so trials go through a throwaway in-memory study,
    sampling the search space and reporting a step, until one past the start-up
    (at most :data:`_PROBE_MAX_TRIALS`).
    """
    from modelsel.objective import suggest_params

    pruner = make_pruner(spec)
    grid = spec.sweep is not None or spec.sampler.name == "grid"
    # A grid's sampler needs no probe (its cells were checked as values); its pruner does.
    sampler = optuna.samplers.RandomSampler(seed=0) if grid else make_sampler(spec)
    n_objectives = len(spec.objectives or ["default"])
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # its warnings concern the probe's trials
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = optuna.create_study(sampler=sampler, pruner=pruner, directions=["minimize"] * n_objectives)
            startup = getattr(sampler, "_n_startup_trials", 0)
            n_probe = min(_PROBE_MAX_TRIALS, startup + 2) if isinstance(startup, int) else 2
            for i in range(max(2, n_probe)):
                value = 1.0 / (i + 2)  # distinct values, so that a model-based sampler can rank them
                try:
                    trial = probe.ask()
                    if not grid:
                        suggest_params(trial, spec)
                except Exception as exc:  # whatever a misconfigured sampler raises
                    raise SpecError(_options_error("sampler", sampler, exc, options=spec.sampler.options)) from None
                if n_objectives == 1 and spec.pruner.name not in ("none", "fold_paired"):
                    try:
                        trial.report(value, 1)
                        trial.should_prune()
                    except Exception as exc:  # whatever a misconfigured pruner raises
                        raise SpecError(_options_error("pruner", pruner, exc, options=spec.pruner.options)) from None
                probe.tell(trial, [value] * n_objectives)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _options_error(field: str, used: object, exc: Exception, *, options: dict[str, Any]) -> str:
    """One line for an Optuna sampler or pruner that accepted its options, then failed."""
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    name = type(used).__name__
    if not options:  # nothing to blame but the choice itself (e.g. CMA-ES with two objectives)
        return f"{field}: optuna's {name} cannot run this study ({what}); choose another {field}"
    return f"{field}.options: optuna's {name} fails with them ({what}); check each against the arguments of {name}"


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner a spec names (``none`` never prunes).

    Steps are epochs trained (see :class:`modelsel.objective.PruningCallback`): the
    median and percentile pruners wait for 5 finished trials and may prune from the
    first epoch on (``n_warmup_steps: 1``); Hyperband's ``max_resource`` is
    ``training.epochs``.

    Raises
    ------
    SpecError
        When ``pruner.options`` are not accepted by the pruner.
    """
    pruners = optuna.pruners
    options = dict(spec.pruner.options)
    try:
        if spec.pruner.name == "none":
            if options:  # they would be ignored without a word
                raise ValueError("the pruner 'none' takes no options; remove them, or name a pruner")
            return pruners.NopPruner()
        if spec.pruner.name == "median":
            options.setdefault("n_startup_trials", 5)
            options.setdefault("n_warmup_steps", 1)
            return pruners.MedianPruner(**options)
        if spec.pruner.name == "percentile":
            options.setdefault("percentile", 25.0)
            options.setdefault("n_startup_trials", 5)
            options.setdefault("n_warmup_steps", 1)
            return pruners.PercentilePruner(**options)
        if spec.pruner.name == "successive_halving":
            return pruners.SuccessiveHalvingPruner(**options)
        if spec.pruner.name == "fold_paired":
            from modelsel.objective import FoldPairedPruner

            worse = options.get("min_worse_folds")
            if isinstance(worse, int) and worse > spec.cv.folds:
                raise ValueError(f"min_worse_folds {worse} is more than the {spec.cv.folds} folds of cv.folds")
            return FoldPairedPruner(**options)
        options.setdefault("min_resource", 1)
        options.setdefault("max_resource", spec.training.epochs)
        for resource in ("min_resource", "max_resource"):
            value = options[resource]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
                raise ValueError(f"{resource} is {value}; give a number of epochs of 1 or more")
        low, high = options["min_resource"], options["max_resource"]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) and low > high:
            raise ValueError(f"min_resource ({low}) is above max_resource ({high}); lower min_resource")
        return pruners.HyperbandPruner(**options)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"pruner.options: {exc}") from None


def study_budget(spec: StudySpec, *, n_trials: int | None = None) -> int | None:
    """Total finished trials the study should reach: a sweep's grid size (or fewer, with
    an explicit ``n_trials``, e.g. ``--n-trials``), else the budget; a ``sampler: grid``
    search's budget stops at its number of cells (more trials would train cells again)."""
    asked = n_trials if n_trials is not None else spec.budget.n_trials
    if spec.sweep is not None:
        asked = n_trials  # a sweep's budget is its grid: budget.n_trials is not used
    elif spec.sampler.name != "grid":
        return asked
    from modelsel.objective import study_grid

    cells = math.prod(len(values) for values in study_grid(spec).values())
    return cells if asked is None else min(cells, asked)


def spec_fingerprint(spec: StudySpec) -> dict[str, Any]:
    """The parts of a spec that define what a study measures (budget/storage excluded)."""
    data = spec.model_dump(mode="json")
    for key in _RUN_ONLY_KEYS:
        data.pop(key, None)
    for key in _RUN_ONLY_TRAINING_KEYS:
        data.get("training", {}).pop(key, None)
    return data


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _load_dataset_for(spec: StudySpec) -> Any:
    from modelsel.data import load_dataset

    return load_dataset(spec.dataset, seed=spec.seed)


def preflight(spec: StudySpec) -> str:
    """Load the data for every distinct dataset configuration the study will use and check
    the CV split works for each; return the task. Raises a UserError on any problem."""
    from modelsel.cv import fold_indices

    dataset = _load_dataset_for(spec)
    task = dataset.task
    objectives = spec.resolved_objectives(task)
    if task == "regression" and "val_accuracy" in objectives:
        raise SpecError("objectives: val_accuracy needs a classification dataset; use val_loss")
    fold_indices(dataset, spec.cv, seed=spec.seed)
    variants: list[tuple[str, dict[str, Any]]] = []
    for grid in spec.sweep_list():
        for axis, values in grid.axes.items():
            if resolve_field(spec, axis)[0] == "dataset":
                variants += [("sweep", {axis: v}) for v in values]
    for key, dist in spec.search.items():
        if resolve_field(spec, key)[0] == "dataset":
            ends = list(getattr(dist, "choices", None) or [dist.low, dist.high])  # type: ignore[union-attr]
            variants += [("search", {key: v}) for v in ends]
    for section, params in variants:
        try:
            variant = with_params(spec, params)
            fold_indices(_load_dataset_for(variant), variant.cv, seed=variant.seed)
        except UserError as exc:  # name the searched or swept value the problem comes with
            ((key, value),) = params.items()
            raise type(exc)(f"{section}.{key} value {value!r}: {exc}") from None
    _check_grid_cells(spec)
    return task


#: At most this many cells of a grid are built by :func:`_check_grid_cells`.
_GRID_CHECK_MAX_CELLS = 1024


def _check_grid_cells(spec: StudySpec) -> None:
    """Refuse a grid (a sweep, or ``sampler: grid``) none of whose cells is a valid
    configuration: each would be pruned as invalid, and the run would report a finished,
    empty study. A grid with some valid cells runs; the others are pruned with the reason."""
    import itertools

    from modelsel.objective import study_grid

    if spec.sweep is None and spec.sampler.name != "grid":
        return
    grid = study_grid(spec)
    if math.prod(len(v) for v in grid.values()) > _GRID_CHECK_MAX_CELLS:
        return  # too many to build here: the run prunes the invalid ones
    keys = list(grid)
    first_problem: str | None = None
    for values in itertools.product(*(grid[k] for k in keys)):
        try:
            with_params(spec, dict(zip(keys, values, strict=True)))
            return
        except ValueError as exc:
            first_problem = first_problem or str(exc)
    raise SpecError(f"no cell of the grid is a valid configuration ({first_problem}); change the grid's values")


class _InterruptedTrialLog(logging.Filter):
    """Turns Optuna's log of a trial that Ctrl-C stopped into one line.

    Optuna logs such a trial as a failure with the KeyboardInterrupt's whole traceback
    (from deep inside the training loop), then "Trial N failed with value None."; a
    user who pressed Ctrl-C needs neither. Other failures are left as they are.
    """

    _FAILED = re.compile(r"Trial (\d+) failed with ")

    def __init__(self) -> None:
        super().__init__()
        self.interrupted: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        match = self._FAILED.match(message)
        if match is None:
            return True
        number = match.group(1)
        if _logs_an_interrupt(record):
            self.interrupted.add(number)
            record.msg, record.args = f"Trial {number} stopped by Ctrl-C or SIGTERM.", ()
            record.exc_info, record.exc_text = None, None
            return True
        return not (number in self.interrupted and message.endswith("failed with value None."))


class _InterruptedPoolLog(logging.Filter):
    """Drops SQLAlchemy's "Exception during reset or similar" when the exception is the
    interrupt itself: Ctrl-C landed while a connection went back to its pool. SQLAlchemy
    logs it with a traceback, then lets it propagate; the user pressed Ctrl-C."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _logs_an_interrupt(record)


def _logs_an_interrupt(record: logging.LogRecord) -> bool:
    """Whether the record carries a KeyboardInterrupt's traceback."""
    exc_type = record.exc_info[0] if record.exc_info else None
    return exc_type is not None and issubclass(exc_type, KeyboardInterrupt)


#: The loggers of the connection pools of the storages' engines (SQLite files and servers).
_POOL_LOGGERS = ("sqlalchemy.pool.impl.QueuePool", "sqlalchemy.pool.impl.NullPool")


def quiet_interrupted_trial_logs() -> None:
    """Log a trial stopped by Ctrl-C as one line, without its traceback, and drop the
    traceback SQLAlchemy logs when Ctrl-C lands in its connection pool (idempotent)."""
    filters: list[tuple[str, type[logging.Filter]]] = [("optuna.study._optimize", _InterruptedTrialLog)]
    filters += [(name, _InterruptedPoolLog) for name in _POOL_LOGGERS]
    for name, kind in filters:
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


def _finished_count(study: optuna.Study) -> int:
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


def requeue_failed_cells(study: optuna.Study) -> int:
    """Queue once more each grid cell whose trials all failed; return how many.

    A trial stopped by Ctrl-C is stored as failed, and Optuna's GridSampler counts a
    failed trial's cell as visited: the cell would never be trained, and a later run
    would train a finished one again. Each such cell is added back as a waiting trial
    with its parameters and its cell (``grid_id``, as Optuna's ``RetryFailedTrialCallback``
    does), which the next trials take before the sampler hands out unvisited cells.
    Trials left running by a process that was killed are to be failed first
    (:func:`fail_stale_trials`).
    """
    trials = study.get_trials(deepcopy=False)
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    covered = {_grid_cell(t) for t in trials if t.state in live}
    requeued = 0
    for trial in trials:
        cell = _grid_cell(trial)
        # A trial asked to be stacked beside another holds its cell (grid_id) before it
        # suggests a parameter: stopped then, it fails without any, and the sampler's
        # grid_id gives the waiting trial its parameters.
        if trial.state == TrialState.FAIL and (trial.params or "grid_id" in trial.system_attrs) and cell not in covered:
            system_attrs = {k: v for k, v in trial.system_attrs.items() if k in ("grid_id", "search_space")}
            study.add_trial(
                optuna.trial.create_trial(
                    state=TrialState.WAITING,
                    params=dict(trial.params),
                    distributions=dict(trial.distributions),
                    system_attrs={**system_attrs, "failed_trial": trial.number},
                )
            )
            covered.add(cell)
            requeued += 1
    return requeued


def fail_stale_trials(study: optuna.Study) -> None:
    """Store as failed the trials left running by a process that was killed (no heartbeat
    for the storage's grace period), so that counts, reports and a grid's cells see them
    as what they are. Optuna does this only when a trial starts: a study already at its
    budget, which trains nothing, kept such a trial running for good."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _grid_cell(trial: FrozenTrial) -> tuple[str, Any]:
    """The grid cell a trial trains: GridSampler's ``grid_id``, else its parameters
    (a trial enqueued with fixed parameters has no grid_id)."""
    if "grid_id" in trial.system_attrs:
        return ("grid_id", trial.system_attrs["grid_id"])
    return ("params", params_key(trial.params or trial.system_attrs.get("fixed_params", {})))


#: How long a run waits for the description of a study that another process has just
#: created (it writes it right after the study's row), before it takes the study over.
_NEW_STUDY_WAIT_S = 3.0


def _open_study(spec: StudySpec, storage_url: str, *, create_parent: bool, task: str) -> optuna.Study:
    storage = open_storage(storage_url, create_parent=create_parent)
    objectives = spec.resolved_objectives(task)  # type: ignore[arg-type]
    directions = [optuna.study.StudyDirection[OBJECTIVE_DIRECTIONS[o].upper()] for o in objectives]
    fingerprint = spec_fingerprint(spec)
    try:
        existing = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None and "spec" not in existing.user_attrs:
        existing = _undescribed_study(existing, spec, storage, storage_url, directions)
    if existing is not None:
        _check_stored_spec(existing.user_attrs, spec, storage_url, fingerprint)
        fail_stale_trials(existing)
        if spec.sweep is not None or spec.sampler.name == "grid":
            requeue_failed_cells(existing)
            existing.sampler = make_sampler(spec)  # a grid keeps its cell order: no resume offset
        else:
            offset = resume_seed_offset(len(existing.get_trials(deepcopy=False)))
            existing.sampler = make_sampler(spec, seed_offset=offset)
        existing.pruner = make_pruner(spec)
        existing.set_user_attr("spec_full", spec.to_json())  # the budget and description may change
        return existing
    study = optuna.create_study(
        storage=storage,
        study_name=spec.name,
        directions=directions,
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    _describe_study(study, spec, fingerprint, objectives, task)
    return study


def _check_stored_spec(
    user_attrs: dict[str, Any], spec: StudySpec, storage_url: str, fingerprint: dict[str, Any]
) -> None:
    """Refuse to resume a study (its ``user_attrs``) created from a spec that trains or
    measures differently."""
    stored = json.loads(user_attrs["spec"])
    for key in _RUN_ONLY_TRAINING_KEYS:  # fingerprints stored before device was run-only
        stored.get("training", {}).pop(key, None)
    changed = _differences(stored, fingerprint)
    if changed:
        raise UserError(
            f"study '{spec.name}' in {display_url(storage_url)} was created from a different spec "
            f"(differs in: {', '.join(changed[:5])}); rename the study, use another --storage, "
            "or delete the old database"
        )


def check_resumable(specs: Sequence[StudySpec], storage_url: str) -> None:
    """Raise :class:`UserError` when a study of ``specs`` is stored at ``storage_url`` from a
    different spec (a multi-grid sweep checks every grid before it runs any); reads only,
    and opens nothing when a file storage does not exist yet."""
    path = local_path(storage_url)
    if path is not None and not path.is_file():
        return
    storage = open_storage(storage_url, heartbeat=False)
    # The summaries carry each study's user attributes: no study needs loading.
    stored = {s.study_name: s.user_attrs for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    for spec in specs:
        if "spec" in stored.get(spec.name, {}):
            _check_stored_spec(stored[spec.name], spec, storage_url, spec_fingerprint(spec))


def _undescribed_study(
    study: optuna.Study,
    spec: StudySpec,
    storage: optuna.storages.BaseStorage,
    storage_url: str,
    directions: list[optuna.study.StudyDirection],
) -> optuna.Study | None:
    """A stored study without modelsel's description of what it measures: one another
    process has just created (its description follows within moments: wait for it),
    or one whose creator stopped before it wrote it (no trials: None, take it over).

    Raises
    ------
    UserError
        When it has trials (a study not made by modelsel), or other directions.
    """
    deadline = time.monotonic() + _NEW_STUDY_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.1)
        study = optuna.load_study(study_name=spec.name, storage=storage)
        if "spec" in study.user_attrs:
            return study
    if study.get_trials(deepcopy=False) or study.directions != directions:
        raise UserError(
            f"study '{spec.name}' in {display_url(storage_url)} was not created by modelsel "
            "(it has no stored spec); rename the study or use another --storage"
        )
    return None  # created by a run stopped at once: made again below, as new


def _describe_study(
    study: optuna.Study, spec: StudySpec, fingerprint: dict[str, Any], objectives: list[str], task: str
) -> None:
    """Store what a new study measures: enough to check a resume, and to rebuild its report."""
    study.set_user_attr("spec", json.dumps(fingerprint, sort_keys=True))
    study.set_user_attr("spec_full", spec.to_json())
    if spec.sweep_list():
        study.set_user_attr("sweep_axes", list(spec.sweep_list()[0].axes))  # spec_full sorts keys
    study.set_user_attr("objectives", objectives)
    study.set_user_attr("task", task)
    study.set_user_attr("modelsel_version", __version__)
    study.set_user_attr("created_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))


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
    from modelsel.objective import StudyObjective

    task = study.user_attrs.get("task") or _load_dataset_for(spec).task
    return StudyObjective(
        spec,
        load_dataset=_load_dataset_for,
        objectives=spec.resolved_objectives(task),
        device=device,
        budget_left=budget_left,
        on_companion_told=on_companion_told,
    )


def _optimize(
    study: optuna.Study,
    spec: StudySpec,
    *,
    target: int | None,
    timeout: float | None,
    device: torch.device,
    on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> int:
    capped = spec.budget.fold_epochs is not None
    # The trials this process ran (another process may add trials to the same study meanwhile).
    ran: set[int] = set()

    def record(study: optuna.Study, trial: FrozenTrial) -> None:
        ran.add(trial.number)
        if on_trial is not None:
            on_trial(study, trial)

    def budget_left(study: optuna.Study) -> int:
        left = [] if target is None else [target - _finished_count(study)]
        room = trials_within_fold_epochs(study, spec)
        return min(left + ([] if room is None else [room]))

    objective = study_objective(
        study,
        spec,
        device=device,
        budget_left=budget_left if target is not None or capped else None,
        on_companion_told=record,
    )
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = []
    if target is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(target, states=FINISHED_STATES))
    if capped:
        callbacks.append(_stop_at_fold_epoch_cap(spec))
    callbacks.append(record)
    remaining = None if target is None else max(target - _finished_count(study), 0)
    if remaining == 0 or trials_within_fold_epochs(study, spec) == 0:
        return 0
    # n_trials bounds this process's own attempts; MaxTrialsCallback stops at the shared total.
    n_trials = None if remaining is None else remaining * 3 + 10
    deadline = None if timeout is None else time.monotonic() + timeout
    with unfinished_trials_failed():
        while True:
            study.optimize(
                objective,
                n_trials=n_trials,
                timeout=None if deadline is None else deadline - time.monotonic(),
                callbacks=callbacks,
                gc_after_trial=False,
                catch=(),
            )
            # GridSampler stops a study once every cell was visited, a failed one too:
            # cells queued again (requeue_failed_cells) may still be waiting then.
            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            out_of_time = deadline is not None and time.monotonic() >= deadline
            out_of_budget = (target is not None or capped) and budget_left(study) <= 0
            if not waiting or out_of_time or out_of_budget:
                break
    return len(ran)


def _stop_at_fold_epoch_cap(spec: StudySpec) -> Callable[[optuna.Study, FrozenTrial], None]:
    """An ``optimize`` callback that stops the study once no further trial fits ``budget.fold_epochs``."""

    def stop_if_spent(study: optuna.Study, trial: FrozenTrial) -> None:
        if trials_within_fold_epochs(study, spec) == 0:
            study.stop()

    return stop_if_spent


def run_study(
    spec: StudySpec,
    *,
    storage: str | None = None,
    output_dir: str | Path = "reports",
    n_trials: int | None = None,
    timeout: float | None = None,
    device: str | None = None,
    workers: int = 1,
    progress: bool = True,
    build_report: bool = True,
) -> StudyOutcome:
    """Run (or resume) the study a spec describes, then select, test and report.

    Parameters
    ----------
    spec
        The validated study spec.
    storage
        Storage URL overriding the spec's; default SQLite under ``output_dir``.
    output_dir
        Folder of the report (``<output_dir>/<study name>/``) and default storage.
    n_trials
        Total finished trials (complete + pruned) the study should reach; overrides
        ``budget.n_trials``. Already-finished trials count, so a re-run tops up.
    timeout
        Seconds this run may spend searching (``budget.timeout`` when omitted).
    device
        ``auto``, ``cpu`` or ``cuda``; overrides ``training.device``.
    workers
        Parallel worker processes sharing the storage (1 thread each on CPU).
    progress
        Show a progress bar over trials.
    build_report
        Write ``trials.csv`` and ``report.html`` at the end.

    Raises
    ------
    UserError
        Bad spec values, data, storage or options; nothing is written in that case.
    """
    _check_run_options(n_trials=n_trials, timeout=timeout, workers=workers)
    if build_report:
        check_output_folder(Path(output_dir) / spec.name)
    if isinstance(spec.sweep, list):
        from modelsel.sweeps import run_sweep_maps

        return run_sweep_maps(
            spec,
            storage=storage,
            output_dir=output_dir,
            n_trials=n_trials,
            timeout=timeout,
            device=device,
            workers=workers,
            progress=progress,
            build_report=build_report,
        )
    if device is not None:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"device": device})})
    storage_url = storage or spec.storage or default_storage_url(output_dir, spec.name)
    storage_kind(storage_url)
    early_refit: EarlyRefit | None = None
    draft: ReportDraft | None = None
    with _worker_pool(spec, workers, storage_url) as pool:
        # Here, not before the pool: the checks import the training stack, which the
        # spawned workers import meanwhile.
        torch_device, target, timeout, task = check_run(spec, n_trials=n_trials, timeout=timeout)
        is_default_storage = storage is None and spec.storage is None
        study = _open_study(spec, storage_url, create_parent=is_default_storage, task=task)

        trained = 0
        if target is None or _finished_count(study) < target:
            # With --workers, this process may wait for the others' last trials: it loads the
            # report's plotting libraries meanwhile instead of after the search.
            warm_up = _warm_up_report if build_report else None
            trained = _search(
                study, spec, storage_url, target, timeout, torch_device, progress, pool, warm_up, build_report
            )
            if pool is not None:
                early_refit, draft = pool.early_refit, pool.report_draft
        refit_threads = pool.threads(torch_device) if pool is not None else None
    outcome = select_and_test(
        study, spec, storage_url=storage_url, device=torch_device, threads=refit_threads, early_refit=early_refit
    )
    outcome.n_trained_this_run = trained
    if build_report:
        from modelsel.report import build_report as write_report

        report_dir = Path(output_dir) / spec.name
        outcome.report_path = write_report(study, output_dir=report_dir, draft=draft)
    return outcome


def _check_run_options(*, n_trials: int | None, timeout: float | None, workers: int) -> None:
    """Refuse run options the command line's types would have refused (for Python callers)."""

    def whole(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if n_trials is not None and not (whole(n_trials) and n_trials >= 1):
        raise UserError(f"n_trials (--n-trials) must be a whole number of at least 1, got {n_trials!r}")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf
    ):
        raise UserError(f"timeout (--timeout) must be a finite number of seconds above 0, got {timeout!r}")
    if not (whole(workers) and workers >= 1):
        raise UserError(f"--workers must be at least 1, got {workers!r}")


def check_run(
    spec: StudySpec, *, n_trials: int | None = None, timeout: float | None = None
) -> tuple[torch.device, int | None, float | None, str]:
    """Every check of a run before it writes anything: the device, the budget, the
    sampler and pruner options, and the data.

    Returns
    -------
    tuple
        The device, the trial target, the timeout (``budget.timeout`` when omitted)
        and the dataset's task.

    Raises
    ------
    UserError
        For any bad input, with one line naming it.
    """
    from modelsel.training import resolve_device

    try:
        torch_device = resolve_device(spec.training.device)
    except RuntimeError as exc:
        raise UserError(f"{exc}; use --device cpu") from None
    target = study_budget(spec, n_trials=n_trials)
    timeout = timeout if timeout is not None else spec.budget.timeout
    if target is None and timeout is None and spec.budget.fold_epochs is None:
        raise SpecError(
            "budget: give n_trials, timeout or fold_epochs (or --n-trials/--timeout/--fold-epochs), "
            "or the study never ends"
        )
    check_sampler_and_pruner(spec)
    return torch_device, target, timeout, preflight(spec)


def _warm_up_report() -> None:
    from modelsel.report import warm_up

    warm_up()


def _worker_pool(
    spec: StudySpec, workers: int, storage_url: str
) -> contextlib.AbstractContextManager[WorkerPool | None]:
    """The other workers of ``--workers N`` (None for one), started now so that they import
    while this process checks and opens things; closed when the block ends."""
    if workers == 1:
        return contextlib.nullcontext()
    from modelsel.parallel import WorkerPool

    return WorkerPool(spec, workers, storage_url=storage_url)


def _search(
    study: optuna.Study,
    spec: StudySpec,
    storage_url: str,
    target: int | None,
    timeout: float | None,
    device: torch.device,
    progress: bool,
    pool: WorkerPool | None,
    while_waiting: Callable[[], object] | None = None,
    report: bool = False,
) -> int:
    from tqdm.auto import tqdm

    bar = tqdm(
        total=target,
        initial=_finished_count(study),
        desc=f"{spec.name} trials",
        unit="trial",
        disable=not progress,
        dynamic_ncols=True,
    )

    def update(study: optuna.Study, trial: FrozenTrial) -> None:
        bar.n = _finished_count(study)
        best = _best_value_text(study)
        bar.set_postfix_str(best, refresh=False)
        bar.refresh()

    try:
        if pool is None:
            return _optimize(study, spec, target=target, timeout=timeout, device=device, on_trial=update)
        from modelsel.parallel import run_parallel

        return run_parallel(
            study,
            spec,
            storage_url=storage_url,
            target=target,
            timeout=timeout,
            device=device,
            pool=pool,
            bar=bar,
            while_waiting=while_waiting,
            report=report,
        )
    finally:
        bar.close()


def _best_value_text(study: optuna.Study) -> str:
    try:
        if len(study.directions) == 1:
            return f"best {study.best_value:.4g}"
    except ValueError:
        pass
    return ""


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The selected trial: the best one, or for several objectives the Pareto-optimal
    trial that is best on the first objective."""
    selection = _selection(study)
    return None if selection is None else selection[0]


def _selection(study: optuna.Study) -> tuple[FrozenTrial, float] | None:
    """The selected trial (:func:`best_trial`) and the first objective's value it was
    ranked by: its cell's mean over the completed seeds for a one-objective sweep with
    repeats, else its own value."""
    complete = selectable_trials(study)
    if not complete:
        return None
    signs = [1 if d == optuna.study.StudyDirection.MINIMIZE else -1 for d in study.directions]
    if len(study.directions) == 1:
        if any(SWEEP_SEED_PARAM in t.params for t in complete):
            return _best_cell_trial(complete, study.direction)
        candidates = complete
    else:
        candidates = _pareto_front(complete, signs)
    # Ties go to the earliest trial, as Optuna's best_trial breaks them.
    chosen = min(candidates, key=lambda t: (signs[0] * t.values[0], t.number))
    return chosen, float(chosen.values[0])


def selectable_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The completed trials that selection may pick: not those whose training diverged
    (regime ``diverged``: a finite blow-up, which completes with a number at chance), as
    a sweep's best cell leaves them out too."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in complete if t.user_attrs.get("regime") != "diverged"]


def _pareto_front(trials: Sequence[FrozenTrial], signs: Sequence[int]) -> list[FrozenTrial]:
    """The trials no other trial dominates (``signs``: +1 to minimize an objective, -1 to
    maximize it), as Optuna's ``best_trials`` but over the given trials."""

    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values, strict=True)]
        return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)

    return [b for b in trials if not any(dominates(a, b) for a in trials)]


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
    same = [t for t in selectable_trials(study) if _cell_key(t) == cell]
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
) -> tuple[FrozenTrial, float]:
    """For a sweep with repeats (a ``seed`` parameter): the first seed's trial of the cell
    whose value, averaged over its completed seeds, is best, and that mean. The best
    single seed of any cell would select by the luck of a seed (and, for data drawn from
    the seed, compare trials on different data)."""
    cells: dict[tuple[tuple[str, str], ...], list[FrozenTrial]] = {}
    for trial in complete:
        cells.setdefault(_cell_key(trial), []).append(trial)
    means = {key: statistics.fmean(float(t.values[0]) for t in trials) for key, trials in cells.items()}
    sign = 1 if direction == optuna.study.StudyDirection.MINIMIZE else -1
    best = min(cells, key=lambda key: sign * means[key])
    return min(cells[best], key=_seed_order), means[best]


@dataclass
class EarlyRefit:
    """The best trial so far, retrained on the whole training split before the search ended.

    With ``--workers N`` the first worker left without a trial to claim retrains the
    best trial so far while the others finish theirs (:mod:`modelsel.parallel`). The
    test split is not touched then: :func:`select_and_test` scores the model only if
    the final selection is the same trial with the same epochs, and otherwise retrains.
    """

    trial_number: int
    params: dict[str, Any]
    epochs: int
    member: TrainedMember

    def fits(self, trial: FrozenTrial, epochs: int) -> bool:
        """Whether this is the retrain that ``trial`` (selected, ``epochs`` to train) needs."""
        return (self.trial_number, self.params, self.epochs) == (trial.number, trial.params, epochs)


def refit_best_so_far(study: optuna.Study, spec: StudySpec, *, device: torch.device) -> EarlyRefit | None:
    """Retrain the study's best trial so far on the whole training split (no test score).

    None when there is no complete trial yet, or the best one is already tested.
    """
    from modelsel.cv import fit_final

    pending = _pending_retrain(study, spec)
    if pending is None:
        return None
    selected, trial_spec, epochs = pending
    member = fit_final(trial_spec, _load_dataset_for(trial_spec), epochs=epochs, device=device)
    return EarlyRefit(selected.number, dict(selected.params), epochs, member)


def _pending_retrain(study: optuna.Study, spec: StudySpec) -> tuple[FrozenTrial, StudySpec, int] | None:
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


def retrain_epochs(trial: FrozenTrial, spec: StudySpec) -> int:
    """Epochs for the final retrain: the folds' mean best epoch under early stopping."""
    final_epochs = trial.user_attrs.get("final_epochs")
    if spec.training.early_stopping is not None and final_epochs:
        return max(1, round(statistics.fmean(final_epochs)))
    return spec.training.epochs


def select_and_test(
    study: optuna.Study,
    spec: StudySpec,
    *,
    storage_url: str,
    device: torch.device,
    threads: int | None = None,
    early_refit: EarlyRefit | None = None,
) -> StudyOutcome:
    """Retrain the selected configuration on the whole training split and score the test split.

    The test split is touched once per selected trial: the score is stored as the study
    user attribute ``test_result`` and reused while the selection does not change. A later
    run that selects another trial scores it, and lists the trials scored before in the
    result's ``earlier_trials`` (choosing among test scores would tune to the test split).
    ``early_refit`` (see :class:`EarlyRefit`) is scored instead of retraining when it is
    the selected trial's retrain. ``threads`` fixes the intra-op threads of the retrain
    and the test (``--workers`` runs retrain with the workers' threads wherever the
    retrain happens, so that its numbers do not depend on which process did it).
    """
    outcome = summarize(study, storage_url)  # with the stored test score, if any
    pending = _pending_retrain(study, spec)
    if pending is None:
        return outcome
    from modelsel.cv import fit_final, score_on_test
    from modelsel.training import Diverged, torch_threads

    selected, trial_spec, epochs = pending
    # A resumed search may select another trial: its score is new, and the ones scored
    # before are named (a diverged retrain, which scores nothing, passes the list on).
    stored = study.user_attrs.get("test_result") or {}
    earlier = [n for n in stored.get("earlier_trials", []) if n != selected.number]
    if "test_metric" in stored and stored.get("trial_number") != selected.number:
        earlier.append(stored["trial_number"])
    dataset = _load_dataset_for(trial_spec)
    reused = early_refit if early_refit is not None and early_refit.fits(selected, epochs) else None
    with torch_threads(threads) if threads is not None else contextlib.nullcontext():
        try:
            if reused is not None:
                member = reused.member
            else:
                member = fit_final(trial_spec, dataset, epochs=epochs, device=device)
        except Diverged as diverged:
            # Stored like a score, so that a rerun reports it instead of retraining into it again;
            # the test split is not touched.
            outcome.test = {
                "trial_number": selected.number,
                "params": selected.params,
                "epochs": epochs,
                "retrain_diverged": f"epoch {diverged.epoch + 1}: {diverged.reason}",
                "earlier_trials": earlier,
            }
            study.set_user_attr("test_result", outcome.test)
            return outcome
        score = score_on_test(member, dataset, device=device)
    outcome.test = {
        "trial_number": selected.number,
        "params": selected.params,
        "metric_name": "accuracy" if dataset.task == "classification" else "rmse",
        "test_loss": score.test_loss,
        "test_metric": score.test_metric,
        "train_loss": score.train_loss,
        "train_metric": score.train_metric,
        "epochs": score.epochs,
        "fit_seconds": score.fit_seconds,
        "n_test": int(dataset.X_test.shape[0]),
        "retrained_during_search": reused is not None,
        "earlier_trials": earlier,
    }
    study.set_user_attr("test_result", outcome.test)
    return outcome


def summarize(study: optuna.Study, storage_url: str) -> StudyOutcome:
    """Read a study's state (counts, selection, CV score, stored test result)."""
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    objectives = study.user_attrs.get("objectives") or ["value"] * len(study.directions)
    outcome = StudyOutcome(
        study_name=study.study_name,
        storage_url=storage_url,
        objectives=list(objectives),
        n_complete=counts[TrialState.COMPLETE],
        n_pruned=counts[TrialState.PRUNED],
        n_failed=counts[TrialState.FAIL],
        test=study.user_attrs.get("test_result"),
    )
    outcome.fold_epochs, outcome.fold_epochs_budget = stored_fold_epochs(study)
    selection = _selection(study)
    if selection is not None:
        selected, outcome.selection_value = selection
        outcome.best_trial_number = selected.number
        # A sweep cell with repeats is selected (one objective) by its mean over seeds: so is
        # it named and scored.
        cell = cell_trials(study, selected)
        outcome.best_params = selected_params(study, selected)
        outcome.best_values = list(selected.values)
        primary = objectives[0]
        attrs = selected.user_attrs
        outcome.metric_name = attrs.get("metric_name", "accuracy")
        outcome.cell_seeds = len(cell)
        if primary == "val_accuracy":
            outcome.cv_mean, outcome.cv_std = cell_score(cell, "val_metric")
        elif primary == "val_loss":
            outcome.cv_mean, outcome.cv_std = cell_score(cell, "val_loss")
        else:  # fit_seconds or n_params: one number of the trial, not a mean over folds
            outcome.cv_mean, outcome.cv_std = selected.values[0], None
    return outcome


def load_study(name: str, storage_url: str) -> optuna.Study:
    """Open a stored study by name.

    Raises
    ------
    UserError
        When no study of that name is stored there (the message lists those that are).
    """
    storage = open_storage(storage_url, heartbeat=False, must_exist=True)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
        known = ", ".join(names) if names else "none"
        raise UserError(
            f"no study named '{name}' in {display_url(storage_url)} (studies there: {known}); "
            "pass the right --storage"
        ) from None
