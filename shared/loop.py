"""Training in the loop: annotations in, a better served model out, round after round.

    python -m shared.runner loop --config RECIPE --annotations FILE.jsonl --from RUN [--export-dir exports]
                                 [--once | --watch]

A round: the accepted tasks appended to the annotations file since the last round (`shared.annotations`) ->
one TFRecord shard set `<loop>/data/round-NNNN/` -> a finetune of the previous round's run (the first round:
of `--from`) over ALL the loop's shard sets, through the normal run lifecycle -> its test figure on the fixed
held-out set `<loop>/eval/` -> a new SavedModel version unless the metric fell by more than `loop.tolerance`
below the last exported round's -> garbage collection -> a row of `rounds.csv` and `rounds.png`.

Exactly once, across kills: `<loop>/state.json` is the commit point, replaced atomically after each stage of a
round (ingested -> trained -> exported -> done). A round's shard set is published (atomic rename) BEFORE the
state that consumes its lines is committed, so a kill between the two redoes the same lines as the same round
number into the same folder (replaced); a kill while training trains the round again in a new run folder (the
dead one is collected later); an export is found again by its run (`assets.extra/export.json`) rather than
made twice. One process drives a loop folder at a time (`shared.locks.folder_writer`).

Garbage collection keeps every annotation (training uses all examples so far): beyond `loop.keep` shard sets,
the oldest are merged into one `merged-NNNN` set (records copied, not re-encoded; the newest merged set
supersedes the sets it holds, so a kill mid-merge never counts an example twice); export versions beyond the
newest `loop.keep` are pruned by the export itself; round runs beyond the newest `loop.keep`, and runs of
rounds that were killed and trained again, are removed. The newest run and the served (newest) version stay.

    loop = open_loop(config, "tasks.jsonl", "runs/resnet/v0001", export_dir="exports")
    result = run_round(loop)                 # one round (min_new=1), or RoundResult(round=None): nothing new
    results = run_rounds(loop, watch=True)   # rounds until stopped (Ctrl-C / SIGTERM, or `stop()` says so)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from shared import annotations, durable, runs
from shared.annotations import Batch, Example
from shared.config import Config, with_changes
from shared.errors import UserError
from shared.locks import folder_writer

STATE_FILE = "state.json"
ROUNDS_CSV = "rounds.csv"
ROUNDS_PNG = "rounds.png"
LABELS_FILE = "labels.txt"
LABEL_MAP_FILE = "label_map.pbtxt"
DATA, EVAL = "data", "eval"
ROUND_RE = re.compile(r"^round-(\d{4,})$")
MERGED_RE = re.compile(r"^merged-(\d{4,})$")
TRAIN_PREFIX, EVAL_PREFIX = "train", "validation"
METRIC = {"classification": "top1", "detection": "mAP"}  # the held-out figure a round is judged by
STAGES = ("ingested", "trained", "exported", "done")
CSV_COLUMNS = ("round", "new", "examples", "metric", "exported_version", "seconds", "run")


@dataclasses.dataclass(frozen=True)
class Loop:
    """What a loop command names: the recipe, the annotations, where it starts and where it exports."""
    config: Config  # the recipe, with its loop: section
    annotations: Path
    from_run: Path
    export_dir: Path
    dir: Path
    export_name: str  # the served model's name: the loop folder's name
    argv: tuple = ()

    @property
    def task(self) -> str:
        return self.config.task


@dataclasses.dataclass
class RoundResult:
    """What one call of `run_round` did: round None when there was nothing new to train on."""
    round: int | None
    batch: Batch | None  # what was read this time (None when a round cut short was finished)
    examples: int  # accepted examples ingested so far, all rounds
    run: Path | None = None
    metric: float | None = None
    exported: Path | None = None  # the version folder, None when the metric fell too far
    seconds: float = 0.0

    def describe(self) -> str:
        if self.round is None:
            return "no new accepted annotations" + (f" ({self.batch.describe()})" if self.batch and self.batch.lines
                                                      else "")
        metric = "n/a" if self.metric is None else f"{self.metric:.4f}"
        exported = f"exported {self.exported}" if self.exported else "not exported (the metric fell)"
        return (f"round {self.round}: {self.examples} examples, run {self.run}, held-out {metric}, {exported}, "
                f"{self.seconds:.1f} s")


def default_dir(config: Config) -> Path:
    """<run.dir>/loops/<model>-<recipe file stem>."""
    stem = Path(config.source_file).stem if config.source_file else "recipe"
    return Path(config.run.dir) / "loops" / f"{config.model.name}-{stem}"


def open_loop(config: Config, annotations_file: str | os.PathLike, from_run: str | os.PathLike,
              export_dir: str | os.PathLike = "exports", argv: list[str] | None = None) -> Loop:
    """Check a loop command before anything is written: the recipe's task supports `loop`, the annotations
    file and the --from run exist (the run idle). Paths become absolute (runs record them)."""
    from shared.tasks import task_for

    if "loop" not in task_for(config).commands:
        raise UserError(f"loop supports tasks classification and detection, not {config.task}")
    annotations_file = Path(annotations_file).expanduser().resolve()
    if not annotations_file.is_file():
        raise UserError(f"annotations file not found: {annotations_file}; give the annotation tool's JSONL export "
                        f"(--annotations)")
    source = runs.open_run(from_run)
    runs.require_idle(source)
    if config.loop.eval and not Path(config.loop.eval).expanduser().is_file():
        raise UserError(f"loop.eval {config.loop.eval}{config.where} is not a file; name a held-out annotations "
                        f"JSONL, or null for the recipe's test split")
    folder = Path(config.loop.dir).expanduser() if config.loop.dir else default_dir(config)
    folder = folder.resolve()
    return Loop(config, annotations_file, source.path.resolve(), Path(export_dir).expanduser().resolve(), folder,
                folder.name, tuple(argv or ()))


# ---------------------------------------------------------------- the rounds


def run_round(loop: Loop, min_new: int = 1) -> RoundResult:
    """One round: finish a round a kill cut short, else ingest the new lines and, when at least `min_new`
    of them are accepted, train, evaluate, export and collect. Lines without an accepted task (rejected,
    ignored, malformed) are consumed and counted without a round; fewer than `min_new` accepted ones are left
    for later (RoundResult(round=None))."""
    started = time.monotonic()
    loop.dir.mkdir(parents=True, exist_ok=True)
    with folder_writer(loop.dir):
        state = _read_state(loop.dir) or _start(loop)
        _check_same_loop(loop, state)
        _reconcile_data(loop.dir, state)
        if state["stage"] != "done":
            print(f"loop {loop.dir}: finishing round {state['round']} (stopped after '{state['stage']}')", flush=True)
            return _finish(loop, state, started, None)
        batch = annotations.read_new(loop.annotations, state["offset"], state["lines"], loop.task,
                                     _class_names(loop.dir))
        if batch.accepted == 0 and batch.lines:  # nothing to train on: consume and count them
            print(f"{loop.annotations}: {batch.describe()}", flush=True)
            _add_counts(state, batch)
            state.update(offset=batch.end_offset, lines=state["lines"] + batch.lines)
            _commit(loop.dir, state)
        if batch.accepted == 0 or batch.accepted < min_new:  # left for later (the caller may report them)
            return RoundResult(None, batch, state["examples"], seconds=time.monotonic() - started)
        print(f"{loop.annotations}: {batch.describe()}", flush=True)
        number = state["round"] + 1
        folder = loop.dir / DATA / f"round-{number:04d}"
        _write_set(folder, batch.examples, loop.task, _class_names(loop.dir))
        _add_counts(state, batch)
        state.update(round=number, stage="ingested", offset=batch.end_offset, lines=state["lines"] + batch.lines,
                     examples=state["examples"] + batch.accepted,
                     current={"round": number, "new": batch.accepted, "examples": state["examples"] + batch.accepted,
                              "annotation_lines": state["lines"] + batch.lines,
                              "seconds": round(time.monotonic() - started, 1)})
        _commit(loop.dir, state)
        print(f"round {number}: {batch.accepted} new examples in {folder} ({state['examples']} in all)", flush=True)
        return _finish(loop, state, time.monotonic(), batch)


def run_rounds(loop: Loop, watch: bool = True, rounds: int | None = None,
               stop: Callable[[], bool] = lambda: False, report: Callable[[str], None] = print) -> list[RoundResult]:
    """Rounds until stopped: with `watch`, poll the annotations every loop.poll_seconds and run a round when
    at least loop.min_new new accepted tasks are there; without, until nothing new is left. `rounds`: stop
    after that many rounds; `stop()`: asked between rounds and polls; `report`: gets a line per round or
    change. Ctrl-C or SIGTERM stops at once; the state on disk is consistent at every moment, and the same
    call continues. Returns the rounds run."""
    done: list[RoundResult] = []
    min_new = loop.config.loop.min_new if watch else 1
    waiting = None
    with folder_writer_held(loop), sigterm_stops():
        if watch:
            report(f"loop {loop.dir}: watching {loop.annotations} every {loop.config.loop.poll_seconds:g} s (a round "
                   f"at {min_new} new accepted tasks); Ctrl-C or SIGTERM stops")
        while not stop() and (rounds is None or len(done) < rounds):
            result = run_round(loop, min_new=min_new)
            if result.round is not None:
                done.append(result)
                report(result.describe())
                continue
            if not watch:
                break
            pending = result.batch.accepted if result.batch else 0
            if pending and pending != waiting:
                report(f"waiting: {pending} of {min_new} new accepted tasks")
            waiting = pending
            _sleep(loop.config.loop.poll_seconds, stop)
    return done


@contextlib.contextmanager
def folder_writer_held(loop: Loop) -> Iterator[None]:
    """The loop folder held for the whole of `run_rounds` (run_round takes it again, re-entrantly)."""
    loop.dir.mkdir(parents=True, exist_ok=True)
    with folder_writer(loop.dir):
        yield


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does (the training lifecycle handles both alike)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("interrupted by SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sleep(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop():
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _finish(loop: Loop, state: dict, started: float, batch: Batch | None) -> RoundResult:
    """The stages of the current round after ingestion, each committed in state.json when done."""
    current = state["current"]

    def timed(**values) -> None:
        nonlocal started
        current.update(values, seconds=round(current.get("seconds", 0.0) + time.monotonic() - started, 1))
        started = time.monotonic()

    def commit(stage: str, **values) -> None:
        timed(**values)
        state["stage"] = stage
        _commit(loop.dir, state)

    if state["stage"] == "ingested":
        run = _train(loop, state)
        metric = (run.test_metrics() or {}).get(METRIC[loop.task])
        commit("trained", run=str(run.path.resolve()), metric=_number(metric))
    if state["stage"] == "trained":
        version = _export(loop, state)
        if version is not None:
            state["served"] = {"round": current["round"], "version": int(version.name), "metric": current["metric"]}
        commit("exported", exported_version=int(version.name) if version is not None else None)
    if state["stage"] == "exported":
        timed()  # the round's time as rounds.csv records it: garbage collection aside
        state["history"] = [entry for entry in state["history"] if entry["round"] != current["round"]] + [current]
        state["previous_run"] = current["run"]
        _write_rounds(loop.dir, state["history"], METRIC[loop.task])
        _collect_garbage(loop, state)
        state["stage"] = "done"
        _commit(loop.dir, state)
    version = current.get("exported_version")
    return RoundResult(current["round"], batch, state["examples"], Path(current["run"]), current["metric"],
                       loop.export_dir / loop.export_name / str(version) if version is not None else None,
                       current["seconds"])


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


# ---------------------------------------------------------------- state


def _read_state(folder: Path) -> dict | None:
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # atomic writes never leave half a file: someone edited it
        raise UserError(f"{path} is damaged ({error}); restore it, or start a new loop (another loop.dir)") from None


def _commit(folder: Path, state: dict) -> None:
    durable.atomic_write(folder / STATE_FILE, json.dumps(state, indent=1) + "\n")


def _check_same_loop(loop: Loop, state: dict) -> None:
    """A loop folder follows one annotations file from one starting run."""
    for key, given, flag in (("annotations", loop.annotations, "--annotations"), ("from_run", loop.from_run, "--from")):
        if state[key] != str(given):
            raise UserError(f"loop {loop.dir} follows {key.replace('_', ' ')} {state[key]}, not {given}; give "
                            f"{flag} {state[key]} to continue it, or set loop.dir to start another loop")


def _add_counts(state: dict, batch: Batch) -> None:
    totals = state["totals"]
    for key, count in (("accepted", batch.accepted), ("rejected", batch.rejected), ("ignored", batch.ignored),
                       ("malformed", len(batch.malformed))):
        totals[key] = totals.get(key, 0) + count


def _start(loop: Loop) -> dict:
    """A new loop folder: its classes (labels.txt, and label_map.pbtxt for detection), its held-out set
    ingested once into eval/, then the first state."""
    names = _initial_class_names(loop)
    durable.atomic_write(loop.dir / LABELS_FILE, "".join(f"{name}\n" for name in names))
    if loop.task == "detection":
        from shared.detection.datasets import write_label_map

        with durable.partial_path(loop.dir / LABEL_MAP_FILE) as partial:
            write_label_map(partial, names)
    _write_eval(loop, names)
    state = {"annotations": str(loop.annotations), "from_run": str(loop.from_run), "task": loop.task,
             "offset": 0, "lines": 0, "round": 0, "stage": "done", "examples": 0,
             "totals": {"accepted": 0, "rejected": 0, "ignored": 0, "malformed": 0},
             "previous_run": None, "served": None, "current": None, "history": []}
    _commit(loop.dir, state)
    return state


def _class_names(folder: Path) -> list[str]:
    return [line for line in (folder / LABELS_FILE).read_text(encoding="utf-8").splitlines() if line]


def _initial_class_names(loop: Loop) -> list[str]:
    """The classes the loop trains: the --from run's when it has the recipe's task, else (a classification
    backbone for a detector) the recipe's label map or detection data."""
    source = runs.open_run(loop.from_run)
    names = source.class_names()
    if (source.config_dict() or {}).get("task", "classification") == loop.task and names:
        return names
    if loop.task == "classification":
        raise UserError(f"--from {loop.from_run} is not a classification run with labels.txt; start the loop from "
                        f"a classification run of the classes to annotate")
    from shared.detection import datasets as detection_data

    if loop.config.detection.label_map:
        return detection_data.read_class_list(loop.config.detection.label_map)
    return detection_data.load_detection_data(loop.config)[2]


