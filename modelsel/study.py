"""Study orchestration: from a spec to a finished, resumable Optuna study.

:func:`run_study` resolves the storage, loads and checks the data (so that bad input
fails before anything is written), creates or resumes the study, tops it up to its
trial budget, retrains the selected configuration on the whole training split, scores
the held-out test split once, and builds the report.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from modelsel import __version__
from modelsel.errors import SpecError, UserError
from modelsel.results import (
    FINISHED_STATES,
    best_of_selections,
    best_value_text,
    cell_score,
    cell_trials,
    finished_count,
    gradient_flow_counts,
    objective_names,
    pareto_front,
    pending_retrain,
    pruned_causes,
    selected_params,
    selection_and_value,
    stored_fold_epochs,
    trials_within_fold_epochs,
)
from modelsel.search import check_sampler_and_pruner, make_pruner, make_sampler, resume_seed_offset
from modelsel.spec import (
    OBJECTIVE_DIRECTIONS,
    CSVSpec,
    StudySpec,
    params_key,
    resolve_field,
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

    from modelsel.parallel import EarlyRefit, WorkerPool
    from modelsel.report import ReportDraft

# torch, scikit-learn and the training stack load on first use (inside the functions that
# train or split), so that reading a stored study (`study show`, `report build`) stays quick.


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
    #: Of the pruned trials, those whose training diverged (a NaN/inf loss) and those whose
    #: sampled configuration could not be built (e.g. batch norm with batches of 1).
    n_diverged: int = 0
    n_invalid: int = 0
    #: How many trials each gradient-flow label has (``vanishing``, ``healthy``, ``exploding``).
    gradient_flows: dict[str, int] = field(default_factory=dict)
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
    #: Fold-epochs the trials trained (epochs × folds, summed; :func:`~modelsel.results.trial_fold_epochs`).
    fold_epochs: int = 0
    #: ``budget.fold_epochs`` of the spec the study's latest run stored (None: none).
    fold_epochs_budget: int | None = None
    #: Completed seeds of the selected sweep cell whose folds ``cv_mean``/``cv_std`` pool
    #: (1 but for a sweep with repeats; ``best_params`` then leaves out the seed).
    cell_seeds: int = 1
    #: Each objective's direction ("maximize", "minimize"), in the order of ``objectives``.
    directions: list[str] = field(default_factory=list)
    #: For several objectives, the trials the selection picked from (:func:`~modelsel.results.pareto_front`):
    #: number and objective values of each, best on the first objective first (the selected trial).
    pareto_front: list[tuple[int, list[float]]] = field(default_factory=list)
    #: For a multi-grid sweep, each map's own outcome (its study name is its report folder,
    #: with its own trials.csv); empty for one study.
    maps: list[StudyOutcome] = field(default_factory=list)
    #: For a multi-grid sweep, the map whose selection this outcome reports (its Pareto
    #: front, test score and trials.csv).
    selected_map: str | None = None

    @property
    def dashboard_command(self) -> str:
        return f"optuna-dashboard {shlex.quote(display_url(self.storage_url))}"


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


def data_file_fingerprint(spec: StudySpec) -> dict[str, Any] | None:
    """The SHA-256 and size of the file a ``csv`` dataset reads (from the loaded dataset, so
    those of the bytes it was decoded from); ``None`` for the other datasets.

    The spec names the file by its path only: a study stores this as its ``data_file``
    user attribute when it is created, and a resume must find the same contents.
    """
    if not isinstance(spec.dataset, CSVSpec):
        return None
    from modelsel.objective import load_dataset_for

    dataset = load_dataset_for(spec)  # cached by the checks before the study is opened
    return {"path": spec.dataset.path, "sha256": dataset.file_sha256, "size": dataset.file_size}


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _text_became_number(old: Any, new: Any) -> bool:
    """Whether some value stored as text (``'1e-4'``, as YAML 1.1 reads it) is now that number."""
    if isinstance(old, dict) and isinstance(new, dict):
        return any(_text_became_number(old[k], new[k]) for k in set(old) & set(new))
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return any(_text_became_number(a, b) for a, b in zip(old, new, strict=True))
    if isinstance(old, str) and isinstance(new, (int, float)) and not isinstance(new, bool):
        try:
            return float(old) == new
        except ValueError:
            return False
    return False


def preflight(spec: StudySpec) -> str:
    """Load the data for every distinct dataset configuration the study will use and check
    the CV split works for each; return the task. Raises a UserError on any problem."""
    from modelsel.cv import fold_indices
    from modelsel.objective import load_dataset_for

    dataset = load_dataset_for(spec)
    task = dataset.task
    objectives = spec.resolved_objectives(task)
    if task == "regression" and "val_accuracy" in objectives:
        raise SpecError("objectives: val_accuracy needs a classification dataset; use val_loss")
    fold_indices(dataset, spec.cv, seed=spec.seed, train_size=spec.dataset.train_size)
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
            train_size = variant.dataset.train_size
            fold_indices(load_dataset_for(variant), variant.cv, seed=variant.seed, train_size=train_size)
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
    data_file = data_file_fingerprint(spec)
    try:
        existing = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None and "spec" not in existing.user_attrs:
        existing = _undescribed_study(existing, spec, storage, storage_url, directions)
    if existing is not None:
        _check_stored_spec(existing.user_attrs, spec, storage_url, fingerprint, data_file)
        if data_file is not None and "data_file" not in existing.user_attrs:
            existing.set_user_attr("data_file", data_file)  # a study created before files were fingerprinted
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
    _describe_study(study, spec, fingerprint, objectives, task, data_file)
    return study


def _check_stored_spec(
    user_attrs: dict[str, Any],
    spec: StudySpec,
    storage_url: str,
    fingerprint: dict[str, Any],
    data_file: dict[str, Any] | None,
) -> None:
    """Refuse to resume a study (its ``user_attrs``) created from a spec that trains or
    measures differently, or from another version of its data file (``data_file``, see
    :func:`data_file_fingerprint`)."""
    stored = json.loads(user_attrs["spec"])
    for key in _RUN_ONLY_TRAINING_KEYS:  # fingerprints stored before device was run-only
        stored.get("training", {}).pop(key, None)
    changed = _differences(stored, fingerprint)
    if changed:
        hint = ""
        if _text_became_number(stored, fingerprint):
            hint = (
                " (if the spec file is unchanged: modelsel now reads a number such as 1e-4 as a number, where "
                "older versions read the text '1e-4'; quote it as '1e-4' to resume this study)"
            )
        raise UserError(
            f"study '{spec.name}' in {display_url(storage_url)} was created from a different spec "
            f"(differs in: {', '.join(changed[:5])}){hint}; rename the study, use another --storage, "
            "or delete the old database"
        )
    old = user_attrs.get("data_file")
    if old is not None and data_file is not None and any(old[k] != data_file[k] for k in ("sha256", "size")):
        raise UserError(
            f"study '{spec.name}' in {display_url(storage_url)} was created from other contents of "
            f"dataset.path {data_file['path']} ({old['size']} bytes, sha256 {old['sha256'][:12]}; now "
            f"{data_file['size']} bytes, sha256 {data_file['sha256'][:12]}), which its trials and test split "
            "come from; restore the file, or give the study a new name or another --storage"
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
            _check_stored_spec(
                stored[spec.name], spec, storage_url, spec_fingerprint(spec), data_file_fingerprint(spec)
            )


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
    study: optuna.Study,
    spec: StudySpec,
    fingerprint: dict[str, Any],
    objectives: list[str],
    task: str,
    data_file: dict[str, Any] | None = None,
) -> None:
    """Store what a new study measures: enough to check a resume, and to rebuild its report."""
    if data_file is not None:  # before "spec": a run that sees "spec" finds the study described
        study.set_user_attr("data_file", data_file)
    study.set_user_attr("spec", json.dumps(fingerprint, sort_keys=True))
    study.set_user_attr("spec_full", spec.to_json())
    if spec.sweep_list():
        study.set_user_attr("sweep_axes", list(spec.sweep_list()[0].axes))  # spec_full sorts keys
    study.set_user_attr("objectives", objectives)
    study.set_user_attr("task", task)
    study.set_user_attr("modelsel_version", __version__)
    study.set_user_attr("created_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _optimize(
    study: optuna.Study,
    spec: StudySpec,
    *,
    target: int | None,
    timeout: float | None,
    device: torch.device,
    on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> int:
    from modelsel.objective import study_objective

    capped = spec.budget.fold_epochs is not None
    # The trials this process ran (another process may add trials to the same study meanwhile).
    ran: set[int] = set()

    def record(study: optuna.Study, trial: FrozenTrial) -> None:
        ran.add(trial.number)
        if on_trial is not None:
            on_trial(study, trial)

    def budget_left(study: optuna.Study) -> int:
        left = [] if target is None else [target - finished_count(study)]
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
    remaining = None if target is None else max(target - finished_count(study), 0)
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
        if target is None or finished_count(study) < target:
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
        initial=finished_count(study),
        desc=f"{spec.name} trials",
        unit="trial",
        disable=not progress,
        dynamic_ncols=True,
    )

    def update(study: optuna.Study, trial: FrozenTrial) -> None:
        bar.n = finished_count(study)
        best = best_value_text(study)
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
    ``early_refit`` (see :class:`~modelsel.parallel.EarlyRefit`) is scored instead of retraining when it is
    the selected trial's retrain. ``threads`` fixes the intra-op threads of the retrain
    and the test (``--workers`` runs retrain with the workers' threads wherever the
    retrain happens, so that its numbers do not depend on which process did it).
    """
    outcome = summarize(study, storage_url)  # with the stored test score, if any
    pending = pending_retrain(study, spec)
    if pending is None:
        return outcome
    from modelsel.cv import fit_final, score_on_test
    from modelsel.objective import load_dataset_for
    from modelsel.training import Diverged, torch_threads

    selected, trial_spec, epochs = pending
    # A resumed search may select another trial: its score is new, and the ones scored
    # before are named (a diverged retrain, which scores nothing, passes the list on).
    stored = study.user_attrs.get("test_result") or {}
    earlier = [n for n in stored.get("earlier_trials", []) if n != selected.number]
    if "test_metric" in stored and stored.get("trial_number") != selected.number:
        earlier.append(stored["trial_number"])
    dataset = load_dataset_for(trial_spec)
    # What a stored result holds when the test split could not be scored (stored like a
    # score, so that a rerun reports it instead of retraining into it again).
    unscored = {"trial_number": selected.number, "params": selected.params, "epochs": epochs, "earlier_trials": earlier}
    reused = early_refit if early_refit is not None and early_refit.fits(selected, epochs) else None
    with torch_threads(threads) if threads is not None else contextlib.nullcontext():
        try:
            if reused is not None:
                member = reused.member
            else:
                member = fit_final(trial_spec, dataset, epochs=epochs, device=device)
        except Diverged as diverged:  # the test split is not touched
            outcome.test = {**unscored, "retrain_diverged": f"epoch {diverged.epoch + 1}: {diverged.reason}"}
            study.set_user_attr("test_result", outcome.test)
            return outcome
        try:
            score = score_on_test(member, dataset, device=device)
        except ArithmeticError as exc:
            # Trained to a finite loss, yet not finite on the test rows (values far outside the
            # training data's).
            outcome.test = {**unscored, "test_not_finite": str(exc), "n_test": int(dataset.X_test.shape[0])}
            study.set_user_attr("test_result", outcome.test)
            return outcome
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
    objectives = objective_names(study)
    outcome = StudyOutcome(
        study_name=study.study_name,
        storage_url=storage_url,
        objectives=list(objectives),
        n_complete=counts[TrialState.COMPLETE],
        n_pruned=counts[TrialState.PRUNED],
        n_failed=counts[TrialState.FAIL],
        test=study.user_attrs.get("test_result"),
        directions=[d.name.lower() for d in study.directions],
    )
    front = pareto_front(study)
    outcome.pareto_front = [(t.number, list(t.values)) for t in front]
    outcome.n_diverged, outcome.n_invalid = pruned_causes(trials)
    outcome.gradient_flows = gradient_flow_counts(trials)
    outcome.fold_epochs, outcome.fold_epochs_budget = stored_fold_epochs(study)
    selection = selection_and_value(study, front=front)
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


