"""Training in the loop: annotations in, a better served model out, round after round.

    python -m shared.runner loop --config RECIPE --annotations FILE.jsonl --from RUN [--export-dir exports]
                                 [--once | --watch]

Ingestion (`shared.annotations`): the lines added to the annotations file since the last read, in chunks of
at most CHUNK_BYTES of images, each chunk committed on its own: its new accepted examples as one TFRecord shard
set `<loop>/data/set-NNNNNN/` (with `ids.txt`, the example number of each record), its answers appended to
`<loop>/answers.jsonl` (the ledger: fingerprint, input, question, answer, example number of every answer
taken). The ledger replayed is the `AnswerTable`: which example each input has now (the latest answer wins).
When an answer replaces or withdraws an example of an older set, that set is rewritten without it (records
copied, not re-encoded) in the same commit, so the shard sets always hold exactly the current examples, each
input at most once. A file that no longer starts with the bytes consumed (an export that rewrote it) is said in
one line and read again from its start: the answers taken before are recognized by fingerprint and skipped.

A round, once new accepted examples are in: round 0 (the `--from` run's figure on the held-out set, once) ->
a finetune of the previous round's run (the first round: of `--from`) over ALL the shard sets, through the
normal run lifecycle -> its test figure on the fixed held-out set `<loop>/eval/` -> a new SavedModel version
unless the figure fell by more than `loop.tolerance` below the served round's or round 0's -> garbage
collection -> a row of `rounds.csv` and `rounds.png`. The rounds see what the `--from` run saw (image size,
channels, normalization, eval crop, classes), whatever the recipe says, and say where they differ.

Exactly once, across kills: `<loop>/state.json` is the commit point, replaced atomically after each chunk and
each stage of a round (ingested -> trained -> exported -> done). It lists the live shard sets and the ledger's
committed length: whatever a kill left beyond them (a published set, ledger lines, a set a rewrite replaced) is
removed when the loop next starts (`_reconcile`), so a chunk cut short is read again. A kill while training
trains the round again in a new run folder (the dead one is collected later); an export is found again by its
run (`assets.extra/export.json`) rather than made twice. One process drives a loop folder at a time
(`shared.locks.folder_writer`).

Garbage collection keeps every current example (training uses all examples so far): beyond `loop.keep` shard
sets the oldest are merged into one (records copied); export versions beyond the newest `loop.keep` are pruned
by the export itself; of the runs this loop trained (each records the attempt id state.json lists in its
`loop.attempt`), those beyond the newest `loop.keep` rounds and those of killed attempts are removed. The
`--from` run and any run the loop did not train are never removed.

    loop = open_loop(config, "tasks.jsonl", "runs/resnet/v0001", export_dir="exports")
    result = run_round(loop)                 # one round (min_new=1), or RoundResult(round=None): nothing new
    results = run_rounds(loop, watch=True)   # rounds until stopped (Ctrl-C / SIGTERM, or `stop()` says so)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from shared import annotations, durable, runs
from shared.annotations import AnswerTable, Batch, Example
from shared.config import Config, with_changes
from shared.errors import UserError
from shared.locks import folder_writer

STATE_FILE = "state.json"
STATE_VERSION = 2  # 2: shard sets listed in the state, the answers ledger
LEDGER_FILE = "answers.jsonl"
IDS_FILE = "ids.txt"  # in a shard set: the example number of each record, in record order
ROUNDS_CSV = "rounds.csv"
ROUNDS_PNG = "rounds.png"
LABELS_FILE = "labels.txt"
LABEL_MAP_FILE = "label_map.pbtxt"
DATA, EVAL = "data", "eval"
TRAIN_PREFIX, EVAL_PREFIX = "train", "validation"
CHUNK_BYTES = 64 << 20  # images held in memory at once while ingesting: a chunk is committed at this size
METRIC = {"classification": "top1", "detection": "mAP"}  # the held-out figure a round is judged by
STAGES = ("ingested", "trained", "exported", "done")
CSV_COLUMNS = ("round", "new", "examples", "metric", "exported_version", "seconds", "run")
FOLLOWED = ("image_size", "channels", "normalize", "mean", "std", "crop_fraction")  # data keys: what a model sees
TOTALS = ("accepted", "rejected", "ignored", "malformed", "duplicates", "replaced", "withdrawn")


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
    examples: int  # current examples, all rounds (each input once)
    run: Path | None = None
    metric: float | None = None
    exported: Path | None = None  # the version folder, None when the metric fell too far
    seconds: float = 0.0
    pending: int = 0  # round None: accepted answers ingested that no round has trained on yet

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
    accepted answers wait (this read's and earlier ones'), train, evaluate, export and collect. Lines without
    an accepted task (rejected, ignored, malformed, already ingested) are consumed and counted without a round;
    fewer than `min_new` accepted ones are ingested and wait for later (RoundResult(round=None, pending=N))."""
    started = time.monotonic()
    loop.dir.mkdir(parents=True, exist_ok=True)
    with folder_writer(loop.dir):
        state = _read_state(loop.dir) or _start(loop)
        _check_same_loop(loop, state)
        _reconcile(loop.dir, state)
        if state["stage"] != "done":
            print(f"loop {loop.dir}: finishing round {state['round']} (stopped after '{state['stage']}')", flush=True)
            return _finish(loop, state, started, None)
        batch = ingest(loop, state)
        if batch.lines:
            print(f"{loop.annotations}: {batch.describe()}", flush=True)
        pending = state["pending"]
        if pending == 0 or pending < min_new or state["examples"] == 0:  # wait for more (the caller may say so)
            return RoundResult(None, batch, state["examples"], seconds=time.monotonic() - started, pending=pending)
        seconds = time.monotonic() - started  # the round's ingestion; round 0 is timed on its own
        _round_zero(loop, state)
        number = state["round"] + 1
        state.update(round=number, stage="ingested", pending=0,
                     current={"round": number, "new": pending, "examples": state["examples"],
                              "annotation_lines": state["lines"], "seconds": round(seconds, 1)})
        _commit(loop.dir, state)
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
            if result.pending and result.pending != waiting:
                report(f"waiting: {result.pending} of {min_new} new accepted tasks")
            waiting = result.pending
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
        # the attempt's id, committed before its run folder exists: what garbage collection may remove
        current["attempt"] = uuid.uuid4().hex
        state.setdefault("attempts", []).append(current["attempt"])
        _commit(loop.dir, state)
        run = _train(loop, state)
        metric = _number((run.test_metrics() or {}).get(METRIC[loop.task]))
        print(f"round {current['round']}: held-out {METRIC[loop.task]} {_shown(metric)} (round 0, the --from run: "
              f"{_shown(round_zero_metric(state))})", flush=True)
        commit("trained", run=str(run.path.resolve()), metric=metric)
    if state["stage"] == "trained":
        version = _export(loop, state)
        if version is not None:
            state["served"] = {"round": current["round"], "version": int(version.name), "metric": current["metric"]}
            print(f"round {current['round']}: exported version {version.name} to {version}", flush=True)
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


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------- ingestion


