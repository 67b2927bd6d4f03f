"""End-to-end tests of the ``modelsel`` command line, as a user runs it."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import SignalsInItsFinalizer, files_under, tiny_spec_data

from modelsel import __version__
from modelsel.cli import main


@pytest.fixture
def workdir(fast_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory (the default ``reports/`` output lands here)."""
    monkeypatch.chdir(fast_tmp)
    return fast_tmp


@pytest.fixture
def spec_file(workdir: Path) -> Callable[..., Path]:
    import yaml

    def write(data: dict[str, object] | None = None, name: str = "tiny.yaml", **changes: object) -> Path:
        path = workdir / name
        content = tiny_spec_data(**changes) if data is None else data
        path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
        return path

    return write


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def modelsel_command() -> list[str]:
    """The installed ``modelsel`` console script, else ``python -m modelsel`` (the same command line)."""
    exe = shutil.which("modelsel")
    return [exe] if exe else [sys.executable, "-m", "modelsel"]


def assert_user_error(result: Result, *fragments: str) -> str:
    """Exit code 2, exactly one line on stderr starting with 'error:', no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    stderr = result.stderr
    assert stderr.startswith("error: ")
    assert stderr.count("\n") == 1 and stderr.endswith("\n")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in stderr
    return stderr


# ------------------------------------------------------------------- help


def test_a_bare_command_prints_its_help_not_an_error() -> None:
    # The one-line usage errors caught click's no-arguments help too: "error: Usage: ...".
    for args in ((), ("study",), ("report",)):
        result = invoke(*args)
        assert result.output.startswith("Usage: modelsel"), result.output
        assert "error:" not in result.output and "Commands:" in result.output


def test_help_lists_the_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "Usage: " in result.stdout and "study" in result.stdout and "report" in result.stdout
    study_help = invoke("study", "-h")
    assert study_help.exit_code == 0
    for command in ("run", "list", "show"):
        assert command in study_help.stdout
    run_help = invoke("study", "run", "--help")
    for option in ("--storage", "--n-trials", "--timeout", "--output", "--seed", "--device", "--workers"):
        assert option in run_help.stdout
    assert invoke("report", "build", "--help").exit_code == 0


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and "modelsel, version 0.1.0" in result.stdout


# ------------------------------------------------------------------- end to end


def test_a_one_epoch_retrain_is_printed_in_the_singular(workdir: Path, spec_file: Callable[..., Path]) -> None:
    spec = spec_file(training={"epochs": 1, "batch_size": 32, "lr": 0.01}, budget={"n_trials": 1})
    result = invoke("study", "run", str(spec), "--quiet")
    assert result.exit_code == 0, result.output
    assert "; retrained on the whole training split, 1 epoch)\n" in result.stdout, result.stdout


def test_a_study_whose_every_completed_trial_blew_up_selects_nothing(
    workdir: Path, spec_file: Callable[..., Path]
) -> None:
    # Adam at lr 1e6 completes with a finite cross-entropy near 1e12: it was selected and
    # its retrain scored the test split.
    training = {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 1.0e6}
    spec = spec_file(search=None, training=training, budget={"n_trials": 1})
    result = invoke("study", "run", str(spec), "--quiet")
    assert result.exit_code == 0, result.output
    assert "1 trial finished (1 complete, 0 pruned, 0 failed)" in result.stdout
    assert "Every completed trial blew up in training (regime diverged), so nothing was selected" in result.stdout
    assert "Held-out test" not in result.stdout


@pytest.mark.slow
def test_study_run_end_to_end_then_resume_list_show_and_report(
    workdir: Path, spec_file: Callable[..., Path]
) -> None:
    spec = spec_file()
    result = invoke("study", "run", str(spec), "--quiet")
    assert result.exit_code == 0, result.output
    out = result.stdout
    db = (workdir / "reports" / "tiny" / "study.db").resolve()
    assert "Study tiny: 2 trials finished (2 complete, 0 pruned, 0 failed); 2 run in this invocation." in out
    assert "Gradient flow" not in out  # every trial healthy: nothing to say
    # Parameters in the order the spec searches them.
    assert re.search(r"^Best trial #\d+: width=\d+, lr=0\.\d+$", out, flags=re.MULTILINE), out
    cv_line = r"^CV val accuracy: (0\.\d{4}|1\.0000) ± (\d\.\d{4}) \(2-fold mean ± std\)$"
    assert re.search(cv_line, out, flags=re.MULTILINE), out
    assert re.search(
        r"^Held-out test accuracy: \d\.\d{4}, loss \d+\.\d{4} \(40 samples; retrained on the whole training split, "
        r"2 epochs\)$",
        out,
        flags=re.MULTILINE,
    ), out
    assert f"Storage: sqlite:///{db}\n" in out
    assert f"Dashboard: optuna-dashboard sqlite:///{db}\n" in out
    report = Path("reports") / "tiny" / "report.html"
    assert f"Report: {report}\n" in out
    assert report.is_file() and (workdir / "reports" / "tiny" / "trials.csv").is_file()

    # The same command again resumes: nothing to train, the same summary.
    again = invoke("study", "run", str(spec), "--quiet")
    assert again.exit_code == 0, again.output
    assert "2 trials finished (2 complete, 0 pruned, 0 failed); 0 run in this invocation." in again.stdout
    assert again.stdout.splitlines()[1:] == out.splitlines()[1:]

    # A larger budget tops the study up.
    more = invoke("study", "run", str(spec), "--quiet", "--n-trials", "3")
    assert more.exit_code == 0, more.output
    assert "3 trials finished (3 complete, 0 pruned, 0 failed); 1 run in this invocation." in more.stdout

    listed = invoke("study", "list")
    assert listed.exit_code == 0, listed.output
    assert listed.stdout == f"tiny\t3 trials\tsqlite:///{db}\n"
    listed_by_url = invoke("study", "list", "--storage", f"sqlite:///{db}")
    assert listed_by_url.stdout == listed.stdout

    shown = invoke("study", "show", "tiny")
    assert shown.exit_code == 0, shown.output
    assert "Study tiny: 3 trials finished" in shown.stdout
    assert re.search(r"^Best trial #\d+: width=\d+, lr=", shown.stdout, flags=re.MULTILINE)
    assert "CV val accuracy: " in shown.stdout and "Held-out test accuracy: " in shown.stdout
    assert "(2-fold mean ± std)" in shown.stdout  # as `study run` says it (show said "(mean ± std)")
    assert f"Report: {report}\n" in shown.stdout
    assert "while the last trials ran" not in shown.stdout
    # With --workers, the selected trial may have been retrained before the search ended.
    stored = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    stored.set_user_attr("test_result", {**stored.user_attrs["test_result"], "retrained_during_search": True})
    shown = invoke("study", "show", "tiny")
    assert "; retrained on the whole training split while the last trials ran, 2 epochs)" in shown.stdout

    report.unlink()
    (workdir / "reports" / "tiny" / "trials.csv").unlink()
    built = invoke("report", "build", "tiny")
    assert built.exit_code == 0, built.output
    assert built.stdout == f"Report: {report}\n"
    assert report.is_file() and (workdir / "reports" / "tiny" / "trials.csv").is_file()
    assert "tiny" in report.read_text(encoding="utf-8")

    # --storage and --output work for another folder.
    elsewhere = invoke("report", "build", "tiny", "--storage", f"sqlite:///{db}", "--output", "elsewhere")
    assert elsewhere.exit_code == 0, elsewhere.output
    assert (workdir / "elsewhere" / "tiny" / "report.html").is_file()


def test_study_run_with_a_journal_storage_and_output_folder(workdir: Path, spec_file: Callable[..., Path]) -> None:
    spec = spec_file(budget={"n_trials": 1})
    (workdir / "runs").mkdir()
    result = invoke("study", "run", str(spec), "--quiet", "--storage", "journal:runs/tiny.log", "--output", "out")
    assert result.exit_code == 0, result.output
    assert "Storage: journal:runs/tiny.log\n" in result.stdout
    assert "Dashboard: optuna-dashboard runs/tiny.log\n" in result.stdout
    assert (workdir / "out" / "tiny" / "report.html").is_file()
    assert not (workdir / "out" / "tiny" / "study.db").exists()
    listed = invoke("study", "list", "--storage", "journal:runs/tiny.log")
    assert listed.stdout == "tiny\t1 trial\truns/tiny.log\n"


def test_study_list_without_studies(workdir: Path) -> None:
    result = invoke("study", "list")
    assert result.exit_code == 0
    assert result.stdout == "No studies under reports/ (run 'modelsel study run' or pass --storage).\n"
    assert files_under(workdir) == []


def test_a_file_under_reports_that_holds_no_study_is_skipped_and_left_as_it_is(
    workdir: Path, spec_file: Callable[..., Path]
) -> None:
    assert invoke("study", "run", str(spec_file(budget={"n_trials": 1}))).exit_code == 0
    (workdir / "reports" / "junk").mkdir()
    (workdir / "reports" / "junk" / "study.db").write_text("hello", encoding="utf-8")
    (workdir / "reports" / "empty").mkdir()
    (workdir / "reports" / "empty" / "study.db").touch()
    (workdir / "reports" / "notes").mkdir()
    (workdir / "reports" / "notes" / "study.log").write_text("not a journal\n", encoding="utf-8")
    listed = invoke("study", "list")
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.startswith("tiny\t1 trial\t")
    assert "reports/junk/study.db is not a study storage (file is not a database)" in listed.stderr
    assert "reports/empty/study.db holds no Optuna studies" in listed.stderr
    assert "reports/notes/study.log is not an Optuna journal file" in listed.stderr  # was exit 2 after the list
    assert (workdir / "reports" / "empty" / "study.db").stat().st_size == 0  # nothing written into it
    assert invoke("study", "show", "tiny").exit_code == 0
    # Named explicitly, such a file is an error.
    assert_user_error(
        invoke("study", "list", "--storage", f"sqlite:///{workdir}/reports/empty/study.db"), "holds no Optuna studies"
    )
    assert (workdir / "reports" / "empty" / "study.db").stat().st_size == 0


def test_a_study_storage_that_cannot_be_read_is_an_error_not_skipped(
    workdir: Path, spec_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # E.g. a WAL-mode study on a read-only file system: a study is there, so `study list`
    # must not report it as a stray file and exit 0 with nothing listed.
    import sqlite3

    assert invoke("study", "run", str(spec_file(budget={"n_trials": 1}))).exit_code == 0

    def unreadable(*args: object, **kwargs: object) -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(sqlite3, "connect", unreadable)
    assert_user_error(invoke("study", "list"), "cannot open storage", "unable to open database file")


# ------------------------------------------------------------------- bad input


def assert_nothing_written(workdir: Path, *keep: str) -> None:
    assert [p.name for p in files_under(workdir)] == sorted(keep)


def test_unknown_spec_key(workdir: Path, spec_file: Callable[..., Path]) -> None:
    data = tiny_spec_data()
    data["model"]["widht"] = 8  # type: ignore[index]
    spec = spec_file(data)
    stderr = assert_user_error(invoke("study", "run", str(spec)), "model.widht: unknown key", "allowed keys: ")
    assert stderr.startswith(f"error: {spec}: ")
    assert_nothing_written(workdir, "tiny.yaml")


def test_wrong_type_and_impossible_range(workdir: Path, spec_file: Callable[..., Path]) -> None:
    spec = spec_file(cv={"folds": "two"})
    assert_user_error(invoke("study", "run", str(spec)), "cv.folds: ")
    search = tiny_spec_data()["search"]
    search["lr"] = {"type": "log", "low": 0.1, "high": 0.001}
    spec = spec_file(search=search)
    assert_user_error(invoke("study", "run", str(spec)), "search.lr: low (0.1) is above high (0.001); swap them")
    assert_nothing_written(workdir, "tiny.yaml")


def test_fold_epochs_flag_caps_the_compute_and_keeps_the_spec_budget(
    workdir: Path, spec_file: Callable[..., Path]
) -> None:
    spec = spec_file(budget={"n_trials": 2})
    # One trial at its longest is 2 epochs x 2 folds.
    assert_user_error(
        invoke("study", "run", str(spec), "--fold-epochs", "3"),
        "--fold-epochs 3 is less than one trial at its longest (2 epochs × 2 folds = 4); give at least 4",
    )
    assert_nothing_written(workdir, "tiny.yaml")
    # The spec's n_trials still applies: 2 trials come first.
    result = invoke("study", "run", str(spec), "--quiet", "--fold-epochs", "13")
    assert result.exit_code == 0, result.output
    assert "Study tiny: 2 trials finished (2 complete, 0 pruned, 0 failed); 2 run in this invocation." in result.stdout
    assert "Trained 8 fold-epochs of the budget's 13 (epochs x folds, summed over trials).\n" in result.stdout
    # With more trials allowed the cap comes first: 3 trials fit in 13, a fourth would not.
    more = invoke("study", "run", str(spec), "--quiet", "--fold-epochs", "13", "--n-trials", "5")
    assert more.exit_code == 0, more.output
    assert "Study tiny: 3 trials finished (3 complete, 0 pruned, 0 failed); 1 run in this invocation." in more.stdout
    assert "Trained 12 fold-epochs of the budget's 13 (epochs x folds, summed over trials).\n" in more.stdout


def test_invalid_yaml(workdir: Path) -> None:
    (workdir / "broken.yaml").write_text("name: tiny\nmodel: {depth: 1\n", encoding="utf-8")
    assert_user_error(invoke("study", "run", "broken.yaml"), "broken.yaml: invalid YAML at line ")
    assert_nothing_written(workdir, "broken.yaml")


def test_missing_spec_file(workdir: Path) -> None:
    assert_user_error(invoke("study", "run", "nope.yaml"), "spec file not found: nope.yaml")
    assert_nothing_written(workdir)


def test_bad_storage_url(workdir: Path, spec_file: Callable[..., Path]) -> None:
    spec = spec_file()
    assert_user_error(invoke("study", "run", str(spec), "--storage", "mongodb://host/db"), "is not supported")
    assert_user_error(
        invoke("study", "run", str(spec), "--storage", "sqlite:///no/such/folder/s.db"),
        "folder no/such/folder does not exist",
    )
    assert_user_error(invoke("study", "list", "--storage", "sqlite://s.db"), "is malformed")
    assert_nothing_written(workdir, "tiny.yaml")


def test_empty_storage_url(workdir: Path, spec_file: Callable[..., Path]) -> None:
    # Without a check, '' on the command line meant the default storage, and in the spec a
    # "folder does not exist" error about the default's folder.
    spec = spec_file()
    flag = "--storage is empty; give a storage URL such as sqlite:///path/to/study.db, or leave --storage out"
    assert_user_error(invoke("study", "run", str(spec), "--storage", ""), flag)
    assert_user_error(invoke("study", "list", "--storage", " "), flag)
    assert_user_error(invoke("study", "show", "tiny", "--storage", ""), flag)
    assert_user_error(invoke("report", "build", "tiny", "--storage", ""), flag)
    in_spec = spec_file(storage="")
    assert_user_error(
        invoke("study", "run", str(in_spec)),
        f"{in_spec}: storage: the storage URL is empty; give one such as sqlite:///path/to/study.db, "
        "or leave 'storage' out",
    )
    assert_nothing_written(workdir, "tiny.yaml")


def test_unknown_study_name(workdir: Path, spec_file: Callable[..., Path]) -> None:
    assert_user_error(invoke("study", "show", "nosuch"), "no study named 'nosuch' under reports/")
    assert_user_error(invoke("report", "build", "nosuch"), "no study named 'nosuch' under reports/")
    assert_nothing_written(workdir)
    # Looking into a storage file that does not exist creates no database.
    assert_user_error(invoke("study", "show", "nosuch", "--storage", "sqlite:///typo.db"), "typo.db")
    assert_user_error(invoke("study", "list", "--storage", "sqlite:///typo.db"), "typo.db")
    assert_user_error(invoke("report", "build", "nosuch", "--storage", "journal:typo.log"), "typo.log")
    assert_nothing_written(workdir)


def test_unknown_study_name_in_an_existing_storage(workdir: Path, spec_file: Callable[..., Path]) -> None:
    spec = spec_file(budget={"n_trials": 1})
    assert invoke("study", "run", str(spec), "--quiet", "--storage", "sqlite:///s.db").exit_code == 0
    before = files_under(workdir)
    assert_user_error(
        invoke("report", "build", "other", "--storage", "sqlite:///s.db"),
        "no study named 'other' in sqlite:///s.db (studies there: tiny)",
    )
    assert files_under(workdir) == before


def test_a_report_folder_that_cannot_be_written_fails_before_training(
    workdir: Path, spec_file: Callable[..., Path]
) -> None:
    # It used to train every trial and then fail with a traceback writing the report.
    spec = spec_file(budget={"n_trials": 1})
    (workdir / "out").mkdir()
    (workdir / "out" / "tiny").write_text("a file where the report folder goes", encoding="utf-8")
    run = invoke("study", "run", str(spec), "--output", "out", "--storage", "sqlite:///s.db")
    assert_user_error(run, f"report folder {workdir / 'out' / 'tiny'}: ", "is not a folder; pass --output DIR")
    assert_nothing_written(workdir, "out", "tiny", "tiny.yaml")
    assert invoke("study", "run", str(spec), "--quiet", "--storage", "sqlite:///s.db").exit_code == 0
    before = files_under(workdir)
    assert_user_error(
        invoke("report", "build", "tiny", "--output", "out", "--storage", "sqlite:///s.db"), "is not a folder"
    )
    assert files_under(workdir) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_report_folder_on_a_filesystem_that_takes_no_files_fails_before_training(
    workdir: Path, spec_file: Callable[..., Path]
) -> None:
    # As root, os.access said /proc was writable: the run trained and then failed writing.
    spec = spec_file(budget={"n_trials": 1})
    run = invoke("study", "run", str(spec), "--output", "/proc/modelsel-reports", "--storage", "sqlite:///s.db")
    assert_user_error(
        run,
        "report folder /proc/modelsel-reports/tiny: cannot write in /proc (it takes no new files); "
        "pass --output DIR with a writable folder",
    )
    assert_nothing_written(workdir, "tiny.yaml")


def test_a_first_objective_that_is_not_a_fold_mean_is_printed_without_a_fold_std(
    workdir: Path, spec_file: Callable[..., Path]
) -> None:
    # "CV fit seconds: 0.0362 ± 0.0000 (2-fold mean ± std)" was one number with a made-up ± 0.
    spec = spec_file(objectives=["fit_seconds", "val_accuracy"], sampler="nsga2", budget={"n_trials": 2})
    result = invoke("study", "run", str(spec), "--quiet")
    assert result.exit_code == 0, result.output
    assert "CV fit seconds" not in result.output
    # Nor printed twice, two ways ("n_params 13202" above, then "N params: 1.32e+04").
    assert "Fit seconds:" not in result.output
    # Why this trial, and what it traded: every objective, and the front it was picked from.
    best = re.search(r"^Best trial #(\d+)", result.output, flags=re.MULTILINE)
    assert best is not None, result.output
    assert re.search(
        r"^Selected as the Pareto-optimal trial best on the first objective \(fit_seconds\): "
        r"fit_seconds \d\S*, val_accuracy \d\.\d{4}$",
        result.output,
        flags=re.MULTILINE,
    ), result.output
    assert "Pareto front (minimize fit_seconds, maximize val_accuracy): " in result.output
    selected = rf"^  #{best[1]} +fit_seconds \S+ +val_accuracy \S+  <- selected$"
    assert re.search(selected, result.output, flags=re.MULTILINE), result.output


def test_study_show_of_a_multi_objective_study_lists_its_pareto_front(workdir: Path) -> None:
    url = f"sqlite:///{workdir}/mo.db"
    study = optuna.create_study(study_name="mo", storage=url, directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["val_accuracy", "n_params"])
    blown = {"regime": "diverged", "regime_evidence": {"train_loss_first": 2.3, "train_loss_last": 1e6}}
    study.add_trial(optuna.trial.create_trial(values=[0.99, 10], user_attrs=blown))  # dominates all; not selectable
    study.add_trial(optuna.trial.create_trial(values=[0.5, 99999]))  # dominated
    for i in range(12):  # each trades accuracy for size: all on the front
        study.add_trial(optuna.trial.create_trial(values=[0.6 + 0.01 * i, 1000 + 10000 * i]))
    shown = invoke("study", "show", "mo", "--storage", url)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    start = lines.index("Best trial #13: (fixed configuration)")
    end = next(i for i, line in enumerate(lines) if line.startswith("Storage: "))
    assert lines[start + 1 : end] == [
        "Selected as the Pareto-optimal trial best on the first objective (val_accuracy): "
        "val_accuracy 0.7100, n_params 111000",
        "Pareto front (maximize val_accuracy, minimize n_params): 12 non-dominated completed trials "
        "(those that blew up left out), best val_accuracy first:",
        "  #13  val_accuracy 0.7100  n_params 111000  <- selected",
        "  #12  val_accuracy 0.7000  n_params 101000",
        "  #11  val_accuracy 0.6900  n_params 91000",
        "  #10  val_accuracy 0.6800  n_params 81000",
        "  #9   val_accuracy 0.6700  n_params 71000",
        "  #8   val_accuracy 0.6600  n_params 61000",
        "  #7   val_accuracy 0.6500  n_params 51000",
        "  #6   val_accuracy 0.6400  n_params 41000",
        "  #5   val_accuracy 0.6300  n_params 31000",
        "  #4   val_accuracy 0.6200  n_params 21000",
        "  … and 2 more; see the pareto column of trials.csv",
    ]


def _sweep_spec(
    spec_file: Callable[..., Path], name: str, sweep: Any, *, training: dict[str, Any], **fields: Any
) -> Path:
    """A spec file of a sweep (no search, sampler or trial budget: the grid is its budget)
    training one epoch at batch 32 with ``training``'s other settings."""
    data = tiny_spec_data(name=name, search=None, sampler=None, budget=None, sweep=sweep, **fields)
    data["training"] = {"epochs": 1, "batch_size": 32, **training}
    return spec_file(data)


