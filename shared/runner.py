"""The command line: train (the default), test.

    python -m shared.runner --config models/resnet/quick.yaml [--set train.epochs=3] [--notes "why"]
    python -m shared.runner test --run runs/resnet/v0003

A user mistake prints one line `error: ...` and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter out of the way

COMMANDS = ("train", "test")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shared.runner",
                                     description="Train and test the canonical ILSVRC classifiers.")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="train from a config, then test (the default command)")
    train.add_argument("--config", required=True, help="a recipe, e.g. models/resnet/quick.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key in dot notation, e.g. --set train.batch_size=64")
    train.add_argument("--notes", help="why this run exists; stored first in the run's notes.md")
    test = sub.add_parser("test", help="re-test a finished run from its own snapshot")
    test.add_argument("--run", required=True, help="a run folder, e.g. runs/resnet/v0003")
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["train", *argv]
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from shared.errors import run_cli  # after argparse, so --help answers before TF loads

    return run_cli(lambda: _test(args) if args.command == "test" else _train(args, argv))


def _test(args: argparse.Namespace) -> None:
    # Cheap checks first: a typo should answer at once, before TensorFlow loads.
    from shared.runs import open_run

    run = open_run(args.run)
    from shared.evaluate import evaluate
    from shared.train import summary

    print(summary(evaluate(run)))


def _train(args: argparse.Namespace, argv: list[str]) -> None:
    from shared.config import load_config

    overrides = list(args.set) + ([f"run.notes={_yaml_string(args.notes)}"] if args.notes else [])
    config = load_config(args.config, overrides)
    from shared.train import summary, train

    run = train(config, argv=["-m", "shared.runner", *argv])
    print(f"{run.path}: {summary(run.test_metrics())}")


def _yaml_string(text: str) -> str:
    import json
    return json.dumps(text)  # a JSON string is a YAML string: quotes and colons survive


if __name__ == "__main__":
    sys.exit(main())
