"""The command line.

    python -m shared.runner --config models/resnet/quick.yaml [--set train.epochs=3] [--notes "why"]
    python -m shared.runner --resume runs/resnet/v0003
    python -m shared.runner --resume runs/resnet/v0003 --set train.epochs=20   # a finished run, in a new folder
    python -m shared.runner finetune --config models/mobilenet_v2/quick.yaml --from runs/mobilenet_v2/v0002
    python -m shared.runner finetune-all --config ... (--from runs/mobilenet_v2/v0002 | --weights file.h5)
    python -m shared.runner test --run runs/resnet/v0003 [--checkpoint last|best|FILE]
    python -m shared.runner test --run runs/resnet/v0005 --classifier runs/resnet/v0003   # a deblurring run
    python -m shared.runner distill --config models/mobilenet_v2/quick.yaml --teacher runs/resnet/v0004
    python -m shared.runner tune --config models/resnet/tune.yaml
    python -m shared.runner preview --config models/alexnet/quick.yaml --out preview.png
    python -m shared.runner lr-sweep --config models/resnet/quick.yaml [--min-lr 1e-5 --max-lr 10 --steps 100]
    python -m shared.runner find-batch --config models/resnet/run.yaml [--max-batch 1024]
    python -m shared.runner export --run runs/resnet/v0003 --format saved_model|tflite [--quantize int8]
    python -m shared.runner size --run runs/resnet/v0003
    python -m shared.runner import-weights --from torchvision resnet50.pth --model resnet --set model.depth=50
    python -m shared.runner loop --config models/resnet/quick.yaml --annotations tasks.jsonl --from runs/resnet/v0003
    python -m shared.runner loop ... --watch --pool photos/ --tasks-out photos/tasks.jsonl [--order uncertainty]
    python -m shared.runner predict --run runs/resnet/v0003 photos/ a.jpg '*.png' [--top-k 5 --out preds.csv]
    python -m shared.runner predict --saved-model exports/resnet photos/ --format tasks --out photos/tasks.jsonl
    python -m shared.runner predict --run runs/resnet/v0003 photos/ --format tasks --out photos/tasks.jsonl \
        --order uncertainty|margin|entropy|random|file [--seed 0]
    python -m shared.runner serve-data dispatcher --port 5050 [--work-dir DIR]   # the tf.data service (data.service)
    python -m shared.runner serve-data worker --dispatcher HOST:5050 [--port P]

Every command goes through its config's or run's task (`shared.tasks.TASKS`: classification, detection, ...):
a command the task does not support (`Task.commands`) is refused in one place, `_check_supported`, with one
line. A user mistake prints one line `error: ...` and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from shared.commands import RUNNER_COMMANDS


def build_parser(prog: str = "python -m shared.runner") -> argparse.ArgumentParser:
    """The runner's parser: one subcommand per row of the command table (shared.commands)."""
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Train and test the canonical ILSVRC classifiers.")
    sub = parser.add_subparsers(dest="command")
    for command in RUNNER_COMMANDS:
        command.arguments(sub.add_parser(command.name, help=command.help))
    return parser


def parse_args(argv: list[str], prog: str = "python -m shared.runner") -> argparse.Namespace:
    parser = build_parser(prog)
    if not argv or argv[0] not in (*(command.name for command in RUNNER_COMMANDS), "-h", "--help"):
        argv = ["train", *argv]
    args = parser.parse_args(argv)
    if args.command == "train" and bool(args.config) == bool(args.resume):
        parser.error("give --config to start a run or --resume RUN to continue one (not both)")
    if args.command == "train" and args.resume and args.notes:
        parser.error("--resume continues a run with its own config and notes; --notes does not apply")
    return args


def main(argv: list[str] | None = None, prog: str = "python -m shared.runner") -> int:
    """`prog`: the command name usage and errors show (`ilsvrc-canon` when shared.cli delegates here)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog)
    args.prog = prog  # the closing line's commands are written as the user called this one
    from shared.errors import run_cli  # after argparse, so --help answers before TF loads

    return run_cli(lambda: HANDLERS[args.command](args, argv))


def _check_option(task, option: str, declared: str, verb: str, what: str, detail: str = "") -> None:
    """Refuse an option the task does not declare (its `declared` set: Task.tflite_options, Task.test_options),
    naming the tasks that take it."""
    from shared.errors import UserError
    from shared.tasks import TASKS

    if option not in getattr(task, declared):
        able = [name for name, other in TASKS.items() if option in getattr(other, declared)]
        raise UserError(f"--{option.replace('_', '-')} {verb} {' or '.join(able) or 'no'} {what}{detail}")


def _check_supported(command: str, task_name: str | None):
    """The one place a command refuses a task it does not support; returns the task."""
    from shared.errors import UserError
    from shared.tasks import TASKS, task_class

    task = task_class(task_name)
    if command not in task.commands:
        able = [name for name, other in TASKS.items() if command in other.commands]
        raise UserError(f"{command} supports task{'s' if len(able) > 1 else ''} {', '.join(able) or 'none'}, "
                        f"not {task.name}")
    return task


def _run_task(run) -> str | None:
    """The task a run's config.yaml names (read without loading TensorFlow)."""
    try:
        return (run.config_dict() or {}).get("task")
    except (OSError, ValueError):
        return None


