"""Where studies live: resolving, checking and opening Optuna storages.

Supported URLs:

- ``sqlite:///path/to/study.db`` (the default: ``<output>/<study>/study.db``);
- ``postgresql://user:password@host:port/db`` (``pip install 'modelsel[postgres]'``);
- ``journal:path/to/study.log``: Optuna's journal file storage, which is what Optuna
  recommends when several processes on one machine share a study.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import json
import os
import re
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs

from modelsel.errors import StorageError, UserError, exception_chain

_HINT = "use sqlite:///path/to/study.db, postgresql://user@host/db or journal:path/to/study.log"
_SQLITE_TIMEOUT_S = 60
_SETUP_ATTEMPTS = 5


def default_storage_url(output_dir: str | Path, study_name: str) -> str:
    """SQLite file ``<output_dir>/<study_name>/study.db`` (absolute)."""
    path = (Path(output_dir) / study_name / "study.db").resolve()
    return f"sqlite:///{path}"


def check_output_folder(folder: str | Path) -> None:
    """Raise a one-line :class:`UserError` unless ``folder`` (a report's folder) is a
    writable folder or can be made one: checked before training, so that a run does not
    train for minutes and then fail to write its report."""
    path = Path(folder).absolute()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"report folder {path}: {existing} is not a folder; pass --output DIR with a folder")
    # Creating a file is the only honest probe: as root, os.access says yes to /proc and
    # to folders on some read-only mounts.
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        # /proc answers "No such file or directory" for a folder that is there.
        reason = "it takes no new files" if error.errno == errno.ENOENT else error.strerror or type(error).__name__
        raise UserError(
            f"report folder {path}: cannot write in {existing} ({reason}); pass --output DIR with a writable folder"
        ) from None


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (everything up to the last ``@``: when in
    doubt, hide more)."""
    return re.sub(r"(://[^:/@]+:).*@", r"\1***@", url)


#: Seconds to wait for a database server to complete a connection (the URL's own
#: ``?connect_timeout=`` wins).
SERVER_CONNECT_TIMEOUT_S = 10
#: What each database driver calls that wait (SQLAlchemy's default driver for a bare
#: ``postgresql://`` is psycopg, for ``mysql://`` mysqlclient). Other drivers keep their own.
_CONNECT_TIMEOUT_KEYWORDS = {
    "postgresql": "connect_timeout",
    "postgresql+psycopg": "connect_timeout",
    "postgresql+psycopg2": "connect_timeout",
    "postgresql+pg8000": "timeout",
    "mysql": "connect_timeout",
    "mysql+mysqldb": "connect_timeout",
    "mysql+pymysql": "connect_timeout",
}


def storage_kind(url: str) -> str:
    """``sqlite``, ``postgresql``, ``mysql`` or ``journal``.

    Raises
    ------
    StorageError
        For a URL of any other form.
    """
    if url.startswith("journal:"):
        if not url.removeprefix("journal:").removeprefix("//"):
            raise StorageError(f"storage URL '{url}' names no file; {_HINT}")
        return "journal"
    # Read by hand, not with urlsplit: a password may hold '#', '?', '/' or brackets, which
    # SQLAlchemy accepts and urlsplit misreads (or raises on); SQLAlchemy judges the rest.
    full_scheme, _ = _scheme_and_netloc(url)
    scheme = full_scheme.split("+")[0]
    if scheme in ("sqlite", "postgresql", "postgres", "mysql"):
        if scheme == "sqlite" and not url.startswith("sqlite:///"):
            raise StorageError(f"storage URL '{redact(url)}' is malformed; {_HINT}")
        if scheme == "sqlite" and url.removeprefix("sqlite:///").split("?")[0] in ("", ":memory:"):
            # Gone with its connection: the run, its workers and the report need a file.
            raise StorageError(f"storage URL '{url}' names no file; use sqlite:///path/to/study.db")
        if scheme == "postgres":  # SQLAlchemy knows the dialect only as postgresql
            raise StorageError(
                f"storage URL '{redact(url)}' uses the scheme postgres://, which SQLAlchemy does not know; "
                "write postgresql:// instead"
            )
        if scheme != "sqlite" and _scheme_and_netloc(url)[1].count("@") > 1:
            raise StorageError(
                f"storage URL '{redact(url)}' has '@' in its user name or password; write each such '@' as %40"
            )
        return scheme
    raise StorageError(f"storage URL '{redact(url)}' is not supported; {_HINT}")


def _scheme_and_netloc(url: str) -> tuple[str, str]:
    """The scheme (with its driver, e.g. ``postgresql+psycopg``) and the part between
    ``://`` and the database path, as SQLAlchemy reads them: the host is after the last
    ``@``, so a password may hold any character but ``@``."""
    match = _URL_START.match(url)
    if match is None:
        return "", ""
    return match["scheme"].lower(), match["netloc"]


#: The start of a database URL as SQLAlchemy's ``make_url`` reads it: user, then an
#: optional password up to the first '@', then the host up to the path or the query.
_URL_START = re.compile(r"(?P<scheme>[\w+]+)://(?P<netloc>(?:[^:/]*(?::[^@]*)?@)?[^/?]*)")


def local_path(url: str) -> Path | None:
    """The file behind a SQLite or journal URL, else None."""
    kind = storage_kind(url)
    if kind == "journal":
        return Path(url.removeprefix("journal:").removeprefix("//"))
    if kind == "sqlite":
        path = url.removeprefix("sqlite:///").split("?")[0]
        return Path(path)
    return None


def check_storage_url(url: str, *, create_parent: bool = False) -> None:
    """Validate a storage URL before anything is written.

    Parameters
    ----------
    url
        The storage URL.
    create_parent
        Whether a missing folder for a file storage may be created (default storages);
        otherwise a missing folder is an error.
    """
    path = local_path(url)
    if path is None:
        return
    try:
        _check_storage_path(url, path, create_parent=create_parent)
    except OSError as exc:  # a name too long, a folder that cannot be read
        raise StorageError(f"storage URL '{url}': cannot use {path} ({exc.strerror}); choose another path") from None


def _check_storage_path(url: str, path: Path, *, create_parent: bool) -> None:
    if not path.parent.exists() and not create_parent:
        raise StorageError(
            f"storage URL '{url}': folder {path.parent} does not exist; create it or choose another path"
        )
    if path.exists() and path.is_dir():
        raise StorageError(f"storage URL '{url}' points at a folder; name a file, e.g. {path / 'study.db'}")
    if storage_kind(url) == "journal" and path.is_file():
        with path.open("rb") as file:
            first_line = file.readline(65536).strip()
        try:
            record = json.loads(first_line) if first_line else {"op_code": None}
        except ValueError:
            record = None
        if not (isinstance(record, dict) and "op_code" in record):
            # Optuna would append its records to the file before failing to read it.
            raise NoStudyStorage(
                f"storage URL '{url}': {path} is not an Optuna journal file; name a new file or a journal"
            )


def display_url(url: str) -> str:
    """The form optuna-dashboard accepts (a journal storage is given as its file path)."""
    if storage_kind(url) == "journal":
        return str(local_path(url))
    return redact(url)


#: SQLAlchemy engines of the storages this process opened, held weakly, for
#: :func:`close_storages` (an engine and its pooled connections can outlive the storage).
_ENGINES: weakref.WeakSet[Any] = weakref.WeakSet()
#: The storages this process opened, for :func:`fail_unfinished_trials`.
_STORAGES: weakref.WeakSet[Any] = weakref.WeakSet()


def close_storages() -> None:
    """Close the pooled database connections of every storage this process opened.

    :func:`close_and_exit` calls it before ``os._exit``: a SQLite database in
    WAL mode moves its write-ahead log into the database file when the last connection
    closes, so nothing is left in ``study.db-wal`` beside it.
    """
    for engine in list(_ENGINES):
        with contextlib.suppress(Exception):  # one broken connection must not keep the others open
            engine.dispose()


class _ThreadTrials(threading.local):
    """Per thread: the trials it made RUNNING and has not finished (a thread's set ends with it)."""

    def __init__(self) -> None:
        self.unfinished: set[int] = set()
        #: Told each trial id this thread makes RUNNING, as soon as the storage has it.
        self.on_start: Callable[[int], None] | None = None


class _OwnTrials:
    """Storage mixin: remembers, per thread, the trials it made RUNNING and has not finished.

    Optuna leaves a trial RUNNING when an interrupt lands between its creation and the
    objective (the sampler's set-up, the heartbeat) or when storing the interrupted trial
    as failed fails itself; only the process that created it knows it is abandoned.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._this_thread = _ThreadTrials()

    def _own(self) -> set[int]:
        return self._this_thread.unfinished

    def _started(self, trial_id: int) -> None:
        self._own().add(trial_id)
        if self._this_thread.on_start is not None:
            self._this_thread.on_start(trial_id)

    def create_new_trial(self, study_id: int, template_trial: Any = None) -> int:
        trial_id: int = super().create_new_trial(study_id, template_trial)  # type: ignore[misc]
        if template_trial is None or template_trial.state.name == "RUNNING":
            self._started(trial_id)
        return trial_id

    def _create_new_trial(self, study_id: int, template_trial: Any = None) -> Any:
        # What Optuna's cache in front of an RDBStorage calls instead of create_new_trial.
        frozen = super()._create_new_trial(study_id, template_trial)  # type: ignore[misc]
        if frozen.state.name == "RUNNING":
            self._started(frozen._trial_id)
        return frozen

    def set_trial_state_values(self, trial_id: int, state: Any, values: Any = None) -> bool:
        updated: bool = super().set_trial_state_values(trial_id, state, values)  # type: ignore[misc]
        if state.is_finished():
            self._own().discard(trial_id)
        elif updated:  # a waiting (enqueued) trial this thread starts
            self._started(trial_id)
        return updated

    def fail_unfinished(self) -> list[int]:
        """Store this thread's unfinished trials that are still RUNNING as failed; return their ids."""

        failed: list[int] = []
        own = self._own()
        for trial_id in sorted(own):
            try:
                if _fail_if_running(self, trial_id):
                    failed.append(trial_id)
                else:  # finished elsewhere meanwhile (another process's heartbeat check)
                    own.discard(trial_id)
            except Exception as error:  # the caller's own error comes first; say what is left behind
                sys.stderr.write(
                    f"warning: {_trial_label(self, trial_id)} could not be stored as failed "
                    f"({type(error).__name__}: {error}); "
                    "it stays running in the storage until a later run's heartbeat check fails it (SQL storages; "
                    "a journal file keeps it running)\n"
                )
        return failed


def _trial_label(storage: Any, trial_id: int) -> str:
    """"trial #N of study S" as the summary and report name it; the storage's own id when
    the storage cannot say (it may be what failed)."""
    try:
        number = storage.get_trial_number_from_id(trial_id)
    except Exception:
        return f"the trial with storage id {trial_id}"
    try:  # RDB storages say which study; a journal storage has no such lookup
        study = storage.get_study_name_from_id(storage.get_study_id_from_trial_id(trial_id))
    except Exception:
        return f"trial #{number}"
    return f"trial #{number} of study {study}"


@functools.cache
def _owning(base: type) -> type:
    """``base`` (an Optuna storage class) with :class:`_OwnTrials` mixed in (optuna is
    imported lazily, so the classes are made on first use)."""
    return type(base.__name__, (_OwnTrials, base), {"__module__": __name__, "__doc__": base.__doc__})


def fail_unfinished_trials() -> list[int]:
    """Store as failed the trials that this thread started and left unfinished.

    Called when a run stops on an exception (Ctrl-C, a worker's SIGTERM, an error): the
    connections are dropped first (:func:`reset_storage_connections`), so that a
    transaction the interrupt left open does not lock the write. Best effort: an error
    here is not raised, so that the caller sees the one that stopped the run, but a line
    on stderr names the trial left RUNNING (a later run's heartbeat check fails it on an
    SQL storage; a journal file has no heartbeat).

    Returns
    -------
    list[int]
        The ids of the trials stored as failed.
    """
    reset_storage_connections()
    return [trial_id for storage in list(_STORAGES) for trial_id in storage.fail_unfinished()]


@contextlib.contextmanager
def trials_started_noted(study: Any, note: Callable[[int], None]) -> Iterator[None]:
    """Within the block, call ``note(trial_id)`` as soon as this thread makes a trial of
    ``study``'s storage RUNNING: before Optuna's set-up of the trial (the sampler, the
    heartbeat) and the objective, so that another process can fail the trial of one
    killed at any point after it started. Does nothing on a storage modelsel did not open."""
    backend = study._storage
    owning = backend if isinstance(backend, _OwnTrials) else getattr(backend, "_backend", None)
    if not isinstance(owning, _OwnTrials):
        yield
        return
    thread = owning._this_thread
    before, thread.on_start = thread.on_start, note
    try:
        yield
    finally:
        thread.on_start = before


def fail_running_trial(study: Any, trial_id: int) -> bool:
    """Store the trial with storage id ``trial_id`` as failed if it is still running (its
    process was killed); whether it was. Best effort: False on any storage error."""
    try:
        return _fail_if_running(study._storage, trial_id)
    except Exception:
        return False


def _fail_if_running(storage: Any, trial_id: int) -> bool:
    """Store trial ``trial_id`` as failed if it is still RUNNING; whether it was."""
    from optuna.trial import TrialState

    if storage.get_trial(trial_id).state != TrialState.RUNNING:
        return False
    storage.set_trial_state_values(trial_id, TrialState.FAIL)
    return True


@contextlib.contextmanager
def unfinished_trials_failed() -> Iterator[None]:
    """Within the block, an exception first stores the trials this thread started and
    left unfinished as failed (:func:`fail_unfinished_trials`), then propagates."""
    try:
        yield
    except BaseException:
        fail_unfinished_trials()
        raise


def reset_storage_connections() -> None:
    """Drop every database connection this process holds; the storages reconnect on their next call.

    A KeyboardInterrupt (Ctrl-C, or a worker's SIGTERM) that lands inside a storage call
    can leave this thread's session or a pooled connection in the middle of a
    transaction, and SQLite then refuses the next write ("database is locked").
    Closing this thread's session and disposing the engines rolls it back.
    """
    for storage in list(_STORAGES):
        if hasattr(storage, "remove_session"):  # RDB storages; a journal file holds no connection
            with contextlib.suppress(Exception):
                storage.remove_session()
    close_storages()


def close_and_exit(code: int) -> NoReturn:
    """End this process now, without the interpreter's teardown, once its storages are closed.

    Finalizing an interpreter that has loaded torch, Optuna, scikit-learn and seaborn
    takes 1-2 s (module and extension teardown) and does nothing a finished command or
    worker needs. So, as mypy does: close every storage (:func:`close_storages`), run
    the atexit handlers (logging's flush, multiprocessing's finalizers: without them an
    interrupted ``--workers`` run leaves semaphores registered and the resource tracker
    warns of leaks; about 0.05 s), flush the standard streams, then ``os._exit(code)``.
    """
    close_storages()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`modelsel study list | head -1`)
            stream.flush()
    os._exit(code)


