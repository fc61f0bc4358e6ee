"""Training in the loop, measured: a simulated annotator streams labels into `shared.loop` round after round,
and the last round is compared with ONE training run on all the same labels for the same total steps.

    python scripts/bench_loop.py [--task classification|detection|both] [--rounds N] [--per-round N]
        [--steps N] [--holdout N] [--from RUN] [--set KEY=VALUE ...] [--seeds 0,1,2] [--out-dir DIR]
    python scripts/bench_loop.py --orders margin,random [--pool 10000] [...]     # active learning, simulated

Classification (models/resnet/quick.yaml): Fashion-MNIST training images, written as PNG files, each round
`--per-round` accepted tasks (default 6 rounds of 500, `--steps` 100: at least 100 steps a round, more with the
recipe's loop.passes) plus a few rejected and ignored tasks and one malformed line, which the loop counts and
skips; the held-out set is the first `--holdout` (2000) test images (the recipe's test split, `data.limit_test`).
Detection (models/resnet/detect.yaml): the generated canvas set (scripts/make_detection_dataset.py, 96 px),
default 6 rounds of 200 canvases, at least 100 steps a round, 200 held-out canvases. Both start from one source
run: quick.yaml for 5 epochs on the first 1000 Fashion-MNIST training images (not among the annotated ones; for
detection its backbone), unless --from names a run. The reference is a second loop folder following the same
annotations file from the same source run: its one round ingests everything and trains for the rounds' total
steps, judged on the same held-out set.

Prints a table per task and seed (round, examples so far, held-out top-1 or mAP@[.5:.95], exported version,
seconds a round), the CPU, `last round X vs one run Y`, and a table of the seeds (each one's gap to one run, its
largest fall between rounds, a round's seconds besides its steps); draws DIR/<task>/bench_loop.png (the loop's
metric per round and the one-run reference). With --orders (classification): held-out top-1 per round for each
order in which the simulated annotator labels a pool (`bench_order`), and how many labels each order needs to
reach the last order's final figure; its own source run (without --from) trains 30 epochs on the same 1000 images,
until its held-out top-1 stops rising, as a user's source run would be.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without `pip install -e .`

import numpy as np  # noqa: E402

from shared import annotations, runs  # noqa: E402
from shared.detection.loop import spans_of  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"classification": REPO / "models" / "resnet" / "quick.yaml",
           "detection": REPO / "models" / "resnet" / "detect.yaml"}
DEFAULTS = {  # rounds, per_round, steps, holdout: detection smaller, to fit ~10 minutes of a 2-core CPU
    "classification": {"rounds": 6, "per_round": 500, "steps": 100, "holdout": 2000},
    "detection": {"rounds": 6, "per_round": 200, "steps": 100, "holdout": 200},
}
SOURCE_EXAMPLES = 1000  # the source run's labelled training images: the first ones, never annotated again
SOURCE_EPOCHS = 5  # 40 steps: fewer leave batch norm's moving statistics far from the data (top-1 at chance)
# --orders: a source trained until its held-out top-1 stops rising on its labels (240 steps), as a user's source run
# is; what a 5-epoch source's scores pick: docs/loop.md, "Asking for the right labels" (least confidence lags there)
ORDERS_SOURCE_EPOCHS = 30
METRIC_NAME = {"classification": "held-out top-1", "detection": "held-out mAP@[.5:.95]"}
QUIET = ["train.verbose=0"]


# ---------------------------------------------------------------- the simulated annotator


class Annotator:
    """Appends a round of task lines to an annotations file, as an annotation tool's export grows: the
    accepted tasks, then `rejected` rejected and `ignored` ignored ones (other questions of the same images:
    a wrong label of `class_names`, or no boxes, rejected; no suggestion, ignored) and one line that is no
    task, which the loop must count and skip. The loop's latest-answer rule keeps the accepted examples: a
    reject of the same question would withdraw one."""

    def __init__(self, path: Path, rejected: int = 2, ignored: int = 1, class_names: list[str] | None = None):
        self.path, self.rejected, self.ignored, self.class_names = path, rejected, ignored, class_names
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def wrong(self, task: dict) -> dict:
        """Another question of the task's image: the next class name, or no boxes."""
        if "spans" in task:
            return {**task, "spans": []}
        names = self.class_names or [task["label"], f"not {task['label']}"]
        return {**task, "label": names[(names.index(task["label"]) + 1) % len(names)]}

    def add_round(self, accepted: list[dict]) -> dict:
        """`accepted`: task fields (image, and label or spans); returns the counts of the lines written."""
        lines = [annotations.task_line(answer="accept", **task) for task in accepted]
        lines += [annotations.task_line(answer="reject", **self.wrong(task)) for task in accepted[:self.rejected]]
        lines += [annotations.task_line(task["image"], answer="ignore") for task in accepted[:self.ignored]]
        lines.append('{"image": "half a line the tool never finished\n')
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.writelines(lines)
        return {"accepted": len(accepted), "rejected": min(self.rejected, len(accepted)),
                "ignored": min(self.ignored, len(accepted)), "malformed": 1}