def ingest(loop: Loop, state: dict) -> Batch:
    """Read the annotations file's new lines in chunks, each committed (`_commit_chunk`); returns the counts
    of this read. Unchanged since the last read (size and modification time): nothing is read. A file that no
    longer starts with the bytes consumed is said in one line and read again from its start, its answers
    taken before skipped by fingerprint."""
    path = loop.annotations
    try:
        facts = os.stat(path)
    except OSError as error:
        raise UserError(f"cannot read annotations file {path} ({error.strerror or error}); check --annotations") \
            from None
    stamp = [facts.st_size, facts.st_mtime_ns]
    offset, lines = state["offset"], state["lines"]
    summary = Batch(examples=[], end_offset=offset, lines=0)
    if stamp == state.get("stamp"):
        return summary
    digest = annotations.prefix_digest(path, offset)
    if digest is None or digest.hexdigest() != state["consumed_sha256"]:
        print(f"{path} no longer starts with the {lines} line(s) ({offset} bytes) read before (an export that "
              f"rewrote it?): reading it again from its start; answers taken before are recognized and skipped",
              flush=True)
        offset, lines, digest = 0, 0, hashlib.sha256()
        summary.end_offset = 0
    table, where = _replay(loop.dir, state)
    names = _class_names(loop.dir)
    while True:
        batch = annotations.read_new(path, offset, lines, loop.task, names, known=table.seen,
                                     max_image_bytes=loop.config.data.max_image_bytes,
                                     max_pixels=loop.config.data.max_pixels, chunk_bytes=CHUNK_BYTES, digest=digest)
        offset, lines = batch.end_offset, lines + batch.lines
        _commit_chunk(loop, state, table, where, batch, lines, digest.hexdigest(), None if batch.more else stamp)
        summary.add(batch)
        if not batch.more:
            return summary