def import_storage_libraries(url: str) -> None:
    """Import what opening a storage at ``url`` imports, without opening anything.

    For a database that is SQLAlchemy's ORM and dialect and Alembic (which Optuna checks
    the schema version with): about 0.9 s of the first open on the 2-core machine. A
    spawned worker does this while it waits for its orders. A missing driver is left
    for :func:`open_storage` to report.
    """
    kind = storage_kind(url)
    if kind == "journal":
        return
    import importlib

    modules = ("sqlalchemy.orm", f"sqlalchemy.dialects.{kind}", "alembic.command", "alembic.config",
               "alembic.migration", "alembic.script", "optuna.storages._rdb.models")  # fmt: skip
    for module in modules:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


class NoStudyStorage(StorageError):
    """A file where a study storage was expected that holds none (not SQLite, or no Optuna tables)."""


def _check_sqlite_study_file(url: str, path: Path) -> None:
    """Raise NoStudyStorage unless ``path`` is a SQLite file holding Optuna's tables (a
    StorageError when it cannot be read at all); reads only."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB":
            message = f"storage URL '{url}': {path} is not a study storage ({exc}); check the path"
            raise NoStudyStorage(message) from None
        raise StorageError(f"cannot open storage '{url}': {exc}; check that {path} can be read") from None
    if "studies" not in tables:
        raise NoStudyStorage(f"storage URL '{url}': {path} holds no Optuna studies; check the path")


def open_storage(url: str, *, create_parent: bool = False, heartbeat: bool = True, must_exist: bool = False) -> Any:
    """Open an Optuna storage, turning connection problems into one-line errors.

    Parameters
    ----------
    url
        The storage URL (see module docs).
    create_parent
        Create the folder of a file storage if it is missing.
    heartbeat
        Let Optuna mark trials of crashed processes as failed (RDB storages).
    must_exist
        Refuse a file storage that does not exist instead of creating an empty one
        (for commands that only read studies).

    Raises
    ------
    StorageError
        When the URL is malformed, its driver is missing or the server cannot be reached.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend

    check_storage_url(url, create_parent=create_parent)
    kind = storage_kind(url)
    path = local_path(url)
    if must_exist and path is not None and not path.is_file():
        raise StorageError(f"storage URL '{url}': no study storage at {path}; check the path")
    if must_exist and kind == "sqlite" and path is not None:
        _check_sqlite_study_file(url, path)  # opening would write Optuna's tables into it
    if path is not None and create_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "journal":
        assert path is not None
        try:
            journal = _owning(optuna.storages.JournalStorage)(JournalFileBackend(str(path)))
        except OSError as exc:  # a read-only folder or file system (the backend creates the file)
            raise StorageError(
                f"storage URL '{url}': cannot write {path} ({exc.strerror}); choose another path"
            ) from None
        except Exception as exc:  # Optuna replays every record on opening: one it cannot read
            raise StorageError(
                f"storage URL '{url}': {path} holds a record that is not Optuna's ({type(exc).__name__}); "
                "name a new file, or restore the journal from a backup"
            ) from None
        _STORAGES.add(journal)
        return journal
    engine_kwargs: dict[str, Any] = {}
    if kind == "sqlite":
        # Several worker processes may write: wait for the lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": _SQLITE_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True
        scheme, netloc = _scheme_and_netloc(url)
        keyword = _CONNECT_TIMEOUT_KEYWORDS.get(scheme)
        query = url.partition("://")[2][len(netloc) :].partition("?")[2]
        if keyword is not None and keyword not in parse_qs(query):
            # libpq and the MySQL drivers would wait for ever on a server that accepts the
            # connection and never answers.
            engine_kwargs["connect_args"] = {keyword: SERVER_CONNECT_TIMEOUT_S}
    heartbeat_kwargs: dict[str, Any] = {"heartbeat_interval": 30, "grace_period": 120} if heartbeat else {}
    try:
        storage = _rdb_storage(url, engine_kwargs, heartbeat_kwargs)
        if kind == "sqlite":
            _use_sqlite_wal(storage.engine)
        _ENGINES.add(storage.engine)
        _STORAGES.add(storage)
        return storage
    except Exception as exc:  # SQLAlchemy raises many kinds; all mean "cannot use this storage"
        missing = _missing_module(exc)
        if missing is not None:
            extra = " (pip install 'modelsel[postgres]')" if kind == "postgresql" else ""
            raise StorageError(f"storage URL '{redact(url)}' needs the driver '{missing}'{extra}") from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if kind == "sqlite":
            raise StorageError(
                f"cannot open storage '{url}': {first_line[:300]}; name a new file or an Optuna SQLite study file"
            ) from None
        raise StorageError(
            f"cannot open storage '{redact(url)}': {first_line[:300]}; check the URL and that the server runs"
        ) from None