def _open_idle_run(path: str):
    # Cheap checks first: a typo, or a run still training, answers before TensorFlow loads.
    from shared.runs import open_run, require_idle

    run = open_run(path)
    require_idle(run)
    return run


def _config(args: argparse.Namespace, overrides: list[str] | None = None):
    from shared.config import load_config

    config = load_config(args.config, list(overrides if overrides is not None else args.set))
    _check_supported(args.command, config.task)
    return config


def _test(args: argparse.Namespace, argv: list[str]) -> None:
    run = _open_idle_run(args.run)
    task = _check_supported("test", _run_task(run))
    if args.classifier:
        classifier = _open_idle_run(args.classifier)
        _check_option(task, "classifier", "test_options", "applies to", "runs", f"; run {run.path} is a "
                      f"{task.name} run")
        from shared.tasks import rebuild, rebuilt, task_for

        model, _ = rebuild(run)
        print(task.summary(task_for(run).test_with_classifier(model, run, rebuilt(classifier))))
        return
    if args.views:
        _check_option(task, "views", "test_options", "applies to", "runs", f"; run {run.path} is a {task.name} run")
    from shared.lifecycle import test

    views = f"{args.views} views: " if args.views else ""
    if args.checkpoint is None:
        print(_results(task, test(run, views=args.views), views))
        return
    checkpoint = run.checkpoint(args.checkpoint)  # a run without best.keras answers before TensorFlow loads
    print(_results(task, test(run, checkpoint, views=args.views), f"{checkpoint}: {views}"))


def _preview(args: argparse.Namespace, argv: list[str]) -> None:
    from shared.errors import UserError

    if args.count < 1:
        raise UserError(f"--count is {args.count}; ask for at least one image")
    config = _config(args)
    from shared import plots

    print(f"wrote {plots.preview(config, args.out, count=args.count)}: {args.count} augmented training images")


def _tune(args: argparse.Namespace, argv: list[str]) -> None:
    config = _config(args, list(args.set) + ([f"run.notes={_yaml_string(args.notes)}"] if args.notes else []))
    from shared import tune

    tune.tune(config, argv=["-m", "shared.runner", *argv])  # it prints the front, its recipes and the plot


def _lr_sweep(args: argparse.Namespace, argv: list[str]) -> None:
    config = _config(args)
    from shared import lr_finder

    print(lr_finder.format_report(lr_finder.lr_range_test(config, args.min_lr, args.max_lr, args.steps, args.out)))


def _find_batch(args: argparse.Namespace, argv: list[str]) -> None:
    config = _config(args)
    from shared import batch_finder

    # A CPU rarely runs out of memory before the search becomes very slow: a lower default cap there.
    limit = args.max_batch or (4096 if batch_finder.has_gpu() else 512)
    print(batch_finder.format_report(batch_finder.find_batch_size(config, start=args.start, max_batch=limit)))


def _export(args: argparse.Namespace, argv: list[str]) -> None:
    run = _open_idle_run(args.run)
    task = _check_supported("export", _run_task(run))
    if args.format == "saved_model":
        from shared.export import serving_command, target_folder

        target_folder(run, args.export_dir, args.name or run.model_name, None, args.keep)  # before TensorFlow loads
        from shared.tasks import rebuild, task_for

        model, _ = rebuild(run)
        path = task_for(run).export_saved_model(model, run, args.export_dir, model_name=args.name, keep=args.keep)
        print(f"exported {path}\n{serving_command(args.export_dir, path.parent.name)}")
        return
    if args.format == "onnx":
        from shared.onnx_export import check_installed

        check_installed()  # before TensorFlow loads
        from shared.tasks import rebuild, task_for

        model, _ = rebuild(run)
        path = task_for(run).export_onnx(model, run)
        print(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB; its input, classes and run in its metadata)")
        return
    # a task's own TFLite options (Task.tflite_options), where not at their defaults
    from shared.tasks import TASKS, rebuild, task_for

    defaults = {key: value for other in TASKS.values() for key, value in other.tflite_options.items()}
    options = {key: getattr(args, key) for key, default in defaults.items() if getattr(args, key) != default}
    for key in options:
        _check_option(task, key, "tflite_options", "is for", "runs (their TFLite post-processing); leave it out")

    from shared.tflite import check_mode

    check_mode(args.quantize, args.io)  # before the model is rebuilt
    model, _ = rebuild(run)
    path, beside = task_for(run).export_tflite(model, run, quantize=args.quantize, io=args.io, **options)
    print(f"exported {path} ({path.stat().st_size / 1e6:.2f} MB)" + (f" {beside}" if beside else ""))
    if args.evaluate:
        print(f"LiteRT {task.summary(task_for(run).evaluate_tflite(path, run))}")