def _commit_chunk(loop: Loop, state: dict, table: AnswerTable, where: dict[int, str], batch: Batch, lines: int,
                  consumed_sha256: str, stamp: list[int] | None) -> None:
    """One chunk's answers into the table; its current examples published as a new shard set, any older set
    holding an example they replaced or withdrew rewritten without it; the ledger lines appended; then the
    state that lists it all committed, and the replaced sets removed."""
    next_id, dead, new, entries = state["next_id"], set(), {}, []
    for answer in batch.answers:
        number = label = None
        if answer.answer == "accept":
            number, label, next_id = next_id, answer.example.label, next_id + 1
            new[number] = answer.example
        _, gone = table.take(answer.fingerprint, answer.input, answer.task, answer.answer, number, label)
        if gone is not None:
            dead.add(gone)
            if answer.answer == "accept":
                batch.replaced += 1
            else:
                batch.withdrawn += 1
        entries.append({"fingerprint": answer.fingerprint, "input": answer.input, "task": answer.task,
                        "answer": answer.answer, "id": number, "label": label})
    sets, counter, replaced = list(state["sets"]), state["next_set"], []
    names = _class_names(loop.dir)
    kept = [(number, example) for number, example in new.items() if number not in dead]
    if kept:
        name, counter = f"set-{counter:06d}", counter + 1
        with durable.partial_path(loop.dir / DATA / name) as partial:
            partial.mkdir()
            _write_records(partial, [example for _, example in kept], [number for number, _ in kept], loop.task,
                           names)
        sets.append(name)
        where.update((number, name) for number, _ in kept)
    hit = {where[number] for number in dead if number in where}
    for name in [name for name in sets if name in hit]:
        position = sets.index(name)
        rewritten, counter = f"set-{counter:06d}", counter + 1
        if _copy_set([loop.dir / DATA / name], loop.dir / DATA / rewritten, dead):
            sets[position] = rewritten
            where.update((number, rewritten) for number in _ids(loop.dir / DATA / rewritten))
        else:
            del sets[position]
        replaced.append(name)
    for number in dead:
        where.pop(number, None)
    ledger_bytes = _append_ledger(loop.dir, state["ledger_bytes"], entries)
    _add_counts(state, batch)
    state.update(offset=batch.end_offset, lines=lines, consumed_sha256=consumed_sha256, ledger_bytes=ledger_bytes,
                 sets=sets, next_set=counter, next_id=next_id, examples=len(table.live),
                 pending=state["pending"] + batch.accepted, stamp=stamp)
    if loop.task == "classification":
        state["class_counts"] = table.class_counts(len(names))
    _commit(loop.dir, state)
    for name in replaced:
        durable.remove(loop.dir / DATA / name)


def _replay(folder: Path, state: dict) -> tuple[AnswerTable, dict[int, str]]:
    """The committed ledger replayed into an AnswerTable, and which shard set holds each current example."""
    table = AnswerTable()
    ledger = folder / LEDGER_FILE
    if state["ledger_bytes"]:
        with open(ledger, "rb") as handle:
            for raw in handle.read(state["ledger_bytes"]).splitlines():
                table.take(**json.loads(raw))
    where = {number: name for name in state["sets"] for number in _ids(folder / DATA / name)}
    return table, where


def _append_ledger(folder: Path, committed: int, entries: list[dict]) -> int:
    """The entries appended to the ledger (durably, before the state that counts them); its new length."""
    ledger = folder / LEDGER_FILE
    if not entries:
        return committed
    created = not ledger.exists()
    with open(ledger, "ab") as handle:
        if handle.tell() != committed:  # _reconcile truncates to the committed length first
            raise UserError(f"{ledger} is {handle.tell()} bytes, not the {committed} that {folder / STATE_FILE} "
                            f"counts; restore both, or start a new loop (another loop.dir)")
        # ASCII JSON: a path the file system holds as bytes (surrogate escapes) round-trips as \\udcXX
        handle.write("".join(json.dumps(entry) + "\n" for entry in entries).encode("ascii"))
        handle.flush()
        os.fsync(handle.fileno())
        length = handle.tell()
    if created:
        durable.fsync_dir(folder)
    return length


