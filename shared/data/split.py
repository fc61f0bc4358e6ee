"""The train / validation / test split of a folder of class folders that has no split folders on disk
(`data.source: folder`, `PATH/<class>/<image>`): stratified by class, the same on every machine and run,
and recorded in the run (`split/<name>.txt`), so a re-test or a resume reads exactly the files it had
even after the folder has changed."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserError

SPLIT_DIR = "split"  # in a run folder: one file list per split
SPLITS = ("train", "val", "test")
SEED = "folder-split-0"  # fixed, and not train.seed: runs with other seeds are tested on the same images


@dataclass
class RecordedSplit:
    """The split a run recorded: each split's files relative to data.path, and the run's classes."""
    files: dict[str, list[str]]
    class_names: list[str]


def held_out(count: int, fraction: float, spare: int) -> int:
    """How many of a class's `count` images a held-out split of `fraction` takes: its rounded share, at
    least one when the fraction is set, and never more than the `spare` images training can give up."""
    if fraction <= 0 or spare <= 0:
        return 0
    return min(max(1, math.floor(count * fraction + 0.5)), spare)


def stratified(by_class: dict[str, list[str]], val_fraction: float,
               test_fraction: float) -> dict[str, dict[str, list[str]]]:
    """Each class's files divided into train / val / test by the fractions: the files are sorted by their
    bytes (not the file system's listing order) and shuffled with a seed of their class's own, so a class's
    split depends only on its own files. Every class with two or more images gives one to the test split,
    and training keeps at least one image of each class. Returns {split: {class: sorted files}}."""
    result: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for name, files in by_class.items():
        order = sorted(files, key=os.fsencode)
        random.Random(f"{SEED}/{name}").shuffle(order)
        count = len(order)
        num_test = held_out(count, test_fraction, count - 1)
        num_val = held_out(count, val_fraction, count - num_test - 1)
        parts = {"test": order[:num_test], "val": order[num_test:num_test + num_val],
                 "train": order[num_test + num_val:]}
        for split, chosen in parts.items():
            result[split][name] = sorted(chosen, key=os.fsencode)
    return result


def record(files: dict[str, list[str]], root: Path) -> dict[str, bytes]:
    """The run's split files ({run-relative path: content}): one image path relative to `root` per line, as
    the file system's bytes (UTF-8 for names that are UTF-8; a name in other bytes stays readable too)."""
    return {f"{SPLIT_DIR}/{split}.txt": b"".join(os.fsencode(Path(path).relative_to(root).as_posix()) + b"\n"
                                                 for path in files.get(split, []))
            for split in SPLITS}


def read(run_folder: Path) -> RecordedSplit | None:
    """The split a run recorded (None: the run has none, as runs of other layouts and sources)."""
    folder = Path(run_folder) / SPLIT_DIR
    labels = Path(run_folder) / "labels.txt"
    if not (folder / "test.txt").is_file() or not labels.is_file():
        return None
    files = {}
    for split in SPLITS:
        path = folder / f"{split}.txt"
        lines = path.read_bytes().split(b"\n") if path.is_file() else []
        files[split] = [os.fsdecode(line) for line in lines if line]
    return RecordedSplit(files, labels.read_text(encoding="utf-8").splitlines())


def check_recordable(path: str) -> None:
    """A split file holds one name per line: an image whose name holds a line break cannot be recorded."""
    if "\n" in path or "\r" in path:
        raise UserError(f"image {path!r} has a line break in its name, which the run's split record cannot hold; "
                        f"rename it")
