"""Tests of modelsel.storage: URL kinds, redaction, checks, journal files and a real PostgreSQL server."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner
from conftest import files_under, tiny_spec_data

from modelsel.cli import main
from modelsel.errors import StorageError, UserError
from modelsel.spec import parse_spec
from modelsel.storage import (
    check_storage_url,
    default_storage_url,
    display_url,
    fail_unfinished_trials,
    find_default_storages,
    local_path,
    open_storage,
    redact,
    storage_kind,
    study_names,
)
from modelsel.study import load_study, run_study

PG_BIN = Path(os.environ.get("MODELSEL_PG_BIN", "/usr/lib/postgresql/15/bin"))


def one_line_error(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ------------------------------------------------------------------- URL kinds


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("sqlite:///study.db", "sqlite"),
        ("sqlite:////abs/path/study.db", "sqlite"),
        ("postgresql://user@host/db", "postgresql"),
        ("postgresql+psycopg://user:pw@127.0.0.1:5432/db", "postgresql"),
        ("mysql+pymysql://user@host/db", "mysql"),
        ("journal:study.log", "journal"),
        ("journal:///abs/study.log", "journal"),
        # Passwords SQLAlchemy accepts and urlsplit misreads (a '#', '/', ']' in them).
        ("postgresql://u:p#ss@db.example/optuna", "postgresql"),
        ("mysql+pymysql://u:a/b@db.example:3306/optuna", "mysql"),
        ("postgresql://u:p]x@host/db", "postgresql"),
        ("postgresql://u@h/db?options=a@b", "postgresql"),
    ],
)
def test_storage_kind(url: str, kind: str) -> None:
    assert storage_kind(url) == kind


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mongodb://host/db", "is not supported"),
        ("study.db", "is not supported"),
        ("", "is not supported"),
        ("sqlite://study.db", "is malformed"),
        ("journal:", "names no file"),
    ],
)
def test_bad_storage_urls(url: str, problem: str) -> None:
    with pytest.raises(StorageError) as info:
        storage_kind(url)
    message = one_line_error(info)
    assert problem in message
    assert "use sqlite:///path/to/study.db, postgresql://user@host/db or journal:path/to/study.log" in message


@pytest.mark.parametrize("url", ["postgresql://[bad/db", "postgresql://u@host:abc/db"])
def test_a_malformed_host_or_port_is_one_line_when_opened(url: str) -> None:
    # urlsplit raised ValueError tracebacks on these; SQLAlchemy now judges them.
    with pytest.raises(StorageError) as info:
        open_storage(url)
    assert one_line_error(info).startswith(f"cannot open storage '{url}': ")


def test_local_path() -> None:
    assert local_path("sqlite:///rel/study.db") == Path("rel/study.db")
    assert local_path("sqlite:////abs/study.db?timeout=3") == Path("/abs/study.db")
    assert local_path("journal:runs/study.log") == Path("runs/study.log")
    assert local_path("postgresql://u@h/db") is None


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite:///", "sqlite:///?timeout=3"])
def test_an_in_memory_sqlite_database_is_refused(url: str) -> None:
    # It is gone with its connection: the run, its workers and the report need a file.
    with pytest.raises(StorageError) as info:
        storage_kind(url)
    assert one_line_error(info) == f"storage URL '{url}' names no file; use sqlite:///path/to/study.db"


def test_a_file_that_is_not_a_journal_is_refused_untouched(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("garbage\n", encoding="utf-8")
    for check in (check_storage_url, open_storage):
        with pytest.raises(StorageError, match=f"{notes} is not an Optuna journal file; name a new file or a journal"):
            check(f"journal:{notes}")
    assert notes.read_text(encoding="utf-8") == "garbage\n"
    empty = tmp_path / "empty.log"
    empty.touch()
    check_storage_url(f"journal:{empty}")  # a new journal may start as an empty file


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('{"op_code": 99}\n', "AssertionError"),
        # A last line that does not parse is taken as a record being written; one before it is not.
        (
            '{"op_code": 0, "worker_id": "a", "study_name": "s", "directions": [1]}\nGARBAGE\n{"op_code": 0}\n',
            "JSONDecodeError",
        ),
    ],
)
def test_a_journal_with_records_optuna_cannot_read_is_one_line(tmp_path: Path, content: str, error: str) -> None:
    journal = tmp_path / "study.log"
    journal.write_text(content, encoding="utf-8")
    with pytest.raises(StorageError) as info:
        open_storage(f"journal:{journal}")
    assert f"holds a record that is not Optuna's ({error}); name a new file" in one_line_error(info)
    assert journal.read_text(encoding="utf-8") == content


def test_a_storage_path_the_system_refuses_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/{'a' * 300}.db"
    with pytest.raises(StorageError, match=r"cannot use .* \(File name too long\); choose another path"):
        check_storage_url(url)


def test_a_file_that_is_not_sqlite_is_named_as_such(tmp_path: Path) -> None:
    notes = tmp_path / "notes.db"
    notes.write_text("not a database\n", encoding="utf-8")
    with pytest.raises(StorageError) as info:
        open_storage(f"sqlite:///{notes}")
    message = one_line_error(info)
    assert "file is not a database; name a new file or an Optuna SQLite study file" in message
    assert "server" not in message


def test_a_journal_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    with pytest.raises(StorageError, match=r"cannot write .*file/s\.log \(Not a directory\); choose another path"):
        open_storage(f"journal:{tmp_path}/file/s.log")


def test_default_storage_url_is_an_absolute_sqlite_file(tmp_path: Path) -> None:
    url = default_storage_url(tmp_path / "reports", "my-study")
    assert url == f"sqlite:///{tmp_path.resolve()}/reports/my-study/study.db"
    assert storage_kind(url) == "sqlite"


# ------------------------------------------------------------------- redaction


def test_redact_hides_passwords_only() -> None:
    assert redact("postgresql://alice:s3cret@db.example:5432/studies") == "postgresql://alice:***@db.example:5432/studies"
    assert redact("postgresql+psycopg://bob:p@ss:w0rd@host/db") == "postgresql+psycopg://bob:***@host/db"
    assert redact("postgresql://bob:p/w@host/db?x=1") == "postgresql://bob:***@host/db?x=1"
    assert redact("postgresql://alice@db.example/studies") == "postgresql://alice@db.example/studies"
    assert redact("sqlite:////tmp/study.db") == "sqlite:////tmp/study.db"


def test_errors_and_display_never_show_the_password() -> None:
    with pytest.raises(StorageError) as info:
        storage_kind("redis://alice:s3cret@host/0")
    assert "s3cret" not in str(info.value) and "alice:***@host" in str(info.value)
    assert "s3cret" not in display_url("postgresql://alice:s3cret@host/db")


def test_an_unencoded_at_sign_in_the_password_is_refused_without_showing_it() -> None:
    with pytest.raises(StorageError) as info:
        storage_kind("postgresql+psycopg://bob:p@ss:w0rd@host/db")
    message = one_line_error(info)
    assert "write each such '@' as %40" in message
    assert "w0rd" not in message and "ss:" not in message
    assert storage_kind("postgresql+psycopg://bob:p%40ss@host/db") == "postgresql"
    assert storage_kind("sqlite:////tmp/a@b/study.db") == "sqlite"


def test_display_url_of_a_journal_is_its_file() -> None:
    assert display_url("journal:runs/study.log") == "runs/study.log"
    assert display_url("sqlite:///x.db") == "sqlite:///x.db"


# ------------------------------------------------------------------- checks


def test_missing_folder_is_an_error_unless_it_may_be_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/missing/study.db"
    with pytest.raises(StorageError) as info:
        check_storage_url(url)
    message = one_line_error(info)
    assert f"folder {tmp_path}/missing does not exist; create it or choose another path" in message
    with pytest.raises(StorageError, match="does not exist"):
        open_storage(url)
    with pytest.raises(StorageError, match="does not exist"):
        check_storage_url(f"journal:{tmp_path}/missing/study.log")
    assert files_under(tmp_path) == []
    check_storage_url(url, create_parent=True)
    open_storage(url, create_parent=True)
    assert (tmp_path / "missing" / "study.db").is_file()


def test_a_folder_is_not_a_storage_file(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="points at a folder; name a file"):
        check_storage_url(f"sqlite:///{tmp_path}")


def test_reading_a_missing_storage_file_creates_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/typo.db"
    with pytest.raises(StorageError) as info:
        study_names(url)
    assert "typo.db" in one_line_error(info)
    with pytest.raises(UserError):
        load_study("tiny", url)
    with pytest.raises(UserError):
        load_study("tiny", f"journal:{tmp_path}/typo.log")
    assert files_under(tmp_path) == []


def test_unreachable_postgres_is_one_line_with_the_password_hidden() -> None:
    url = f"postgresql+psycopg://alice:s3cret@127.0.0.1:{free_port()}/studies"
    with pytest.raises(StorageError) as info:
        open_storage(url)
    message = one_line_error(info)
    assert message.startswith("cannot open storage 'postgresql+psycopg://alice:***@127.0.0.1:")
    assert "check the URL and that the server runs" in message
    assert "s3cret" not in message


def test_the_postgres_scheme_is_refused_with_its_fix() -> None:
    with pytest.raises(StorageError) as info:
        storage_kind("postgres://alice:s3cret@host/db")
    message = one_line_error(info)
    assert "postgres://, which SQLAlchemy does not know; write postgresql:// instead" in message
    assert "s3cret" not in message


def test_a_postgres_server_that_never_answers_is_one_line_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import modelsel.storage as storage_module

    monkeypatch.setattr(storage_module, "SERVER_CONNECT_TIMEOUT_S", 1)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"postgresql+psycopg://alice@127.0.0.1:{silent.getsockname()[1]}/studies"
        with pytest.raises(StorageError) as info:
            open_storage(url)
    assert one_line_error(info).startswith("cannot open storage 'postgresql+psycopg://alice@127.0.0.1:")


@pytest.mark.parametrize(
    ("url", "connect_args"),
    [
        ("postgresql://alice@db/studies", {"connect_timeout": 10}),
        ("postgresql+psycopg://alice@db/studies", {"connect_timeout": 10}),
        ("postgresql+pg8000://alice@db/studies", {"timeout": 10}),  # pg8000 has no connect_timeout
        ("postgresql://alice@db/studies?connect_timeout=3", None),  # the URL's own wins
        ("mysql+mysqlconnector://alice@db/studies", None),  # a driver whose keyword is not known
    ],
)
def test_each_server_driver_gets_its_own_connect_timeout(
    url: str, connect_args: dict[str, int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelsel.storage as storage_module

    given: list[dict[str, Any]] = []

    def capture(url: str, engine_kwargs: dict[str, Any], heartbeat_kwargs: dict[str, Any]) -> Any:
        given.append(engine_kwargs)
        raise RuntimeError("not connecting in this test")

    monkeypatch.setattr(storage_module, "_rdb_storage", capture)
    with pytest.raises(StorageError):
        open_storage(url)
    assert given[0].get("connect_args") == connect_args


def test_unreachable_postgres_via_the_cli_exits_2() -> None:
    url = f"postgresql+psycopg://alice:s3cret@127.0.0.1:{free_port()}/studies"
    result = CliRunner().invoke(main, ["study", "list", "--storage", url])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot open storage ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "s3cret" not in result.output + result.stderr


# ------------------------------------------------------------------- journal and sqlite studies


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_the_printed_dashboard_command_serves_the_study(tmp_path: Path, kind: str) -> None:
    """The run prints "Dashboard: optuna-dashboard ..."; that command must serve the study."""
    import json
    import shlex
    import time
    import urllib.request

    pytest.importorskip("optuna_dashboard")  # in the dev extra: CI runs this
    (tmp_path / "my runs").mkdir()  # the printed command quotes a path with a space
    url = f"sqlite:///{tmp_path}/my runs/s.db" if kind == "sqlite" else f"journal:{tmp_path}/my runs/s.log"
    outcome = run_study(
        parse_spec(tiny_spec_data()), storage=url, output_dir=tmp_path / "reports", progress=False, build_report=False
    )
    port = free_port()
    beside = Path(sys.executable).parent / "optuna-dashboard"  # a venv's script, when its bin is not on PATH
    executable = shutil.which("optuna-dashboard") or (str(beside) if beside.is_file() else None)
    assert executable is not None, "optuna-dashboard is installed with the dev extra"
    command = [executable, *shlex.split(outcome.dashboard_command)[1:], "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    summaries = json.load(response)["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode() if server.stderr else "it exited"
                assert time.monotonic() < deadline, "the dashboard did not answer within 60 s"
                time.sleep(0.3)
        assert [s["study_name"] for s in summaries] == ["tiny"]
        study_id = summaries[0]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}", timeout=30) as response:
            detail = json.load(response)
        assert len(detail["trials"]) == outcome.n_complete == 2
        # The user attributes the report is rebuilt from are there to browse.
        keys = {a["key"] for a in detail["trials"][0]["user_attrs"]}
        assert {"fold_val_metric", "regime", "grad_norms", "curves"} <= keys
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_study_in_a_journal_file(fast_tmp: Path) -> None:
    url = f"journal:{fast_tmp}/runs/study.log"
    (fast_tmp / "runs").mkdir()
    outcome = run_study(
        parse_spec(tiny_spec_data()), storage=url, output_dir=fast_tmp / "reports", progress=False, build_report=False
    )
    assert outcome.n_complete == 2
    assert outcome.dashboard_command == f"optuna-dashboard {fast_tmp}/runs/study.log"
    assert (fast_tmp / "runs" / "study.log").is_file()
    assert study_names(url) == ["tiny"]
    study = optuna.load_study(study_name="tiny", storage=open_storage(url))
    assert len(study.trials) == 2 and "test_result" in study.user_attrs
    # A second run resumes from the journal.
    again = run_study(parse_spec(tiny_spec_data()), storage=url, output_dir=fast_tmp / "reports", progress=False)
    assert again.n_trained_this_run == 0 and again.test == outcome.test


def test_find_default_storages(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "study.db").touch()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "study.log").touch()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "other.db").touch()
    assert find_default_storages(tmp_path) == [
        f"sqlite:///{(tmp_path / 'a' / 'study.db').resolve()}",
        f"journal:{(tmp_path / 'b' / 'study.log').resolve()}",
    ]
    assert find_default_storages(tmp_path / "nothing-here") == []


@contextlib.contextmanager
def another_process_creates_the_tables_first(url: str) -> Iterator[list[int]]:
    """Make the next schema creation lose a race: just before it creates the first table,
    another connection (as a second process would) creates them all. Yields how often
    that happened."""
    import sqlalchemy
    from optuna.storages._rdb import models

    raced: list[int] = []

    def create_them_first(metadata: object, connection: object, **kw: object) -> None:
        if raced:
            return
        raced.append(1)
        other = sqlalchemy.create_engine(url)
        models.BaseModel.metadata.create_all(other)  # fires this listener again: a no-op now
        other.dispose()

    # First in line: on PostgreSQL, a later listener creates the enum types in the
    # still-open transaction, and the other connection would wait for it forever.
    sqlalchemy.event.listen(models.BaseModel.metadata, "before_create", create_them_first, insert=True)
    try:
        yield raced
    finally:
        sqlalchemy.event.remove(models.BaseModel.metadata, "before_create", create_them_first)


def check_open_storage_survives_a_lost_setup_race(url: str) -> None:
    with another_process_creates_the_tables_first(url) as raced:
        storage = open_storage(url)
    assert raced == [1]
    optuna.create_study(study_name="after-the-race", storage=storage)
    assert [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)] == [
        "after-the-race"
    ]


def test_opening_a_new_sqlite_storage_that_another_process_sets_up_meanwhile(tmp_path: Path) -> None:
    """Two processes (a second `study run`, the dashboard) opening one new storage both find
    its tables missing; the one whose CREATE comes second opens it again instead of failing."""
    check_open_storage_survives_a_lost_setup_race(f"sqlite:///{tmp_path / 'study.db'}")


# ------------------------------------------------------------------- PostgreSQL server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server on loopback for this test, stopped afterwards.

    initdb refuses to run as root, so as root the server runs as the unprivileged user
    ``nobody`` (its data lives in a temporary folder owned by that user).
    """
    for tool in ("initdb", "pg_ctl"):
        if not (PG_BIN / tool).is_file():
            pytest.skip(f"PostgreSQL server binaries not found: {PG_BIN / tool} is missing (set MODELSEL_PG_BIN)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is not installed")
    prefix: list[str] = []
    user: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root, and there is no unprivileged user 'nobody' to run PostgreSQL as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root, and 'runuser' (util-linux) is missing to run PostgreSQL as 'nobody'")
        prefix = ["runuser", "-u", "nobody", "--"]
    root = Path(tempfile.mkdtemp(prefix="modelsel-pg-"))
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    data, log, port = root / "data", root / "server.log", free_port()

    def pg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *args], cwd=root, capture_output=True, text=True, timeout=120)

    try:
        init = pg(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        assert init.returncode == 0, f"initdb failed: {init.stderr}"
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        start = pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
        assert start.returncode == 0, f"pg_ctl start failed: {start.stderr}\n{log.read_text() if log.exists() else ''}"
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.server
def test_a_study_on_a_postgresql_server(postgres_url: str, fast_tmp: Path) -> None:
    outcome = run_study(
        parse_spec(tiny_spec_data()), storage=postgres_url, output_dir=fast_tmp / "reports", progress=False
    )
    assert outcome.n_complete == 2 and outcome.test is not None
    assert outcome.storage_url == postgres_url
    runner = CliRunner()
    listed = runner.invoke(main, ["study", "list", "--storage", postgres_url])
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.startswith(f"tiny\t2 trials\t{postgres_url}")
    shown = runner.invoke(
        main, ["study", "show", "tiny", "--storage", postgres_url, "--output", str(fast_tmp / "reports")]
    )
    assert shown.exit_code == 0, shown.output
    assert f"Best trial #{outcome.best_trial_number}:" in shown.stdout
    assert f"Storage: {postgres_url}" in shown.stdout
    # Resuming against the server tops the study up.
    more = run_study(parse_spec(tiny_spec_data()), storage=postgres_url, n_trials=3, progress=False, build_report=False)
    assert more.n_trained_this_run == 1 and more.n_complete == 3


@pytest.mark.server
def test_opening_a_new_postgresql_storage_that_another_process_sets_up_meanwhile(postgres_url: str) -> None:
    check_open_storage_survives_a_lost_setup_race(postgres_url)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_stopping_thread_fails_only_the_trials_it_started_and_left_unfinished(
    fast_tmp: Path, kind: str
) -> None:
    import threading
    import warnings

    from optuna.trial import TrialState

    url = f"sqlite:///{fast_tmp}/own.db" if kind == "sqlite" else f"journal:{fast_tmp}/own.log"
    study = optuna.create_study(study_name="own", storage=open_storage(url))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Heartbeat ... supposed to be used with Study.optimize"
        finished, left = study.ask(), study.ask()
        study.tell(finished, 1.0)
        study.enqueue_trial({})
        elsewhere = threading.Thread(target=study.ask)  # pops the enqueued trial in another thread
        elsewhere.start()
        elsewhere.join()
    assert fail_unfinished_trials() == [left._trial_id]
    states = [t.state for t in optuna.load_study(study_name="own", storage=open_storage(url)).trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING]
    assert fail_unfinished_trials() == [], "a trial is failed once"


def test_a_trial_that_cannot_be_stored_as_failed_is_named_on_stderr(
    fast_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The write error was swallowed without a word: the trial stayed RUNNING unseen.
    import warnings

    import modelsel.storage as storage_module

    study = optuna.create_study(study_name="own", storage=open_storage(f"journal:{fast_tmp}/own.log"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        left = study.ask()

    def disk_full(storage: Any, trial_id: int) -> bool:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(storage_module, "_fail_if_running", disk_full)
        assert fail_unfinished_trials() == []
    err = capsys.readouterr().err
    assert f"warning: trial #{left.number} could not be stored as failed (OSError: " in err
    assert "a journal file keeps it running" in err
    assert fail_unfinished_trials() == [left._trial_id]  # still this thread's: a later call retries


def test_importing_the_storage_libraries_opens_nothing(tmp_path: Path) -> None:
    # A spawned worker imports them while it waits for its orders, before the study is
    # open: it must not create the database (or touch a journal) then.
    script = (
        "import sys\n"
        "from modelsel.storage import import_storage_libraries\n"
        f"import_storage_libraries('journal:{tmp_path}/study.log')\n"
        "print('alembic.migration' in sys.modules)\n"
        f"import_storage_libraries('sqlite:///{tmp_path}/study.db')\n"
        "print('alembic.migration' in sys.modules, 'sqlalchemy.dialects.sqlite' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True", "True"]
    assert files_under(tmp_path) == []
