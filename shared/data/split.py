"""The train / validation / test split of a folder of class folders that has no split folders on disk
(`data.source: folder`, `PATH/<class>/<image>`): stratified by class, the same on every machine and run,
and recorded in the run (`split/<name>.txt`), so a re-test or a resume reads exactly the files it had
even after the folder has changed.

Each file's split is decided by a hash of its name within its class (as TensorFlow's image-retraining example
did), not by its place in a shuffled list: adding or removing images never moves another image between
splits, so a model finetuned on the grown folder is not tested on images it trained on before."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserError

SPLIT_DIR = "split"  # in a run folder: one file list per split
SPLITS = ("train", "val", "test")
# Files whose names differ only after this mark share one split (several photos of one object stay together).
NO_HASH = re.compile(r"_nohash_.*$", re.DOTALL)


@dataclass
class RecordedSplit:
    """The split a run recorded: each split's files relative to data.path, and the run's classes."""
    files: dict[str, list[str]]
    class_names: list[str]


def hash_name(path: str) -> str:
    """What decides a file's split: its name within its class folder, up to a `_nohash_` mark, in Unicode's
    composed form (a folder copied from macOS, which stores names decomposed, keeps its split)."""
    return unicodedata.normalize("NFC", NO_HASH.sub("", Path(path).name))


def position(name: str) -> float:
    """A fixed point in [0, 1) for a hash name (SHA-1 of its bytes): the same on every machine and run, and
    independent of every other file."""
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def assign(names: list[str], val_fraction: float, test_fraction: float) -> dict[str, str]:
    """{hash name: split} for one class: test below `test_fraction`, validation up to `test_fraction +
    val_fraction`, training above. Three rules need a fallback, which acts only in small classes (or by
    rare chance): training keeps one name of each class (the highest-placed, when none falls there); a class
    of two or more gives one to the test split (its lowest-placed, when none falls there); and with a
    `val_fraction`, one to validation while training keeps another (its lowest-placed training name)."""
    points = {name: position(name) for name in set(names)}
    ordered = sorted(points, key=lambda name: (points[name], name.encode("utf-8", "surrogateescape")))
    chosen = {name: "test" if points[name] < test_fraction else "val" if points[name] < test_fraction + val_fraction
              else "train" for name in ordered}
    if ordered and "train" not in chosen.values():
        chosen[ordered[-1]] = "train"
    if test_fraction > 0 and len(ordered) > 1 and "test" not in chosen.values():
        chosen[ordered[0]] = "test"
    training = [name for name in ordered if chosen[name] == "train"]
    if val_fraction > 0 and len(training) > 1 and "val" not in chosen.values():
        chosen[training[0]] = "val"
    return chosen


def stratified(by_class: dict[str, list[str]], val_fraction: float,
               test_fraction: float) -> dict[str, dict[str, list[str]]]:
    """Each class's files divided into train / val / test by the fractions (`assign`): each file by its own
    name's hash, so the shares are the fractions on average, not exactly, and a class's split depends only
    on its own files, never on the file system's listing order or on files added or removed. Returns
    {split: {class: sorted files}}."""
    result: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for label, files in by_class.items():
        names = {path: hash_name(path) for path in files}
        chosen = assign(list(names.values()), val_fraction, test_fraction)
        for split in SPLITS:
            result[split][label] = sorted((path for path in files if chosen[names[path]] == split), key=os.fsencode)
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
