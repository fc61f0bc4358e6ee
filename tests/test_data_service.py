"""data.service: the training pipeline run by tf.data service workers (shared/data/service.py), with real
`serve-data` dispatcher and worker processes on localhost."""

from __future__ import annotations

import collections
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shared.config import from_dict
from shared.errors import UserError

import forked
from conftest import REPO, free_ports, load_script, tiny_tree

# The benchmark's servers and reader (scripts/bench_service_share.py): one copy of each
bench = load_script("bench_service_share")
bench.START = forked.popen
ENV, Server = bench.ENV, bench.Server


class Cluster:
    """Starts a dispatcher (`dispatcher(*args)`) and workers (`worker()`) on a free port; `stop()` stops them all."""

    def __init__(self, work_dir: Path):
        self.port = free_ports(1)[0]
        self.address = f"localhost:{self.port}"
        self.work_dir = work_dir
        self.started: list[Server] = []

    def dispatcher(self, fault_tolerant: bool = False) -> Server:
        extra = ["--work-dir", str(self.work_dir)] if fault_tolerant else []
        self.started.append(Server("dispatcher", "--port", str(self.port), *extra))
        return self.started[-1]

    def worker(self) -> Server:
        self.started.append(Server("worker", "--dispatcher", self.address))
        return self.started[-1]

    def stop(self) -> None:
        for server in self.started:
            server.stop(signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path):
    """A cluster of the test's own, for the tests that start, stop or kill its servers."""
    started = Cluster(tmp_path / "dispatcher")
    yield started
    started.stop()


def _running(tmp_path_factory, workers: int):
    started = Cluster(tmp_path_factory.mktemp("dispatcher"))
    started.dispatcher()
    for _ in range(workers):
        started.worker()
    return started


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """A dispatcher and two workers, started once for the tests that only read or train through them (each test's
    jobs are its own: its pipeline, its marks folder); every process a cluster starts first imports TensorFlow."""
    started = _running(tmp_path_factory, 2)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """A dispatcher and one worker, likewise: for the shared jobs, whose elements one worker decodes once each."""
    started = _running(tmp_path_factory, 1)
    yield started
    started.stop()


def _service_tree(tmp_path: Path, model: dict, address: str, **service) -> dict:
    tree = tiny_tree(tmp_path / "runs", data={"service": {"dispatcher": address, **service}})
    tree["model"] = model
    return tree


def _train(tmp_path: Path, tree: dict, *args: str) -> subprocess.Popen:
    """The runner training `tree` (written as a recipe) in a process of its own; its output in a file."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    command = [sys.executable, "-m", "shared.runner", *(args or ("--config", str(recipe)))]
    path = tmp_path / f"train-{len(list(tmp_path.glob('train-*')))}.out"
    with path.open("w") as output:
        process = forked.popen(command, cwd=REPO, env=ENV, stdout=output, stderr=subprocess.STDOUT, text=True)
    process.output_path = path
    return process


def _output(process: subprocess.Popen) -> str:
    return process.output_path.read_text()


def _wait_for_epochs(runs: Path, epochs: int, timeout: float = 240) -> Path:
    """The run folder once its metrics.csv has `epochs` rows."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for metrics in runs.glob("*/v*/metrics.csv"):
            if len(metrics.read_text().splitlines()) > epochs:
                return metrics.parent
        time.sleep(0.5)
    raise AssertionError(f"no run in {runs} reached {epochs} epochs in {timeout} s")


# ---------------------------------------------------------------- the config key


def test_data_service_is_off_by_default_and_its_keys_are_checked():
    assert from_dict({}).data.service.dispatcher is None
    config = from_dict({"data": {"service": {"dispatcher": "10.0.0.5:5050", "mode": "parallel_epochs",
                                             "share": True}}})
    assert (config.data.service.mode, config.data.service.share) == ("parallel_epochs", True)
    with pytest.raises(UserError, match=r"data.service.dispatcher is 'localhost'; give the HOST:PORT"):
        from_dict({"data": {"service": {"dispatcher": "localhost"}}})
    with pytest.raises(UserError, match="data.service.mode"):
        from_dict({"data": {"service": {"dispatcher": "localhost:5050", "mode": "epochs"}}})
    with pytest.raises(UserError, match="share needs data.service.mode: parallel_epochs"):
        from_dict({"data": {"service": {"dispatcher": "localhost:5050", "share": True}}})
    with pytest.raises(UserError, match="data.on_corrupt: skip does not combine with data.service"):
        from_dict({"data": {"on_corrupt": "skip", "service": {"dispatcher": "localhost:5050"}}})


def test_an_unreachable_dispatcher_is_one_user_error_within_seconds():
    import tensorflow as tf

    from shared.data.service import distribute_train

    port = free_ports(1)[0]  # nothing listens there
    service = from_dict({"data": {"service": {"dispatcher": f"localhost:{port}"}}}).data.service
    started = time.time()
    with pytest.raises(UserError) as refused:
        distribute_train(tf.data.Dataset.range(4).repeat(), service)
    assert time.time() - started < 5
    message = str(refused.value)
    assert "\n" not in message and f"no tf.data service dispatcher answers at localhost:{port}" in message
    assert f"serve-data dispatcher --port {port}" in message