def _import_weights(args: argparse.Namespace, argv: list[str]) -> None:
    from shared.config import load_config
    from shared.runs import IMPORTED_FILE

    overrides = list(args.set) + ([f"run.notes={_yaml_string(args.notes)}"] if args.notes else [])
    task = _check_supported("import-weights", load_config(tree={"model": {"name": args.model}},
                                                          overrides=overrides).task)
    run = task.import_weights(args.source, args.file, args.model, overrides, ["-m", "shared.runner", *argv])
    print(f"imported {args.source} weights {args.file} into {run.path} (the file, its SHA-256 and the mapping: "
          f"{run.path / IMPORTED_FILE})")
    print(closing_line(run, task, args.prog))


def _size(args: argparse.Namespace, argv: list[str]) -> None:
    run = _open_idle_run(args.run)
    _check_supported("size", _run_task(run))
    from shared import size_report
    from shared.tasks import rebuild, task_for

    model, _ = rebuild(run)
    print(size_report.format_table(size_report.size_report(task_for(run), model, run)))


def _predict(args: argparse.Namespace, argv: list[str]) -> None:
    from shared.errors import UserError

    if [bool(args.run and not args.tflite), bool(args.saved_model), bool(args.tflite)].count(True) != 1:
        raise UserError("predict with one of --run RUN, --saved-model DIR or --tflite FILE [--run RUN]")
    if args.checkpoint and (args.saved_model or args.tflite):
        raise UserError("--checkpoint chooses a run's checkpoint: use it with --run RUN alone")
    run = _open_idle_run(args.run) if args.run else None
    if run is not None:
        _check_supported("predict", _run_task(run))
        if args.checkpoint:
            run.checkpoint(args.checkpoint)  # a run without best.keras answers before TensorFlow loads
    from shared import predict

    def predictor():  # a classifier or a detector, by the source's task
        from shared.tasks import open_predictor  # the tasks load TensorFlow: after predict's cheap checks

        return open_predictor(run, args.saved_model, args.tflite, args.checkpoint, args.min_score)

    predict.command(predictor, args.paths, top_k=args.top_k, out=args.out, strict=args.strict,
                    batch_size=args.batch_size, fmt=args.format, order=args.order, seed=args.seed)


def _loop(args: argparse.Namespace, argv: list[str]) -> None:
    config = _config(args, list(args.set) + ([f"run.notes={_yaml_string(args.notes)}"] if args.notes else []))
    from shared.errors import UserError
    from shared.loop import rounds as loop
    from shared.tasks import task_for

    if args.pool and not args.watch:
        raise UserError("--pool rewrites --tasks-out as rounds finish; add --watch")
    session = loop.open_loop(task_for(config), args.annotations, args.from_run, args.export_dir,
                             ["-m", "shared.runner", *argv], args.pool, args.tasks_out, args.order)
    try:
        if args.watch:
            loop.run_rounds(session, watch=True, report=lambda line: print(line, flush=True))
            return
        with loop.sigterm_stops():
            print(loop.run_round(session).describe())
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; nothing is half-way: rerun the same command to continue the loop "
                                f"in {session.dir}") from None


def _serve_data(args: argparse.Namespace, argv: list[str]) -> None:
    from shared.errors import UserError

    if args.role == "worker" and not args.dispatcher:
        raise UserError("serve-data worker needs --dispatcher HOST:PORT (what `serve-data dispatcher` printed)")
    for option, role in (("dispatcher", "worker"), ("work_dir", "dispatcher")):
        if getattr(args, option) and args.role != role:
            raise UserError(f"--{option.replace('_', '-')} is for serve-data {role}; leave it out")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port is {args.port}; give a port in 1..65535 (or 0: any free one)")
    from shared.data import service

    service.serve(args.role, args.port, work_dir=args.work_dir, dispatcher=args.dispatcher, host=args.host)


def finetune_overrides(args: argparse.Namespace) -> list[str]:
    """What `finetune` / `finetune-all` mean, as config keys (so the run's config.yaml records them);
    the user's own --set values come after and win."""
    source = [f"init.from_run={args.from_run}"] if args.from_run else [f"init.weights={args.weights}"]
    if args.command == "finetune":
        return [*source, "init.mode=finetune", "train.freeze=[backbone]"]
    return [*source, "init.mode=finetune_all", "train.freeze=[]"]