def classification_tasks(images: np.ndarray, labels: np.ndarray, first: int, count: int, folder: Path,
                         class_names: list[str]) -> list[dict]:
    """Training images first .. first+count-1 as PNG files in `folder`, with their true labels."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for index in range(first, first + count):
        path = folder / f"train_{index:05d}.png"
        Image.fromarray(images[index]).save(path)
        tasks.append({"image": str(path), "label": class_names[int(labels[index])]})
    return tasks


def detection_tasks(split, first: int, count: int) -> list[dict]:
    """Canvases first .. first+count-1 of a DetectionSplit (files written by make_detection_dataset.py)."""
    return [{"image": str(record.image),
             "spans": spans_of(record.boxes, [split.class_names[c] for c in record.classes])}
            for record in split.records[first:first + count]]


# ---------------------------------------------------------------- steps


# ---------------------------------------------------------------- the bench


def cpu_line() -> str:
    model, avx512 = "unknown CPU", False
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                     model)
        avx512 = "avx512f" in text.split()
    except OSError:
        pass
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores, avx512f {'yes' if avx512 else 'no'}, load average at the end "
            f"{load}")


def source_holdout(task: str, holdout: int) -> int:
    """The source run's test images: the classification bench's held-out set (detection holds out canvases)."""
    return holdout if task == "classification" else DEFAULTS["classification"]["holdout"]


def train_source(out: Path, holdout: int, epochs: int = SOURCE_EPOCHS):
    from shared.config import load_config
    from shared.lifecycle import train

    print(f"source run: {RECIPES['classification'].name}, {epochs} epochs on the first {SOURCE_EXAMPLES} "
          f"Fashion-MNIST training images", flush=True)
    config = load_config(str(RECIPES["classification"]),
                         [f"train.epochs={epochs}", f"data.limit_train={SOURCE_EXAMPLES}",
                          f"data.limit_test={holdout}", f"run.dir={out / 'runs'}",
                          "run.notes=bench_loop: the loops' source run", *QUIET])
    return train(config, argv=["bench_loop.py", "source"]).path


def recipe_config(task: str, out: Path, data_root: Path | None, holdout: int, steps: int, loop_dir: Path,
                  tolerance: str = "0.01", changes: tuple[str, ...] = ()):
    from shared.config import load_config

    overrides = [f"run.dir={out / 'runs'}", f"loop.dir={loop_dir}", f"loop.steps={steps}",
                 f"loop.tolerance={tolerance}", *QUIET]
    if task == "classification":
        overrides.append(f"data.limit_test={holdout}")  # loop.eval null: the first `holdout` test images
    else:
        overrides += [f"data.path={data_root / 'images'}",
                      f"detection.train_annotations={data_root / 'annotations' / 'train.json'}",
                      f"detection.test_annotations={data_root / 'annotations' / 'test.json'}"]
    return load_config(str(RECIPES[task]), [*overrides, *changes])


def bench(task: str, rounds: int, per_round: int, steps: int, holdout: int, source: Path | None,
          out: Path, changes: tuple[str, ...] = ()) -> dict:
    from shared.loop import rounds as loop_module
    from shared.loop.folder import STATE_FILE
    from shared.tasks import task_for

    out.mkdir(parents=True, exist_ok=True)
    folder = out / task
    tasks_file = folder / "tasks.jsonl"
    if tasks_file.exists():
        raise SystemExit(f"error: {folder} holds an earlier bench; give another --out-dir")
    data_root, class_names = None, None
    if task == "classification":
        from shared.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIRS, read_split

        images, labels = read_split(Path(FASHION_MNIST_DIRS[0]), "train")
        if SOURCE_EXAMPLES + rounds * per_round > len(images):
            raise SystemExit(f"error: {rounds} x {per_round} labels exceed the {len(images) - SOURCE_EXAMPLES} "
                             f"training images the source run did not see")

        def new_tasks(number: int) -> list[dict]:
            first = SOURCE_EXAMPLES + (number - 1) * per_round
            return classification_tasks(images, labels, first, per_round, folder / "images", FASHION_MNIST_CLASSES)

        class_names = list(FASHION_MNIST_CLASSES)
    else:
        from shared.detection.coco import read_coco

        data_root = folder / "canvases"
        make = _load_make_detection_dataset()
        if make.main([str(data_root), "--train", str(rounds * per_round), "--test", str(holdout), "--no-progress"]):
            raise SystemExit("error: generating the canvas set failed")
        canvases = read_coco(data_root / "annotations" / "train.json", data_root / "images")

        def new_tasks(number: int) -> list[dict]:
            return detection_tasks(canvases, (number - 1) * per_round, per_round)

    if source is None:
        source = train_source(out, source_holdout(task, holdout))
    annotator = Annotator(tasks_file, class_names=class_names)
    served_name = f"resnet-{RECIPES[task].stem}"  # the loop folder's name: the export's model name
    config = recipe_config(task, out, data_root, holdout, steps, folder / served_name, changes=changes)
    loop = loop_module.open_loop(task_for(config), tasks_file, source, export_dir=folder / "exports",
                                 argv=["bench_loop.py", task])
    written = {"accepted": 0, "rejected": 0, "ignored": 0, "malformed": 0}
    rows = []
    for number in range(1, rounds + 1):
        for key, count in annotator.add_round(new_tasks(number)).items():
            written[key] += count
        result = loop_module.run_round(loop)
        if result.round is None:
            raise SystemExit(f"error: round {number} found nothing new to train on ({result.describe()})")
        print(result.describe(), flush=True)
        trained = runs.open_run(result.run).config_dict()["train"]
        rows.append({"round": result.round, "examples": result.examples, "metric": result.metric,
                     "exported": result.exported.name if result.exported else "-", "seconds": result.seconds,
                     "steps": loop_module.round_steps(trained)})
    state = json.loads((loop.dir / STATE_FILE).read_text())
    totals = {key: state["totals"][key] for key in written}
    if totals != written or state["examples"] != written["accepted"]:
        raise SystemExit(f"error: the annotator wrote {written} but the loop counted {totals} and holds "
                         f"{state['examples']} examples")

    batch_size = config.train.batch_size
    planned = [row["steps"] for row in rows]
    total = sum(planned)
    print(f"reference: one run over all {rounds * per_round} labels for {total} steps from {source}", flush=True)
    # One run: the recipe's own schedule, for exactly the rounds' total steps (loop.passes would add more).
    reference_config = recipe_config(task, out, data_root, holdout, total, folder / "reference" / served_name, "null",
                                     (*changes, "loop.schedule=restart", "loop.passes=null"))
    reference_loop = loop_module.open_loop(task_for(reference_config), tasks_file, source,
                                           export_dir=folder / "reference" / "exports",
                                           argv=["bench_loop.py", task, "reference"])
    started = time.monotonic()
    reference = loop_module.run_round(reference_loop)
    reference_seconds = time.monotonic() - started
    reference_steps = loop_module.round_steps(runs.open_run(reference.run).config_dict()["train"])
    source_metric = loop_module.round_zero_metric(state)  # round 0: the source run on the held-out set
    # A round's time besides its steps: its seconds less its steps at the one run's pace (its training time a
    # step, one compilation spread over all its steps); round 1 also measures round 0, so it is left out.
    per_step = json.loads((reference.run / "test_metrics.json").read_text())["train_seconds"] / reference_steps
    overheads = [row["seconds"] - steps * per_step for row, steps in zip(rows[1:], planned[1:])]
    summary = {"task": task, "rows": rows, "source_metric": source_metric, "steps": planned, "totals": totals,
               "source": str(source),
               "reference": {"metric": reference.metric, "steps": reference_steps, "seconds": reference_seconds,
                             "examples": reference.examples},
               "settings": {"rounds": rounds, "per_round": per_round, "steps": steps, "holdout": holdout,
                            "batch_size": batch_size, "recipe": str(RECIPES[task].relative_to(REPO)),
                            "set": list(changes)},
               "loop": str(loop.dir), "overhead": float(np.mean(overheads)) if overheads else None,
               "seconds_a_step": per_step}
    (folder / "bench_loop.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, folder / "bench_loop.png")
    return summary


# ---------------------------------------------------------------- asking for the right labels


def bench_order(order: str, rounds: int, per_round: int, steps: int, holdout: int, pool_size: int, source: Path,
                out: Path, changes: tuple[str, ...] = ()) -> dict:
    """Active learning, simulated: a pool of `pool_size` unlabelled Fashion-MNIST training images (ones the
    source run did not see); before each round the loop's newest model scores the pool
    (`shared.loop.pool.write_pool_tasks`, the file `loop --pool --tasks-out` rewrites) and the annotator labels
    the first `per_round` tasks in `order`, with their true labels; then a round. Returns the held-out figure
    per round."""
    from shared.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIRS, read_split
    from shared.loop import rounds as loop_module
    from shared.loop.pool import write_pool_tasks
    from shared.loop.state import answered_inputs, read_state
    from shared.tasks import task_for

    images, labels = read_split(Path(FASHION_MNIST_DIRS[0]), "train")
    if SOURCE_EXAMPLES + pool_size > len(images) or rounds * per_round > pool_size:
        raise SystemExit(f"error: --pool {pool_size} must hold {rounds} x {per_round} labels and fit the "
                         f"{len(images) - SOURCE_EXAMPLES} training images the source run did not see")
    pool = out / "pool"
    if not pool.is_dir():  # shared by the orders: the same images
        classification_tasks(images, labels, SOURCE_EXAMPLES, pool_size, pool / ".partial", FASHION_MNIST_CLASSES)
        (pool / ".partial").rename(pool / "images")
    truth = {str((pool / "images" / f"train_{index:05d}.png").resolve()): FASHION_MNIST_CLASSES[int(labels[index])]
             for index in range(SOURCE_EXAMPLES, SOURCE_EXAMPLES + pool_size)}
    folder = out / order
    tasks_out, answers = folder / "tasks.jsonl", folder / "answers.jsonl"
    annotator = Annotator(answers, class_names=list(FASHION_MNIST_CLASSES))
    config = recipe_config("classification", out, None, holdout, steps, folder / "resnet-quick", changes=changes)
    loop = loop_module.open_loop(task_for(config), answers, source, export_dir=folder / "exports",
                                 argv=["bench_loop.py", "order", order])
    seed = next((int(c.split("=", 1)[1]) for c in changes if c.startswith("train.seed=")), 0)
    run, rows = source, []
    for number in range(1, rounds + 1):
        annotated = answered_inputs(loop.dir, read_state(loop.dir)) if number > 1 else set()
        started = time.monotonic()
        write_pool_tasks(run, pool / "images", tasks_out, order, annotated=annotated, seed=seed + number)
        scoring = time.monotonic() - started
        with open(tasks_out, encoding="utf-8") as handle:
            chosen = [json.loads(line) for _, line in zip(range(per_round), handle)]
        accepted = []
        for task in chosen:
            image = Path(task["image"]) if Path(task["image"]).is_absolute() else tasks_out.parent / task["image"]
            accepted.append({"image": task["image"], "label": truth[str(image.resolve())]})
        annotator.add_round(accepted)
        result = loop_module.run_round(loop)
        print(f"{order}: {result.describe()} (pool scored in {scoring:.1f} s)", flush=True)
        rows.append({"round": result.round, "labels": result.examples, "metric": result.metric,
                     "scoring_seconds": scoring})
        run = result.run
    return {"order": order, "rows": rows, "seed": seed}


def orders_table(results: list[dict]) -> str:
    """Held-out top-1 per round and order at equal labels, and how many labels each order needs to reach the
    last order's (the baseline's, e.g. random) final figure."""
    names = [result["order"] for result in results]
    lines = [f"| round | labels | {' | '.join(names)} |", "| --- | --- |" + " --- |" * len(names)]
    for index, row in enumerate(results[0]["rows"]):
        lines.append(f"| {row['round']} | {row['labels']} | "
                     + " | ".join(_value(result["rows"][index]["metric"]) for result in results) + " |")
    baseline = results[-1]
    final, labels = baseline["rows"][-1]["metric"], baseline["rows"][-1]["labels"]
    lines.append("")
    for result in results[:-1]:
        reached = next((row for row in result["rows"] if row["metric"] is not None and final is not None
                        and row["metric"] >= final), None)
        lines.append(f"{result['order']} reaches {baseline['order']}'s final {_value(final)} ({labels} labels) "
                     + (f"at round {reached['round']}: {reached['labels']} labels, "
                        f"{100 * reached['labels'] / labels:.0f} % of them" if reached else "in no round"))
    return "\n".join(lines)


def _load_make_detection_dataset():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_detection_dataset",
                                                  REPO / "scripts" / "make_detection_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(summary: dict) -> str:
    """The rounds as a Markdown table, then the comparison line."""
    metric = METRIC_NAME[summary["task"]]
    lines = [f"| round | examples so far | steps | {metric} | exported version | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    if summary.get("source_metric") is not None:
        lines.append(f"| 0 (the --from run) | 0 | - | {_value(summary['source_metric'])} | - | - |")
    for row, steps in zip(summary["rows"], summary["steps"]):
        value = "n/a" if row["metric"] is None else f"{row['metric']:.4f}"
        lines.append(f"| {row['round']} | {row['examples']} | {steps} | {value} | {row['exported']} | "
                     f"{row['seconds']:.1f} |")
    reference, last = summary["reference"], summary["rows"][-1]
    lines.append(f"| one run | {reference['examples']} | {reference['steps']} | "
                 f"{_value(reference['metric'])} | - | {reference['seconds']:.1f} |")
    lines.append("")
    lines.append(f"{summary['task']}: last round {_value(last['metric'])} ({sum(summary['steps'])} steps over "
                 f"{len(summary['rows'])} rounds, {sum(r['seconds'] for r in summary['rows']):.0f} s) vs one run "
                 f"{_value(reference['metric'])} ({reference['steps']} steps, {reference['seconds']:.0f} s); "
                 f"annotation lines counted {summary['totals']}")
    return "\n".join(lines)


def _value(metric: float | None) -> str:
    return "n/a" if metric is None else f"{metric:.4f}"


def plot(summary: dict, out_png: Path) -> Path:
    """The loop's held-out metric per round (round 0: the source run, when known), and the one run on all
    labels as a marker at the last round."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from shared import plots

    figure = Figure(figsize=(5.0, 3.2), dpi=plots.DPI, layout="constrained")
    axes = figure.subplots()
    rows = summary["rows"]
    if summary.get("source_metric") is not None:
        rows = [{"round": 0, "metric": summary["source_metric"]}, *rows]
    numbers = [row["round"] for row in rows]
    metrics = [np.nan if row["metric"] is None else row["metric"] for row in rows]
    axes.plot(numbers, metrics, marker="o", color="tab:blue", label="loop, round by round")
    reference = summary["reference"]["metric"]
    if reference is not None:
        axes.plot([numbers[-1]], [reference], linestyle="none", marker="*", markersize=12, color="tab:orange",
                  label=f"one run, all labels, {summary['reference']['steps']} steps")
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(METRIC_NAME[summary["task"]])
    axes.set_title(f"{summary['task']}: {summary['settings']['per_round']} new labels a round", fontsize=9)
    axes.legend(loc="best", fontsize=7)
    return plots.save_figure(figure, out_png)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("classification", "detection", "both"), default="both")
    parser.add_argument("--rounds", type=int, help="rounds (default 6)")
    parser.add_argument("--per-round", type=int,
                        help="new accepted labels a round (default 500 classification, 200 detection)")
    parser.add_argument("--steps", type=int, help="loop.steps, training steps a round (default 100)")
    parser.add_argument("--holdout", type=int, help="held-out images (default 2000 classification, 200 detection)")
    parser.add_argument("--from", dest="source", type=Path,
                        help="the run the loops start from (default: train one, quick.yaml on 1000 images for "
                             "5 epochs, 30 with --orders)")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for the loop's rounds and the one run alike (repeatable)")
    parser.add_argument("--seeds", default="0", metavar="S,S,...",
                        help="train.seed of the rounds and the one run, one bench each (default 0; the source run "
                             "is trained once; with several, each seed's bench runs in a process of its own)")
    parser.add_argument("--orders", metavar="ORDER,ORDER,...",
                        help="instead: active learning, classification, the annotator labelling a pool in each order "
                             "(e.g. uncertainty,random: the last is the baseline)")
    parser.add_argument("--pool", type=int, default=10000, help="--orders: unlabelled images in the pool (10000)")
    parser.add_argument("--out-dir", type=Path, help="where everything goes (default: a new temporary folder)")
    args = parser.parse_args(argv)
    for name in ("rounds", "per_round", "steps", "holdout"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def seeds_table(summaries: list[dict]) -> str:
    """One line per seed (last round, one run, the gap, the largest fall from one round to the next) and
    their mean: what the loop's goal is judged on."""
    task = summaries[0]["task"]
    lines = [f"| seed | rounds 1-{len(summaries[0]['rows'])} {METRIC_NAME[task]} | last round | one run | gap | "
             f"largest fall between rounds | seconds a round besides its steps |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    gaps, falls = [], []
    for summary in summaries:
        metrics = [row["metric"] for row in summary["rows"]]
        last, reference = metrics[-1], summary["reference"]["metric"]
        gap = None if last is None or reference is None else reference - last
        fall = max((round(before - after, 6) for before, after in zip(metrics, metrics[1:])
                    if before is not None and after is not None), default=0.0)
        gaps.append(gap)
        falls.append(fall)
        overhead = summary.get("overhead")
        lines.append(f"| {summary['seed']} | {' '.join(_value(m) for m in metrics)} | {_value(last)} | "
                     f"{_value(reference)} | {_value(gap)} | {f'{fall:.4f}' if fall > 0 else 'none'} | "
                     f"{'-' if overhead is None else f'{overhead:.1f}'} |")
    known = [gap for gap in gaps if gap is not None]
    if known:
        lines.append(f"| mean | | {_value(np.mean([s['rows'][-1]['metric'] for s in summaries]))} | "
                     f"{_value(np.mean([s['reference']['metric'] for s in summaries]))} | "
                     f"{_value(float(np.mean(known)))} | {max(max(falls), 0.0):.4f} (largest) | |")
    return "\n".join(lines)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds {text!r} is not a comma-separated list of integers (e.g. 0,1,2)") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: --seeds {text!r} must name at least one seed, each once")
    return seeds


def bench_in_child(args: argparse.Namespace, task: str, seed: int, source: Path, where: Path) -> dict:
    """One seed's bench (`bench`) in a new process: the rounds of a loop and its one run share a process, but no
    seed inherits the models, traces and memory of the seeds before it. Returns the summary it wrote."""
    command = [sys.executable, __file__, "--task", task, "--seeds", str(seed), "--from", str(source),
               "--out-dir", str(where)]
    for name in ("rounds", "per_round", "steps", "holdout"):
        if getattr(args, name) is not None:
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for change in args.changes:
        command += ["--set", change]
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"error: the bench of seed {seed} failed (its output is above)")
    return json.loads((where / task / "bench_loop.json").read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = (args.out_dir or Path(tempfile.mkdtemp(prefix="bench-loop-"))).resolve()
    tasks = ["classification", "detection"] if args.task == "both" else [args.task]
    seeds = parse_seeds(args.seeds)
    if any(change.split("=", 1)[0].strip() == "train.seed" for change in args.changes):
        raise SystemExit("error: --set train.seed: the bench sets each seed's train.seed itself; give --seeds instead")
    source = args.source.resolve() if args.source else None
    if args.orders:
        return main_orders(args, out, seeds, source)
    results: dict[str, list[dict]] = {}
    for task in tasks:
        sizes = {name: getattr(args, name) or default for name, default in DEFAULTS[task].items()}
        if len(seeds) > 1 and source is None:  # every seed and both tasks start from the same run
            source = train_source(out, source_holdout(task, sizes["holdout"]))
        for seed in seeds:
            if len(seeds) == 1:
                summary = bench(task, source=source, out=out, changes=(*args.changes, f"train.seed={seed}"), **sizes)
            else:  # each seed's loop in a process of its own, as `loop --watch` runs one loop a process
                summary = bench_in_child(args, task, seed, source, out / f"seed-{seed}")
            summary["seed"] = seed
            source = Path(summary["source"])
            results.setdefault(task, []).append(summary)
            print(table(summary), flush=True)
    print(f"\nCPU: {cpu_line()}")
    for task, summaries in results.items():
        for summary in summaries:
            settings = summary["settings"]
            changed = f" with --set {' '.join(settings['set'])}" if settings["set"] else ""
            print(f"\n{summary['task']}, seed {summary['seed']}: {settings['recipe']}{changed}, {settings['rounds']} "
                  f"rounds of {settings['per_round']} labels, loop.steps {settings['steps']} (batch "
                  f"{settings['batch_size']}), {settings['holdout']} held-out images, source {summary['source']}; "
                  f"plot {Path(summary['loop']).parent / 'bench_loop.png'}")
            print(table(summary))
        print(f"\n{task}, {len(summaries)} seed(s):\n{seeds_table(summaries)}")
    return 0


def main_orders(args: argparse.Namespace, out: Path, seeds: list[int], source: Path | None) -> int:
    from shared.annotation_tasks import ORDERS

    orders = [order.strip() for order in args.orders.split(",") if order.strip()]
    unknown = [order for order in orders if order not in ORDERS]
    if unknown or len(orders) < 2:
        raise SystemExit(f"error: --orders {args.orders!r}: give two or more of {', '.join(ORDERS)}")
    sizes = {name: getattr(args, name) or default for name, default in DEFAULTS["classification"].items()}
    out.mkdir(parents=True, exist_ok=True)
    source = source or train_source(out, sizes["holdout"], ORDERS_SOURCE_EPOCHS)
    tables = []
    for seed in seeds:
        where = out / "active" / f"seed-{seed}"
        results = [bench_order(order, pool_size=args.pool, source=source, out=where,
                               changes=(*args.changes, f"train.seed={seed}"), **sizes) for order in orders]
        (where / "bench_orders.json").write_text(json.dumps(results, indent=1) + "\n")
        tables.append(f"\nseed {seed}: {sizes['rounds']} rounds of {sizes['per_round']} labels from a pool of "
                      f"{args.pool}, loop.steps {sizes['steps']}, {sizes['holdout']} held-out images, source "
                      f"{source}\n{orders_table(results)}")
        print(tables[-1], flush=True)
    print(f"\nCPU: {cpu_line()}")
    print("\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
