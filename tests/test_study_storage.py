"""Studies shared beyond one SQLite file: a real PostgreSQL server (started here from Debian's `postgresql`
package in a temporary folder, on a free local port) and Optuna's journal file. Tuner workers are real processes."""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import forked
from conftest import REPO, free_ports, tiny_tree
from shared import tune as tune_module
from shared.config import load_config
from shared.errors import UserError
from shared.tuning.storage import AdvisoryLock, open_storage, study_lock

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
GRID = [0.01, 0.02, 0.05, 0.1]


def _server_binaries() -> Path | None:
    found = shutil.which("initdb")
    if found and (Path(found).resolve().parent / "createdb").is_file():
        return Path(found).resolve().parent  # Debian links some tools into PATH, all of them in its own folder
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return installed[-1].parent if installed else None


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own (trust authentication, 127.0.0.1 only) and an empty database on it."""
    pytest.importorskip("psycopg", reason="PostgreSQL's driver is not installed: pip install -e '.[postgres]'")
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server installed (Debian: apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="postgres-"))
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no postgres user to run the server as")
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(tool: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, str(binaries / tool), *args], capture_output=True, text=True, timeout=120)

    port = free_ports(1)[0]
    data = folder / "data"
    try:
        for step in (run("initdb", "-D", str(data), "-U", "tuner", "--auth=trust", "-E", "UTF8"),
                     run("pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
                         f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"),
                     run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "tuner", "studies")):
            if step.returncode != 0:
                pytest.skip(f"PostgreSQL could not start here: {(step.stderr or step.stdout).strip()[-300:]}")
        yield f"postgresql+psycopg://tuner@127.0.0.1:{port}/studies"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def recipe(model: dict, runs_dir: Path, storage: str, epochs: int = 1, **tune) -> Path:
    """A grid study over GRID learning rates of `model` (conftest's one_conv_model), as a recipe file."""
    tree = tiny_tree(runs_dir, train={"epochs": epochs}, data={"synthetic_train": 64, "synthetic_test": 32})
    tree["model"] = model
    tree["tune"] = {"study": "shared", "sampler": "grid", "trials": len(GRID), "storage": storage,
                    "space": {"train.lr.base": {"choice": GRID}}, **tune}
    path = runs_dir.parent / f"tune-{runs_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


def tuner(path: Path) -> subprocess.Popen:
    return forked.popen([sys.executable, "-m", "shared.runner", "tune", "--config", str(path)], cwd=REPO,
                        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def states(study: optuna.Study) -> list[TrialState]:
    return [trial.state for trial in study.get_trials(deepcopy=False)]


def training(study: optuna.Study) -> int:
    """Trials running with their values drawn, each trained by a worker (a trial is RUNNING from its creation, a
    moment before its values are drawn: killed in between, it leaves no values for its retry to repeat)."""
    return sum(trial.state == TrialState.RUNNING and bool(trial.params) for trial in study.get_trials(deepcopy=False))


@pytest.mark.slow
def test_two_machines_share_a_postgres_study_and_a_killed_worker_s_trial_is_run_again(postgres_url, tmp_path,
                                                                                     one_conv_model):
    # Each worker has its own runs folder, as on two machines: only the server is shared, so its advisory lock
    # is what keeps them from starting more than tune.trials or training one value twice.
    # Two trials: when the survivor ends its own, the killed worker's trial still looks RUNNING and would make
    # the count; only a stale trial failed before the count lets its retry run. A beat every 3 s (stale after 6)
    # outlasts the survivor's own trial: it must wait for the dead worker's trial to go stale, not leave it RUNNING.
    paths = [recipe(one_conv_model, tmp_path / f"machine{index}" / "runs", postgres_url, epochs=10,
                    heartbeat_seconds=3, trials=2) for index in (1, 2)]
    doomed, survivor = tuner(paths[0]), tuner(paths[1])
    try:
        deadline = time.monotonic() + 240
        study = None
        storage = None
        while time.monotonic() < deadline:  # both workers inside a trial of the new study
            time.sleep(0.2)
            try:  # opened as the workers open it: one at a time while Optuna makes its tables
                storage = storage or open_storage(postgres_url)
                study = optuna.load_study(study_name="shared", storage=storage)
            except KeyError:  # not created yet
                continue
            if training(study) == 2:
                break
        assert study is not None and training(study) == 2, \
            doomed.stderr.read() if doomed.poll() is not None else "the workers never trained at once"
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=30)
        out, err = survivor.communicate(timeout=400)
    finally:
        for process in (doomed, survivor):
            if process.poll() is None:
                process.kill()
    assert survivor.returncode == 0, err[-3000:]

    trials = optuna.load_study(study_name="shared", storage=postgres_url).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # The killed worker's trial was failed by its stale heartbeat and queued again with the same value, and
    # the survivor ran it: every trial once, none trained twice, nothing more than asked.
    assert len(failed) == 1 and len(complete) == 2, [(t.number, t.state, t.params) for t in trials]
    assert len({t.params["train.lr.base"] for t in complete}) == 2
    retry = next(t for t in complete if t.system_attrs.get("failed_trial") == failed[0].number)
    assert retry.params == failed[0].params
    survivor_runs = {str(p) for p in (tmp_path / "machine2" / "runs" / "tiny").iterdir()}
    assert retry.user_attrs["run"] in survivor_runs
    assert "trial" in out


def line_of(fd: int, timeout: float = 30) -> bytes:
    """The next line a process writes to the pipe `fd`, read a byte at a time: nothing after it is taken."""
    line = b""
    while not line.endswith(b"\n") and select.select([fd], [], [], timeout)[0]:
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line


@pytest.mark.slow
def test_the_study_lock_on_a_server_is_one_lock_for_every_worker(postgres_url, tmp_path, one_conv_model):
    config = load_config(recipe(one_conv_model, tmp_path / "runs", postgres_url))
    first, second = study_lock(config, postgres_url), study_lock(config, postgres_url)
    assert isinstance(first, AdvisoryLock) and first.key == second.key
    code = ("import sys; from shared.tuning.storage import AdvisoryLock; lock = AdvisoryLock(sys.argv[1], 'x'); "
            "lock.key = int(sys.argv[2]); print('asking', flush=True); lock.acquire(); print('locked', flush=True); "
            "sys.stdin.read()")
    holder = None
    try:
        with first, first:  # re-entrant within a worker
            holder = forked.popen([sys.executable, "-c", code, postgres_url, str(first.key)], cwd=REPO, env=ENV,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            said = holder.stdout.fileno()  # read raw: a buffered reader could take "locked" in with "asking"
            assert line_of(said) == b"asking\n"
            assert not select.select([said], [], [], 1.0)[0]  # another worker waits while this one holds it
        assert line_of(said) == b"locked\n"  # ... and takes it once released
        holder.send_signal(signal.SIGKILL)  # a worker that dies holding it: the server drops its lock
        holder.wait(timeout=30)
        started = time.monotonic()
        with second:
            assert time.monotonic() - started < 10
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()


def test_workers_opening_a_new_database_at_once_each_open_it(postgres_url):
    """Optuna makes its tables when a storage first opens a database; workers started together on a new one
    raced to (a duplicate-key error in PostgreSQL's catalog, optuna/optuna#1092). Four at once, each with its own
    connections as on four machines, on a database no storage has opened: every one opens it."""
    import threading

    import sqlalchemy

    server = sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool)
    with server.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sqlalchemy.text("CREATE DATABASE fresh"))
    url = postgres_url.rsplit("/", 1)[0] + "/fresh"
    start, failures = threading.Barrier(4), []

    def open_at_once() -> None:
        start.wait()
        try:
            open_storage(url)
        except UserError as error:
            failures.append(str(error))

    workers = [threading.Thread(target=open_at_once) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert failures == []
    assert optuna.get_all_study_summaries(url) == []  # the tables are there, and empty


def test_an_unreachable_server_is_one_line_within_seconds(tmp_path):
    pytest.importorskip("psycopg", reason="PostgreSQL's driver is not installed: pip install -e '.[postgres]'")
    url = f"postgresql+psycopg://tuner@127.0.0.1:{free_ports(1)[0]}/studies"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(UserError, match=r"^tune.storage '.*' could not be opened: OperationalError: .*; give an"):
        open_storage(url)
    assert time.monotonic() - started < 15


def test_a_missing_driver_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    with pytest.raises(UserError, match=r"PostgreSQL needs its driver: pip install -e '\.\[postgres\]'"):
        open_storage("postgresql+psycopg://tuner@127.0.0.1:1/studies")


@pytest.mark.slow
def test_two_workers_share_a_journal_study(tmp_path, one_conv_model):
    journal = tmp_path / "shared folder" / "studies.log"
    paths = [recipe(one_conv_model, tmp_path / f"machine{index}" / "runs", f"journal:{journal}") for index in (1, 2)]
    workers = [tuner(path) for path in paths]
    results = [worker.communicate(timeout=400) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [err[-2000:] for _, err in results]

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name="shared", storage=storage)
    assert states(study) == [TrialState.COMPLETE] * len(GRID)
    assert sorted(t.params["train.lr.base"] for t in study.trials) == GRID  # none trained twice
    assert study.user_attrs["workers"] == 2
    assert (journal.parent / ".studies.log.lock").is_file()  # the study lock sits beside the journal
    assert (journal.parent / "shared-history.png").is_file()  # the study's plot too


@pytest.mark.slow
def test_a_journal_study_resumes(tmp_path, one_conv_model):
    journal = tmp_path / "studies.log"
    config = load_config(recipe(one_conv_model, tmp_path / "runs", f"journal:{journal}", trials=1))
    assert tune_module.tune(config)["trials"]["complete"] == 1
    more = load_config(recipe(one_conv_model, tmp_path / "runs", f"journal:{journal}", trials=2))
    result = tune_module.tune(more)
    assert result["trials"]["complete"] == 2 and result["storage"] == f"journal:{journal}"