#: The timeout a grid gets once the run's time is spent: it starts no trial, and still
#: selects, tests and reports what the grid's study holds.
_NO_TIME_LEFT_S = 1e-6


def run_sweep_maps(spec: StudySpec, *, storage: str | None, output_dir: str | Path, **options: Any) -> StudyOutcome:
    """Run every grid of a multi-grid sweep as its own resumable study in one storage.

    Each grid's study is named :func:`~modelsel.sweeps.map_name`; its report goes to
    ``<output_dir>/<map name>/`` as for any study, and a combined report with every
    map's findings and plots to ``<output_dir>/<name>/report.html``. The returned
    outcome sums the counts and carries the map whose selected trial scores best.
    """
    import time

    from modelsel.report import build_maps_report
    from modelsel.storage import default_storage_url, local_path
    from modelsel.sweeps import map_specs

    children = map_specs(spec)
    device = options.get("device")
    timeout = options.pop("timeout", None)
    timeout = timeout if timeout is not None else spec.budget.timeout
    for child in children:  # bad input in any grid: fail before anything is written
        training = child.training if device is None else child.training.model_copy(update={"device": device})
        check_run(child.model_copy(update={"training": training}), n_trials=options.get("n_trials"), timeout=timeout)
    url = storage or spec.storage or default_storage_url(output_dir, spec.name)
    check_resumable(children, url)  # a changed grid fails before any other grid trains
    path = local_path(url)
    if storage is None and spec.storage is None and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    # The timeout is the seconds of this run, shared by its grids; the other budgets
    # (n_trials, fold_epochs) are each grid's study's own.
    deadline = None if timeout is None else time.monotonic() + timeout
    outcomes = []
    for child in children:
        left = None if deadline is None else max(deadline - time.monotonic(), _NO_TIME_LEFT_S)
        outcomes.append(
            run_study(
                child.model_copy(update={"storage": url}), storage=url, output_dir=output_dir, timeout=left, **options
            )
        )
    combined = combine_map_outcomes(spec.name, outcomes)
    if options.get("build_report", True):
        from modelsel.storage import open_storage

        storage = open_storage(url, heartbeat=False)
        studies = [optuna.load_study(study_name=o.study_name, storage=storage) for o in outcomes]
        # With the storage it used, as `report build` shows it from the maps' stored specs.
        shown = spec.model_copy(update={"storage": url})
        combined.report_path = build_maps_report(shown, studies, output_dir=Path(output_dir) / spec.name)
    return combined


