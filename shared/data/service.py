"""The tf.data service (Audibert et al. 2022, `tf.data.experimental.service`): the training pipeline (decode,
augmentation, batching) run by worker processes, on this machine or others, and read by the trainer over the
network. Evaluation stays local.

`data.service.dispatcher` (HOST:PORT) turns it on for a run: `distribute_train` hands the finished (endless)
training pipeline to the service. In `distributed_epoch` mode the dispatcher deals the training examples out to
the workers one by one, pass after pass over the training split (the pipeline's repeat runs in the dispatcher), so
each example is read once a pass. One endless job rather than a job per pass: a pass that a lost worker had a
share of did not end (TensorFlow 2.21), and training stalled there. In `parallel_epochs` mode every worker runs
the whole stream on its own.
`share` puts every trainer of the same pipeline on one job through the service's cross-trainer cache (concurrent
tune trials: each reads the whole stream, each image decoded once for all of them).

`serve` runs a dispatcher (fault tolerant with a work folder: its journal) or a worker until SIGINT / SIGTERM.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import threading
import uuid

from shared.config_validation import split_address
from shared.errors import UserError

REACH_SECONDS = 3.0  # how long a dispatcher may take to answer before a run is refused
# A worker heartbeats this often, and one silent for WORKER_TIMEOUT_MS is dropped with its share of the pass (the
# dispatcher looks every CHECK_MS), so the trainer goes on with the others; with the service's defaults (a
# heartbeat every 30 s, a look every 10 minutes) training stalled for minutes on a lost worker.
HEARTBEAT_MS = 1000
WORKER_TIMEOUT_MS = 5000
CHECK_MS = 1000
VERSION_METHOD = "/tensorflow.data.DispatcherService/GetVersion"  # every dispatcher answers it


def check_reachable(address: str, what: str = "data.service.dispatcher", timeout: float = REACH_SECONDS) -> None:
    """A UserError within `timeout` seconds unless a tf.data service dispatcher answers at `address` (asked for
    its version: the service's own client would retry for an hour, and hang on a port where something else
    listens)."""
    try:
        import grpc  # TensorFlow's own dependency (grpcio)
    except ImportError:  # a TensorFlow built without it
        raise UserError("data.service needs grpcio, which TensorFlow installs: pip install grpcio") from None

    try:
        host, port = split_address(address)
    except ValueError:
        raise UserError(f"{what} is {address!r}; give the HOST:PORT `serve-data dispatcher` prints") from None
    fix = f"start one with `serve-data dispatcher --port {port}` there, or correct the address"
    try:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            channel.unary_unary(VERSION_METHOD)(b"", timeout=timeout)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:  # refused, unreachable, no such host: the last reason
            why = (error.details() or "unavailable").rsplit(": ", 1)[-1]
        elif error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            why = f"no answer within {timeout:g} s"
        else:
            why = f"something else listens there ({error.code().name.lower()})"
        raise UserError(f"no tf.data service dispatcher answers at {address} ({what}): {why}; {fix}") from None


def pipeline_id(dataset) -> str:
    """The same id for the same pipeline built in any process (the trainers a shared job joins): a hash of the
    dataset's graph, its maps written in key order, with TensorFlow's per-process function and node counters left
    out. (Unseeded random ops draw their seeds per process: a run sets train.seed before building its data.)"""
    import tensorflow as tf

    serialized = dataset._as_serialized_graph(strip_device_assignment=True).numpy()  # no public API serializes one
    graph = tf.compat.v1.GraphDef.FromString(serialized).SerializeToString(deterministic=True)
    return "pipeline-" + hashlib.sha256(re.sub(rb"_\d+", b"_", graph)).hexdigest()[:20]


def distribute_train(dataset, service, trainer: str | None = None):
    """The training `dataset` read from the tf.data service `service` (a DataServiceConfig) names, as an
    endless stream; `dataset` itself when the service is off. `trainer`: this trainer's id in a shared job
    (default: host, process and a random suffix). A UserError, before any reading, when the dispatcher does not
    answer or the pipeline does not fit the mode."""
    if not service.dispatcher:
        return dataset
    import tensorflow as tf

    check_reachable(service.dispatcher)
    host, port = split_address(service.dispatcher)
    target = f"grpc://{host}:{port}"
    api = tf.data.experimental.service
    if service.share:  # the cross-trainer cache: one job, every trainer reads all of it
        name = pipeline_id(dataset)
        dataset_id = api.register_dataset(target, dataset, dataset_id=name)
        trainer = trainer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        read = api.from_dataset_id(service.mode, target, dataset_id, dataset.element_spec, job_name=name,
                                   cross_trainer_cache=api.CrossTrainerCache(trainer_id=trainer))
    else:
        name = None
        read = dataset.apply(api.distribute(service.mode, target))
    print(f"training input from the tf.data service at {host}:{port} ({service.mode}"
          + (f", shared job {name}" if name else "") + ")", flush=True)
    # A pipeline that ends (none of the project's training pipelines does) is read again, so fit never runs dry.
    endless = dataset.cardinality() == tf.data.INFINITE_CARDINALITY
    return (read if endless else read.repeat()).prefetch(tf.data.AUTOTUNE)


def serve(role: str, port: int = 0, work_dir: str | None = None, dispatcher: str | None = None,
          host: str | None = None) -> None:
    """Run a tf.data service dispatcher or worker in this process until SIGINT or SIGTERM. `work_dir` (a
    dispatcher): its journal, so a dispatcher restarted on it resumes its datasets and jobs. `dispatcher` (a
    worker): the dispatcher's HOST:PORT; `host`: the name clients reach this worker by (default: localhost for a
    dispatcher on this machine, else this machine's name). Prints where it listens, and that it stopped."""
    if role == "worker":
        check_reachable(dispatcher, "--dispatcher")
        if host is None:
            local = split_address(dispatcher)[0] in ("localhost", "127.0.0.1", "::1")
            host = "localhost" if local else socket.getfqdn()
    try:
        server = _start_server(role, port, work_dir, dispatcher, host)
    except RuntimeError:  # TensorFlow says only "Could not start gRPC server"
        raise UserError(f"the {role} could not listen on port {port}: is it in use? choose another --port") from None
    where = f"{host or socket.getfqdn()}:{server._server.bound_port()}"  # the port --port 0 was given
    stop = threading.Event()
    received = []

    def request_stop(signum, frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    # The handlers go in before the line is printed: a supervisor that signals as soon as it reads the line must
    # reach them, not the default action.
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    if role == "dispatcher":
        print(f"tf.data service dispatcher listening on {where}"
              + (f", journal in {work_dir}" if work_dir else " (no --work-dir: not fault tolerant)"), flush=True)
    else:
        print(f"tf.data service worker listening on {where}, for the dispatcher at {dispatcher}", flush=True)
    try:
        while not stop.wait(1.0):  # a timed wait: signals are handled between waits
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()
    print(f"tf.data service {role} at {where} stopped ({received[0]})", flush=True)


def _start_server(role: str, port: int, work_dir: str | None, dispatcher: str | None, host: str | None):
    import tensorflow as tf

    api = tf.data.experimental.service
    if role == "dispatcher":
        if work_dir:
            os.makedirs(work_dir, exist_ok=True)
        return api.DispatchServer(api.DispatcherConfig(port=port, work_dir=work_dir, fault_tolerant_mode=bool(work_dir),
                                                       worker_timeout_ms=WORKER_TIMEOUT_MS,
                                                       job_gc_check_interval_ms=CHECK_MS))
    return api.WorkerServer(api.WorkerConfig(dispatcher_address=dispatcher.removeprefix("grpc://"),
                                             worker_address=f"{host}:%port%", port=port,
                                             data_transfer_address=f"{host}:%dts_port%",
                                             heartbeat_interval_ms=HEARTBEAT_MS))