def test_a_port_where_something_else_listens_is_refused_within_seconds_not_a_hang():
    from shared.data.service import check_reachable

    with socket.socket() as silent:  # accepts connections, never answers: the service's own client waits an hour
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.time()
        with pytest.raises(UserError, match=f"no tf.data service dispatcher answers at {address} "
                                            r"\(data.service.dispatcher\): no answer within 1 s; start one"):
            check_reachable(address, timeout=1)
        assert time.time() - started < 4


def test_the_service_off_leaves_the_training_pipeline_as_it_is():
    import tensorflow as tf

    from shared.data.service import distribute_train

    dataset = tf.data.Dataset.range(4)
    assert distribute_train(dataset, from_dict({}).data.service) is dataset


# ---------------------------------------------------------------- the commands


@pytest.mark.slow
def test_serve_data_prints_where_it_listens_and_stops_cleanly_on_sigint_and_sigterm(cluster):
    dispatcher = cluster.dispatcher()
    port = cluster.address.split(":")[1]
    assert dispatcher.line.startswith("tf.data service dispatcher listening on ")  # this machine's name
    assert dispatcher.line.endswith(f":{port} (no --work-dir: not fault tolerant)")
    worker = cluster.worker()
    assert worker.line.startswith("tf.data service worker listening on localhost:")
    assert worker.line.endswith(f"for the dispatcher at {cluster.address}")
    assert worker.stop(signal.SIGTERM) == 0
    assert worker.next_line().endswith("stopped (SIGTERM)")
    assert dispatcher.stop(signal.SIGINT) == 0
    stopped = dispatcher.next_line()
    assert stopped.startswith("tf.data service dispatcher at ") and stopped.endswith(f":{port} stopped (SIGINT)")