def test_the_summary_counts_the_trials_whose_gradients_vanished_or_exploded(
    workdir: Path, spec_file: Callable[..., Path]
) -> None:
    # 10 ReLU layers at PyTorch's default init (vanishing), with He init (healthy), and an
    # lr that blows training up (exploding).
    spec = _sweep_spec(
        spec_file,
        "flow",
        {"init": ["default", "kaiming_normal"], "lr": [0.01, 1.0e12]},
        training={"optimizer": "sgd", "lr": 0.01},
        model={"width": 16, "depth": 10, "activation": "relu", "init": "kaiming_normal"},
    )
    result = invoke("study", "run", str(spec), "--quiet")
    assert result.exit_code == 0, result.output
    expected = (
        "Gradient flow: 1 vanishing, 1 healthy, 2 exploding (gradient_flow in trials.csv; "
        "the report's Gradient flow section explains).\n"
    )
    assert expected in result.stdout
    shown = invoke("study", "show", "flow")
    assert expected in shown.stdout


def test_the_pareto_front_of_a_multi_grid_sweep_points_at_the_selected_map_s_trials_csv(
    workdir: Path, spec_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelsel.cli

    monkeypatch.setattr(modelsel.cli, "_FRONT_LINES", 1)  # so that a front of two trials has more to see
    spec = _sweep_spec(
        spec_file,
        "fronts",
        [{"width": [2, 64]}, {"depth": [1, 2]}],
        training={"optimizer": "adam", "lr": 0.01},
        objectives=["val_accuracy", "n_params"],
    )
    result = invoke("study", "run", str(spec), "--quiet")
    assert result.exit_code == 0, result.output
    best = re.search(r"^Study fronts \[2 maps; best: (fronts-\w+)\]", result.stdout, flags=re.MULTILINE)
    assert best is not None, result.stdout
    assert f"more; see the pareto column of {best[1]}/trials.csv" in result.stdout
    assert (workdir / "reports" / best[1] / "trials.csv").exists()


def test_a_retrain_that_diverges_is_reported_and_the_run_and_its_rerun_finish(
    workdir: Path, spec_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The folds trained sanely, but the retrain on the whole split (more steps) reached NaN.
    # This used to end the run with a Diverged traceback before the report, on every rerun.
    # (A trial whose folds blew up is not selected, so no retrain of it is tried.)
    import modelsel.cv
    from modelsel.training import Diverged

    def diverging_retrain(*args: object, **kwargs: object) -> None:
        raise Diverged(0, 0, "training loss is nan")

    monkeypatch.setattr(modelsel.cv, "fit_final", diverging_retrain)
    spec = spec_file(budget={"n_trials": 1})
    for _ in range(2):
        result = invoke("study", "run", str(spec), "--quiet")
        assert result.exit_code == 0, result.output
        assert "Held-out test: not scored. Retraining the selected configuration" in result.output
        assert "diverged at epoch 1: training loss is nan" in result.output
    html = (workdir / "reports" / "tiny" / "report.html").read_text(encoding="utf-8")
    assert "not scored: the retrain on the whole training split diverged" in html


def test_a_test_loss_that_is_not_finite_is_reported_and_the_run_and_its_rerun_finish(
    workdir: Path, spec_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Test rows far outside the training data (a CSV value of 1e30) gave an inf test loss
    # after a finite retrain: an ArithmeticError traceback, and no report.
    import modelsel.cv

    monkeypatch.setattr(modelsel.cv, "evaluate", lambda *args, **kwargs: (math.inf, 0.5))
    spec = spec_file(budget={"n_trials": 1})
    for _ in range(2):
        result = invoke("study", "run", str(spec), "--quiet")
        assert result.exit_code == 0, result.output
        assert "Held-out test: not finite. The retrained model's test loss is inf on its" in result.output
    html = (workdir / "reports" / "tiny" / "report.html").read_text(encoding="utf-8")
    assert "not finite: the retrained model's test loss is inf" in html


def test_the_summary_says_which_pruned_trials_no_pruner_stopped(
    workdir: Path, spec_file: Callable[..., Path]
) -> None:
    # With no pruner, "1 pruned" read as the pruner's work: it was an invalid combination
    # of searched values (batch norm with batches of 1), and another trial diverged.
    spec = spec_file(
        search={"batch_size": [1, 8], "batch_norm": [True], "lr": [0.01, 1.0e12]},
        model={"depth": 1, "width": 4},
        training={"epochs": 1, "optimizer": "sgd"},
        sampler="grid",
        budget={"n_trials": 4},
    )
    result = invoke("study", "run", str(spec), "--quiet")
    assert result.exit_code == 0, result.output
    assert "4 trials finished (1 complete, 3 pruned, 0 failed)" in result.stdout
    expected = "Of the pruned trials, 1 diverged in training and 2 were invalid configurations (fail_reason in"
    assert expected in result.stdout


def test_the_summary_of_a_multi_grid_sweep_points_at_the_trials_csv_of_the_maps_with_diverged_trials(
    workdir: Path, spec_file: Callable[..., Path]
) -> None:
    # Each grid is its own study with its own trials.csv; the sweep's folder has none. Only
    # the maps with such trials are named (five long map names made one unreadable line).
    spec = _sweep_spec(spec_file, "maps", [{"lr": [0.01, 1.0e12]}, {"width": [4]}], training={"optimizer": "sgd"})
    result = invoke("study", "run", str(spec), "--quiet")
    assert result.exit_code == 0, result.output
    expected = "Of the pruned trials, 1 diverged in training (fail_reason in maps-lr/trials.csv says why)."
    assert expected in result.stdout
    assert (workdir / "reports" / "maps-lr" / "trials.csv").exists()
    shown = invoke("study", "show", "maps")
    assert shown.exit_code == 0, shown.output
    assert expected in shown.stdout


def test_a_study_without_stored_objectives_names_them_as_the_report_does(workdir: Path) -> None:
    # study show said "maximize value, minimize value" where trials.csv says value_0, value_1.
    url = f"sqlite:///{workdir}/plain.db"
    study = optuna.create_study(study_name="plain", storage=url, directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.6, 20.0]))
    shown = invoke("study", "show", "plain", "--storage", url)
    assert shown.exit_code == 0, shown.output
    assert "Pareto front (maximize value_0, minimize value_1)" in shown.stdout
    assert "value 0" not in shown.stdout


def test_n_trials_must_be_positive(workdir: Path, spec_file: Callable[..., Path]) -> None:
    spec = spec_file()
    result = invoke("study", "run", str(spec), "--n-trials", "0")
    assert_user_error(result, "Invalid value for '--n-trials'", "(see 'modelsel study run --help')")
    assert_nothing_written(workdir, "tiny.yaml")


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        # Each printed click's usage block, a hint and a blank line before the error.
        (["--seed", "abc"], "Invalid value for '--seed': 'abc' is not a valid integer"),
        (["--workers", "0"], "Invalid value for '--workers': 0 is not in the range x>=1"),
        (["--device", "gpu"], "Invalid value for '--device': 'gpu' is not one of 'auto', 'cpu', 'cuda'"),
        (["--n-trial", "3"], "No such option '--n-trial'. Did you mean '--n-trials'?"),
    ],
)
def test_a_bad_flag_is_one_line(workdir: Path, spec_file: Callable[..., Path], flags: list[str], says: str) -> None:
    result = invoke("study", "run", str(spec_file()), *flags)
    assert_user_error(result, says, "(see 'modelsel study run --help')")
    assert_nothing_written(workdir, "tiny.yaml")