# ---------------------------------------------------------------- shard sets


def _write_set(folder: Path, examples: list[Example], task: str, class_names: list[str],
               prefix: str = TRAIN_PREFIX) -> None:
    """The examples as one TFRecord shard in a new folder, published whole (an earlier, uncommitted attempt of
    the same folder is replaced): classification in TF Model Garden's layout (shared.data.tfrecord),
    detection as TF Object Detection API records (shared.detection.datasets)."""
    import tensorflow as tf

    from shared.data.tfrecord import image_example, shard_name

    durable.remove(folder)
    with durable.partial_path(folder) as partial:
        partial.mkdir()
        if task == "classification":
            with tf.io.TFRecordWriter(str(partial / shard_name(prefix, 0, 1))) as writer:
                for example in examples:
                    writer.write(image_example(example.image, example.image_format, example.height, example.width,
                                               example.label, class_names[example.label]).SerializeToString())
        else:
            from shared.detection.datasets import DetectionRecord, DetectionSplit, write_tfod_records

            split = DetectionSplit([DetectionRecord(example.image, example.width, example.height, example.boxes,
                                                    example.classes, name=example.name) for example in examples],
                                   class_names)
            write_tfod_records(split, partial / f"{shard_name(prefix, 0, 1)}.tfrecord", class_names)