def combine_map_outcomes(name: str, outcomes: Sequence[StudyOutcome]) -> StudyOutcome:
    """One outcome for a multi-grid sweep ``name``: the counts of every map summed, and
    the selection and test score of the map whose selected cell scores best."""
    chosen = _best_outcome(outcomes)
    return replace(
        chosen,
        study_name=f"{name} [{len(outcomes)} maps; best: {chosen.study_name}]",
        n_complete=sum(o.n_complete for o in outcomes),
        n_pruned=sum(o.n_pruned for o in outcomes),
        n_failed=sum(o.n_failed for o in outcomes),
        n_diverged=sum(o.n_diverged for o in outcomes),
        n_invalid=sum(o.n_invalid for o in outcomes),
        gradient_flows=dict(sum((Counter(o.gradient_flows) for o in outcomes), Counter())),
        n_trained_this_run=sum(o.n_trained_this_run for o in outcomes),
        fold_epochs=sum(o.fold_epochs for o in outcomes),  # each map's own cap, summed
        fold_epochs_budget=(
            None
            if any(o.fold_epochs_budget is None for o in outcomes)
            else sum(o.fold_epochs_budget or 0 for o in outcomes)
        ),
        maps=list(outcomes),
        selected_map=chosen.study_name,
    )


def _best_outcome(outcomes: Sequence[StudyOutcome]) -> StudyOutcome:
    # Each map's selected cell as its own selection ranked it (a cell's mean over its seeds), in
    # the direction the studies optimize it (an outcome with no directions selected nothing).
    direction = optuna.study.StudyDirection[(outcomes[0].directions or ["minimize"])[0].upper()]
    best = best_of_selections([o.selection_value for o in outcomes], direction)
    return outcomes[0] if best is None else outcomes[best]