# ---------------------------------------------------------------- state


def _read_state(folder: Path) -> dict | None:
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # atomic writes never leave half a file: someone edited it
        raise UserError(f"{path} is damaged ({error}); restore it, or start a new loop (another loop.dir)") from None
    if state.get("version") != STATE_VERSION:
        newest = state.get("previous_run") or state.get("from_run")
        raise UserError(f"loop {folder} was started by an earlier version of the loop (no answers ledger); start a "
                        f"new loop from its newest run: --from {newest} with another loop.dir")
    return state


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
    for key in TOTALS:
        count = len(batch.malformed) if key == "malformed" else getattr(batch, key)
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
    durable.remove(loop.dir / LEDGER_FILE)  # a kill before the first state left nothing it counts
    state = {"version": STATE_VERSION, "annotations": str(loop.annotations), "from_run": str(loop.from_run),
             "task": loop.task, "offset": 0, "lines": 0, "consumed_sha256": hashlib.sha256().hexdigest(),
             "stamp": None, "ledger_bytes": 0, "sets": [], "next_set": 1, "next_id": 1, "examples": 0,
             "pending": 0, "class_counts": [0] * len(names) if loop.task == "classification" else None,
             "round": 0, "stage": "done", "totals": {key: 0 for key in TOTALS}, "attempts": [],
             "previous_run": None, "served": None, "current": None, "history": []}
    _commit(loop.dir, state)
    return state


def _reconcile(folder: Path, state: dict) -> None:
    """The loop folder as the state says: no temporary folders, no shard set the state does not list (a kill
    between publishing and committing it, or between a commit and removing what it replaced), the ledger at
    its committed length."""
    for root in (folder / DATA, folder / EVAL, folder):
        for partial in root.glob(".partial-*") if root.is_dir() else ():
            durable.remove(partial)
    listed = set(state["sets"])
    for entry in sorted((folder / DATA).iterdir()) if (folder / DATA).is_dir() else ():
        if entry.name not in listed:
            durable.remove(entry)
    missing = [name for name in state["sets"] if not (folder / DATA / name / IDS_FILE).is_file()]
    if missing:
        raise UserError(f"loop {folder}: shard set {folder / DATA / missing[0]} that {folder / STATE_FILE} lists is "
                        f"gone; restore it, or start a new loop (another loop.dir)")
    ledger = folder / LEDGER_FILE
    size = ledger.stat().st_size if ledger.is_file() else 0
    if size < state["ledger_bytes"]:
        raise UserError(f"{ledger} is {size} bytes, shorter than the {state['ledger_bytes']} that "
                        f"{folder / STATE_FILE} counts; restore it, or start a new loop (another loop.dir)")
    if size > state["ledger_bytes"]:
        with open(ledger, "r+b") as handle:
            handle.truncate(state["ledger_bytes"])
            os.fsync(handle.fileno())


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


def _write_records(folder: Path, examples: list[Example], ids: list[int], task: str, class_names: list[str],
                   prefix: str = TRAIN_PREFIX) -> None:
    """The examples as one TFRecord shard in `folder` (an unpublished one), with ids.txt: classification in
    TF Model Garden's layout (shared.data.tfrecord), detection as TF Object Detection API records
    (shared.detection.datasets)."""
    import tensorflow as tf

    from shared.data.tfrecord import image_example, shard_name

    if task == "classification":
        with tf.io.TFRecordWriter(str(folder / shard_name(prefix, 0, 1))) as writer:
            for example in examples:
                writer.write(image_example(example.image, example.image_format, example.height, example.width,
                                           example.label, class_names[example.label]).SerializeToString())
    else:
        from shared.detection.datasets import DetectionRecord, DetectionSplit, write_tfod_records

        split = DetectionSplit([DetectionRecord(example.image, example.width, example.height, example.boxes,
                                                example.classes, name=example.name) for example in examples],
                               class_names)
        write_tfod_records(split, folder / f"{shard_name(prefix, 0, 1)}.tfrecord", class_names)
    (folder / IDS_FILE).write_text("".join(f"{number}\n" for number in ids), encoding="utf-8")


