"""data.service: the training pipeline run by tf.data service workers (shared/data/service.py), with real
`serve-data` dispatcher and worker processes on localhost."""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from shared.config import from_dict
from shared.errors import UserError

from conftest import REPO, free_ports, tiny_tree

# As a user runs them: TensorFlow's C++ log at the project's default (conftest lowers it for the test process)
ENV = {**{key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}, "PYTHONPATH": str(REPO)}


class Server:
    """A `serve-data` process; `line` is the first line it printed (where it listens)."""

    def __init__(self, *args: str, timeout: float = 120):
        self.process = subprocess.Popen([sys.executable, "-m", "shared.runner", "serve-data", *args], cwd=REPO,
                                        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.line = self.next_line(timeout)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float = 60) -> str | None:
        return self.lines.get(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture
def cluster(tmp_path):
    """Starts a dispatcher (`dispatcher(*args)`) and workers (`worker()`) on free ports; stops them all after."""
    started: list[Server] = []
    port = free_ports(1)[0]

    class Cluster:
        address = f"localhost:{port}"
        work_dir = tmp_path / "dispatcher"

        def dispatcher(self, fault_tolerant: bool = False) -> Server:
            extra = ["--work-dir", str(self.work_dir)] if fault_tolerant else []
            started.append(Server("dispatcher", "--port", str(port), *extra))
            return started[-1]

        def worker(self) -> Server:
            started.append(Server("worker", "--dispatcher", self.address))
            return started[-1]

    yield Cluster()
    for server in started:
        server.stop(signal.SIGKILL)


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
        process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=output, stderr=subprocess.STDOUT, text=True)
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
        result = subprocess.run([sys.executable, "-m", "shared.runner", "serve-data", *args], cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert time.time() - started < 60
    taken.close()


# ---------------------------------------------------------------- reading through the service

# A trainer reading a pipeline through the service: each example's "decoding" on a worker leaves a marker file
# named by its id in MARKS (the workers are other processes); the ids the trainer received, on stdout.
READER = """
import json, sys
import keras
import tensorflow as tf
from shared.config import from_dict
from shared.data import make_datasets
from shared.data.service import distribute_train, pipeline_id

marks, address, mode, share, batches = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "share", int(sys.argv[5])
passes = int(sys.argv[6]) or None  # 0: endless, as a training stream
service = from_dict({"data": {"service": {"dispatcher": address, "mode": mode, "share": share}}}).data.service

keras.utils.set_random_seed(0)  # as a run does (shared.lifecycle.prepare): the same graph in every process
training = make_datasets(from_dict({"data": {"source": "synthetic", "image_size": 8, "num_classes": 2,
                                             "synthetic_train": 16, "synthetic_test": 4}})).train

def decode(index):
    name = tf.strings.join([marks, "/", tf.strings.as_string(index), "-", tf.strings.as_string(
        tf.timestamp(), precision=9), "-", tf.strings.as_string(tf.random.uniform([], maxval=2**31, dtype=tf.int64))])
    with tf.control_dependencies([tf.io.write_file(name, "")]):
        return tf.identity(index)

pipeline = tf.data.Dataset.range(64).shuffle(64, seed=1).repeat(passes).map(decode).batch(4)
stream = distribute_train(pipeline, service)
# a job's workers each batch their part: its last batches may be short, so a finite job is read by its elements
stream = stream.unbatch().take(64 * passes).batch(4) if passes else stream.take(batches)
read = [int(i) for batch in stream for i in batch.numpy()]
print(json.dumps({"ids": read, "pipeline": pipeline_id(pipeline), "training": pipeline_id(training)}))
"""


def _read(marks: Path, address: str, mode: str, batches: int, share: bool = False,
          passes: int = 0) -> subprocess.Popen:
    """The READER on the ids 0-63, shuffled each pass, batched by 4: endless, `batches` batches read; or
    `passes` passes, read whole (the service's stream is endless: the elements of the first job only)."""
    return subprocess.Popen([sys.executable, "-c", READER, str(marks), address, mode, "share" if share else "-",
                             str(batches), str(passes)], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _decodes(marks: Path) -> collections.Counter:
    """Decodes per example id, once the workers' prefetching has settled."""
    counts, previous = None, -1
    while counts is None or sum(counts.values()) != previous:
        previous = -1 if counts is None else sum(counts.values())
        time.sleep(2)
        counts = collections.Counter(int(path.name.split("-")[0]) for path in marks.iterdir())
    return counts


def _result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_distributed_epoch_reads_each_example_once_a_pass(cluster, tmp_path):
    cluster.dispatcher()
    cluster.worker(), cluster.worker()
    marks = tmp_path / "marks"
    marks.mkdir()
    # A pipeline of three passes, read to its last element: the job's whole output. An endless stream read part way
    # says little of the passes (ids the dispatcher dealt ahead to a worker are undecoded when the reader stops:
    # 2 to 5 decodes of one id in one loaded run); a finished job must hold every id exactly once a pass.
    read = _result(_read(marks, cluster.address, "distributed_epoch", batches=0, passes=3))["ids"]
    assert collections.Counter(read) == {index: 3 for index in range(64)}
    assert min(_decodes(marks).values()) >= 3  # decoded on the workers (the stream read again may start anew)


@pytest.mark.slow
def test_parallel_epochs_workers_read_the_whole_stream_each(cluster, tmp_path):
    """The contrast that makes the test above able to fail: two workers each read every example."""
    cluster.dispatcher()
    cluster.worker(), cluster.worker()
    marks = tmp_path / "marks"
    marks.mkdir()
    _result(_read(marks, cluster.address, "parallel_epochs", batches=16))  # 64 examples: one pass's worth
    decoded = _decodes(marks)
    assert sum(decoded.values()) >= 2 * 32 and max(decoded.values()) >= 2  # both workers went over the ids


@pytest.mark.slow
def test_a_shared_job_decodes_each_image_once_for_two_concurrent_trainers(cluster, tmp_path):
    cluster.dispatcher()
    cluster.worker()
    marks = tmp_path / "marks"
    marks.mkdir()
    readers = [_read(marks, cluster.address, "parallel_epochs", batches=32, share=True) for _ in range(2)]
    first, second = (_result(reader) for reader in readers)
    # built in two processes: the same job, and the same id for a run's training pipeline
    assert first["pipeline"] == second["pipeline"] and first["training"] == second["training"]
    for result in (first, second):
        assert len(result["ids"]) == 128 and set(result["ids"]) == set(range(64))  # each read two passes
    decoded = _decodes(marks)
    # the two trainers read 256 examples between them; the worker decoded each once per pass it made
    assert sum(decoded.values()) < 256 and max(decoded.values()) - min(decoded.values()) <= 1, decoded


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
def test_concurrent_runs_of_one_pipeline_with_share_read_one_job(cluster, tmp_path, one_conv_model):
    """Two runs at once, as two tune trials that tune a key outside the pipeline (the learning rate)."""
    cluster.dispatcher()
    cluster.worker()
    runs = []
    for trial, rate in enumerate((0.05, 0.01)):
        folder = tmp_path / f"trial{trial}"
        folder.mkdir()
        tree = _service_tree(folder, one_conv_model, cluster.address, mode="parallel_epochs", share=True)
        tree["train"]["lr"]["base"] = rate
        runs.append(_train(folder, tree))
    jobs = set()
    for run in runs:
        assert run.wait(300) == 0, _output(run)
        line = next(line for line in _output(run).splitlines() if line.startswith("training input from"))
        assert line.startswith(f"training input from the tf.data service at {cluster.address} (parallel_epochs, "
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
def test_a_resumed_run_continues_with_the_service(cluster, tmp_path, one_conv_model):
    cluster.dispatcher()
    cluster.worker(), cluster.worker()
    tree = _service_tree(tmp_path, one_conv_model, cluster.address)
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
    assert f"training input from the tf.data service at {cluster.address}" in output
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
