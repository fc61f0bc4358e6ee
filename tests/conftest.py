"""Shared fixtures: tiny configs on synthetic data, and one trained run reused by many tests."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path
from types import ModuleType
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from shared import runs
from shared.modelzoo import MODELS_DIR

# pytest-xdist runs several workers side by side; TensorFlow sizes each of its thread pools to every core, so N
# workers would run N times the threads the cores have and spin on each other. Each worker (and what it starts:
# forked commands and subprocesses inherit the environment) gets its share of the cores instead. Read when
# TensorFlow makes its first context, so setting it here, after importing it but before any test runs an op, is in time.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _share = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", _share)
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", _share)

REPO = Path(__file__).resolve().parent.parent


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (the scripts are not a package), to call its main() or helpers."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_ports(count: int) -> list[int]:
    """`count` TCP ports free on this host now (for a multi-worker cluster of local processes)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tiny_tree(runs_dir: Path, **sections) -> dict:
    """A config tree for a very small ResNet on synthetic 16 px images: seconds per run."""
    tree = {
        "model": {"name": "resnet", "depth": 18, "width": 4, "small_input": True},
        "data": {"source": "synthetic", "image_size": 16, "channels": 3, "num_classes": 4,
                 "synthetic_train": 256, "synthetic_test": 64},
        "train": {"epochs": 2, "batch_size": 32, "verbose": 0, "lr": {"base": 0.05}},
        "run": {"dir": str(runs_dir), "notes": "a tiny test run"},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return tree


# A tiny classifier module (model.path) for tests that train real runs in seconds.
TINY_MODEL = '''
import keras


def build(num_classes: int = 10, input_shape: tuple = (16, 16, 3), width: int = 4):
    inputs = keras.Input(input_shape)
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(width, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name="tiny")
'''

# TINY_MODEL without its Rescaling, for tests that compare probabilities across paths (predict, export, formats):
# the runs' pipelines hand it normalized pixels already, and rescaled once more a decoding one level off would move
# the probabilities by less than those tests' tolerances; at their own scale such a difference shows.
SENSITIVE_MODEL = TINY_MODEL.replace("keras.layers.Rescaling(1 / 255.0)(inputs)", "inputs")
assert SENSITIVE_MODEL != TINY_MODEL

# A tiny backbone (model.path): feature maps of strides 4 and 8, for detection, deblurring and finetuning runs
# whose backbone is not what a test checks (the runner's failures, evaluation during training, distribution,
# export and pre-annotation of a trained detector, freezing). It traces and trains in about half the time of the
# width-4 ResNet-18 that detect.yaml's recipe otherwise gives; the tests of that backbone (copied from a
# classification run, frozen, mismatched) keep it.
TINY_BACKBONE = '''
import keras


def backbone(input_shape: tuple = (48, 48, 1), width: int = 4) -> keras.Model:
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="conv1_bn")(x)
    x = keras.layers.ReLU(name="conv1_relu")(x)
    x4 = keras.layers.Conv2D(2 * width, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x8 = keras.layers.Conv2D(4 * width, 3, strides=2, padding="same", activation="relu", name="conv3")(x4)
    return keras.Model(inputs, {"stride_4": x4, "stride_8": x8}, name="tiny_backbone")


def build(num_classes: int = 10, input_shape: tuple = (48, 48, 1), width: int = 4) -> keras.Model:
    trunk = backbone(input_shape, width)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(trunk.output["stride_8"])
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(trunk.input, outputs, name="tiny_backbone")
'''


def tiny_backbone_model(folder: Path) -> dict:
    """The model section of TINY_BACKBONE, written into folder/tiny_backbone_src. Its runs go to
    runs/tiny_backbone/."""
    target = folder / "tiny_backbone_src"
    target.mkdir(parents=True, exist_ok=True)
    (target / "model.py").write_text(TINY_BACKBONE)
    return {"name": "tiny_backbone", "path": str(target), "width": 4}


def tiny_backbone(folder: Path) -> str:
    """`tiny_backbone_model(folder)` as the `--set` that makes it a recipe's whole model section (detect.yaml's
    ResNet hyperparameters do not apply to it)."""
    return f"model={json.dumps(tiny_backbone_model(folder))}"  # JSON is YAML's flow style


# Runs the runner with os.replace and os.rename (every durable rename, every publish) wrapped: SIGKILL this
# process before or after the n-th rename onto a path named as KILL_AT says ("name:before|after:n").
KILLING_RUNNER = '''
import os, signal, sys
from pathlib import Path

name, when, nth = os.environ["KILL_AT"].split(":")
seen = 0


def killing(rename):
    def wrapped(source, target, **kwargs):
        global seen
        hit = Path(target).name == name
        seen += hit
        if hit and seen == int(nth) and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        rename(source, target, **kwargs)
        if hit and seen == int(nth) and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
    return wrapped


os.replace, os.rename = killing(os.replace), killing(os.rename)
from shared import runner
sys.exit(runner.main(sys.argv[1:]))
'''


# ---------------------------------------------------------------- scheduling under `-n 2 --dist loadscope`

# Files whose tests each train, export or kill processes for tens of seconds, independently of one another:
# one file on one worker would be the run's tail, so each of their tests is a work unit of its own (a module
# fixture is then built at most once per worker).
SPLIT_BY_TEST = {"test_loop.py", "test_training_knobs.py", "test_detection_distribute.py", "test_distribute.py",
                 "test_concurrency.py", "test_resume.py", "test_faults.py", "test_kept_trainer.py",
                 "test_checkpoints.py"}

# The files that take longest on one worker (`--durations`), heaviest first. Handed out before everything else,
# so the many quick files fill in around them instead of a heavy file starting last and running alone (plain
# loadscope hands out the files with the most tests first: the heavy files of few tests came last). A file
# missing here only loses its place in the order.
HEAVY_FIRST = ["test_tune.py", "test_detection_runner.py", "test_deblur_runs.py", "test_data_service.py",
               "test_preannotate.py", "test_detection_size_tune.py", "test_torchvision_weights.py",
               "test_study_storage.py", "test_models.py", "test_onnx.py", "test_loop.py", "test_detection_model.py",
               "test_mlflow_log.py", "test_detection_tflite.py", "test_detection_distribute.py", "test_console.py",
               "test_training_knobs.py", "test_fashion_training.py", "test_cpu_kernels.py", "test_predict.py",
               "test_fit_on_jax.py", "test_own_folders.py", "test_detection_eval.py", "test_kept_trainer.py"]


def _file_of(scope: str) -> str:
    return scope.split("::", 1)[0].rsplit("/", 1)[-1]


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without the plugin (`-p no:xdist`) it is never called
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    try:  # pytest-xdist (the test extra) calls this hook, so it is there; its scheduler module may move
        from xdist.scheduler import LoadScopeScheduling
    except ImportError:
        return None  # xdist's own loadscope

    class HeavyFirstScheduling(LoadScopeScheduling):
        """loadscope (a file's tests on one worker, for its module fixtures), with SPLIT_BY_TEST's files split
        per test and HEAVY_FIRST's files handed out first."""

        def _split_scope(self, nodeid: str) -> str:
            return nodeid if _file_of(nodeid) in SPLIT_BY_TEST else super()._split_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            def rank(scope: str) -> int:
                name = _file_of(scope)
                return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)

            first = min(self.workqueue, key=rank)  # min keeps the queue's order among equals
            self.workqueue.move_to_end(first, last=False)
            super()._assign_work_unit(node)

    return HeavyFirstScheduling(config, log)