def _sets(folder: Path) -> list[tuple[int, Path]]:
    """(last round held, folder) of the data sets, oldest first: merged-K holds rounds up to K."""
    found = []
    for entry in (folder / DATA).iterdir() if (folder / DATA).is_dir() else ():
        match = ROUND_RE.match(entry.name) or MERGED_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found, key=lambda item: (item[0], item[1].name.startswith("round-")))


def _reconcile_data(folder: Path, state: dict) -> None:
    """The data folder as the state says: no temporary folders, no set that a newer merged set holds (a kill
    between publishing a merge and removing what it merged), no round set beyond the committed rounds (a
    kill between publishing it and committing its state: that round is redone)."""
    for root in (folder / DATA, folder / EVAL, folder):
        for partial in root.glob(".partial-*") if root.is_dir() else ():
            durable.remove(partial)
    merged = [number for number, path in _sets(folder) if path.name.startswith("merged-")]
    newest = max(merged, default=0)
    for number, path in _sets(folder):
        superseded = number <= newest and path.name != f"merged-{newest:04d}"
        uncommitted = path.name.startswith("round-") and number > state["round"]
        if superseded or uncommitted:
            durable.remove(path)


def _merge_old_sets(folder: Path, keep: int) -> None:
    """Beyond `keep` sets, the oldest become one merged-K set (K: the newest round it holds); published
    before the sets it replaces are removed, which `_reconcile_data` completes after a kill."""
    import tensorflow as tf

    sets = _sets(folder)
    if len(sets) <= keep:
        return
    oldest = sets[:len(sets) - keep + 1]
    files = [str(path) for _, folder_path in oldest for path in sorted(folder_path.glob(f"{TRAIN_PREFIX}-*"))]
    suffix = Path(files[0]).suffix if files else ""
    target = folder / DATA / f"merged-{oldest[-1][0]:04d}"
    with durable.partial_path(target) as partial:
        partial.mkdir()
        with tf.io.TFRecordWriter(str(partial / f"{TRAIN_PREFIX}-00000-of-00001{suffix}")) as writer:
            for record in tf.data.TFRecordDataset(files):
                writer.write(record.numpy())
    for _, path in oldest:
        if path != target:
            durable.remove(path)


