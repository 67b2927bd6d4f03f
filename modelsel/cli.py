"""The ``modelsel`` command line.

Heavy libraries (torch, optuna, pandas) are imported inside the commands so that
``modelsel --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from modelsel import __version__
from modelsel.errors import RunError, UserError, exception_chain
from modelsel.signals import interrupt_on

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(func: F) -> F:
    """Print a UserError as one line and exit 2, a RunError and exit 1; Ctrl-C and
    SIGTERM stop the run as Ctrl-C does and say how to resume."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _stop_watch() as stops:
            try:
                return func(*args, **kwargs)
            except UserError as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(2)
            except RunError as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(1)
            except KeyboardInterrupt:
                _interrupted(stops)
            except Exception as exc:
                # Ctrl-C that lands inside a library's own code can surface as another error:
                # raised while handling it (Optuna's trial loop, UnboundLocalError), or after a
                # library caught it and then failed to clean up (Optuna could not store the
                # interrupted trial as failed: "database is locked", then AssertionError).
                if stops.is_set() or _raised_while_interrupted(exc):
                    _interrupted(stops)
                raise

    return wrapper  # type: ignore[return-value]


class _Stops:
    """Which stop signals arrived: Ctrl-C (SIGINT) and SIGTERM."""

    def __init__(self) -> None:
        self.ctrl_c = threading.Event()
        self.terminated = threading.Event()

    def is_set(self) -> bool:
        return self.ctrl_c.is_set() or self.terminated.is_set()


@contextlib.contextmanager
def _stop_watch() -> Iterator[_Stops]:
    """Within the block, Ctrl-C and SIGTERM raise KeyboardInterrupt and are recorded; one
    that a finalizer swallowed is delivered again (:func:`modelsel.signals.interrupt_on`).
    A signal the embedding program handles (or ignores) is left alone. SIGTERM thus
    stops a run as Ctrl-C does: the running trials are stored as failed and the
    ``--workers`` processes are stopped, none left training on its own."""
    stops = _Stops()
    with contextlib.ExitStack() as stack:
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                stops.ctrl_c = stack.enter_context(interrupt_on(signal.SIGINT))
            if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                stops.terminated = stack.enter_context(interrupt_on(signal.SIGTERM))
        yield stops


def _interrupted(stops: _Stops) -> NoReturn:
    if stops.terminated.is_set():
        click.echo("terminated: finished trials are kept; run the same command again to resume", err=True)
        sys.exit(128 + signal.SIGTERM)
    click.echo("interrupted: finished trials are kept; run the same command again to resume", err=True)
    sys.exit(130)