def _train(args: argparse.Namespace, argv: list[str]) -> None:
    from shared.runs import lock_run, open_run, require_idle

    if getattr(args, "resume", None) and args.set:
        epochs = _continued_epochs(args.set)
        run = open_run(args.resume)
        require_idle(run)  # a typo or a live run answers before TensorFlow loads
        task = _check_supported("resume", _run_task(run))
        from shared.lifecycle import continue_run

        run = continue_run(run.path, epochs, argv=["-m", "shared.runner", *argv])
    elif getattr(args, "resume", None):
        run = open_run(args.resume)  # a typo, or a run another process trains, answers before TensorFlow loads
        lock_run(run, ["-m", "shared.runner", *argv])
        task = _check_supported("resume", _run_task(run))
        from shared.lifecycle import resume

        run = resume(run.path, argv=["-m", "shared.runner", *argv])
    else:
        overrides = finetune_overrides(args) if args.command.startswith("finetune") else []
        if args.command == "distill":
            overrides.append(f"distill.teacher={args.teacher}")
        overrides += list(args.set) + ([f"run.notes={_yaml_string(args.notes)}"] if args.notes else [])
        from shared.config import load_config

        config = load_config(args.config, overrides)
        for source in (config.init.from_run, config.distill.teacher):
            if source:
                require_idle(open_run(source))  # a typo or a live run answers before TensorFlow loads
        task = _check_supported(args.command, config.task)
        from shared.lifecycle import train

        run = train(config, argv=["-m", "shared.runner", *argv])
    metrics = run.test_metrics()
    if not metrics:
        print("worker done; the chief worker keeps the run folder")
        return
    print(_results(task, metrics, f"{run.path}: "))
    print(closing_line(run, task, args.prog))


# What `closing_line` offers next, by command: its arguments after the run
NEXT_COMMANDS = {"test": "", "predict": " IMAGES", "export": " --format saved_model"}


def closing_line(run, task, prog: str = "python -m shared.runner") -> str:
    """After training, one line: what the run folder holds to look at (its figures, the split it recorded)
    and the commands that go on from it (those the run's task supports)."""
    import shlex

    from shared.data.split import SPLIT_DIR

    held = sorted((path.name for path in run.path.glob("*.png")), key=lambda name: (name != "curves.png", name))
    held += [f"{SPLIT_DIR}/ (the split's file lists)"] if (run.path / SPLIT_DIR).is_dir() else []
    where = shlex.quote(str(run.path))
    commands = [f"`{prog} {name} --run {where}{rest}`" for name, rest in NEXT_COMMANDS.items()
                if name in task.commands]
    return (f"run folder {where}: {', '.join(held) or 'no figures'}"
            + (f"; next: {', '.join(commands)}" if commands else ""))


def _results(task, metrics: dict, prefix: str = "") -> str:
    """The task's one summary line (after `prefix`), then its details (the worst classes, ...) if any."""
    details = task.details(metrics)
    return prefix + task.summary(metrics) + (f"\n{details}" if details else "")


def _continued_epochs(overrides: list[str]) -> int:
    """N of `--resume RUN --set train.epochs=N`, the one key that continuing a finished run takes."""
    from shared.config import parse_override
    from shared.errors import UserError

    epochs = None
    for text in overrides:
        keys, value = parse_override(text)
        if keys != ["train", "epochs"] or isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"--resume RUN --set takes only train.epochs=N (a whole number: continue a finished run "
                            f"for more epochs, in a new run folder), not {text!r}; other changes need a new run")
        epochs = value
    return epochs


def _yaml_string(text: str) -> str:
    """`text` as a YAML double-quoted scalar for a --set value: quotes, colons, newlines and any Unicode
    come back verbatim. (JSON's \\ud83d\\ude00 escapes for an emoji read back as two lone surrogates.)"""
    import math

    import yaml

    return yaml.safe_dump(_cli_text(text), default_style='"', allow_unicode=True, width=math.inf).strip()


def _cli_text(text: str) -> str:
    """Command-line text as the user typed it. Outside UTF-8 mode (a C locale with PYTHONUTF8=0) Python
    hands over UTF-8 bytes as surrogate escapes; they are decoded here. Bytes that are not UTF-8 stay
    escaped, and the config check names them."""
    import os

    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeError:
        return text


# Each command's handler (the table, shared.commands, says which commands there are, in order); which task
# supports which command is each Task's `commands`.
HANDLERS = {"train": _train, "finetune": _train, "finetune-all": _train, "distill": _train, "tune": _tune,
            "preview": _preview, "lr-sweep": _lr_sweep, "find-batch": _find_batch, "export": _export,
            "import-weights": _import_weights, "size": _size,
            "predict": _predict, "loop": _loop, "test": _test, "serve-data": _serve_data}


if __name__ == "__main__":
    sys.exit(main())