def _write_eval(loop: Loop, names: list[str]) -> None:
    """The fixed held-out set, once: loop.eval's accepted tasks, else the recipe's test split."""
    folder = loop.dir / EVAL
    if folder.is_dir():
        return
    if loop.config.loop.eval:
        path = Path(loop.config.loop.eval).expanduser()
        batch = annotations.read_new(path, 0, 0, loop.task, names)
        print(f"held-out set {path}: {batch.describe()}", flush=True)
        if not batch.examples:
            raise UserError(f"loop.eval {path} holds no accepted task; the loop needs a held-out set to judge rounds")
        _write_set(folder, batch.examples, loop.task, names, EVAL_PREFIX)
    elif loop.task == "classification":
        _write_recipe_test_split(loop, names, folder)
    else:
        from shared.detection.datasets import load_detection_data, write_tfod_records

        _, test, _ = load_detection_data(loop.config)
        if test is None:
            raise UserError(f"loop.eval is null and the recipe has no detection.test_annotations{loop.config.where}; "
                            f"name a held-out annotations file in loop.eval")
        with durable.partial_path(folder) as partial:
            partial.mkdir()
            write_tfod_records(test, partial / f"{EVAL_PREFIX}-00000-of-00001.tfrecord", names)
    print(f"held-out set: {folder}", flush=True)