def _ids(folder: Path) -> list[int]:
    return [int(word) for word in (folder / IDS_FILE).read_text(encoding="utf-8").split()]


def _copy_set(sources: list[Path], target: Path, drop: set[int], prefix: str = TRAIN_PREFIX) -> int:
    """The records of the shard sets `sources` but those whose example number is in `drop`, copied (not
    re-encoded) into one new set `target`, published whole; returns how many (0: nothing published)."""
    import tensorflow as tf

    from shared.data.tfrecord import shard_name

    ids = [number for source in sources for number in _ids(source)]
    kept = [number for number in ids if number not in drop]
    if not kept:
        return 0
    files = [str(path) for source in sources for path in sorted(source.glob("*-of-*"))]
    suffix = Path(files[0]).suffix
    with durable.partial_path(target) as partial:
        partial.mkdir()
        with tf.io.TFRecordWriter(str(partial / f"{shard_name(prefix, 0, 1)}{suffix}")) as writer:
            for number, record in zip(ids, tf.data.TFRecordDataset(files)):
                if number not in drop:
                    writer.write(record.numpy())
        (partial / IDS_FILE).write_text("".join(f"{number}\n" for number in kept), encoding="utf-8")
    return len(kept)


def _merge_old_sets(folder: Path, state: dict, keep: int) -> int:
    """Beyond `keep` sets, the oldest become one (committed in the state, then removed); how many merged."""
    sets = state["sets"]
    if len(sets) <= keep:
        return 0
    oldest = sets[:len(sets) - keep + 1]
    name = f"set-{state['next_set']:06d}"
    _copy_set([folder / DATA / old for old in oldest], folder / DATA / name, set())
    state.update(sets=[name, *sets[len(oldest):]], next_set=state["next_set"] + 1)
    _commit(folder, state)
    for old in oldest:
        durable.remove(folder / DATA / old)
    return len(oldest)


def _write_eval(loop: Loop, names: list[str]) -> None:
    """The fixed held-out set, once: loop.eval's current accepted examples (the latest answer per input, as
    for training, read in chunks), else the recipe's test split."""
    folder = loop.dir / EVAL
    if folder.is_dir():
        return
    if loop.config.loop.eval:
        _write_eval_file(loop, Path(loop.config.loop.eval).expanduser(), names, folder)
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


def _write_eval_file(loop: Loop, path: Path, names: list[str], folder: Path) -> None:
    table, summary, parts, number = AnswerTable(), Batch(examples=[], end_offset=0, lines=0), [], 0
    dead: set[int] = set()
    with durable.partial_path(folder) as partial:
        partial.mkdir()
        while True:
            batch = annotations.read_new(path, summary.end_offset, summary.lines, loop.task, names, known=table.seen,
                                         max_image_bytes=loop.config.data.max_image_bytes,
                                         max_pixels=loop.config.data.max_pixels, chunk_bytes=CHUNK_BYTES)
            ids = []
            for answer in batch.answers:
                if answer.answer == "accept":
                    ids.append(number)
                    number += 1
                _, gone = table.take(answer.fingerprint, answer.input, answer.task, answer.answer,
                                     ids[-1] if answer.answer == "accept" else None)
                if gone is not None:
                    dead.add(gone)
            if batch.examples:
                parts.append(partial / f"part-{len(parts):05d}")
                parts[-1].mkdir()
                _write_records(parts[-1], batch.examples, ids, loop.task, names, EVAL_PREFIX)
            summary.add(batch)
            if not batch.more:
                break
        print(f"held-out set {path}: {summary.describe()}", flush=True)
        if not table.live:
            raise UserError(f"loop.eval {path} holds no accepted task; the loop needs a held-out set to judge rounds")
        _copy_set(parts, partial / "all", dead, EVAL_PREFIX)
        for shard in (partial / "all").iterdir():
            os.replace(shard, partial / shard.name)
        for part in [*parts, partial / "all"]:
            shutil.rmtree(part)


