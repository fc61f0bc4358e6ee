"""Benchmark: what the tf.data service workers decode when several trainers read one training pipeline at once,
as concurrent tune trials do, with `data.service.share` off (a job each) and on (one job through the service's
cross-trainer cache).

Each element of the pipeline's endless stream is tagged with its place in that stream (64 example ids, shuffled
each pass; a worker reads its stream in order), and every decoding leaves a marker file named by the element on
the worker. So the counts say how often each element was decoded, not only each example id: with `share` every
element should be decoded once, however many trainers read it, and the decodings beyond the trainers' reads are
read-ahead and the trainers' staggered starts.

    python scripts/bench_service_share.py [--trainers 3] [--batches 32]

Starts its own `serve-data` dispatcher and one worker on a free local port; tests/test_data_service.py uses its
reader and servers.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# As a user runs them: TensorFlow's C++ log at the project's default
ENV = {**{key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}, "PYTHONPATH": str(REPO)}
IDS = 64  # example ids a pass; a tagged element is place * IDS + id

# A trainer reading the pipeline through the service; the elements it received, on stdout. argv: marks folder,
# dispatcher, mode, "share" or "-", batches to read (endless stream), passes (0: endless; else the finite job read
# whole), "places" to tag each element with its place in the stream (one worker only: each worker numbers its own).
READER = """
import json, sys
import keras
import tensorflow as tf
from shared.config import from_dict
from shared.data import make_datasets
from shared.data.service import distribute_train, pipeline_id

marks, address, mode, share, batches = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "share", int(sys.argv[5])
passes, places = int(sys.argv[6]) or None, sys.argv[7] == "places"  # passes 0: endless, as a training stream
service = from_dict({"data": {"service": {"dispatcher": address, "mode": mode, "share": share}}}).data.service

keras.utils.set_random_seed(0)  # as a run does (shared.lifecycle.prepare): the same graph in every process
training = make_datasets(from_dict({"data": {"source": "synthetic", "image_size": 8, "num_classes": 2,
                                             "synthetic_train": 16, "synthetic_test": 4}})).train

def decode(element):
    name = tf.strings.join([marks, "/", tf.strings.as_string(element), "-", tf.strings.as_string(
        tf.timestamp(), precision=9), "-", tf.strings.as_string(tf.random.uniform([], maxval=2**31, dtype=tf.int64))])
    with tf.control_dependencies([tf.io.write_file(name, "")]):
        return tf.identity(element)

pipeline = tf.data.Dataset.range(IDS).shuffle(IDS, seed=1).repeat(passes)
if places:
    pipeline = pipeline.enumerate().map(lambda place, index: place * IDS + index)
pipeline = pipeline.map(decode).batch(4)
stream = distribute_train(pipeline, service)
# a job's workers each batch their part: its last batches may be short, so a finite job is read by its elements
stream = stream.unbatch().take(IDS * passes).batch(4) if passes else stream.take(batches)
read = [int(i) for batch in stream for i in batch.numpy()]
print(json.dumps({"elements": read, "pipeline": pipeline_id(pipeline), "training": pipeline_id(training)}))
""".replace("IDS", str(IDS))


# How the processes start: subprocess.Popen's arguments (tests/test_data_service.py forks them instead).
START = subprocess.Popen


class Server:
    """A `serve-data` process; `line` is the first line it printed (where it listens)."""

    def __init__(self, *args: str, timeout: float = 120):
        self.process = START([sys.executable, "-m", "shared.runner", "serve-data", *args], cwd=REPO,
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


def read(marks: Path, address: str, mode: str, batches: int, share: bool = False, passes: int = 0,
         places: bool = False) -> subprocess.Popen:
    """The READER in a process of its own: `batches` batches of 4 of the endless stream, or `passes` passes of a
    finite job read whole; its elements tagged with their places when `places`."""
    return START([sys.executable, "-c", READER, str(marks), address, mode, "share" if share else "-",
                  str(batches), str(passes), "places" if places else "-"], cwd=REPO, env=ENV,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(process: subprocess.Popen) -> dict:
    """A reader's output: `elements` read, the pipeline's ids."""
    out, err = process.communicate(timeout=300)
    if process.returncode != 0:
        raise RuntimeError(f"a reader failed: {err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def decodings(marks: Path, settle_seconds: float = 2.0) -> collections.Counter:
    """Decodings per element (example id, or tagged element), once the workers' prefetching has settled: no new
    decoding for `settle_seconds` (0 for a lower bound, which later decodings cannot undo: the marks as they are)."""
    counts, previous = None, -1
    while counts is None or sum(counts.values()) != previous:
        previous = -1 if counts is None else sum(counts.values())
        time.sleep(settle_seconds)
        counts = collections.Counter(int(path.name.split("-")[0]) for path in marks.iterdir())
    return counts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(trainers: int, batches: int, share: bool) -> dict:
    """`trainers` readers at once through a fresh dispatcher and one worker, `parallel_epochs`, tagged elements."""
    address = f"localhost:{_free_port()}"
    servers = [Server("dispatcher", "--port", address.split(":")[1])]
    try:
        servers.append(Server("worker", "--dispatcher", address))
        with tempfile.TemporaryDirectory() as folder:
            marks = Path(folder)
            readers = [read(marks, address, "parallel_epochs", batches, share=share, places=True)
                       for _ in range(trainers)]
            reads = [result(reader)["elements"] for reader in readers]
            counts = decodings(marks)
    finally:
        for server in servers:
            server.stop(signal.SIGKILL)
    return {"read": sum(map(len, reads)), "distinct": len(set().union(*reads)), "decoded": sum(counts.values()),
            "elements": len(counts), "most": max(counts.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainers", type=int, default=3)
    parser.add_argument("--batches", type=int, default=32, help="batches of 4 each trainer reads (32: two passes)")
    args = parser.parse_args(argv)
    print(f"{args.trainers} trainers at once, each reading {args.batches} batches of 4 from {IDS} example ids "
          f"(shuffled each pass); one worker, parallel_epochs")
    print("| share | examples read | distinct stream elements read | decodings | elements decoded | "
          "most decodings of one element |")
    print("| --- | --- | --- | --- | --- | --- |")
    for share in (False, True):
        figures = measure(args.trainers, args.batches, share)
        print(f"| {str(share).lower()} | {figures['read']} | {figures['distinct']} | {figures['decoded']} | "
              f"{figures['elements']} | {figures['most']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
