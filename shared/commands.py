"""The command table: every command of `python -m shared.runner` and `ilsvrc-canon`, each with its one-line help
and its options, in the order the help lists them.

Read by the runner's parser and dispatch (`shared.runner`), the console command's help and dispatch (`shared.cli`),
and the tasks (`ALL_COMMANDS`, what a `Task.commands` may hold). A command added here appears in all of them; its
handler goes in `shared.runner.HANDLERS` (tests/test_commands.py checks each row has one).

This module imports nothing of the project: the tasks read it, and the runner's handlers import the tasks, so the
handlers cannot be in this table without an import cycle.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

# predict --order and loop --order: shared.annotation_tasks.ORDERS (a test keeps them equal; this table imports
# nothing of the project)
ORDERS = ("file", "uncertainty", "margin", "entropy", "random")
# test --views: shared.classification.views.VIEWS (a test keeps them equal)
TEST_VIEWS = ("center", "flip", "10crop", "multiscale", "144crop")


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str  # the one line both `-h` listings show
    arguments: Callable[[argparse.ArgumentParser], None] | None = None  # adds the runner's options for it
    runner: bool = True  # False: `ilsvrc-canon` only, which hands the line to the command's own program
    also_checks: tuple[str, ...] = ()  # what else its handler may ask a task for (Task.commands), beside its name


def config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="a recipe, e.g. models/resnet/quick.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in dot notation, e.g. --set train.batch_size=64")
    parser.add_argument("--notes", help="why this run exists; stored first in the run's notes.md")


def train_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser, required=False)
    parser.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last complete epoch "
                        "(a finished one, with --set train.epochs=N: for more epochs, in a new run folder)")


def finetune_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="from_run", metavar="RUN", help="the run whose weights to start from")
    source.add_argument("--weights", help="a weight file, e.g. a Keras Applications .h5 for ResNet/MobileNetV2")


def distill_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser)
    parser.add_argument("--teacher", required=True, metavar="RUN", help="the teacher run, e.g. runs/resnet/v0004")


def preview_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser)
    parser.add_argument("--count", type=int, default=32, help="how many images (default 32)")
    parser.add_argument("--out", default="preview.png", help="the PNG to write (default preview.png)")


def lr_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser)
    parser.add_argument("--min-lr", type=float, default=1e-6)
    parser.add_argument("--max-lr", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=100, help="training batches, one per rate (default 100)")
    parser.add_argument("--out", default="lr_sweep.png", help="the plot to write (default lr_sweep.png)")


def find_batch_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser)
    parser.add_argument("--start", type=int, default=8, help="the first batch size tried (default 8)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="stop searching here (default 4096 on a GPU, 512 on a CPU)")


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a run folder, e.g. runs/resnet/v0003")
    parser.add_argument("--format", required=True, choices=("saved_model", "tflite", "onnx"),
                        help="onnx: <run>/export/model.onnx (detector_raw.onnx, restorer.onnx), with .[onnx]")
    parser.add_argument("--export-dir", default="exports",
                        help="saved_model: the TF Serving model base folder (default exports)")
    parser.add_argument("--name", help="saved_model: the served model's name (default: the run's model)")
    parser.add_argument("--keep", type=int, default=5, help="saved_model: versions kept (default 5)")
    parser.add_argument("--quantize", default="none", choices=("none", "float16", "dynamic", "int8"),
                        help="tflite: post-training quantization (default none: float32)")
    parser.add_argument("--io", default="float", choices=("float", "int8"),
                        help="tflite int8: the input/output type (default float)")
    parser.add_argument("--evaluate", action="store_true", help="tflite: test the file with LiteRT on the test split")
    parser.add_argument("--raw-outputs", action="store_true",
                        help="tflite, detection: the raw box deltas and class logits, builtin ops only (default: "
                             "ending in TFLite_Detection_PostProcess)")
    parser.add_argument("--nms", default="regular", choices=("regular", "fast"),
                        help="tflite, detection: the post-processing op's NMS, per class (default) or class-agnostic "
                             "(fast: right on any number of LiteRT threads; see docs/detection.md)")


def import_weights_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, choices=("torchvision",),
                        help="whose state dict FILE is (torchvision: its ImageNet classifiers)")
    parser.add_argument("file", metavar="FILE",
                        help="the state dict: .pth (torch.save; reading it needs .[torch]) or .safetensors")
    parser.add_argument("--model", required=True, help="the model to import into: alexnet, googlenet, resnet (with "
                                                       "--set model.depth=18|34|50|101|152) or mobilenet_v2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of the run, e.g. --set model.depth=50 --set data.image_size=160")
    parser.add_argument("--notes", help="why this run exists; stored first in the run's notes.md")


def size_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a run folder, e.g. runs/resnet/v0003")


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--saved-model", metavar="DIR", help="a SavedModel version folder written by export")
    parser.add_argument("--tflite", metavar="FILE", help="a .tflite file written by export (--run: the run it is of)")
    parser.add_argument("--run", help="a finished run folder, e.g. runs/resnet/v0003")
    parser.add_argument("--checkpoint", help="--run: last (default), best or a checkpoint file")
    parser.add_argument("paths", nargs="*", metavar="PATH", help="image files, folders (recursively) or globs")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    parser.add_argument("--out", help="also write one row per image to FILE.csv or FILE.jsonl")
    parser.add_argument("--format", choices=("csv", "jsonl", "tasks"),
                        help="what --out holds (default: by its extension); tasks: one annotation task per image "
                             "with the prediction as its suggestion (FILE.jsonl)")
    parser.add_argument("--order", choices=ORDERS,
                        help="--format tasks: the images the model is least sure of first (uncertainty, margin or "
                             "entropy, each task's score in its meta), a seeded shuffle (random) or as given (file, "
                             "the default)")
    parser.add_argument("--seed", type=int, help="--order random: the shuffle's seed (default 0)")
    parser.add_argument("--min-score", type=float,
                        help="detection: boxes from this score up (default the run's detection.score_threshold)")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable file (default: skip it)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")


def loop_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser)
    parser.add_argument("--annotations", required=True, metavar="FILE.jsonl",
                        help="the annotation tool's append-only JSONL export")
    parser.add_argument("--from", dest="from_run", required=True, metavar="RUN",
                        help="the run the first round starts from")
    parser.add_argument("--export-dir", default="exports", help="the TF Serving model base folder (default exports)")
    parser.add_argument("--pool", metavar="FOLDER",
                        help="unlabelled images: after each round (and at the start) rewrite --tasks-out with those "
                             "not yet annotated, the ones the newest model is least sure of first")
    parser.add_argument("--tasks-out", metavar="FILE.jsonl", help="--pool: the annotation tasks file to rewrite")
    parser.add_argument("--order", choices=ORDERS,
                        help="--pool: the tasks' order (default margin; see predict --order)")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--once", action="store_true", help="one round with what is new, then exit (the default)")
    when.add_argument("--watch", action="store_true",
                      help="poll every loop.poll_seconds; a round when loop.min_new new accepted tasks are there")


def retest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a run folder, e.g. runs/resnet/v0003")
    parser.add_argument("--checkpoint", help="last (default), best (checkpoints/best.keras, see train.best) or a "
                                             "checkpoint file")
    parser.add_argument("--classifier", metavar="RUN",
                        help="deblurring runs: also a classification run's top-1 on sharp, blurred and restored images")
    parser.add_argument("--views", choices=TEST_VIEWS,
                        help="classification runs: test views, softmax averaged over each image's crops: center (the "
                             "run's own), flip, 10crop (AlexNet, ResNet), multiscale (ResNet), 144crop (GoogLeNet); "
                             "recorded in the run's test_metrics.json")


def serve_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("role", choices=("dispatcher", "worker"),
                        help="dispatcher: hands out the work (one per cluster); worker: runs the training pipeline")
    parser.add_argument("--port", type=int, default=0, help="the port to listen on (default: any free one, printed)")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="dispatcher: keep its journal in DIR, so a dispatcher restarted on it resumes its jobs")
    parser.add_argument("--dispatcher", metavar="HOST:PORT", help="worker: the dispatcher it works for")
    parser.add_argument("--host", help="the name the trainer and workers reach this machine by (default: localhost "
                                       "for a dispatcher on this machine, else this machine's name)")


COMMANDS: tuple[Command, ...] = (
    Command("train", "train from a config, then test (the default command)", train_arguments,
            also_checks=("resume",)),  # train --resume RUN
    Command("finetune", "train a new head on the frozen backbone of a finished run", finetune_arguments),
    Command("finetune-all", "train every layer, starting from a finished run, at a lower rate", finetune_arguments),
    Command("distill", "train the config's model as a student of a finished run", distill_arguments),
    Command("tune", "hyperparameter search with Optuna over the config's tune: section", config_arguments),
    Command("preview", "write a grid of augmented training images as a PNG", preview_arguments),
    Command("lr-sweep", "learning-rate range test: loss against a rising rate, and a suggestion", lr_sweep_arguments),
    Command("find-batch", "the largest batch size that fits in device memory", find_batch_arguments),
    Command("export", "a finished run as a TF Serving SavedModel or a TFLite file", export_arguments),
    Command("import-weights", "a new run holding another framework's trained weights (torchvision's state dicts)",
            import_weights_arguments),
    Command("size", "parameters, multiply-adds, size on disk and CPU latency of a run's artifacts", size_arguments),
    Command("predict", "top-k classes (or boxes) of image files, folders or globs, by a run or its export",
            predict_arguments),
    Command("loop", "train in the loop: new annotations -> finetune -> a new served version", loop_arguments),
    Command("test", "re-test a finished run from its own snapshot", retest_arguments),
    Command("serve-data", "run a tf.data service dispatcher or worker for data.service (until stopped)",
            serve_data_arguments),
    Command("runs", "list the runs (runs list [MODEL]), diff two (runs diff RUN RUN) or log one to MLflow "
                    "(runs log-to-mlflow RUN), as python -m shared.runs",
            runner=False),
    Command("prune", "free disk: keep the newest N checkpoints of each run, skip live runs "
                     "(scripts/prune_checkpoints.sh)", runner=False),
)

# The commands `python -m shared.runner` parses and dispatches.
RUNNER_COMMANDS: tuple[Command, ...] = tuple(command for command in COMMANDS if command.runner)

# What a task may support (its `Task.commands` is a subset): each runner command, and what else a handler asks.
ALL_COMMANDS: frozenset[str] = frozenset(name for command in RUNNER_COMMANDS
                                         for name in (command.name, *command.also_checks))
