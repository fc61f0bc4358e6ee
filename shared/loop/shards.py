"""A loop's shard sets: `<loop>/data/set-NNNNNN/`, each a TFRecord shard of examples (written by the task's
`LoopSupport.write_records`) with `ids.txt`, the example number of each record in record order. Sets are
published whole (`durable.partial_path`), rewritten without the examples a later answer replaced or withdrew,
and merged when there are more than loop.keep, their records copied, never re-encoded."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from shared import durable
from shared.annotations import Example
from shared.data.tfrecord import shard_name
from shared.loop.folder import DATA, IDS_FILE, TRAIN_PREFIX
from shared.loop.state import commit
from shared.loop.support import LoopSupport


def ids(folder: Path) -> list[int]:
    """The example numbers of a shard set's records, in record order."""
    return [int(word) for word in (folder / IDS_FILE).read_text(encoding="utf-8").split()]


def holders(folder: Path, sets: list[str]) -> dict[int, str]:
    """Which of the shard sets `sets` of the loop in `folder` holds each example number."""
    return {number: name for name in sets for number in ids(folder / DATA / name)}


def write_set(folder: Path, support: LoopSupport, examples: list[Example], numbers: list[int],
              class_names: list[str], prefix: str = TRAIN_PREFIX) -> None:
    """The examples as one shard set in `folder` (an unpublished one): the task's records and ids.txt."""
    support.write_records(folder, prefix, examples, class_names)
    (folder / IDS_FILE).write_text("".join(f"{number}\n" for number in numbers), encoding="utf-8")


def copy_set(sources: list[Path], target: Path, drop: set[int], prefix: str = TRAIN_PREFIX) -> int:
    """The records of the shard sets `sources` but those whose example number is in `drop`, copied (not
    re-encoded) into one new set `target`, published whole; returns how many (0: nothing published)."""
    numbers = [number for source in sources for number in ids(source)]
    kept = [number for number in numbers if number not in drop]
    if not kept:
        return 0
    files = [str(path) for source in sources for path in sorted(source.glob("*-of-*"))]
    suffix = Path(files[0]).suffix
    with durable.partial_path(target) as partial:
        partial.mkdir()
        with tf.io.TFRecordWriter(str(partial / f"{shard_name(prefix, 0, 1)}{suffix}")) as writer:
            for number, record in zip(numbers, tf.data.TFRecordDataset(files)):
                if number not in drop:
                    writer.write(record.numpy())
        (partial / IDS_FILE).write_text("".join(f"{number}\n" for number in kept), encoding="utf-8")
    return len(kept)


def merge_old_sets(folder: Path, state: dict, keep: int) -> int:
    """Beyond `keep` sets, the oldest become one (committed in the state, then removed); how many merged."""
    sets = state["sets"]
    if len(sets) <= keep:
        return 0
    oldest = sets[:len(sets) - keep + 1]
    name = f"set-{state['next_set']:06d}"
    copy_set([folder / DATA / old for old in oldest], folder / DATA / name, set())
    state.update(sets=[name, *sets[len(oldest):]], next_set=state["next_set"] + 1)
    commit(folder, state)
    for old in oldest:
        durable.remove(folder / DATA / old)
    return len(oldest)