def _write_recipe_test_split(loop: Loop, names: list[str], folder: Path) -> None:
    """The recipe's classification test split as shards (decoded arrays encoded as PNG; files and encoded
    images as they are), its classes matched to the loop's by name. An image that does not decode is one line
    naming it, or (data.on_corrupt: skip) left out and named."""
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
    skipped = []
    with durable.partial_path(folder) as partial:
        partial.mkdir()
        with tf.io.TFRecordWriter(str(partial / shard_name(EVAL_PREFIX, 0, 1))) as writer:
            for number, (image, label) in enumerate(test.as_numpy_iterator(), start=1):
                name = source.class_names[int(label)]
                shown = os.fsdecode(image) if source.encoding == "path" else f"test image {number}"
                try:
                    if source.encoding == "path":
                        encoded, fmt, height, width = read_image_file(shown, data.max_pixels)
                    elif source.encoding == "bytes":
                        encoded = bytes(image)
                        fmt, width, height = annotations.image_facts(encoded, shown, data.max_pixels)
                    else:
                        pixels = image if image.ndim == 3 else image[..., None]
                        encoded, fmt, (height, width) = tf.io.encode_png(pixels).numpy(), "png", pixels.shape[:2]
                except (UserError, annotations.Malformed) as why:
                    if data.on_corrupt != "skip":
                        raise UserError(f"the loop's held-out set (the recipe's test split): {why}; or set "
                                        f"data.on_corrupt: skip") from None
                    skipped.append(shown)
                    continue
                writer.write(image_example(encoded, fmt, height, width, position[name], name).SerializeToString())
    if skipped:
        more = " ..." if len(skipped) > annotations.SHOWN_PROBLEMS else ""
        print(f"held-out set: left out {len(skipped)} test image(s) that do not decode (data.on_corrupt: skip): "
              f"{', '.join(skipped[:annotations.SHOWN_PROBLEMS])}{more}", flush=True)


# ---------------------------------------------------------------- training, round 0, export


def round_config(loop: Loop, state: dict) -> Config:
    """The recipe as this round trains it: from the previous round's run (the first: --from), over every
    shard set of the loop, tested on its held-out set, for about loop.steps steps (whole epochs of equal
    length: the pipeline repeats, so steps may exceed the examples), seeing what the starting run saw
    (`follow_run`), quiet (one line a phase), `train.class_weight: auto` counted from the loop's examples."""
    from shared.data import class_weights

    config, current = loop.config, state["current"]
    start = state["previous_run"] or state["from_run"]
    per_epoch, epochs = steps_schedule(config.loop.steps, current["examples"], config.train.batch_size)
    notes = (f"loop {loop.dir}, round {current['round']}: {current['examples']} annotated examples "
             f"({current['new']} new, annotation lines 1-{current['annotation_lines']} of {loop.annotations}); "
             f"started from {start}")
    changes = {"init.from_run": start, "init.weights": None, "train.epochs": epochs,
               "train.steps_per_epoch": per_epoch, "train.keep_checkpoints": config.train.keep_checkpoints or 1,
               "train.verbose": 0, "loop.dir": str(loop.dir), "loop.attempt": current.get("attempt"),
               "data.limit_train": None, "data.limit_test": None, "data.num_classes": None,
               "run.notes": notes + (f"\n\n{config.run.notes.strip()}" if config.run.notes.strip() else ""),
               **follow_run(config, runs.open_run(start))[0], **_data_changes(loop, f"{DATA}/*/{TRAIN_PREFIX}")}
    if loop.task == "classification" and config.train.class_weight == class_weights.AUTO:
        names = _class_names(loop.dir)  # the tfrecord source lists no labels: the loop counted them
        changes["train.class_weight"] = class_weights.as_config(class_weights.auto(state["class_counts"]), names)
    if loop.task == "detection" and config.detection.unfreeze_epoch is not None \
            and config.detection.unfreeze_epoch >= epochs:
        changes["detection.unfreeze_epoch"] = None  # the round is shorter than its frozen stretch
    return with_changes(config, changes)


def _data_changes(loop: Loop, train: str) -> dict:
    """The config keys that point a run's data at the loop's shard sets (`train`: a glob under the loop
    folder) and its held-out set."""
    if loop.task == "classification":
        return {"data.source": "tfrecord", "data.path": str(loop.dir), "data.label_offset": 0,
                "data.train_split": train, "data.test_split": f"{EVAL}/{EVAL_PREFIX}", "data.val_fraction": 0.0,
                "data.test_fraction": 0.0}
    return {"detection.format": "tfrecord",
            "detection.train_annotations": str(loop.dir / f"{train}-*.tfrecord"),
            "detection.test_annotations": str(loop.dir / EVAL / f"{EVAL_PREFIX}-*.tfrecord"),
            "detection.label_map": str(loop.dir / LABEL_MAP_FILE)}