@pytest.mark.parametrize("timeout", ["nan", "inf"])
def test_timeout_must_be_finite(workdir: Path, spec_file: Callable[..., Path], timeout: str) -> None:
    spec = spec_file()
    result = invoke("study", "run", str(spec), "--timeout", timeout)
    assert_user_error(result, f"--timeout must be a finite number of seconds, got {timeout}; e.g. --timeout 600")
    assert_nothing_written(workdir, "tiny.yaml")


def test_too_many_folds_for_the_data(workdir: Path, spec_file: Callable[..., Path]) -> None:
    spec = spec_file(dataset={**tiny_spec_data()["dataset"], "train_size": 6}, cv={"folds": 4})
    assert_user_error(invoke("study", "run", str(spec)), "cv.folds is 4 but a class has only")
    assert_nothing_written(workdir, "tiny.yaml")


def test_changed_spec_or_seed_on_resume(workdir: Path, spec_file: Callable[..., Path]) -> None:
    spec = spec_file(budget={"n_trials": 1})
    assert invoke("study", "run", str(spec), "--quiet").exit_code == 0
    assert_user_error(invoke("study", "run", str(spec), "--seed", "1"), "differs in: seed")
    spec_file(budget={"n_trials": 1}, training={"epochs": 3, "batch_size": 32, "lr": 0.01})
    assert_user_error(invoke("study", "run", str(spec)), "differs in: training.epochs")
    # The device is not part of what a study measures.
    resumed = invoke("study", "run", str(spec_file(budget={"n_trials": 1})), "--quiet", "--device", "cpu")
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(workdir: Path, spec_file: Callable[..., Path]) -> None:
    spec = spec_file()
    assert_user_error(invoke("study", "run", str(spec), "--device", "cuda"), "use --device cpu")
    assert_nothing_written(workdir, "tiny.yaml")


