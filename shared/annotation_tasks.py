"""The annotation tasks file `predict --format tasks` and the loop's pool (`shared.loop.pool`) write: one task a
line in `shared.annotations`' format, without an answer (the annotator gives it), each image as the annotation
reader finds it from the file's folder, written whole or not at all. In input order, or (`--order`) the images
the model is least sure of first, the way an annotation tool's "prefer uncertain" sorter orders a stream: what
a prediction's score is, its task says (`shared.predict.Result.informativeness`).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from shared.durable import partial_name, partial_path, remove
from shared.errors import UserError

# --order: the tasks file's order; the scored ones ask each result how much its answer would teach
ORDERS = ("file", "uncertainty", "margin", "entropy", "random")
SCORED_ORDERS = ("uncertainty", "margin", "entropy")
DEFAULT_SEED = 0  # --order random's shuffle when --seed is not given: the same order every time


def task_image(path: str, folder: str) -> str:
    """An image's path in a tasks file in `folder`: relative to it when the image lies under it (the tasks
    file moves with its images), else absolute (the reader resolves relative paths against that folder,
    not against where predict ran)."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute, folder)
    return absolute if relative.split(os.sep)[0] == os.pardir else relative


def json_line(row: dict) -> str:
    """Unicode as it is; a file name that is not UTF-8 as \\udcXX escapes (os.fsencode gets its bytes back), so
    the file stays valid UTF-8 JSON."""
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row)
    return line + "\n"


def checked_order(order: str | None, fmt: str | None, seed: int | None = None) -> str:
    """--order as given (None: file order, as before --order existed), refused in one line where it cannot
    apply: an order of anything but a tasks file, --seed for anything but --order random."""
    if order is not None and order not in ORDERS:
        raise UserError(f"--order {order}: choose one of {', '.join(ORDERS)}")
    if order is not None and fmt != "tasks":
        raise UserError(f"--order {order} orders an annotation tasks file; add --format tasks --out FILE.jsonl, "
                        f"or leave --order out")
    if seed is not None and order != "random":
        raise UserError(f"--seed {seed} shuffles --order random; add --order random, or leave --seed out")
    return order or "file"


@contextlib.contextmanager
def task_file(out: Path, order: str = "file", seed: int = DEFAULT_SEED) -> Iterator[Callable[[object], bool]]:
    """A writer of annotation tasks to `out`: call it with each result of a predictor (`shared.predict.Result`;
    a skipped image is no task: False); each image is written as the annotation reader finds it from
    `out`'s folder (`task_image`). `out` appears whole when the block ends, else not at all (a file it
    replaces stays as it was). `order` (ORDERS): `file` writes the tasks as they come, nothing held; a scored
    order (SCORED_ORDERS) writes them by the result's `informativeness`, highest first, ties in input order,
    each with its score in its "meta" under the order's name (what the annotation tool shows); `random`, a
    shuffle seeded by `seed`. An ordered file needs every score first: each task goes to
    a scratch file beside `out` as it comes, only its score and place there are held, and the tasks are copied
    over in order at the end."""
    if order not in ORDERS:
        raise ValueError(f"order {order!r} is not one of {ORDERS}")
    folder = os.path.abspath(Path(out).parent)
    with partial_path(Path(out)) as partial:
        if order == "file":
            with open(partial, "wb") as handle:
                def write(result) -> bool:
                    if result.error is None:
                        handle.write(_task_line(result, folder, order, None))
                    return result.error is None

                yield write
            return
        scratch = partial_name(Path(out))
        scores, offsets = array.array("d"), array.array("q")  # 16 bytes a task, whatever the task holds
        try:
            with open(scratch, "w+b") as handle:
                def add(result) -> bool:
                    if result.error is not None:
                        return False
                    score = result.informativeness(order) if order in SCORED_ORDERS else None
                    offsets.append(handle.tell())
                    scores.append(0.0 if score is None else score)
                    handle.write(_task_line(result, folder, order, score))
                    return True

                yield add
                offsets.append(handle.tell())  # the end of the last task
                with open(partial, "wb") as ordered:
                    for index in _order(np.frombuffer(scores, np.float64), order, seed).tolist():
                        handle.seek(offsets[index])
                        ordered.write(handle.read(offsets[index + 1] - offsets[index]))
        finally:
            remove(scratch)


def _order(scores: np.ndarray, order: str, seed: int) -> np.ndarray:
    """The tasks' positions in the order they are written: highest score first, ties in input order (a
    stable sort), or a seeded shuffle."""
    if order == "random":
        return np.random.default_rng(seed).permutation(len(scores))
    return np.argsort(-scores, kind="stable")


def _task_line(result, folder: str, order: str, score: float | None) -> bytes:
    """One result's task, its score (when the order has one) in its "meta" under the order's name."""
    task = {"image": task_image(result.input, folder), **result.task()}
    if score is not None:
        task["meta"] = {**task.get("meta", {}), order: round(score, 4)}
    return json_line(task).encode("utf-8", "surrogateescape")


