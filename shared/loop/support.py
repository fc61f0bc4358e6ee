"""What a task supplies to the loop (`shared.loop`): how its annotations read, how examples become shards, its
held-out set and the config changes of a round. A task that supports the `loop` command returns its
`LoopSupport` from `Task.loop_support()`; the loop itself names no task."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

from shared.annotations import AnswerSchema, AnswerTable, Example
from shared.loop.folder import Loop


class LoopSupport(abc.ABC):
    """A task's part of the loop."""
    answers: ClassVar[AnswerSchema]  # what an accepted annotation line says, read into the task's Example
    # why round 0 (the --from run on the held-out set) may have no figure, printed after its n/a; "" for none
    unmeasured_start: ClassVar[str] = ""

    @abc.abstractmethod
    def classes_without_run(self, loop: Loop) -> list[str]:
        """The classes the loop trains when --from is not a run of the loop's task with labels.txt (e.g. a
        classification backbone for a detector), or UserError when the task needs such a run."""

    def write_class_files(self, folder: Path, class_names: list[str]) -> None:  # noqa: B027 (nothing by default)
        """What the task's shards need beside the loop's labels.txt (written whole: durable.partial_path)."""

    @abc.abstractmethod
    def write_records(self, folder: Path, prefix: str, examples: list[Example], class_names: list[str]) -> None:
        """The examples, in order, as one TFRecord shard `<prefix>-00000-of-00001...` in `folder` (one not yet
        published)."""

    @abc.abstractmethod
    def write_test_split(self, loop: Loop, class_names: list[str], folder: Path) -> None:
        """The recipe's own test split as the held-out set's EVAL_PREFIX shards in `folder` (not yet
        published), when loop.eval names no file."""

    def ingested_facts(self, table: AnswerTable, class_names: list[str]) -> dict:
        """What the task keeps in state.json about the current examples (updated with each chunk)."""
        return {}

    @abc.abstractmethod
    def data_changes(self, loop: Loop, train: str) -> dict:
        """The config keys that point a run's data at the loop's shards (`train`: a glob of shard-set folders
        under the loop folder, e.g. "data/*/train") and its held-out set."""

    def oversample_changes(self, sets: list[str], times: int) -> dict:
        """The config keys that make a round read the shard sets `sets` (names under the loop's data folder)
        `times` times a pass; {} where the task's data cannot (loop.oversample_new is then without effect)."""
        return {}

    def round_changes(self, loop: Loop, state: dict, epochs: int) -> dict:
        """The task's own config changes for a round of `epochs` epochs, beside the loop's."""
        return {}
