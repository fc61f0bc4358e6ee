"""Where a study lives: its name, its SQL database (with heartbeats, so a killed worker's trial is retried)
and the lock its workers share."""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

import optuna
from sqlalchemy.engine import make_url

from shared.config_schema import Config
from shared.errors import UserError
from shared.locks import FileLock
from shared.names import check_plain_name

STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # it names files too
HEARTBEAT_S = 60  # a running trial writes a heartbeat this often; stale after twice as long
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


def study_lock(config: Config, url: str) -> FileLock:
    """The lock the workers of a study take to create it and to claim trials: beside an SQLite file, else
    (a database server) in <run.dir>/tune, which covers the workers of one machine; workers on several
    machines rely on Optuna's own create-or-load of the study."""
    database = sqlite_file(url)
    if database is not None:
        return FileLock(database.with_name(f".{database.name}.lock"))
    return FileLock(Path(config.run.dir) / "tune" / f".{study_name(config)}.lock")


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study database, with heartbeats: a trial of a process that died is failed once its heartbeat
    is stale, and queued again (same values) up to MAX_RETRY times."""
    database = sqlite_file(url)
    engine_kwargs = {}
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several workers on one file wait, not fail
    try:
        with quiet_experimental():
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    except Exception as error:  # SQLAlchemy's ArgumentError, OperationalError, a missing driver ...
        raise UserError(f"tune.storage {url!r} could not be opened: {type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}; give an SQLAlchemy URL such as "
                        f"sqlite:///runs/tuning.db") from None


@contextlib.contextmanager
def quiet_experimental():
    """Heartbeat retry, stale-trial failing and metric names are marked experimental in Optuna; the
    warning would be noise on every run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
