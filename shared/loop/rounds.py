"""Training in the loop: annotations in, a better served model out, round after round.

    python -m shared.runner loop --config RECIPE --annotations FILE.jsonl --from RUN [--export-dir exports]
                                 [--once | --watch]

The loop is generic; the recipe's task supplies what is particular to it (`Task.loop_support()`, a
`shared.loop.support.LoopSupport`: how its annotations read, its shards, its held-out set, its config changes)
and the figure a round is judged by (`Task.judged_by`). Ingestion: `shared.loop.ingest`; the commit point and
the answers ledger: `shared.loop.state`; shard sets: `shared.loop.shards`; garbage: `shared.loop.garbage`;
rounds.csv and rounds.png: `shared.loop.report`.

A round, once new accepted examples are in: round 0 (the `--from` run's figure on the held-out set, once) ->
a finetune of the previous round's run (the first round: of `--from`) over ALL the shard sets, through the
normal run lifecycle -> its test figure on the fixed held-out set `<loop>/eval/` -> a new SavedModel version
unless the figure fell by more than `loop.tolerance` below the served round's or round 0's -> garbage
collection -> a row of `rounds.csv` and `rounds.png`. The rounds see what the `--from` run saw (image size,
channels, normalization, eval crop, classes), whatever the recipe says, and say where they differ.

Exactly once, across kills: `<loop>/state.json` is the commit point, replaced atomically after each chunk and
each stage of a round (ingested -> trained -> exported -> done). A kill while training trains the round again
in a new run folder (the dead one is collected later); an export is found again by its run
(`assets.extra/export.json`) rather than made twice. One process drives a loop folder at a time
(`shared.locks.folder_writer`).

    loop = open_loop(task_for(config), "tasks.jsonl", "runs/resnet/v0001", export_dir="exports")
    result = run_round(loop)                 # one round (min_new=1), or RoundResult(round=None): nothing new
    results = run_rounds(loop, watch=True)   # rounds until stopped (Ctrl-C / SIGTERM, or `stop()` says so)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from shared import config as config_module
from shared import durable, lifecycle, optim, runs
from shared.loop import state as loop_state
from shared.annotations import AnswerTable, Batch
from shared.config_schema import Config, with_changes
from shared.frozen import thaw
from shared.errors import UserError
from shared.eval_view import resizes_pixels
from shared.export import versions
from shared.locks import folder_writer
from shared.loop.folder import DATA, EVAL, EVAL_PREFIX, LABELS_FILE, LEDGER_FILE, TRAIN_PREFIX, Loop, default_dir
from shared.loop.garbage import collect_garbage
from shared.loop.ingest import ingest, write_held_out
from shared.loop.pool import check_pool, refresh_pool
from shared.loop.report import write_rounds
from shared.task import Task
from shared.tasks import rebuild, recorded_task

FOLLOWED = ("image_size", "channels", "normalize", "mean", "std", "crop_fraction")  # data keys: what a model sees


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


def open_loop(task: Task, annotations_file: str | os.PathLike, from_run: str | os.PathLike,
              export_dir: str | os.PathLike = "exports", argv: list[str] | None = None,
              pool: str | os.PathLike | None = None, tasks_out: str | os.PathLike | None = None,
              order: str | None = None) -> Loop:
    """Check a loop command before anything is written (`task`: the recipe's, bound to it, one that supports
    the `loop` command): the annotations file and the --from run exist (the run idle), and the `pool` of
    unlabelled images written to `tasks_out` in `order` (`shared.loop.pool.check_pool`). Paths become absolute (runs
    record them)."""
    config = task.config
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
    return Loop(task, annotations_file, source.path.resolve(), Path(export_dir).expanduser().resolve(), folder,
                folder.name, tuple(argv or ()), *check_pool(pool, tasks_out, order, annotations_file))


# ---------------------------------------------------------------- the rounds


def run_round(loop: Loop, min_new: int = 1) -> RoundResult:
    """One round: finish a round a kill cut short, else ingest the new lines and, when at least `min_new`
    accepted answers wait (this read's and earlier ones'), train, evaluate, export and collect. Lines without
    an accepted task (rejected, ignored, malformed, already ingested) are consumed and counted without a round;
    fewer than `min_new` accepted ones are ingested and wait for later (RoundResult(round=None, pending=N))."""
    started = time.monotonic()
    loop.dir.mkdir(parents=True, exist_ok=True)
    with folder_writer(loop.dir):
        state = loop_state.read_state(loop.dir) or _start(loop)
        loop_state.check_same_loop(loop, state)
        loop_state.reconcile(loop.dir, state)
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
        loop_state.commit(loop.dir, state)
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
        refresh_pool(loop, report)  # the annotator's first tasks, before any round
        while not stop() and (rounds is None or len(done) < rounds):
            result = run_round(loop, min_new=min_new)
            if result.round is not None:
                done.append(result)
                report(result.describe())
                refresh_pool(loop, report)  # the pool re-scored by the new round's model
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
        loop_state.commit(loop.dir, state)

    tested: list = []  # the model the round's test rebuilt, which its export takes (a kill between: rebuilt again)
    if state["stage"] == "ingested":
        # the attempt's id, committed before its run folder exists: what garbage collection may remove
        current["attempt"] = uuid.uuid4().hex
        state.setdefault("attempts", []).append(current["attempt"])
        loop_state.commit(loop.dir, state)
        run = _train(loop, state, tested.append)
        metric = _number((run.test_metrics() or {}).get(judged_by(loop).key))
        print(f"round {current['round']}: held-out {judged_by(loop).key} {_shown(metric)} (round 0, the --from run: "
              f"{_shown(round_zero_metric(state))})", flush=True)
        commit("trained", run=str(run.path.resolve()), metric=metric)
    if state["stage"] == "trained":
        version = _export(loop, state, tested[0] if tested else None)
        if version is not None:
            state["served"] = {"round": current["round"], "version": int(version.name), "metric": current["metric"]}
            print(f"round {current['round']}: exported version {version.name} to {version}", flush=True)
        commit("exported", exported_version=int(version.name) if version is not None else None)
    if state["stage"] == "exported":
        timed()  # the round's time as rounds.csv records it: garbage collection aside
        state["history"] = [entry for entry in state["history"] if entry["round"] != current["round"]] + [current]
        state["previous_run"] = current["run"]
        write_rounds(loop.dir, state["history"], judged_by(loop).key)
        collect_garbage(loop, state)
        state["fresh"] = []  # the next round's new examples are in sets still to come
        state["stage"] = "done"
        loop_state.commit(loop.dir, state)
    version = current.get("exported_version")
    return RoundResult(current["round"], batch, state["examples"], Path(current["run"]), current["metric"],
                       loop.export_dir / loop.export_name / str(version) if version is not None else None,
                       current["seconds"])


def judged_by(loop: Loop):
    """The measure (`shared.task.Measure`) the loop's rounds are judged by: its task's."""
    return loop.task.judged_by[1]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------- a new loop folder


def _start(loop: Loop) -> dict:
    """A new loop folder: its classes (labels.txt, and the files its task's shards need beside it), its
    held-out set ingested once into eval/, then the first state."""
    support = loop.task.loop_support()
    names = _initial_class_names(loop)
    durable.atomic_write(loop.dir / LABELS_FILE, "".join(f"{name}\n" for name in names))
    support.write_class_files(loop.dir, names)
    write_held_out(loop, names)
    durable.remove(loop.dir / LEDGER_FILE)  # a kill before the first state left nothing it counts
    state = loop_state.first_state(loop, support.ingested_facts(AnswerTable(), names))
    loop_state.commit(loop.dir, state)
    return state


def _initial_class_names(loop: Loop) -> list[str]:
    """The classes the loop trains: the --from run's when it has the recipe's task, else its task's
    (`LoopSupport.classes_without_run`)."""
    source = runs.open_run(loop.from_run)
    names = source.class_names()
    if recorded_task(source) == loop.task.name and names:
        return names
    return loop.task.loop_support().classes_without_run(loop)


# ---------------------------------------------------------------- training, round 0, export


def round_config(loop: Loop, state: dict) -> Config:
    """The recipe as this round trains it: from the previous round's run (the first: --from), over every
    shard set of the loop, tested on its held-out set, for about `planned_steps` steps (whole passes of equal
    length, trained as one epoch where the schedule allows: `as_one_epoch`), seeing what the starting run saw
    (`follow_run`), quiet (one line a phase), `train.class_weight: auto` counted from the loop's examples."""
    config, current = loop.config, state["current"]
    start = state["previous_run"] or state["from_run"]
    steps = planned_steps(config.loop.steps, config.loop.passes, current["examples"], config.train.batch_size)
    per_epoch, epochs = steps_schedule(steps, current["examples"], config.train.batch_size)
    notes = (f"loop {loop.dir}, round {current['round']}: {current['examples']} annotated examples "
             f"({current['new']} new, annotation lines 1-{current['annotation_lines']} of {loop.annotations}); "
             f"started from {start}")
    changes = {"init.from_run": start, "init.weights": None, "train.epochs": epochs, "train.steps": None,
               "train.steps_per_epoch": per_epoch, "train.keep_checkpoints": config.train.keep_checkpoints or 1,
               "train.verbose": 0, "loop.dir": str(loop.dir), "loop.attempt": current.get("attempt"),
               "data.limit_train": None, "data.limit_test": None, "data.num_classes": None,
               "run.notes": notes + (f"\n\n{config.run.notes.strip()}" if config.run.notes.strip() else ""),
               **follow_run(config, runs.open_run(start))[0],
               **loop.task.loop_support().data_changes(loop, f"{DATA}/*/{TRAIN_PREFIX}")}
    changes.update(continued_schedule(config, state["previous_run"]))
    changes.update(shrunk_start(config, state["previous_run"]))
    fresh = [name for name in state.get("fresh", []) if name in state["sets"]]
    if config.loop.oversample_new > 1 and fresh and len(fresh) < len(state["sets"]):  # all new: all alike
        changes.update(loop.task.loop_support().oversample_changes(fresh, config.loop.oversample_new))
    changes.update(loop.task.loop_support().round_changes(loop, state, epochs))
    return as_one_epoch(loop.task, with_changes(config, changes))


def as_one_epoch(task: Task, config: Config) -> Config:
    """The round's epochs as ONE epoch of all their steps over the repeating training stream (`train.steps`): one
    checkpoint and one backup a round, not one an epoch; a kill during training retrains the whole round anyway.
    The optimizer sees the same rates: its schedule counts steps, and what it says in epochs (warmup, exponential
    decay) is rescaled to the same steps. Left in epochs where an epoch is more than a length: step milestones,
    plateau, a monitored best checkpoint or early stop, a task's phases (a frozen stretch)."""
    train = config.train
    if (train.epochs == 1 or train.lr.schedule in ("step", "plateau") or train.best.monitor
            or train.early_stopping.monitor or len(task.bound(config).plan_phases()) > 1):
        return config
    return with_changes(config, {"train.steps": train.steps_per_epoch * train.epochs, "train.epochs": 1,
                                 "train.steps_per_epoch": None,
                                 "train.lr.warmup_epochs": train.lr.warmup_epochs / train.epochs,
                                 "train.lr.decay_epochs": train.lr.decay_epochs / train.epochs})


def round_steps(train) -> int:
    """The steps a round's run trains (`train:` of its config, or of its config.yaml as a dict)."""
    get = train.get if isinstance(train, dict) else lambda key: getattr(train, key)
    return int(get("steps") or 0) or int(get("steps_per_epoch") or 0) * int(get("epochs") or 0)


def continued_schedule(config: Config, previous_run: str | None) -> dict:
    """The config changes that make a round after the first go on with the previous round's training: its
    weights and optimizer state (momentum, step count) carried in, at loop.lr_scale x the recipe's rate,
    constant or decaying to 0 within the round (loop.schedule), the schedule counted from the optimizer's step
    where the previous round ended. None for the first round (a finetune of --from with the recipe's own
    schedule) or with `loop.schedule: restart` (every round so)."""
    if previous_run is None or config.loop.schedule == "restart":
        return {}
    previous = runs.open_run(previous_run)
    trained = previous.config_dict().get("train") or {}
    last = previous.last_checkpoint()
    epochs = int(runs.CHECKPOINT_RE.match(last.name).group(1)) if last is not None else 0
    per_epoch = int(trained.get("steps") or trained.get("steps_per_epoch") or 0)
    step = int((trained.get("lr") or {}).get("start_step") or 0) + epochs * per_epoch
    return {"init.optimizer_state": True, "train.lr.start_step": step, "train.lr.schedule": config.loop.schedule,
            "train.lr.base": optim.base_learning_rate(config.train) * config.loop.lr_scale,
            "train.lr.base_batch_size": None, "train.lr.warmup_epochs": 0.0}


def shrunk_start(config: Config, previous_run: str | None) -> dict:
    """The config changes that shrink and perturb the previous round's weights (loop.shrink, loop.perturb) as a
    round after the first starts from them; none for the first round, which starts from --from as the recipe
    says."""
    if previous_run is None:
        return {}
    return {"init.shrink": config.loop.shrink, "init.perturb": config.loop.perturb}


def follow_run(config: Config, run: runs.Run) -> tuple[dict, list[str]]:
    """(config changes, where the recipe differed) that make the loop's rounds see what `run` saw: its image
    size, channels, normalization and eval crop (the whole image for a run of fixed-size arrays, such as
    Fashion-MNIST's), when it has the recipe's task (its classes are the loop's
    already); a run of another task (a backbone) lends only its normalization."""
    recorded = run.config_dict() or {}
    data = recorded.get("data") or {}
    if recorded_task(run) != config.task:
        if data.get("mean") and data.get("std") and len(data["mean"]) == config.data.channels:
            return {"data.normalize": data.get("normalize", True), "data.mean": data["mean"],
                    "data.std": data["std"]}, []
        return {}, []
    changes, differences = {}, []
    for key in FOLLOWED:
        value, recipe = data.get(key), thaw(getattr(config.data, key))  # as the run's config.yaml holds it
        if value is None or value == recipe:
            continue
        changes[f"data.{key}"] = value
        if recipe is not None:  # the recipe left the statistics to the data: nothing it said differs
            differences.append(f"data.{key} {value} (the recipe: {recipe})")
    if config.data.crop_fraction != 1.0:
        changes.update(whole_view(data))
    classes = len(run.class_names() or [])
    if config.data.num_classes is not None and classes and config.data.num_classes != classes:
        differences.append(f"its {classes} classes (the recipe: data.num_classes {config.data.num_classes})")
    return changes, differences


def whole_view(data: dict) -> dict:
    """The change that shows the loop's images as a run whose eval view resized them whole (fixed-size arrays,
    such as Fashion-MNIST's) saw its own: whole. The loop's images are encoded, and the eval view center-crops
    encoded images by data.crop_fraction; {} for a run that saw that crop already. `data`: the run's recorded
    data section; `resizes_pixels` answers as it does for the run's predict and export."""
    return {"data.crop_fraction": 1.0} if resizes_pixels(config_module.from_dict({"data": data})) else {}


def planned_steps(steps: int, passes: float | None, examples: int, batch_size: int) -> int:
    """A round's training steps: `steps` (loop.steps), or with loop.passes about `passes` passes over the
    examples so far when that is more, so every round sees its data alike and the later rounds, with more
    labels, train longer."""
    if passes is None:
        return steps
    return max(steps, math.ceil(passes * examples / batch_size))


def steps_schedule(steps: int, examples: int, batch_size: int) -> tuple[int, int]:
    """(steps per epoch, epochs) for about `steps` steps: as few equal epochs as the examples allow (an epoch
    is at most one pass), so steps_per_epoch x epochs is `steps` rounded up by less than one per epoch."""
    natural = max(1, math.ceil(examples / batch_size))
    epochs = math.ceil(steps / natural)
    return math.ceil(steps / epochs), epochs


def _train(loop: Loop, state: dict, tested: Callable) -> runs.Run:
    start = runs.open_run(state["previous_run"] or state["from_run"])
    runs.require_idle(start)
    config, current = round_config(loop, state), state["current"]
    differences = follow_run(loop.config, start)[1]
    if differences:
        print(f"round {current['round']}: follows --from {state['from_run']} in what the model sees, not the "
              f"recipe: {'; '.join(differences)}", flush=True)
    lr = config.train.lr
    how = (f"continuing its training (optimizer step {lr.start_step}) at a {lr.schedule} rate from {lr.base:g}"
           if config.init.optimizer_state else f"with the recipe's {lr.schedule} schedule")
    print(f"round {current['round']}: training from {start.path} on {current['examples']} examples "
          f"({current['new']} new) for {round_steps(config.train)} steps "
          f"({config.train.epochs} epochs of {config.train.steps or config.train.steps_per_epoch}), {how}", flush=True)
    return lifecycle.train(config, argv=list(loop.argv) or None, draw=False, tested=tested,  # the loop: rounds.png
                           keep=loop.kept)


def _round_zero(loop: Loop, state: dict) -> None:
    """Round 0, once: the --from run's figure on the loop's held-out set (n/a for a run of another task, a
    backbone), the floor no exported round falls below by more than loop.tolerance."""
    if any(entry["round"] == 0 for entry in state["history"]):
        return
    started = time.monotonic()
    metric = evaluate_run(loop, runs.open_run(state["from_run"]))
    seconds = round(time.monotonic() - started, 1)
    unmeasured = loop.task.loop_support().unmeasured_start
    print(f"round 0: --from {state['from_run']} on the held-out set: {judged_by(loop).key} {_shown(metric)}"
          + ("" if metric is not None or not unmeasured else f" ({unmeasured})"), flush=True)
    state["history"] = [{"round": 0, "new": 0, "examples": 0, "metric": metric, "exported_version": None,
                         "seconds": seconds, "run": state["from_run"]},
                        *[entry for entry in state["history"] if entry["round"] != 0]]
    loop_state.commit(loop.dir, state)


def round_zero_metric(state: dict) -> float | None:
    """Round 0's figure: the --from run on the held-out set (None before it is measured, or for a backbone)."""
    return next((entry["metric"] for entry in state["history"] if entry["round"] == 0), None)


def evaluate_run(loop: Loop, run: runs.Run) -> float | None:
    """A run's figure on the loop's held-out set (the measure its task judges rounds by), with the run's own
    config (what it sees); None when the run is not of the loop's task. Nothing is written into the run."""
    if recorded_task(run) != loop.task.name:
        return None
    held_out = loop.task.loop_support().data_changes(loop, f"{EVAL}/{EVAL_PREFIX}")
    metrics = lifecycle.test(run, changes={**held_out, **whole_view(run.config_dict().get("data") or {}),
                                           "data.limit_train": None, "data.limit_test": None,
                                           "data.num_classes": None}, draw=False)
    return _number(metrics.get(judged_by(loop).key))


def _export(loop: Loop, state: dict, model=None) -> Path | None:
    """The round's run as the next SavedModel version, unless its metric is worse by more than loop.tolerance
    than the served round's or round 0's (the --from run's), in the sense of the task's measure; a version already
    exported from this run (a kill before the state said so) is the round's export, never a second one. `model`:
    the run's model as its test rebuilt it, else rebuilt here."""
    current, served, tolerance = state["current"], state.get("served"), loop.config.loop.tolerance
    model_dir = loop.export_dir / loop.export_name
    already = exported_version(model_dir, Path(current["run"]))
    if already is not None:
        return already
    metric = current.get("metric")
    floors = [(served.get("metric"), f"round {served['round']}'s (version {served['version']}, served)")
              if served else (None, ""),
              (round_zero_metric(state), "round 0's (the --from run)")]
    higher = judged_by(loop).higher_is_better
    for best, whose in floors:
        if tolerance is None or metric is None or best is None:
            continue
        if worse_by(metric, best, higher) > tolerance:
            stays = f"version {served['version']} stays served" if served else "nothing is exported"
            moved = "fell more than {} below" if higher else "rose more than {} above"
            print(f"round {current['round']}: held-out {metric:.4f} {moved.format(tolerance)} {whose} "
                  f"{best:.4f}; {stays}", flush=True)
            return None
    run = runs.open_run(current["run"])
    if model is None:
        model, config = rebuild(run)
    else:
        config = config_module.from_dict(run.config_dict())
    return loop.task.bound(config).export_saved_model(model, run, loop.export_dir, model_name=loop.export_name,
                                                      keep=loop.config.loop.keep)


def worse_by(metric: float, best: float, higher_is_better: bool) -> float:
    """How much worse `metric` is than `best` in the sense of its measure (negative: better)."""
    return best - metric if higher_is_better else metric - best


def exported_version(model_dir: Path, run_path: Path) -> Path | None:
    """The version folder of `model_dir` exported from the run at `run_path` (its assets.extra/export.json)."""
    for _, folder in sorted(versions(model_dir).items()):
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((folder / "assets.extra" / "export.json").read_text(encoding="utf-8"))
            if Path(record.get("run", "")) == run_path.resolve():
                return folder
    return None