# ------------------------------------------------------------------- the quickstart


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path: Path) -> None:
    """`modelsel study run` with no argument, through the installed entry point (3 of its 30 trials)."""
    command = modelsel_command()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, "study", "run", "--n-trials", "3", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Study quickstart: 3 trials finished" in out
    assert re.search(r"^Best trial #\d+: width=\d+, depth=\d+, activation=\w+, lr=", out, flags=re.MULTILINE), out
    assert "(5-fold mean ± std)" in out
    assert "Held-out test accuracy: " in out and "(360 samples;" in out
    db = (tmp_path / "reports" / "quickstart" / "study.db").resolve()
    assert f"Storage: sqlite:///{db}\n" in out
    assert f"Dashboard: optuna-dashboard sqlite:///{db}\n" in out
    assert "Report: reports/quickstart/report.html\n" in out
    assert (tmp_path / "reports" / "quickstart" / "report.html").is_file()
    # The entry point leaves with os._exit after closing its storages: SQLite has folded
    # its write-ahead log into study.db, so the file alone holds every trial.
    assert sorted(p.name for p in db.parent.glob("study.db*")) == ["study.db"]
    show = subprocess.run(
        [*command, "study", "show", "quickstart"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert show.returncode == 0, show.stderr
    assert "quickstart: 3 trials finished" in show.stdout
    assert sorted(p.name for p in db.parent.glob("study.db*")) == ["study.db"]


def test_the_entry_point_keeps_exit_codes_and_flushes_its_output(tmp_path: Path) -> None:
    command = modelsel_command()
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120)
    assert (version.returncode, version.stdout.strip()) == (0, f"modelsel, version {__version__}")
    missing = subprocess.run(
        [*command, "study", "run", "nowhere.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1
    usage = subprocess.run([*command, "study", "run", "--workers", "0"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "Invalid value for '--workers'" in usage.stderr


def test_python_dash_m_modelsel_is_the_same_command(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "modelsel"]
    version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120)
    assert (version.returncode, version.stdout.strip()) == (0, f"modelsel, version {__version__}")
    usage = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and usage.stdout.startswith("Usage: python -m modelsel "), usage.stdout
    missing = subprocess.run(
        [*command, "study", "run", "nowhere.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1


def finished_trials_read_only(db: Path) -> int:
    """Finished trials in a SQLite study file, read without creating or changing anything
    (the run being watched may be creating the tables right now)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as connection:
            (count,) = connection.execute(
                "SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED', 'FAIL')"
            ).fetchone()
    except sqlite3.Error:  # no file or no tables yet
        return 0
    return int(count)


@pytest.mark.slow
def test_ctrl_c_during_a_two_worker_run_exits_130_cleanly(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group: one line on how to resume, no leaked semaphores."""
    import signal

    import yaml

    data = tiny_spec_data(name="interrupted", budget={"n_trials": 200})
    data["training"] = {**data["training"], "epochs": 30}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    command = modelsel_command()
    # A child of a non-interactive shell may inherit SIGINT ignored; start it with the default.
    process = subprocess.Popen(
        [*command, "study", "run", "spec.yaml", "--workers", "2", "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    db = tmp_path / "reports" / "interrupted" / "study.db"
    deadline = time.monotonic() + 120
    finished = 0
    while finished < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        finished = finished_trials_read_only(db)
    if process.poll() is not None:
        pytest.fail(f"the run ended before Ctrl-C (exit {process.returncode}): {process.communicate()[1][-3000:]}")
    assert finished >= 2, "the run should have finished two trials within two minutes"
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted: finished trials are kept; run the same command again to resume" in stderr
    assert "leaked semaphore" not in stderr
    assert "Traceback" not in stderr  # a trial that Ctrl-C stopped is one line, in either process


def spawned_workers(parent: int) -> list[int]:
    """Process ids of the ``--workers`` processes a run has spawned (not its resource tracker)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
@pytest.mark.parametrize(
    ("target", "signum", "code", "message"),
    [
        ("parent", "SIGTERM", 143, "terminated: finished trials are kept; run the same command again to resume"),
        ("worker", "SIGTERM", 1, "error: worker 1 was terminated (SIGTERM); its running trial is stored as failed"),
        ("worker", "SIGKILL", 1, "error: worker 1 exited with code -9 (killed? out of memory?)"),
    ],
)
def test_a_two_worker_run_stopped_by_a_signal_stops_whole_and_says_so(
    tmp_path: Path, target: str, signum: str, code: int, message: str
) -> None:
    """SIGTERM to the calling process stops the run as Ctrl-C does, leaving no worker
    training on its own; a worker terminated or killed from outside stops the run with
    exit code 1 (not a success short of its budget), and its trial is not left running."""
    import signal
    import sqlite3

    import yaml

    data = tiny_spec_data(name="signalled", budget={"n_trials": 200})
    data["training"] = {**data["training"], "epochs": 30}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    process = subprocess.Popen(
        [*modelsel_command(), "study", "run", "spec.yaml", "--workers", "2", "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    db = tmp_path / "reports" / "signalled" / "study.db"
    deadline = time.monotonic() + 120
    while finished_trials_read_only(db) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
    if process.poll() is not None:
        pytest.fail(f"the run ended before the signal (exit {process.returncode}): {process.communicate()[1][-3000:]}")
    workers = spawned_workers(process.pid)
    assert len(workers) == 1, workers
    os.kill(process.pid if target == "parent" else workers[0], getattr(signal, signum))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert message in stderr
    assert "Traceback" not in stderr and "leaked semaphore" not in stderr
    finished_at_exit = finished_trials_read_only(db)
    time.sleep(3)  # a worker left behind would go on adding trials
    assert finished_trials_read_only(db) == finished_at_exit
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
        (running,) = connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'").fetchone()
    assert running == 0


def test_reading_a_stored_study_does_not_load_the_training_stack() -> None:
    """`study show`, `study list` and `report build` only read storage: no torch, no scikit-learn splitters."""
    code = (
        "import sys, modelsel.cli, modelsel.study, modelsel.report; "
        "print(sorted(m for m in ('torch', 'sklearn.model_selection') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("interrupted", [True, False])
def test_an_error_raised_while_handling_ctrl_c_still_exits_130(
    workdir: Path, spec_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, interrupted: bool
) -> None:
    """A Ctrl-C that lands inside a library's cleanup can surface as another error raised
    while the KeyboardInterrupt is handled (Optuna's trial loop once raised UnboundLocalError
    there): still the resume line and 130. Any other error is not disguised as an interrupt."""
    import modelsel.study

    def broken_run_study(*args: object, **kwargs: object) -> None:
        try:
            if interrupted:
                raise KeyboardInterrupt
            raise ValueError("the cause")
        except BaseException:
            raise UnboundLocalError("cannot access local variable 'updated_state'") from None

    monkeypatch.setattr(modelsel.study, "run_study", broken_run_study)
    result = invoke("study", "run", str(spec_file()))
    if interrupted:
        assert result.exit_code == 130, result.output
        assert "interrupted: finished trials are kept" in result.stderr
    else:
        assert isinstance(result.exception, UnboundLocalError)
        assert "interrupted" not in result.stderr


def test_an_error_after_a_library_swallowed_ctrl_c_still_exits_130(
    workdir: Path, spec_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optuna catches the KeyboardInterrupt of Ctrl-C to store the running trial as failed;
    when that store fails (seen: "database is locked"), its trial loop raises AssertionError
    with no KeyboardInterrupt in the chain. A real SIGINT was received: still 130."""
    import signal

    import modelsel.study

    def run_study_interrupted_then_broken(*args: object, **kwargs: object) -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises KeyboardInterrupt here
        except KeyboardInterrupt:
            pass  # a library catches it to clean up
        raise AssertionError("Should not reach.")

    monkeypatch.setattr(modelsel.study, "run_study", run_study_interrupted_then_broken)
    result = invoke("study", "run", str(spec_file()))
    assert result.exit_code == 130, result.output
    assert "interrupted: finished trials are kept" in result.stderr
    # The command restored the handler it found.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_that_lands_in_a_finalizer_is_not_lost(
    workdir: Path, spec_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python swallows a KeyboardInterrupt raised inside a finalizer (seen: a weakref callback
    of SQLAlchemy's ORM), and the run went on to its last trial with exit 0. The command
    delivers that Ctrl-C again once the finalizer is done."""
    import signal

    import modelsel.study

    def run_study_whose_ctrl_c_lands_in_a_finalizer(*args: object, **kwargs: object) -> None:
        SignalsInItsFinalizer(signal.SIGINT)  # dropped at once: its finalizer runs here
        time.sleep(5)  # a delivered Ctrl-C interrupts this
        sys.exit(0)  # the run "finished": what happened when the Ctrl-C was lost

    monkeypatch.setattr(modelsel.study, "run_study", run_study_whose_ctrl_c_lands_in_a_finalizer)
    hook_before = sys.unraisablehook
    result = invoke("study", "run", str(spec_file()))
    assert result.exit_code == 130, result.output
    assert "interrupted: finished trials are kept" in result.stderr
    assert sys.unraisablehook is hook_before
