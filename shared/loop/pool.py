"""The loop's pool: a folder of unlabelled images, written as the annotation tasks file the annotator works from,
the images the newest model is least sure of first.

    python -m shared.runner loop ... --watch --pool photos/ --tasks-out photos/tasks.jsonl [--order uncertainty]

When the loop starts (with the --from run, or the newest round's run of a loop that continues) and after each
round, the pool's images that no answer in the loop's ledger names yet (accepted, rejected or ignored) are
scored by that run's model and written as `predict --format tasks --order ORDER` writes them
(`shared.annotation_tasks.task_file`): the tasks file is replaced whole, never half-written.

From a script, with any finished run:

    write_pool_tasks("runs/resnet/v0007", "photos", "photos/tasks.jsonl", order="margin",
                     annotated=answered_inputs(loop_dir, read_state(loop_dir)))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Container

from shared import durable, runs
from shared.annotation_tasks import DEFAULT_SEED, ORDERS
from shared.errors import UserError
from shared.loop.folder import Loop
from shared.loop.state import answered_inputs, read_state
from shared.predict import DEFAULT_BATCH, Paths

DEFAULT_ORDER = "margin"  # the loop asks first where its newest model hesitates most between two classes


def write_pool_tasks(run: runs.Run | str | os.PathLike, pool: str | os.PathLike, tasks_out: str | os.PathLike,
                     order: str = DEFAULT_ORDER, annotated: Container[str] = frozenset(), seed: int = DEFAULT_SEED,
                     batch_size: int = DEFAULT_BATCH) -> int:
    """The images under `pool` (recursively, in name order) that are not `annotated`, scored by `run`'s model
    (its last checkpoint) and written to `tasks_out` as annotation tasks in `order` (ORDERS; `seed`: random's
    shuffle), replacing it atomically. `annotated`: input identities as the annotation reader has them
    (`path:<normalized absolute path>`, `answered_inputs`). Images that cannot be read are left out. Returns
    the number of tasks written."""
    from shared.annotation_tasks import task_file
    from shared.tasks import open_predictor  # the tasks load TensorFlow

    if order not in ORDERS:
        raise UserError(f"--order {order}: choose one of {', '.join(ORDERS)}")
    run = run if isinstance(run, runs.Run) else runs.open_run(run)
    predictor = open_predictor(run)
    folder = os.path.abspath(os.path.expanduser(os.fspath(pool)))
    images = (path for path in Paths([folder]) if f"path:{os.path.normpath(path)}" not in annotated)
    written = 0
    with task_file(Path(tasks_out), order, seed) as write:
        for result in predictor.iter_predict(images, batch_size=batch_size):
            written += write(result)
    return written


def check_pool(pool: str | os.PathLike | None, tasks_out: str | os.PathLike | None, order: str | None,
               annotations: Path) -> tuple[Path | None, Path | None, str]:
    """(pool, tasks file, order) as a `Loop` holds them (absolute paths; the order by default margin),
    refused in one line before the loop starts: --tasks-out or --order without --pool or the other way round,
    a pool without images, a tasks file that is not .jsonl or is the annotations file itself."""
    if pool is None:
        if tasks_out is not None or order is not None:
            raise UserError("--tasks-out and --order say where and how the pool is written; add --pool FOLDER "
                            "(the unlabelled images), or leave them out")
        return None, None, DEFAULT_ORDER
    if tasks_out is None:
        raise UserError("--pool needs --tasks-out FILE.jsonl: the annotation tasks file to write the pool to")
    if order is not None and order not in ORDERS:
        raise UserError(f"--order {order}: choose one of {', '.join(ORDERS)}")
    pool, tasks_out = Path(pool).expanduser().resolve(), Path(tasks_out).expanduser().resolve()
    if not pool.is_dir():
        raise UserError(f"--pool {pool} is not a folder; give the folder of unlabelled images")
    Paths([str(pool)]).check()  # a folder without images says so
    if tasks_out.suffix.lower() != ".jsonl":
        raise UserError(f"--tasks-out {tasks_out} is an annotation tasks file; name it {tasks_out.stem}.jsonl")
    if tasks_out == annotations:
        raise UserError(f"--tasks-out {tasks_out} is the --annotations file the loop reads; write the tasks to "
                        f"another file (the annotation tool exports the answers to --annotations)")
    return pool, tasks_out, order or DEFAULT_ORDER


def refresh_pool(loop: Loop, report: Callable[[str], None] = print) -> int | None:
    """The loop's tasks file rewritten from its pool (nothing without --pool: None) with the newest run's model
    (the newest round's, else --from), leaving out what the ledger has answers for; the number of tasks. A
    --from run of another task than the loop's (a backbone) cannot predict its tasks: the first round's run
    writes the first file."""
    from shared.tasks import recorded_task  # the tasks load TensorFlow

    if loop.pool is None:
        return None
    state = read_state(loop.dir)
    newest = (state or {}).get("previous_run") or str(loop.from_run)
    run = runs.open_run(newest)
    if recorded_task(run) != loop.task.name:
        report(f"pool {loop.pool}: run {newest} is not a {loop.task.name} run; the tasks come after the first round")
        return None
    for stale in loop.tasks_out.parent.glob(f".partial-*-{loop.tasks_out.name}"):  # a kill while writing it
        durable.remove(stale)
    answered = answered_inputs(loop.dir, state) if state else set()
    count = write_pool_tasks(run, loop.pool, loop.tasks_out, loop.order, answered)
    report(f"pool {loop.pool}: {count} unlabelled images in {loop.tasks_out}, {loop.order} order, scored by {newest}")
    return count