def _write_recipe_test_split(loop: Loop, names: list[str], folder: Path) -> None:
    """The recipe's classification test split as shards (decoded arrays encoded as PNG; files and encoded
    images as they are), its classes matched to the loop's by name."""
    import tensorflow as tf

    from shared.data import sources
    from shared.data.tfrecord import image_example, read_image_file, shard_name

    data = loop.config.data
    source = sources.load(data)
    position = {name: i for i, name in enumerate(names)}
    missing = [name for name in source.class_names if name not in position]
    if missing:
        raise UserError(f"the recipe's test split has class {missing[0]!r}, which the loop's model (--from) does "
                        f"not know; set loop.eval to a held-out annotations file")
    test = source.test.take(data.limit_test) if data.limit_test else source.test
    with durable.partial_path(folder) as partial:
        partial.mkdir()
        with tf.io.TFRecordWriter(str(partial / shard_name(EVAL_PREFIX, 0, 1))) as writer:
            for image, label in test.as_numpy_iterator():
                name = source.class_names[int(label)]
                if source.encoding == "path":
                    encoded, fmt, height, width = read_image_file(image.decode())
                elif source.encoding == "bytes":
                    encoded = bytes(image)
                    fmt, width, height = annotations.image_facts(encoded, "a test image")
                else:
                    pixels = image if image.ndim == 3 else image[..., None]
                    encoded, fmt, (height, width) = tf.io.encode_png(pixels).numpy(), "png", pixels.shape[:2]
                writer.write(image_example(encoded, fmt, height, width, position[name], name).SerializeToString())


