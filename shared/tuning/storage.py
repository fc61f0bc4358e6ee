"""Where a study lives: its name, its storage and the lock its workers share.

    sqlite:///runs/tuning.db                          the default: one machine (or a file system whose locks work)
    postgresql+psycopg://user:pass@host:5432/studies  a database server: workers on many machines (`.[postgres]`)
    journal:/shared/studies/resnet.log                Optuna's journal file: a shared file system, no server

SQL storages beat a heartbeat, so a killed worker's trial is failed and queued again; the journal has none. The
study lock (create the study, count and claim trials) is a file beside an SQLite or journal file, a PostgreSQL
advisory lock on a server (held by the worker's session, so the server drops it when the worker dies), else a
file in <run.dir>/tune, which covers the workers of one machine."""

from __future__ import annotations

import contextlib
import hashlib
import re
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from shared.config_schema import Config
from shared.errors import UserError
from shared.locks import FileLock
from shared.names import check_plain_name

STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # it names files too
JOURNAL_PREFIX = "journal:"
CONNECT_TIMEOUT_S = 10  # a database server that does not answer: an error within seconds, not a hang
MAX_RETRY = 1  # a trial whose process died is queued again this many times


def study_name(config: Config) -> str:
    """tune.study, else <model>-<config file stem> (<model>-tune for a config built in code)."""
    name = config.tune.study or f"{config.model.name}-{Path(config.source_file).stem if config.source_file else 'tune'}"
    check_plain_name("tune.study", name)
    if not STUDY_NAME_RE.match(name):
        raise UserError(f"tune.study {name!r} must be letters, digits, '.', '_' and '-' (it names files too)")
    return name


def trial_tag(study: str, number: int) -> str:
    return f"tune study {study} trial {number}"


def storage_url(config: Config) -> str:
    """tune.storage, else an SQLite file in the runs root."""
    return config.tune.storage or f"sqlite:///{(Path(config.run.dir) / 'tuning.db').resolve()}"


def sqlite_file(url: str) -> Path | None:
    if not url.startswith("sqlite"):
        return None
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def journal_file(url: str) -> Path | None:
    """The file of a `journal:PATH` storage (relative to the working folder), else None."""
    if not url.startswith(JOURNAL_PREFIX):
        return None
    return Path(url[len(JOURNAL_PREFIX):]).expanduser().resolve()


def study_file(url: str) -> Path | None:
    """The file a study lives in (SQLite or journal), None on a database server."""
    return sqlite_file(url) or journal_file(url)


def study_lock(config: Config, url: str) -> FileLock | AdvisoryLock:
    """The lock the workers of a study take to create it and to claim trials: beside its file, an advisory lock
    of a PostgreSQL server (workers on any machine), else in <run.dir>/tune (the workers of one machine; on
    several, Optuna's own create-or-load of the study)."""
    database = study_file(url)
    if database is not None:
        return FileLock(database.with_name(f".{database.name}.lock"))
    if make_url(url).get_backend_name() == "postgresql":
        return AdvisoryLock(url, f"ilsvrc-canon tune {study_name(config)}")
    return FileLock(Path(config.run.dir) / "tune" / f".{study_name(config)}.lock")


def open_storage(url: str, heartbeat_seconds: int = 60) -> optuna.storages.BaseStorage:
    """The study's storage. SQL: with heartbeats every `heartbeat_seconds`, so a trial of a process that died is
    failed once its beat is twice that old, and queued again (same values) up to MAX_RETRY times. Journal: a
    file Optuna appends to under its own lock (no heartbeat: a killed worker's trial stays RUNNING)."""
    journal = journal_file(url)
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        try:
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        except OSError as error:
            raise UserError(f"tune.storage {url!r} could not be opened: {error.strerror or error}; give a file "
                            f"in a writable folder (journal:PATH)") from None
    database = sqlite_file(url)
    engine_kwargs = {}
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several workers on one file wait, not fail
    elif url.startswith("postgresql"):
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}  # a server that is down: seconds
    # Optuna makes its tables when a storage first opens a database: workers that start at once on a new
    # PostgreSQL database race to (optuna/optuna#1092, "duplicate key value violates unique constraint
    # pg_type_typname_nsp_index"), so there they open it one at a time.
    one_at_a_time = AdvisoryLock(url, "ilsvrc-canon tune tables") if url.startswith("postgresql") \
        else contextlib.nullcontext()
    try:
        with one_at_a_time, quiet_experimental():
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    except Exception as error:  # SQLAlchemy's ArgumentError, OperationalError, a missing driver ...
        raise UserError(f"tune.storage {url!r} could not be opened: {_first_line(error)}; "
                        f"{_storage_hint(url, error)}") from None



def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _storage_hint(url: str, error: BaseException) -> str:
    if isinstance(error, ImportError) and url.startswith("postgresql"):  # Optuna re-raises the driver's
        return "PostgreSQL needs its driver: pip install -e '.[postgres]' (psycopg 3, URL postgresql+psycopg://...)"
    return ("give an SQLAlchemy URL such as sqlite:///runs/tuning.db or postgresql+psycopg://user@host/db, or "
            "journal:PATH")


class AdvisoryLock:
    """A lock on a PostgreSQL server (the study's, keyed by its name; the one its tables are made under): a
    session-level advisory lock keyed by `name`, held on one connection of this worker. The server drops it when
    the connection ends, however the worker ends. Re-entrant, as FileLock is (PostgreSQL counts a session's locks
    on one key)."""

    def __init__(self, url: str, name: str):
        self.url = url
        self.key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        self._connection = None
        self._depth = 0

    def acquire(self) -> bool:
        if self._connection is None:
            engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool,
                                              connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
            self._connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
        self._depth += 1
        return True

    def release(self) -> None:
        self._connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        self._depth -= 1
        if self._depth == 0:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> AdvisoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def quiet_experimental():
    """Heartbeat retry, stale-trial failing and metric names are marked experimental in Optuna; the
    warning would be noise on every run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