@pytest.mark.slow
def test_serve_data_refuses_a_worker_without_a_dispatcher_that_answers_and_a_port_in_use():
    port = free_ports(1)[0]
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    for args, expected in ((["worker"], "serve-data worker needs --dispatcher HOST:PORT"),
                           (["dispatcher", "--port", str(taken.getsockname()[1])],
                            f"the dispatcher could not listen on port {taken.getsockname()[1]}: is it in use?"),
                           (["worker", "--dispatcher", f"localhost:{port}"],
                            f"no tf.data service dispatcher answers at localhost:{port} (--dispatcher)"),
                           (["dispatcher", "--dispatcher", "localhost:1"], "--dispatcher is for serve-data worker")):
        started = time.time()
        result = forked.run([sys.executable, "-m", "shared.runner", "serve-data", *args], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert time.time() - started < 60
    taken.close()


# ---------------------------------------------------------------- reading through the service
# The benchmark's READER: each example's "decoding" on a worker leaves a marker file named by its id (or its
# element of the stream) in MARKS (the workers are other processes); the elements a trainer received, on stdout.
_read, _decodes, _result = bench.read, bench.decodings, bench.result


@pytest.mark.slow
def test_distributed_epoch_reads_each_example_once_a_pass(two_workers, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    # A pipeline of three passes, read to its last element: the job's whole output. An endless stream read part way
    # says little of the passes (ids the dispatcher dealt ahead to a worker are undecoded when the reader stops:
    # 2 to 5 decodes of one id in one loaded run); a finished job must hold every id exactly once a pass.
    read = _result(_read(marks, two_workers.address, "distributed_epoch", batches=0, passes=3))["elements"]
    assert collections.Counter(read) == {index: 3 for index in range(64)}
    # decoded on the workers (the stream read again may start anew); a lower bound: no need to wait for the workers
    assert min(_decodes(marks, settle_seconds=0).values()) >= 3


@pytest.mark.slow
def test_parallel_epochs_workers_read_the_whole_stream_each(two_workers, tmp_path):
    """The contrast that makes the test above able to fail: two workers each read every example."""
    marks = tmp_path / "marks"
    marks.mkdir()
    _result(_read(marks, two_workers.address, "parallel_epochs", batches=16))  # 64 examples: one pass's worth
    decoded = _decodes(marks, settle_seconds=0)  # lower bounds, which later decodings cannot undo
    assert sum(decoded.values()) >= 2 * 32 and max(decoded.values()) >= 2  # both workers went over the ids


@pytest.mark.slow
def test_a_shared_job_decodes_each_element_once_for_two_concurrent_trainers(one_worker, tmp_path):
    """Elements tagged with their place in the stream: with `share` each is decoded once however many trainers
    read it (without, each trainer's job decodes the stream anew, twice for two trainers: in
    scripts/bench_service_share.py's table)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    readers = [_read(marks, one_worker.address, "parallel_epochs", batches=32, share=True, places=True)
               for _ in range(2)]
    first, second = (_result(reader) for reader in readers)
    # built in two processes: the same job, and the same id for a run's training pipeline
    assert first["pipeline"] == second["pipeline"] and first["training"] == second["training"]
    for result in (first, second):  # 128 elements in a row of the stream hold a whole pass
        assert len(result["elements"]) == 128 and {e % bench.IDS for e in result["elements"]} == set(range(64))
    decoded = _decodes(marks)
    assert set(first["elements"]) | set(second["elements"]) <= set(decoded)  # read only what a worker decoded
    assert max(decoded.values()) == 1, decoded.most_common(3)
    assert set(first["elements"]) & set(second["elements"])  # one stream: they read the same elements


# ---------------------------------------------------------------- training runs


@pytest.mark.slow
def test_a_run_trains_through_the_service_and_a_killed_worker_does_not_stop_it(cluster, tmp_path, one_conv_model):
    cluster.dispatcher()
    doomed, _ = cluster.worker(), cluster.worker()
    tree = _service_tree(tmp_path, one_conv_model, cluster.address)
    tree["data"].update(synthetic_train=2048)
    tree["train"].update(epochs=4)
    training = _train(tmp_path, tree)
    _wait_for_epochs(tmp_path / "runs", 1)
    doomed.stop(signal.SIGKILL)  # while the second epoch trains
    assert training.wait(300) == 0, _output(training)
    output = _output(training)
    assert f"training input from the tf.data service at {cluster.address} (distributed_epoch)" in output
    run = next((tmp_path / "runs").glob("tiny/v*"))
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert len((run / "metrics.csv").read_text().splitlines()) == 5


@pytest.mark.slow
def test_concurrent_runs_of_one_pipeline_with_share_read_one_job(one_worker, tmp_path, one_conv_model):
    """Two runs at once, as two tune trials that tune a key outside the pipeline (the learning rate)."""
    runs = []
    for trial, rate in enumerate((0.05, 0.01)):
        folder = tmp_path / f"trial{trial}"
        folder.mkdir()
        tree = _service_tree(folder, one_conv_model, one_worker.address, mode="parallel_epochs", share=True)
        tree["train"]["lr"]["base"] = rate
        runs.append(_train(folder, tree))
    jobs = set()
    for run in runs:
        assert run.wait(300) == 0, _output(run)
        line = next(line for line in _output(run).splitlines() if line.startswith("training input from"))
        assert line.startswith(f"training input from the tf.data service at {one_worker.address} (parallel_epochs, "
                               f"shared job pipeline-")
        jobs.add(line)
    assert len(jobs) == 1  # the same pipeline in two processes: one job


@pytest.mark.slow
def test_a_dispatcher_restarted_from_its_work_dir_resumes(cluster, tmp_path, one_conv_model):
    dispatcher = cluster.dispatcher(fault_tolerant=True)
    assert f"journal in {cluster.work_dir}" in dispatcher.line
    cluster.worker(), cluster.worker()
    tree = _service_tree(tmp_path, one_conv_model, cluster.address)
    tree["data"].update(synthetic_train=2048)
    tree["train"].update(epochs=4)
    training = _train(tmp_path, tree)
    _wait_for_epochs(tmp_path / "runs", 1)
    dispatcher.stop(signal.SIGKILL)
    cluster.dispatcher(fault_tolerant=True)  # the same port, the same journal
    assert training.wait(300) == 0, _output(training)
    run = next((tmp_path / "runs").glob("tiny/v*"))
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_a_resumed_run_continues_with_the_service(two_workers, tmp_path, one_conv_model):
    tree = _service_tree(tmp_path, one_conv_model, two_workers.address)
    tree["data"].update(synthetic_train=2048)
    tree["train"].update(epochs=4)
    training = _train(tmp_path, tree)
    run = _wait_for_epochs(tmp_path / "runs", 1)
    training.send_signal(signal.SIGTERM)
    training.wait(120)
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
    resumed = _train(tmp_path, tree, "--resume", str(run))
    assert resumed.wait(300) == 0, _output(resumed)
    output = _output(resumed)
    assert f"training input from the tf.data service at {two_workers.address}" in output
    assert "resuming after epoch" in output
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def test_an_unreachable_dispatcher_stops_a_run_before_its_folder_exists(tmp_path, one_conv_model, capsys):
    from shared import runner

    port = free_ports(1)[0]
    recipe = tmp_path / "recipe.yaml"  # the runner in this process: what is checked is its exit code and message
    recipe.write_text(yaml.safe_dump(_service_tree(tmp_path, one_conv_model, f"localhost:{port}")))
    assert runner.main(["--config", str(recipe)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no tf.data service dispatcher answers at localhost:{port} (data.service.dispatcher): "
                      f"Connection refused; start one with `serve-data dispatcher --port {port}` there, or correct "
                      f"the address"]
    assert not list((tmp_path / "runs").glob("*/v*"))