# ---------------------------------------------------------------- training, export


def round_config(loop: Loop, state: dict) -> Config:
    """The recipe as this round trains it: from the previous round's run (the first: --from), over every
    shard set of the loop, tested on its held-out set, for about loop.steps steps (whole epochs of equal
    length: the pipeline repeats, so steps may exceed the examples), with the starting run's normalization."""
    config, current = loop.config, state["current"]
    start = state["previous_run"] or state["from_run"]
    per_epoch, epochs = steps_schedule(config.loop.steps, current["examples"], config.train.batch_size)
    recorded = runs.open_run(start).config_dict().get("data", {})
    notes = (f"loop {loop.dir}, round {current['round']}: {current['examples']} annotated examples "
             f"({current['new']} new, annotation lines 1-{current['annotation_lines']} of {loop.annotations}); "
             f"started from {start}")
    changes = {"init.from_run": start, "init.weights": None, "train.epochs": epochs,
               "train.steps_per_epoch": per_epoch, "train.keep_checkpoints": config.train.keep_checkpoints or 1,
               "loop.dir": str(loop.dir), "data.limit_train": None, "data.limit_test": None,
               "data.num_classes": None,
               "run.notes": notes + (f"\n\n{config.run.notes.strip()}" if config.run.notes.strip() else "")}
    if recorded.get("mean") and recorded.get("std") and len(recorded["mean"]) == config.data.channels:
        changes.update({"data.normalize": recorded.get("normalize", True), "data.mean": recorded["mean"],
                        "data.std": recorded["std"]})
    if loop.task == "classification":
        changes.update({"data.source": "tfrecord", "data.path": str(loop.dir), "data.label_offset": 0,
                        "data.train_split": f"{DATA}/*/{TRAIN_PREFIX}", "data.test_split": f"{EVAL}/{EVAL_PREFIX}",
                        "data.val_fraction": 0.0, "data.test_fraction": 0.0})
    else:
        changes.update({"detection.format": "tfrecord",
                        "detection.train_annotations": str(loop.dir / DATA / "*" / f"{TRAIN_PREFIX}-*.tfrecord"),
                        "detection.test_annotations": str(loop.dir / EVAL / f"{EVAL_PREFIX}-*.tfrecord"),
                        "detection.label_map": str(loop.dir / LABEL_MAP_FILE)})
        if config.detection.unfreeze_epoch is not None and config.detection.unfreeze_epoch >= epochs:
            changes["detection.unfreeze_epoch"] = None  # the round is shorter than its frozen stretch
    return with_changes(config, changes)


def steps_schedule(steps: int, examples: int, batch_size: int) -> tuple[int, int]:
    """(steps per epoch, epochs) for about `steps` steps: as few equal epochs as the examples allow (an epoch
    is at most one pass), so steps_per_epoch x epochs is `steps` rounded up by less than one per epoch."""
    natural = max(1, math.ceil(examples / batch_size))
    epochs = math.ceil(steps / natural)
    return math.ceil(steps / epochs), epochs


def _train(loop: Loop, state: dict) -> runs.Run:
    from shared.lifecycle import train

    runs.require_idle(runs.open_run(state["previous_run"] or state["from_run"]))
    return train(round_config(loop, state), argv=list(loop.argv) or None)


