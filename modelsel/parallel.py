"""Parallel trials on one machine: ``modelsel study run --workers N``.

N processes share the study's storage and run trials until the shared budget is
spent. The calling process is worker 0 (its imports and cached data are already
there); N - 1 more are started with ``spawn`` (safe with torch's thread pools, unlike
``fork``). On CPU every worker trains with one intra-op thread: on a machine with as
many cores as workers that uses every core without oversubscription, and a 1-thread
process is not slowed down by OpenMP threads spinning at barriers while other
processes hold the cores.

Start-up
    A spawned worker spends seconds importing torch, Optuna and scikit-learn. The
    :class:`WorkerPool` is started first thing in ``run_study``, so the workers import
    while the calling process does the same, checks the data and opens the storage; they
    then wait for their orders (storage, budget, deadline, device). Until then they
    touch no storage, so a run that stops on bad input leaves nothing behind. (Measured
    on 2 cores: started only when the search began, the second worker's first trial
    began 7.5 s after the first worker's.)

Budget
    The budget is exact within one invocation: before each trial a worker claims one
    of the ``target - finished`` slots from a counter shared by the workers (under its
    lock), so exactly the missing number of trials is started. (Optuna's
    ``MaxTrialsCallback`` alone, checked when a trial ends, lets each other worker's
    running trial finish: up to N - 1 trials over.) A trial that fails with an error
    stops the run. Two separate invocations on one storage can still overshoot by their
    running trials; each also stops once the storage holds ``target`` finished trials.
    Under ``budget.fold_epochs`` a worker also reserves room for one trial at its
    longest before it starts one (:meth:`_Shared.reserve`): a trial starts only if the
    fold-epochs the storage holds, plus every running trial and this one at their
    longest, stay within the cap.

Storage
    The storage a study already has is used as it is: SQLite by default, in WAL mode
    (readers do not block the writer) with a 60 s busy timeout (``modelsel.storage``),
    so a worker waits for another's write instead of failing. Workers write a few rows
    per epoch and a few dozen per trial, so with a handful of processes the lock is
    almost never contended. Optuna recommends
    its journal file storage for many processes on one node (``--storage
    journal:path.log``); it is not made the default for ``--workers`` because the default
    storage must stay the same file across runs, or a study started with ``--workers 2``
    would not be found when resumed without it.

Samplers
    Each worker seeds its sampler differently (``seed + 7919 * worker``, plus the
    resumed study's offset of :func:`modelsel.search.resume_seed_offset`), or they would
    draw the same first configurations; TPE runs with ``constant_liar`` (unless the spec
    sets it) so concurrent workers do not all sample next to the same running trial.

The work after the search
    The first worker left without a trial to claim while others still train retrains
    the best trial so far on the whole training split, on the core that would
    otherwise wait (:func:`refit_while_others_search`; a spawned worker sends the model
    to the calling process). The test split is not touched until the search is over:
    the model is scored only if the final selection is that trial, else the calling
    process retrains. Either way the retrain runs with the workers' threads (1 on
    CPU), so the test score does not depend on which process made it (a run with
    ``--workers 1`` retrains with the process's threads, and its last digits may
    differ). Once every trial is finished, the report is drafted (all but its summary,
    :func:`modelsel.report.draft_report`) by the calling process if it is idle, or by
    the last worker out if the calling process is still retraining
    (:func:`after_search_work`). On the benchmark grid (``benchmarks/results.md``), 2
    workers, the time from the last trial's end to the written report fell from 8.1 to
    4.9 s (means of three runs each): the 1-thread retrain (5-7 s) is hidden only as far
    as the other worker's last trial lasts.

Interrupts and errors
    Ctrl-C (or SIGTERM) reaches the calling process; it stops claiming trials,
    terminates the other workers (their running trials are stored as failed) and
    re-raises, so the CLI says how to resume. A worker that fails, or is terminated
    from outside, sends one line (worker, exception type, message); a worker that is
    killed sends nothing, and the calling process's watcher thread sees its exit.
    Either way the run starts no more trials, stores the trial the worker left running
    as failed, and raises :class:`WorkerError` (exit code 1), so that it never ends as
    a success short of its budget.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from modelsel.errors import RunError
from modelsel.signals import interrupt_on
from modelsel.spec import StudySpec, parse_spec

# Only the standard library and the spec at import time: the calling process imports
# this module to start the workers, before it has imported torch or Optuna itself.
if TYPE_CHECKING:
    import optuna
    import torch
    from optuna.trial import FrozenTrial

    from modelsel.report import ReportDraft
    from modelsel.training import TrainedMember

_SEED_STRIDE = 7919
_POLL_S = 0.25


class WorkerError(RunError):
    """A worker process failed or was killed; the message is one line (exit code 1)."""


def worker_sampler(spec: StudySpec, worker: int, *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler of worker ``worker``: seeded apart from the others (and from earlier runs
    of the study by ``seed_offset``, see :func:`modelsel.search.resume_seed_offset`); TPE
    with constant liar."""
    from modelsel.search import make_sampler

    if spec.sweep is not None or spec.sampler.name == "grid":
        # Every worker must see the same grid order: GridSampler's seed permutes the cells
        # (and a sweep's seed axis derives from the spec seed), and cell i goes to trial i.
        return make_sampler(spec)
    options = dict(spec.sampler.options)
    if spec.sampler.name == "tpe" and spec.sweep is None:
        options.setdefault("constant_liar", True)
    sampler_spec = spec.model_copy(
        update={
            "seed": spec.seed + _SEED_STRIDE * worker,
            "sampler": spec.sampler.model_copy(update={"options": options}),
        }
    )
    return make_sampler(sampler_spec, seed_offset=seed_offset)