def pytest_collection_finish(session) -> None:
    """Collected, a process has imported TensorFlow, Keras, the package and every test file: objects that live as
    long as it does. Frozen out of the garbage collector's sight, they are no longer walked by each full
    collection, which the tests' many short-lived graphs and models trigger again and again."""
    gc.freeze()


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def one_conv_model(tmp_path) -> dict:
    """The model section of TINY_MODEL (one convolution, written into tmp_path): for runs whose model is not what
    a test checks, it builds and traces in a fraction of the tiny ResNet's time. Its runs go to runs/tiny/."""
    folder = tmp_path / "one_conv_model"
    folder.mkdir(exist_ok=True)
    (folder / "model.py").write_text(TINY_MODEL)
    return {"name": "tiny", "path": str(folder)}


@pytest.fixture
def model_copy(tmp_path) -> Path:
    """A private copy of models/resnet, free to edit."""
    target = tmp_path / "resnet_copy"
    shutil.copytree(MODELS_DIR / "resnet", target)
    return target


@contextlib.contextmanager
def _session_lock(path: Path):
    """An exclusive lock on `path` (created) held for the block: one xdist worker at a time."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def once_a_session(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder `name` that `make(folder)` fills once a test session: the first xdist worker to ask makes it,
    under a lock, in the folder the workers share; the others wait for it and find it made. Read only: a test
    copies what it changes (`copied_run`)."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    with _session_lock(folder.with_name(f".{name}.lock")):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed to make it left
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


def copied_run(tmp_path_factory, runs_dir: Path) -> runs.Run:
    """A copy, in this worker's own temporary folder, of the one run under `runs_dir` (runs/<model>/vNNNN)."""
    own = tmp_path_factory.mktemp(runs_dir.parent.name) / "runs"
    shutil.copytree(runs_dir, own)
    (folder,) = (path for model in own.iterdir() if model.is_dir() for path in model.glob("v[0-9]*"))
    return runs.Run(folder)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One finished tiny run (from a private copy of the model source), for read-only tests: trained once a
    session (`once_a_session`), each worker testing its own copy of the run folder."""
    def make(folder: Path) -> None:
        from shared.config import load_config
        from shared.lifecycle import train

        shutil.copytree(MODELS_DIR / "resnet", folder / "resnet_src")
        tree = tiny_tree(folder / "runs")
        tree["model"]["path"] = str(folder / "resnet_src")
        train(load_config(tree=tree), argv=["pytest"])

    shared = once_a_session(tmp_path_factory, "trained_run", make)
    return copied_run(tmp_path_factory, shared / "runs"), shared / "resnet_src"


@pytest.fixture(scope="session")
def tiny_detector(tmp_path_factory) -> runs.Run:
    """A tiny detector trained from scratch through the CLI on the detection tests' canvas set (the recipe of
    test_detection_runner.py on TINY_BACKBONE: 2 epochs on 16 canvases of 48 px), once a session
    (`once_a_session`); each worker gets its own copy of the run folder, free to export into."""
    def make(folder: Path) -> None:
        from shared import runner
        from test_detection_runner import TINY, data_overrides, tiny_canvases

        tiny_canvases(folder / "data")
        overrides = [*TINY, tiny_backbone(folder), *data_overrides(folder / "data"), f"run.dir={folder / 'runs'}"]
        assert runner.main(["--config", str(REPO / "models" / "resnet" / "detect.yaml"),
                            *[arg for item in overrides for arg in ("--set", item)]]) == 0

    return copied_run(tmp_path_factory, once_a_session(tmp_path_factory, "tiny_detector", make) / "runs")
