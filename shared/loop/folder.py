"""A loop and its folder's layout: what a loop command names, and the names of the files it keeps.

    <loop>/state.json       the commit point (`shared.loop.state`)
    <loop>/answers.jsonl    the ledger: every answer taken
    <loop>/labels.txt       the classes the loop trains (its task may write more beside it)
    <loop>/data/set-NNNNNN/ a shard set: TRAIN_PREFIX shards and ids.txt (`shared.loop.shards`)
    <loop>/eval/            the held-out set: EVAL_PREFIX shards
    <loop>/rounds.csv, rounds.png
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from shared.config_schema import Config
from shared.kept import KeptTrainer
from shared.task import Task

STATE_FILE = "state.json"
LEDGER_FILE = "answers.jsonl"
IDS_FILE = "ids.txt"  # in a shard set: the example number of each record, in record order
ROUNDS_CSV = "rounds.csv"
ROUNDS_PNG = "rounds.png"
LABELS_FILE = "labels.txt"
DATA, EVAL = "data", "eval"
TRAIN_PREFIX, EVAL_PREFIX = "train", "validation"


@dataclasses.dataclass(frozen=True)
class Loop:
    """What a loop command names: the recipe's task (bound to the recipe, with its loop: section), the
    annotations, where it starts and where it exports, and the pool of unlabelled images it orders for the
    annotator."""
    task: Task
    annotations: Path
    from_run: Path
    export_dir: Path
    dir: Path
    export_name: str  # the served model's name: the loop folder's name
    argv: tuple = ()
    pool: Path | None = None  # unlabelled images, scored after each round (`shared.loop.pool`)
    tasks_out: Path | None = None  # the tasks file the pool is written to, most informative first
    order: str = "margin"  # shared.annotation_tasks.ORDERS (`shared.loop.pool.DEFAULT_ORDER`)
    # the trainer of this process's last round, which the next round trains again where it can (`shared.kept`):
    # rounds in one process (--watch) build and compile their model once
    kept: KeptTrainer = dataclasses.field(default_factory=KeptTrainer, compare=False, repr=False)

    @property
    def config(self) -> Config:
        return self.task.config


def default_dir(config: Config) -> Path:
    """<run.dir>/loops/<model>-<recipe file stem>."""
    stem = Path(config.source_file).stem if config.source_file else "recipe"
    return Path(config.run.dir) / "loops" / f"{config.model.name}-{stem}"


def class_names(folder: Path) -> list[str]:
    """The classes of the loop in `folder` (its labels.txt)."""
    return [line for line in (folder / LABELS_FILE).read_text(encoding="utf-8").splitlines() if line]