def _missing_module(exc: BaseException) -> str | None:
    """The module a failed import named, where ``exc`` or what it wraps is one (Optuna
    re-raises a missing database driver as its own ImportError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ModuleNotFoundError) and current.name:
            return current.name
        current = current.__cause__ or current.__context__
    return None


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], heartbeat_kwargs: dict[str, Any]) -> Any:
    """Optuna's RDBStorage, opened again when another process set up the same new storage meanwhile.

    Optuna creates missing tables with check-then-create; two processes opening one new
    storage (a second ``study run``, the dashboard) can both find a table missing, and the
    second CREATE (or the second insert of the schema version row) fails. The tables exist
    by then, so opening again works.
    """
    import optuna
    from sqlalchemy.exc import IntegrityError

    def open_once() -> Any:
        with warnings.catch_warnings():
            # Heartbeats are marked experimental in Optuna; they are what marks crashed trials failed.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _owning(optuna.storages.RDBStorage)(url, engine_kwargs=engine_kwargs, **heartbeat_kwargs)

    for attempt in range(1, _SETUP_ATTEMPTS):
        try:
            return open_once()
        except Exception as exc:
            if not any(
                isinstance(e, IntegrityError) or "already exists" in str(e).lower() or "duplicate key" in str(e).lower()
                for e in exception_chain(exc)
            ):
                raise
        time.sleep(0.05 * attempt)
    return open_once()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _use_sqlite_wal(engine: Any) -> None:
    """Write-ahead log with ``synchronous=NORMAL`` on every connection.

    Each trial writes many small transactions (intermediate values, user attributes);
    in the default rollback-journal mode every one of them waits for a disk sync.
    WAL keeps commits durable against a crash of the process (not of the OS) and lets
    readers (the dashboard, other workers) proceed while a worker writes.
    """
    from sqlalchemy import event

    engine.dispose()  # connections opened while Optuna created its tables lack the pragmas
    event.listen(engine, "connect", _sqlite_pragmas)


def study_names(url: str) -> list[str]:
    """Names of the studies stored at ``url``."""
    import optuna

    storage = open_storage(url, heartbeat=False, must_exist=True)
    return sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


def find_default_storages(output_dir: str | Path) -> list[str]:
    """Storage URLs of the studies under ``output_dir`` (``*/study.db`` and ``*/study.log``)."""
    root = Path(output_dir)
    urls = [f"sqlite:///{p.resolve()}" for p in sorted(root.glob("*/study.db"))]
    urls += [f"journal:{p.resolve()}" for p in sorted(root.glob("*/study.log"))]
    return urls