def _export(loop: Loop, state: dict) -> Path | None:
    """The round's run as the next SavedModel version, unless its metric fell by more than loop.tolerance
    below the served round's; a version already exported from this run (a kill before the state said so)
    is the round's export, never a second one."""
    from shared.tasks import task_for

    current, served, tolerance = state["current"], state.get("served"), loop.config.loop.tolerance
    model_dir = loop.export_dir / loop.export_name
    already = exported_version(model_dir, Path(current["run"]))
    if already is not None:
        return already
    metric, best = current.get("metric"), (served or {}).get("metric")
    if tolerance is not None and metric is not None and best is not None and metric < best - tolerance:
        print(f"round {current['round']}: held-out {metric:.4f} fell more than {tolerance} below round "
              f"{served['round']}'s {best:.4f}; version {served['version']} stays served", flush=True)
        return None
    run = runs.open_run(current["run"])
    return task_for(run).export_saved_model(run, loop.export_dir, model_name=loop.export_name,
                                            keep=loop.config.loop.keep)


def exported_version(model_dir: Path, run_path: Path) -> Path | None:
    """The version folder of `model_dir` exported from the run at `run_path` (its assets.extra/export.json)."""
    from shared.export import versions

    for _, folder in sorted(versions(model_dir).items()):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((folder / "assets.extra" / "export.json").read_text(encoding="utf-8"))
            if Path(record.get("run", "")) == run_path.resolve():
                return folder
    return None


# ---------------------------------------------------------------- garbage, rounds.csv and rounds.png


def _collect_garbage(loop: Loop, state: dict) -> None:
    """Merge old shard sets; remove round runs beyond the newest loop.keep and runs of attempts a kill cut
    short (runs of this loop no process holds and no round names). Export versions are pruned by the export
    (keep: loop.keep). The current round's run, the next round's start, is never removed."""
    keep = loop.config.loop.keep
    _merge_old_sets(loop.dir, keep)
    rounds = [entry["run"] for entry in state["history"] if entry.get("run")]
    for path in rounds[:-keep]:
        _remove_run(Path(path))
    model_folder = Path(rounds[-1]).parent  # <run.dir>/<model>: where this loop's runs are
    for run in runs.all_runs(model_folder.parent, model_folder.name):
        if str(run.path.resolve()) in rounds:
            continue
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if (run.config_dict().get("loop") or {}).get("dir") == str(loop.dir):
                _remove_run(run.path)


def _remove_run(path: Path) -> None:
    """A run folder gone in one step (renamed hidden, then deleted), unless a process holds it."""
    if not path.is_dir() or runs.lock_holder(runs.Run(path)) is not None:
        return
    hidden = path.parent / f".deleting-{path.name}-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)


def _write_rounds(folder: Path, history: list[dict], metric: str) -> None:
    """rounds.csv (one row a round, rewritten atomically from the committed state) and rounds.png."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for entry in history:
        writer.writerow(["" if entry.get(key) is None else entry.get(key) for key in
                         ("round", "new", "examples", "metric", "exported_version", "seconds", "run")])
    durable.atomic_write(folder / ROUNDS_CSV, out.getvalue())
    with durable.disk_space_checked(folder / ROUNDS_PNG):
        plot_rounds(history, folder / ROUNDS_PNG, metric)


def plot_rounds(history: list[dict], out_png: Path, metric: str = "metric") -> Path:
    """The held-out metric per round (exported rounds filled), with the examples so far on a second axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from shared import plots

    figure = Figure(figsize=(5.0, 3.2), dpi=plots.DPI, layout="constrained")
    axes = figure.subplots()
    numbers = [entry["round"] for entry in history]
    metrics = [entry.get("metric") if entry.get("metric") is not None else float("nan") for entry in history]
    axes.plot(numbers, metrics, color="tab:blue", marker="o", markerfacecolor="white", label="held-out")
    exported = [(n, m) for n, m, entry in zip(numbers, metrics, history) if entry.get("exported_version")]
    if exported:
        axes.plot(*zip(*exported), linestyle="none", marker="o", color="tab:blue", label="exported")
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(f"held-out {metric}")
    axes.legend(loc="lower right", fontsize=7)
    second = axes.twinx()
    second.bar(numbers, [entry.get("examples", 0) for entry in history], alpha=0.15, color="tab:gray")
    second.set_ylabel("examples so far")
    axes.set_zorder(second.get_zorder() + 1)
    axes.patch.set_visible(False)
    return plots.save_figure(figure, out_png)