def worker_threads(device: torch.device, workers: int) -> int:
    """Intra-op threads per worker: 1 on CPU, else the cores shared out."""
    if device.type == "cpu":
        return 1
    return max(1, (os.cpu_count() or 1) // workers)


class _Shared:
    """The state the workers share: budget slots, finished count, stop flag, orders, errors,
    and the work after the search (how many workers still search, who retrains early,
    whether the calling process retrains, who drafts the report, what a worker sends back)."""

    def __init__(self, context: Any, slots: int | None = None, *, workers: int = 1) -> None:
        self.slots = context.Value("q", -1 if slots is None else slots)
        #: Trials claimed under ``budget.fold_epochs`` and not yet finished (see :meth:`reserve`).
        self.reserved = context.Value("i", 0)
        self.done = context.Value("q", 0)
        self.stop = context.Event()
        self.errors = context.Queue()
        self.orders = context.Queue()
        self.searching = context.Value("i", workers)
        self.early_refit_claimed = context.Value("b", 0)
        self.caller_refitting = context.Value("b", 0)
        self.draft_claimed = context.Value("b", 0)
        self.results = context.Queue()
        #: The storage id of the trial each worker is training (-1: none), for failing the trial of
        #: a worker that was killed.
        self.running = context.Array("q", [-1] * workers)

    def set_slots(self, slots: int | None) -> None:
        with self.slots.get_lock():
            self.slots.value = -1 if slots is None else slots

    def claim(self) -> bool:
        """Take one trial slot; False when the budget is spent or the run is stopping."""
        if self.stop.is_set():
            return False
        with self.slots.get_lock():
            if self.slots.value == 0:
                return False
            if self.slots.value > 0:
                self.slots.value -= 1
        return True

    def reserve(self, fits: Callable[[int], bool]) -> bool:
        """Reserve room for one trial under ``budget.fold_epochs``: True when ``fits(reserved)``,
        given how many trials other workers have reserved and not finished; one at a time."""
        with self.reserved.get_lock():
            if not fits(self.reserved.value):
                return False
            self.reserved.value += 1
            return True

    def unreserve(self) -> None:
        with self.reserved.get_lock():
            self.reserved.value -= 1

    def finished_one(self) -> None:
        with self.done.get_lock():
            self.done.value += 1

    def left_search(self) -> None:
        """Count one worker out of the search."""
        with self.searching.get_lock():
            self.searching.value -= 1

    def claim_early_refit(self) -> bool:
        """Whether this worker is the one to retrain early (True once per run)."""
        return _claim_once(self.early_refit_claimed)

    def claim_draft(self) -> bool:
        """Whether this worker is the one to draft the report (True once per run)."""
        return _claim_once(self.draft_claimed)


def _claim_once(flag: Any) -> bool:
    with flag.get_lock():
        if flag.value:
            return False
        flag.value = 1
        return True


@dataclass(frozen=True)
class WorkerOrders:
    """What a started worker waits for: where the study is and how long to run."""

    storage_url: str
    target: int | None
    deadline: float | None
    device_type: str
    threads: int
    #: Whether the run builds a report (a worker may then draft it, see :func:`after_search_work`).
    report: bool = False
    #: Added to each worker's sampler seed (:func:`modelsel.search.resume_seed_offset`).
    sampler_seed_offset: int = 0


class WorkerPool:
    """The N - 1 spawned workers of ``--workers N``, started before the study is open.

    They import and then wait; :meth:`release` hands them their orders, :meth:`close`
    stops any that are still alive (never released, or left over after an error).
    """

    def __init__(self, spec: StudySpec, workers: int, *, storage_url: str | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self.shared = _Shared(context, workers=workers)
        #: The retrain a worker made while others still searched (:func:`run_parallel`).
        self.early_refit: EarlyRefit | None = None
        #: The report drafted once every trial was finished (:func:`run_parallel`).
        self.report_draft: ReportDraft | None = None
        spec_json = spec.to_json()
        self.processes = [
            context.Process(
                target=_worker_process,
                args=(i, spec_json, self.shared, storage_url),
                name=f"modelsel-worker-{i}",
                daemon=True,
            )
            for i in range(1, workers)
        ]
        for process in self.processes:
            process.start()

    def release(self, orders: WorkerOrders, slots: int | None) -> None:
        """Set the budget and let every worker start claiming trials."""
        self.shared.set_slots(slots)
        for _ in self.processes:
            self.shared.orders.put(orders)

    @property
    def workers(self) -> int:
        """All workers of the run, the calling process included."""
        return len(self.processes) + 1

    def threads(self, device: torch.device) -> int:
        """Intra-op threads of each worker on ``device`` (also those of the final retrain)."""
        return worker_threads(device, self.workers)

    def close(self) -> None:
        """Stop the workers that are still alive (a no-op after a finished run)."""
        if any(p.is_alive() for p in self.processes):
            self.shared.stop.set()
        _terminate(self.processes)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def trial_loop(
    study: optuna.Study,
    spec: StudySpec,
    *,
    device: torch.device,
    target: int | None,
    deadline: float | None,
    shared: _Shared,
    on_trial: Any = None,
    worker: int = 0,
) -> int:
    """Run trials one at a time while slots, time and the budget (trials, fold-epochs) last; return how many.

    ``worker`` is this process's index, under which it notes the trial it trains (for
    failing the trial of a worker that is killed: :func:`_fail_trials_of_stopped_workers`).
    """
    from modelsel.objective import study_objective
    from modelsel.results import FINISHED_STATES, trials_within_fold_epochs
    from modelsel.storage import trials_started_noted, unfinished_trials_failed

    # Workers claim budget slots one trial at a time, so each trains its trials alone:
    # training.stack_trials (a run-only setting) applies to one process.
    alone = spec.model_copy(update={"training": spec.training.model_copy(update={"stack_trials": 1})})
    train = study_objective(study, alone, device=device)

    tracked = worker < len(shared.running)

    def started(trial_id: int) -> None:
        # Noted from the moment the storage has the trial until it is stored as finished
        # (the callback below), so that a worker killed while Optuna sets the trial up or
        # stores its result leaves no trial running either.
        if tracked:
            shared.running[worker] = trial_id

    def finished(study: optuna.Study, trial: FrozenTrial) -> None:
        if tracked:
            shared.running[worker] = -1
        shared.finished_one()
        if on_trial is not None:
            on_trial(study, trial)

    capped = spec.budget.fold_epochs is not None
    ran = 0
    try:
        while True:
            if deadline is not None and time.time() >= deadline:
                break
            if target is not None and len(study.get_trials(deepcopy=False, states=FINISHED_STATES)) >= target:
                break  # another invocation on the same storage filled the budget
            # Under budget.fold_epochs every running trial holds room for its longest run, so
            # that workers starting at once cannot overspend the cap between them.
            if capped and not shared.reserve(lambda running: (trials_within_fold_epochs(study, spec) or 0) > running):
                break
            try:
                if not shared.claim():
                    break
                with unfinished_trials_failed(), trials_started_noted(study, started):
                    study.optimize(train, n_trials=1, callbacks=[finished], gc_after_trial=False, catch=())
            finally:
                if capped:
                    shared.unreserve()
            ran += 1
    finally:
        shared.left_search()
    return ran


def refit_while_others_search(
    study: optuna.Study, spec: StudySpec, *, device: torch.device, shared: _Shared, caller: bool = False
) -> EarlyRefit | None:
    """Retrain the best trial so far if other workers still search and no one else does.

    Called by each worker when its trial loop ends: the first one left without a trial
    retrains the best trial so far on the whole training split (no test score) on the
    core that would otherwise wait, with the workers' threads. After the search the
    calling process scores that model if the final selection is the same trial
    (:func:`modelsel.study.select_and_test`), or retrains. Best effort: an error here is
    dropped, and the retrain after the search meets it again and reports it.
    ``caller``: this is the calling process (the others then know it is busy).
    """
    if shared.stop.is_set() or int(shared.searching.value) == 0 or not shared.claim_early_refit():
        return None
    shared.caller_refitting.value = int(caller)
    try:
        return refit_best_so_far(study, spec, device=device)
    except Exception:
        return None
    finally:
        shared.caller_refitting.value = 0


def after_search_work(
    study: optuna.Study, spec: StudySpec, *, device: torch.device, shared: _Shared, report: bool
) -> tuple[Literal["refit", "draft"], EarlyRefit | ReportDraft] | None:
    """What a spawned worker does when its trial loop ends, for the calling process.

    The first worker out of trials retrains early (:func:`refit_while_others_search`).
    The last one out drafts the report (:func:`modelsel.report.draft_report`: every
    trial is finished by then) if the calling process is busy retraining; an idle
    calling process drafts it itself, with its plotting libraries already loaded.
    Returns ``("refit", ...)`` (the model on the CPU), ``("draft", ...)`` or None. Best
    effort, as the retrain.
    """
    early_refit = refit_while_others_search(study, spec, device=device, shared=shared)
    if early_refit is not None:
        early_refit.member.model.to("cpu")
        return "refit", early_refit
    if not report or int(shared.searching.value) != 0 or not shared.caller_refitting.value:
        return None
    if not shared.claim_draft():
        return None
    draft = _draft(study)
    return None if draft is None else ("draft", draft)


def worker_main(index: int, spec_json: str, shared: _Shared, storage_url: str | None = None) -> None:
    """Entry point of a spawned worker process: import, wait for orders, run trials."""
    # Ctrl-C goes to the whole process group: the calling process handles it and
    # terminates the workers, whose SIGTERM then fails their running trial cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with interrupt_on(signal.SIGTERM) as terminated:
        try:
            _work(index, spec_json, shared, storage_url)
        except BaseException as exc:
            if terminated.is_set() and not shared.stop.is_set():
                # Not the calling process stopping the run (it sets stop first): the run
                # must not end as a success without this worker's trials.
                shared.errors.put(
                    f"worker {index} was terminated (SIGTERM); its running trial is stored as failed; "
                    "run the same command again to finish the study"
                )
                shared.stop.set()
                raise SystemExit(1) from None
            if terminated.is_set() or isinstance(exc, KeyboardInterrupt):
                # Stopped by the calling process; an error while stopping (Optuna could not
                # store the trial) is stopped all the same.
                return
            # Report every failure as one line to the calling process.
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            shared.errors.put(f"worker {index}: {type(exc).__name__}{': ' + text if text else ''}")
            shared.stop.set()
            raise SystemExit(1) from None


def _work(index: int, spec_json: str, shared: _Shared, storage_url: str | None) -> None:
    import optuna
    import torch

    import modelsel.objective  # noqa: F401  (the heavy imports, done before the orders come)
    from modelsel.search import make_pruner
    from modelsel.signals import quiet_interrupted_trial_logs
    from modelsel.storage import open_storage

    spec = parse_spec(json.loads(spec_json))
    _prepare_before_orders(spec, storage_url)
    orders: WorkerOrders = shared.orders.get()
    if shared.stop.is_set():
        return
    torch.set_num_threads(orders.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_interrupted_trial_logs()  # its SIGTERM comes from the calling process's Ctrl-C
    study = optuna.load_study(
        study_name=spec.name,
        storage=open_storage(orders.storage_url),
        sampler=worker_sampler(spec, index, seed_offset=orders.sampler_seed_offset),
        pruner=make_pruner(spec),
    )
    device = torch.device(orders.device_type)
    trial_loop(
        study, spec, device=device, target=orders.target, deadline=orders.deadline, shared=shared, worker=index
    )
    result = after_search_work(study, spec, device=device, shared=shared, report=orders.report)
    if result is not None:
        # Pickled here, not by the queue: torch's queue pickler would send the tensors as
        # shared memory, which the calling process can no longer map once this one exits.
        shared.results.put(pickle.dumps(result))
        shared.results.close()
        shared.results.join_thread()  # in the pipe before the exit without teardown


def _prepare_before_orders(spec: StudySpec, storage_url: str | None) -> None:
    """What a worker can do before its orders without touching the storage: decode the
    data (kept in :mod:`modelsel.data`'s cache; never downloaded here) and import the
    storage's libraries.

    Until the calling process has checked the data and opened the study, a worker must
    write nothing; this only reads. Skipped on any error: the calling process reports
    bad data or a bad storage itself. It is about 1 s of work (the storage's imports
    0.85 s, Fashion-MNIST 0.25 s) that otherwise comes after the orders. On the 2-core
    machine the worker's imports, competing with the calling process's, end about when
    the orders come, so little was gained there (first-trial lag 0.3-1.9 s against
    0.8-1.2 s, three runs each); with a spare core the worker waits for its orders.
    """
    from modelsel.data import load_dataset
    from modelsel.storage import import_storage_libraries

    with contextlib.suppress(Exception):
        if storage_url is not None:
            import_storage_libraries(storage_url)
        dataset = spec.dataset
        if getattr(dataset, "download", False):
            # Only the calling process downloads (once, in its check of the data).
            dataset = dataset.model_copy(update={"download": False})
        load_dataset(dataset, seed=spec.seed)


def _worker_process(index: int, spec_json: str, shared: _Shared, storage_url: str | None = None) -> None:
    """A spawned worker: :func:`worker_main`, then an exit without interpreter teardown.

    The calling process waits for every worker to exit before it selects and tests, and
    finalizing torch, Optuna and scikit-learn took about 1.8 s; every trial is committed
    to the storage by then (:func:`~modelsel.storage.close_and_exit` closes it first). A
    failing worker raises SystemExit and exits the normal way.
    """
    from modelsel.storage import close_and_exit

    worker_main(index, spec_json, shared, storage_url)
    close_and_exit(0)


def run_parallel(
    study: optuna.Study,
    spec: StudySpec,
    *,
    storage_url: str,
    target: int | None,
    timeout: float | None,
    device: torch.device,
    pool: WorkerPool,
    bar: Any,
    while_waiting: Callable[[], object] | None = None,
    report: bool = False,
) -> int:
    """Run the study with this process and the ``pool``'s workers; return trials run here and there.

    ``while_waiting`` is called once this process has no trial left to claim, before it
    waits for the other workers' last trials: a core is free then for what comes next
    (e.g. the report's imports, about 1 s). The early retrain and, with ``report``, the
    report's draft (see :func:`after_search_work`) are left in ``pool.early_refit`` and
    ``pool.report_draft``.
    """
    from modelsel.results import FINISHED_STATES, best_value_text
    from modelsel.search import resume_seed_offset
    from modelsel.training import torch_threads

    processes, shared = pool.processes, pool.shared
    stored = study.get_trials(deepcopy=False)
    finished_before = sum(t.state in FINISHED_STATES for t in stored)
    slots = None if target is None else max(target - finished_before, 0)
    deadline = None if timeout is None else time.time() + timeout
    threads = pool.threads(device)
    seed_offset = resume_seed_offset(len(stored))
    pool.release(
        WorkerOrders(storage_url, target, deadline, device.type, threads, report, seed_offset), slots
    )
    refreshing = threading.Event()
    refresher = threading.Thread(
        target=_refresh_bar, args=(bar, finished_before, shared, refreshing, processes), daemon=True
    )
    refresher.start()
    sampler = study.sampler

    def show_best(study: optuna.Study, trial: FrozenTrial) -> None:
        bar.set_postfix_str(best_value_text(study), refresh=False)

    try:
        study.sampler = worker_sampler(spec, 0, seed_offset=seed_offset)
        with torch_threads(threads):
            trial_loop(
                study,
                spec,
                device=device,
                target=target,
                deadline=deadline,
                shared=shared,
                on_trial=show_best,
            )
            early_refit = refit_while_others_search(study, spec, device=device, shared=shared, caller=True)
        if while_waiting is not None and any(p.is_alive() for p in processes):
            while_waiting()
        received = _wait(processes, shared, draft=functools.partial(_draft, study) if report else None)
        pool.early_refit = early_refit or received.early_refit
        pool.report_draft = received.report_draft
    except BaseException:
        pool.close()
        _fail_trials_of_stopped_workers(study, shared)
        raise
    finally:
        study.sampler = sampler
        refreshing.set()
        refresher.join()
        bar.n = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))
        bar.refresh()
    return int(shared.done.value)


def _fail_trials_of_stopped_workers(study: optuna.Study, shared: _Shared) -> list[int]:
    """Store as failed the trials the (now stopped) workers left running: a killed worker
    cannot (a terminated one already has). Returns their storage ids."""
    from modelsel.storage import fail_running_trial

    failed = []
    for worker in range(1, len(shared.running)):
        trial_id = int(shared.running[worker])
        if trial_id >= 0 and fail_running_trial(study, trial_id):
            failed.append(trial_id)
    return failed


def _refresh_bar(
    bar: Any, initial: int, shared: _Shared, stop: threading.Event, processes: Sequence[Any] = ()
) -> None:
    """Show the finished trials; and stop the run as soon as a worker has died (a non-zero
    exit: killed), so that no worker, this process included, claims another trial."""
    shown = -1
    while not stop.wait(_POLL_S):
        if any(p.exitcode not in (None, 0) for p in processes):
            shared.stop.set()
        done = int(shared.done.value)
        if done != shown:
            shown = done
            bar.n = initial + done
            bar.refresh()


def _draft(study: optuna.Study) -> ReportDraft | None:
    """The report's draft, by the calling process or a worker; best effort (an error is
    met again, and reported, when the report is built after the test)."""
    from modelsel.report import draft_report

    try:
        return draft_report(study)
    except Exception:
        return None


@dataclass
class _AfterSearch:
    """What the calling process has when the workers are gone: the early retrain and the
    report's draft, made by it or sent by a worker (see :func:`after_search_work`)."""

    early_refit: EarlyRefit | None = None
    report_draft: ReportDraft | None = None

    def take(self, data: bytes) -> None:
        kind, made = pickle.loads(data)  # from a worker of this run
        if kind == "refit":
            self.early_refit = made
        else:
            self.report_draft = made


def _wait(
    processes: list[Any], shared: _Shared, *, draft: Callable[[], ReportDraft | None] | None = None
) -> _AfterSearch:
    """Wait for the workers; on the first error, stop the others and raise it.

    Returns what the workers sent (read while waiting: a worker cannot exit before its
    pickled result is through the pipe). Once no worker searches any more and one is
    still alive (retraining early, or exiting), this process calls ``draft`` to draft
    the report, unless a worker took that on.
    """
    received = _AfterSearch()
    while True:
        message = _first_error(shared)
        if message is not None:
            shared.stop.set()
            _terminate(processes)
            raise WorkerError(message)
        alive = [p for p in processes if p.is_alive()]
        if not alive:
            break
        if draft is not None and int(shared.searching.value) == 0:
            if shared.claim_draft():
                received.report_draft = draft()
            draft = None
            continue
        _receive(received, shared, wait_s=_POLL_S)
    failed = [(i, p.exitcode) for i, p in enumerate(processes, start=1) if p.exitcode not in (0, None)]
    # A message put just before its worker exited may still be on its way through the pipe.
    message = _first_error(shared, wait_s=2.0 if failed or shared.stop.is_set() else 0.0)
    if message is not None:
        raise WorkerError(message)
    if failed:
        i, code = failed[0]
        raise WorkerError(
            f"worker {i} exited with code {code} (killed? out of memory?); "
            "run the same command again to finish the study"
        )
    while _receive(received, shared):
        pass
    return received


def _receive(received: _AfterSearch, shared: _Shared, wait_s: float = 0.0) -> bool:
    """Take one result a worker sent, waiting up to ``wait_s``; whether there was one."""
    try:
        data: bytes = shared.results.get(timeout=wait_s) if wait_s > 0 else shared.results.get_nowait()
    except queue.Empty:
        return False
    received.take(data)
    return True


def _first_error(shared: _Shared, wait_s: float = 0.0) -> str | None:
    try:
        message: str = shared.errors.get(timeout=wait_s) if wait_s > 0 else shared.errors.get_nowait()
    except queue.Empty:
        return None
    return message


def _terminate(processes: list[Any], grace_s: float = 10.0) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


@dataclass
class EarlyRefit:
    """The best trial so far, retrained on the whole training split before the search ended.

    With ``--workers N`` the first worker left without a trial to claim retrains the
    best trial so far while the others finish theirs (:mod:`modelsel.parallel`). The
    test split is not touched then: :func:`modelsel.study.select_and_test` scores the model only if
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
    from modelsel.objective import load_dataset_for
    from modelsel.results import pending_retrain

    pending = pending_retrain(study, spec)
    if pending is None:
        return None
    selected, trial_spec, epochs = pending
    member = fit_final(trial_spec, load_dataset_for(trial_spec), epochs=epochs, device=device)
    return EarlyRefit(selected.number, dict(selected.params), epochs, member)