def follow_run(config: Config, run: runs.Run) -> tuple[dict, list[str]]:
    """(config changes, where the recipe differed) that make the loop's rounds see what `run` saw: its image
    size, channels, normalization and eval crop, when it has the recipe's task (its classes are the loop's
    already); a classification backbone for a detector lends only its normalization."""
    recorded = run.config_dict() or {}
    data = recorded.get("data") or {}
    if recorded.get("task", "classification") != config.task:
        if data.get("mean") and data.get("std") and len(data["mean"]) == config.data.channels:
            return {"data.normalize": data.get("normalize", True), "data.mean": data["mean"],
                    "data.std": data["std"]}, []
        return {}, []
    changes, differences = {}, []
    for key in FOLLOWED:
        value, recipe = data.get(key), getattr(config.data, key)
        if value is None or value == recipe:
            continue
        changes[f"data.{key}"] = value
        if recipe is not None:  # the recipe left the statistics to the data: nothing it said differs
            differences.append(f"data.{key} {value} (the recipe: {recipe})")
    classes = len(run.class_names() or [])
    if config.data.num_classes is not None and classes and config.data.num_classes != classes:
        differences.append(f"its {classes} classes (the recipe: data.num_classes {config.data.num_classes})")
    return changes, differences


def steps_schedule(steps: int, examples: int, batch_size: int) -> tuple[int, int]:
    """(steps per epoch, epochs) for about `steps` steps: as few equal epochs as the examples allow (an epoch
    is at most one pass), so steps_per_epoch x epochs is `steps` rounded up by less than one per epoch."""
    natural = max(1, math.ceil(examples / batch_size))
    epochs = math.ceil(steps / natural)
    return math.ceil(steps / epochs), epochs


def _train(loop: Loop, state: dict) -> runs.Run:
    from shared.lifecycle import train

    start = runs.open_run(state["previous_run"] or state["from_run"])
    runs.require_idle(start)
    config, current = round_config(loop, state), state["current"]
    differences = follow_run(loop.config, start)[1]
    if differences:
        print(f"round {current['round']}: follows --from {state['from_run']} in what the model sees, not the "
              f"recipe: {'; '.join(differences)}", flush=True)
    print(f"round {current['round']}: training from {start.path} on {current['examples']} examples "
          f"({current['new']} new) for {config.train.steps_per_epoch * config.train.epochs} steps "
          f"({config.train.epochs} epochs of {config.train.steps_per_epoch})", flush=True)
    return train(config, argv=list(loop.argv) or None)


def _round_zero(loop: Loop, state: dict) -> None:
    """Round 0, once: the --from run's figure on the loop's held-out set (n/a for a classification backbone
    of a detector), the floor no exported round falls below by more than loop.tolerance."""
    if any(entry["round"] == 0 for entry in state["history"]):
        return
    started = time.monotonic()
    metric = evaluate_run(loop, runs.open_run(state["from_run"]))
    seconds = round(time.monotonic() - started, 1)
    print(f"round 0: --from {state['from_run']} on the held-out set: {METRIC[loop.task]} {_shown(metric)}"
          + ("" if metric is not None else " (a classification backbone: no detector yet)"), flush=True)
    state["history"] = [{"round": 0, "new": 0, "examples": 0, "metric": metric, "exported_version": None,
                         "seconds": seconds, "run": state["from_run"]},
                        *[entry for entry in state["history"] if entry["round"] != 0]]
    _commit(loop.dir, state)


def round_zero_metric(state: dict) -> float | None:
    """Round 0's figure: the --from run on the held-out set (None before it is measured, or for a backbone)."""
    return next((entry["metric"] for entry in state["history"] if entry["round"] == 0), None)


def evaluate_run(loop: Loop, run: runs.Run) -> float | None:
    """A run's METRIC on the loop's held-out set, with the run's own config (what it sees); None when the run
    is not of the loop's task. Nothing is written into the run."""
    from shared import lifecycle

    if (run.config_dict() or {}).get("task", "classification") != loop.task:
        return None
    metrics = lifecycle.test(run, changes={**_data_changes(loop, f"{EVAL}/{EVAL_PREFIX}"), "data.limit_train": None,
                                           "data.limit_test": None, "data.num_classes": None}, draw=False)
    return _number(metrics.get(METRIC[loop.task]))