def _raised_while_interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while a KeyboardInterrupt was being handled."""
    return any(isinstance(e, KeyboardInterrupt) for e in exception_chain(exc))


_storage_option = click.option(
    "--storage",
    metavar="URL",
    help="Optuna storage URL (sqlite:///file.db, postgresql://..., journal:file.log). "
    "Default: the spec's, else OUTPUT/<study>/study.db.",
)
_stored_option = click.option(
    "--storage",
    metavar="URL",
    help="Optuna storage URL (sqlite:///file.db, postgresql://..., journal:file.log). "
    "Default: the studies under OUTPUT (OUTPUT/*/study.db and OUTPUT/*/study.log).",
)
_output_option = click.option(
    "--output",
    "output_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("reports"),
    show_default=True,
    help="Folder for reports (OUTPUT/<study>/) and default storages.",
)


class _OneLineUsageErrors(click.Group):
    """A group whose usage errors (a bad flag or option value) print one line, as every
    other bad input does, instead of click's usage block, hint and error: ``error: ...
    (see 'modelsel study run --help')``, exit code 2."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare `modelsel` or `modelsel study`: the help
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "modelsel"
            message = exc.format_message().rstrip(".")
            click.echo(f"error: {message} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:  # what click's standalone mode does with the rest
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class _Integer(click.IntRange):
    """An integer option with bounds that a bad value names as an integer ("'abc' is not a
    valid integer", not click's "valid integer range")."""

    name = "integer"


@click.group("modelsel", cls=_OneLineUsageErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modelsel")
def main() -> None:
    """Hyperparameter search and model selection for PyTorch MLPs, on Optuna."""


@main.group()
def study() -> None:
    """Run, list and inspect studies."""


@study.command("run")
@click.argument("spec", required=False, type=click.Path(path_type=Path))
@_storage_option
@click.option("--n-trials", type=_Integer(min=1), help="Total finished trials to reach (tops up a study).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds to search in this run.")
@click.option(
    "--fold-epochs",
    type=_Integer(min=1),
    help="Compute cap: epochs x folds summed over the study's trials (overrides budget.fold_epochs).",
)
@_output_option
@click.option("--seed", type=_Integer(0, 2**31 - 1), help="Override the spec's seed.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Override training.device.")
@click.option("--workers", type=_Integer(min=1), default=1, show_default=True, help="Parallel processes.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def run_command(
    spec: Path | None,
    storage: str | None,
    n_trials: int | None,
    timeout: float | None,
    fold_epochs: int | None,
    output_dir: Path,
    seed: int | None,
    device: str | None,
    workers: int,
    quiet: bool,
) -> None:
    """Run the study in SPEC (YAML); without SPEC, the built-in quickstart on digits.

    Re-running the same command resumes the study: finished trials count towards the
    budget, and a finished study trains nothing and prints its summary again.
    """
    from modelsel.signals import quiet_interrupted_trial_logs
    from modelsel.spec import builtin_spec_path, fold_epochs_shortfall, load_spec
    from modelsel.study import run_study

    if timeout is not None and not math.isfinite(timeout):  # click's range lets nan and inf through
        raise UserError(f"--timeout must be a finite number of seconds, got {timeout}; e.g. --timeout 600")
    _check_storage_flag(storage)
    overrides = {"seed": seed} if seed is not None else None
    study_spec = load_spec(spec if spec is not None else builtin_spec_path(), overrides=overrides)
    if fold_epochs is not None:
        short = fold_epochs_shortfall(study_spec, fold_epochs, name=f"--fold-epochs {fold_epochs}")
        if short:
            raise UserError(short)
        # model_copy skips validation: the one rule a new cap can break is checked just above.
        budget = study_spec.budget.model_copy(update={"fold_epochs": fold_epochs})
        study_spec = study_spec.model_copy(update={"budget": budget})
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_interrupted_trial_logs()
    outcome = run_study(
        study_spec,
        storage=storage,
        output_dir=output_dir,
        n_trials=n_trials,
        timeout=timeout,
        device=device,
        workers=workers,
        progress=not quiet,
    )
    _print_outcome(outcome, folds=study_spec.cv.folds, after_run=True)


def _print_outcome(outcome: Any, *, folds: int | None = None, after_run: bool = False) -> None:
    from modelsel.spec import value_text

    finished = outcome.n_complete + outcome.n_pruned
    ran = f"; {outcome.n_trained_this_run} run in this invocation" if after_run else ""
    click.echo(
        f"Study {outcome.study_name}: {_count(finished, 'trial')} finished ({outcome.n_complete} complete, "
        f"{outcome.n_pruned} pruned, {outcome.n_failed} failed){ran}."
    )
    if outcome.n_diverged or outcome.n_invalid:
        click.echo(_pruned_why(outcome))
    flows = outcome.gradient_flows
    if flows.get("vanishing") or flows.get("exploding"):  # all healthy goes without saying
        counts = ", ".join(f"{flows.get(label, 0)} {label}" for label in ("vanishing", "healthy", "exploding"))
        where = "each map's trials.csv" if outcome.maps else "trials.csv"
        click.echo(f"Gradient flow: {counts} (gradient_flow in {where}; the report's Gradient flow section explains).")
    if outcome.fold_epochs:
        cap = f" of the budget's {outcome.fold_epochs_budget}" if outcome.fold_epochs_budget else ""
        click.echo(f"Trained {outcome.fold_epochs} fold-epochs{cap} (epochs x folds, summed over trials).")
    if outcome.best_trial_number is None and outcome.n_complete:
        click.echo(
            "Every completed trial blew up in training (regime diverged), so nothing was selected: lower the "
            "learning rate, or clip gradients, and run again."
        )
    elif outcome.best_trial_number is None:
        click.echo("No trial completed, so nothing was selected.")
    else:
        params = ", ".join(f"{k}={value_text(v)}" for k, v in outcome.best_params.items()) or "(fixed configuration)"
        seeds = outcome.cell_seeds
        cell = f" (the sweep cell of {seeds} seeds; its first seed's trial)" if seeds > 1 else ""
        click.echo(f"Best trial #{outcome.best_trial_number}{cell}: {params}")
        if len(outcome.objectives) > 1:
            values = ", ".join(map(_objective_value, outcome.objectives, outcome.best_values))
            click.echo(
                f"Selected as the Pareto-optimal trial best on the first objective ({outcome.objectives[0]}): {values}"
            )
        primary = outcome.objectives[0]
        label = f"val {outcome.metric_name}" if primary == "val_accuracy" else primary.replace("_", " ")
        fold_text = f"{folds}-fold " if folds else ""
        if seeds > 1:
            fold_text = f"{seeds} seeds x {fold_text}"
        if outcome.cv_mean is not None and primary in ("val_accuracy", "val_loss"):
            click.echo(f"CV {label}: {outcome.cv_mean:.4f} ± {outcome.cv_std or 0:.4f} ({fold_text}mean ± std)")
        elif outcome.cv_mean is not None and len(outcome.objectives) == 1:
            # fit_seconds, n_params: a number of the trial, not of each fold (several objectives: said above)
            click.echo(_objective_value(primary, outcome.cv_mean))
        test = outcome.test
        if test and test.get("trial_number") == outcome.best_trial_number and "retrain_diverged" in test:
            click.echo(
                f"Held-out test: not scored. Retraining the selected configuration on the whole training split "
                f"diverged at {test['retrain_diverged']} (lower the learning rate, or clip gradients, and run again)"
            )
        elif test and test.get("trial_number") == outcome.best_trial_number and "test_not_finite" in test:
            click.echo(
                f"Held-out test: not finite. {test['test_not_finite'].capitalize()} on its {test.get('n_test', '?')} "
                "samples, though its training loss was finite (test rows far outside the training data?)"
            )
        elif test and test.get("trial_number") == outcome.best_trial_number:
            when = " while the last trials ran" if test.get("retrained_during_search") else ""
            click.echo(
                f"Held-out test {test['metric_name']}: {test['test_metric']:.4f}, loss {test['test_loss']:.4f} "
                f"({test.get('n_test', '?')} samples; retrained on the whole training split{when}, "
                f"{test['epochs']} epoch{'' if test['epochs'] == 1 else 's'})"
            )
        if test and test.get("trial_number") == outcome.best_trial_number and test.get("earlier_trials"):
            earlier = ", ".join(f"#{n}" for n in test["earlier_trials"])
            click.echo(
                f"The test split was also scored for {earlier}, selected by an earlier run of this study; "
                "report the selected trial's score, not the best of them"
            )
        if outcome.pareto_front:
            _print_pareto_front(outcome)
    click.echo(f"Storage: {outcome.storage_url}")
    click.echo(f"Dashboard: {outcome.dashboard_command}")
    if outcome.report_path is not None:
        click.echo(f"Report: {outcome.report_path}")


#: Trials of the Pareto front that the summary lists (the rest are in trials.csv).
_FRONT_LINES = 10


def _print_pareto_front(outcome: Any) -> None:
    """The Pareto front the selection picked from, best on the first objective first."""
    front = outcome.pareto_front
    goals = ", ".join(f"{d} {o}" for o, d in zip(outcome.objectives, outcome.directions, strict=False))
    click.echo(
        f"Pareto front ({goals}): {len(front)} non-dominated completed trial{'' if len(front) == 1 else 's'} "
        f"(those that blew up left out), best {outcome.objectives[0]} first:"
    )
    shown = front[:_FRONT_LINES]
    cells = [[f"#{number}", *map(_objective_value, outcome.objectives, values)] for number, values in shown]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for (number, _), row in zip(shown, cells, strict=True):
        line = "  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True))
        mark = "  <- selected" if number == outcome.best_trial_number else ""
        click.echo(f"  {line.rstrip()}{mark}")
    if len(front) > len(shown):
        where = f"{outcome.selected_map}/trials.csv" if outcome.selected_map else "trials.csv"
        click.echo(f"  … and {len(front) - len(shown)} more; see the pareto column of {where}")


def _objective_value(objective: str, value: float) -> str:
    """``val_accuracy 0.7439``, ``n_params 1234``: an objective and its value."""
    from modelsel.results import objective_text

    return f"{objective} {objective_text(objective, value)}"


def _pruned_why(outcome: Any) -> str:
    """Which pruned trials the pruner did not stop: diverged ones and invalid configurations."""
    parts = [f"{outcome.n_diverged} diverged in training"] if outcome.n_diverged else []
    if outcome.n_invalid:
        were = "was an invalid configuration" if outcome.n_invalid == 1 else "were invalid configurations"
        parts.append(f"{outcome.n_invalid} {were}")
    where = "trials.csv"
    if outcome.maps:  # a multi-grid sweep: each map has its own trials.csv, in its own folder
        where = " and ".join(f"{m.study_name}/trials.csv" for m in outcome.maps if m.n_diverged or m.n_invalid)
    return f"Of the pruned trials, {' and '.join(parts)} (fail_reason in {where} says why)."


def _count(n: int, noun: str) -> str:
    """``1 trial``, ``3 trials``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _check_storage_flag(storage: str | None) -> None:
    """Refuse an empty ``--storage`` (``--storage ""``), which would otherwise mean the default."""
    if storage is not None and not storage.strip():
        raise UserError(
            "--storage is empty; give a storage URL such as sqlite:///path/to/study.db, or leave --storage out"
        )


def _storages(storage: str | None, output_dir: Path) -> list[str]:
    from modelsel.storage import find_default_storages

    _check_storage_flag(storage)
    return [storage] if storage else find_default_storages(output_dir)


@study.command("list")
@_stored_option
@_output_option
@_user_errors
def list_command(storage: str | None, output_dir: Path) -> None:
    """List stored studies (in --storage, else every study under OUTPUT)."""
    import optuna

    from modelsel.storage import NoStudyStorage, display_url, open_storage

    urls = _storages(storage, output_dir)
    if not urls:
        click.echo(f"No studies under {output_dir}/ (run 'modelsel study run' or pass --storage).")
        return
    for url in urls:
        try:
            opened = open_storage(url, heartbeat=False, must_exist=True)
        except NoStudyStorage as exc:
            if storage:
                raise
            click.echo(f"skipped: {exc}", err=True)  # one stray file under OUTPUT hides no other study
            continue
        summaries = optuna.get_all_study_summaries(opened, include_best_trial=False)
        for summary in sorted(summaries, key=lambda s: s.study_name):
            click.echo(f"{summary.study_name}\t{_count(summary.n_trials, 'trial')}\t{display_url(url)}")


def _locate(name: str, storage: str | None, output_dir: Path) -> str:
    from modelsel.storage import NoStudyStorage, default_storage_url, find_default_storages, study_names

    _check_storage_flag(storage)
    if storage:
        return storage
    default = default_storage_url(output_dir, name)
    candidates = [default] if Path(default.removeprefix("sqlite:///")).exists() else []
    candidates += [u for u in find_default_storages(output_dir) if u not in candidates]
    for url in candidates:
        with contextlib.suppress(NoStudyStorage):  # a stray file under OUTPUT
            if name in study_names(url):
                return url
    raise UserError(f"no study named '{name}' under {output_dir}/; pass --storage URL or --output DIR")


@study.command("show")
@click.argument("name")
@_stored_option
@_output_option
@_user_errors
def show_command(name: str, storage: str | None, output_dir: Path) -> None:
    """Print a stored study's summary."""
    from modelsel.results import stored_folds, stored_spec
    from modelsel.study import load_study, summarize

    try:
        url = _locate(name, storage, output_dir)
        study = load_study(name, url)
        outcome = summarize(study, url)
        folds = stored_folds(stored_spec(study))
    except UserError:
        maps = _stored_maps(name, storage, output_dir)  # the maps of a multi-grid sweep
        if maps is None:
            raise
        from modelsel.study import combine_map_outcomes

        url, spec, studies = maps
        outcome = combine_map_outcomes(name, [summarize(study, url) for study in studies])
        folds = spec.cv.folds
    report = output_dir / name / "report.html"
    outcome.report_path = report if report.exists() else None
    _print_outcome(outcome, folds=folds)  # as `study run` printed it


@main.group()
def report() -> None:
    """Build reports from stored studies."""


@report.command("build")
@click.argument("name")
@_stored_option
@_output_option
@_user_errors
def build_command(name: str, storage: str | None, output_dir: Path) -> None:
    """Rebuild trials.csv and report.html of study NAME from its storage alone (for a
    sweep of several grids: each map's folder, then the report of all maps)."""
    from modelsel.report import build_report
    from modelsel.storage import check_output_folder
    from modelsel.study import load_study

    try:
        study = load_study(name, _locate(name, storage, output_dir))
    except UserError:
        maps = _stored_maps(name, storage, output_dir)  # the combined report of a multi-grid sweep
        if maps is None:
            raise
        from modelsel.report import build_maps_report

        check_output_folder(output_dir / name)
        _, spec, studies = maps
        for study in studies:  # each map's own folder (trials.csv, sweep.csv, report), then the maps together
            check_output_folder(output_dir / study.study_name)
            click.echo(f"Report: {build_report(study, output_dir=output_dir / study.study_name)}")
        click.echo(f"Report: {build_maps_report(spec, studies, output_dir=output_dir / name)}")
        return
    check_output_folder(output_dir / name)
    path = build_report(study, output_dir=output_dir / name)
    click.echo(f"Report: {path}")


def _stored_maps(name: str, storage: str | None, output_dir: Path) -> tuple[str, Any, list[Any]] | None:
    """A multi-grid sweep ``name`` (its storage URL, spec and map studies) in ``storage``,
    else in its default storage ``OUTPUT/<name>/study.db``; None when there is none."""
    from modelsel.storage import default_storage_url, local_path
    from modelsel.sweeps import stored_maps

    url = storage or default_storage_url(output_dir, name)
    path = local_path(url)
    if path is not None and not path.is_file():
        return None
    found = stored_maps(url, name)
    return None if found is None else (url, *found)


def entry_point() -> None:
    """The ``modelsel`` console script: run the command, then leave without interpreter teardown.

    Finalizing an interpreter that has loaded torch, scikit-learn and seaborn takes about
    2 s (0.8 s for torch alone) and does nothing a finished command needs, so the command
    ends through :func:`modelsel.storage.close_and_exit`. Errors other than SystemExit
    propagate as usual.
    """
    try:
        main()  # click's standalone mode always ends in SystemExit
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):
        click.echo(code, err=True)
        code = 1
    from modelsel.storage import close_and_exit

    close_and_exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    entry_point()