def _export(loop: Loop, state: dict) -> Path | None:
    """The round's run as the next SavedModel version, unless its metric fell by more than loop.tolerance
    below the served round's or round 0's (the --from run's); a version already exported from this run (a
    kill before the state said so) is the round's export, never a second one."""
    from shared.tasks import rebuild, task_for

    current, served, tolerance = state["current"], state.get("served"), loop.config.loop.tolerance
    model_dir = loop.export_dir / loop.export_name
    already = exported_version(model_dir, Path(current["run"]))
    if already is not None:
        return already
    metric = current.get("metric")
    floors = [(served.get("metric"), f"round {served['round']}'s (version {served['version']}, served)")
              if served else (None, ""),
              (round_zero_metric(state), "round 0's (the --from run)")]
    for best, whose in floors:
        if tolerance is not None and metric is not None and best is not None and metric < best - tolerance:
            stays = f"version {served['version']} stays served" if served else "nothing is exported"
            print(f"round {current['round']}: held-out {metric:.4f} fell more than {tolerance} below {whose} "
                  f"{best:.4f}; {stays}", flush=True)
            return None
    run = runs.open_run(current["run"])
    return task_for(run).export_saved_model(rebuild(run)[0], run, loop.export_dir, model_name=loop.export_name,
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
    """Merge old shard sets; remove the runs this loop trained (their loop.attempt among the state's
    attempts) beyond the newest loop.keep rounds, and those of attempts a kill cut short. Never the --from
    run, the current round's run (the next round's start), or a run the loop did not train. Export
    versions are pruned by the export (keep: loop.keep)."""
    keep = loop.config.loop.keep
    merged = _merge_old_sets(loop.dir, state, keep)
    rounds = [entry["run"] for entry in state["history"] if entry["round"] > 0 and entry.get("run")]
    kept = {*rounds[-keep:], state["from_run"], state["current"]["run"]}
    attempts = set(state.get("attempts", []))
    model_folder = Path(rounds[-1]).parent  # <run.dir>/<model>: where this loop's runs are
    removed = []
    for run in runs.all_runs(model_folder.parent, model_folder.name):
        if str(run.path.resolve()) in kept:
            continue
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if (run.config_dict().get("loop") or {}).get("attempt") in attempts and _remove_run(run.path):
                removed.append(run.path.name)
    if merged or removed:
        print(f"round {state['current']['round']}: garbage collected: "
              + ", ".join(what for what in (f"{merged} shard sets merged into one" if merged else "",
                                            f"runs {', '.join(removed)} removed" if removed else "") if what),
              flush=True)


def _remove_run(path: Path) -> bool:
    """A run folder gone in one step (renamed hidden, then deleted), unless a process holds it."""
    if not path.is_dir() or runs.lock_holder(runs.Run(path)) is not None:
        return False
    hidden = path.parent / f".deleting-{path.name}-{os.getpid()}"
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return False
    shutil.rmtree(hidden, ignore_errors=True)
    return True


def _write_rounds(folder: Path, history: list[dict], metric: str) -> None:
    """rounds.csv (one row a round, round 0 the --from run, rewritten atomically from the committed state)
    and rounds.png."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for entry in history:
        writer.writerow(["" if entry.get(key) is None else entry.get(key) for key in CSV_COLUMNS])
    durable.atomic_write(folder / ROUNDS_CSV, out.getvalue())
    with durable.disk_space_checked(folder / ROUNDS_PNG):
        plot_rounds(history, folder / ROUNDS_PNG, metric)


def plot_rounds(history: list[dict], out_png: Path, metric: str = "metric") -> Path:
    """The held-out metric per round (round 0: the --from run, a dashed floor; exported rounds filled), with
    the examples so far on a second axis."""
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
    zero = [entry.get("metric") for entry in history if entry["round"] == 0 and entry.get("metric") is not None]
    if zero:
        axes.axhline(zero[0], color="tab:gray", linestyle="--", linewidth=0.8, label="round 0 (--from)")
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
