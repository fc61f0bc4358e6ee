"""Ingestion (`shared.annotations`): the lines added to the annotations file since the last read, in chunks of
at most CHUNK_BYTES of images, each chunk committed on its own: its new accepted examples as one shard set
(`shared.loop.shards`), its answers appended to the ledger (`shared.loop.state`). When an answer replaces or
withdraws an example of an older set, that set is rewritten without it in the same commit, so the shard sets
always hold exactly the current examples, each input at most once. A file that no longer starts with the bytes
consumed (an export that rewrote it) is said in one line and read again from its start: the answers taken
before are recognized by fingerprint and skipped. The held-out set is ingested once, when the loop starts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from shared import annotations, durable
from shared.loop import state as loop_state
from shared.annotations import AnswerTable, Batch
from shared.errors import UserError
from shared.loop.folder import DATA, EVAL, EVAL_PREFIX, Loop, class_names
from shared.loop.shards import copy_set, holders, ids, write_set

CHUNK_BYTES = 64 << 20  # images held in memory at once while ingesting: a chunk is committed at this size


def ingest(loop: Loop, state: dict) -> Batch:
    """Read the annotations file's new lines in chunks, each committed (`commit_chunk`); returns the counts
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
    table, where = loop_state.replay(loop.dir, state), holders(loop.dir, state["sets"])
    names = class_names(loop.dir)
    while True:
        batch = annotations.read_new(path, offset, lines, loop.task.loop_support().answers, names, known=table.seen,
                                     max_image_bytes=loop.config.data.max_image_bytes,
                                     max_pixels=loop.config.data.max_pixels, chunk_bytes=CHUNK_BYTES, digest=digest)
        offset, lines = batch.end_offset, lines + batch.lines
        commit_chunk(loop, state, table, where, batch, lines, digest.hexdigest(), None if batch.more else stamp)
        summary.add(batch)
        if not batch.more:
            return summary


def commit_chunk(loop: Loop, state: dict, table: AnswerTable, where: dict[int, str], batch: Batch, lines: int,
                 consumed_sha256: str, stamp: list[int] | None) -> None:
    """One chunk's answers into the table; its current examples published as a new shard set, any older set
    holding an example they replaced or withdrew rewritten without it; the ledger lines appended; then the
    state that lists it all committed, and the replaced sets removed."""
    support = loop.task.loop_support()
    next_id, dead, new, entries = state["next_id"], set(), {}, []
    for answer in batch.answers:
        number = label = None
        if answer.answer == "accept":
            number, label, next_id = next_id, answer.example.counted_class(), next_id + 1
            new[number] = answer.example
        _, gone = table.take(answer.fingerprint, answer.input, answer.task, answer.answer, number, label)
        if gone is not None:
            dead.add(gone)
            if answer.answer == "accept":
                batch.replaced += 1
            else:
                batch.withdrawn += 1
        entries.append({"fingerprint": answer.fingerprint, "input": answer.input, "task": answer.task,
                        "answer": answer.answer, "id": number, "label": label,
                        **({"image": answer.image} if answer.image not in (None, answer.input) else {})})
    sets, counter, replaced = list(state["sets"]), state["next_set"], []
    fresh = list(state.get("fresh", []))  # the sets of examples new since the last round (loop.oversample_new)
    names = class_names(loop.dir)
    kept = [(number, example) for number, example in new.items() if number not in dead]
    if kept:
        name, counter = f"set-{counter:06d}", counter + 1
        with durable.partial_path(loop.dir / DATA / name) as partial:
            partial.mkdir()
            write_set(partial, support, [example for _, example in kept], [number for number, _ in kept], names)
        sets.append(name)
        fresh.append(name)
        where.update((number, name) for number, _ in kept)
    hit = {where[number] for number in dead if number in where}
    for name in [name for name in sets if name in hit]:
        position = sets.index(name)
        rewritten, counter = f"set-{counter:06d}", counter + 1
        if copy_set([loop.dir / DATA / name], loop.dir / DATA / rewritten, dead):
            sets[position] = rewritten
            fresh = [rewritten if old == name else old for old in fresh]
            where.update((number, rewritten) for number in ids(loop.dir / DATA / rewritten))
        else:
            del sets[position]
            fresh = [old for old in fresh if old != name]
        replaced.append(name)
    for number in dead:
        where.pop(number, None)
    ledger_bytes = loop_state.append_ledger(loop.dir, state["ledger_bytes"], entries)
    loop_state.add_counts(state, batch)
    state.update(offset=batch.end_offset, lines=lines, consumed_sha256=consumed_sha256, ledger_bytes=ledger_bytes,
                 sets=sets, fresh=fresh, next_set=counter, next_id=next_id, examples=len(table.live),
                 pending=state["pending"] + batch.accepted, stamp=stamp, **support.ingested_facts(table, names))
    loop_state.commit(loop.dir, state)
    for name in replaced:
        durable.remove(loop.dir / DATA / name)


def write_held_out(loop: Loop, names: list[str]) -> None:
    """The fixed held-out set, once: loop.eval's current accepted examples (the latest answer per input, as
    for training, read in chunks), else the recipe's test split (the task writes it)."""
    folder = loop.dir / EVAL
    if folder.is_dir():
        return
    if loop.config.loop.eval:
        _write_held_out_file(loop, Path(loop.config.loop.eval).expanduser(), names, folder)
    else:
        with durable.partial_path(folder) as partial:
            partial.mkdir()
            loop.task.loop_support().write_test_split(loop, names, partial)
    print(f"held-out set: {folder}", flush=True)


def _write_held_out_file(loop: Loop, path: Path, names: list[str], folder: Path) -> None:
    support = loop.task.loop_support()
    table, summary, parts, number = AnswerTable(), Batch(examples=[], end_offset=0, lines=0), [], 0
    dead: set[int] = set()
    with durable.partial_path(folder) as partial:
        partial.mkdir()
        while True:
            batch = annotations.read_new(path, summary.end_offset, summary.lines, support.answers, names,
                                         known=table.seen, max_image_bytes=loop.config.data.max_image_bytes,
                                         max_pixels=loop.config.data.max_pixels, chunk_bytes=CHUNK_BYTES)
            numbers = []
            for answer in batch.answers:
                if answer.answer == "accept":
                    numbers.append(number)
                    number += 1
                _, gone = table.take(answer.fingerprint, answer.input, answer.task, answer.answer,
                                     numbers[-1] if answer.answer == "accept" else None)
                if gone is not None:
                    dead.add(gone)
            if batch.examples:
                parts.append(partial / f"part-{len(parts):05d}")
                parts[-1].mkdir()
                write_set(parts[-1], support, batch.examples, numbers, names, EVAL_PREFIX)
            summary.add(batch)
            if not batch.more:
                break
        print(f"held-out set {path}: {summary.describe()}", flush=True)
        if not table.live:
            raise UserError(f"loop.eval {path} holds no accepted task; the loop needs a held-out set to judge rounds")
        copy_set(parts, partial / "all", dead, EVAL_PREFIX)
        for shard in (partial / "all").iterdir():
            os.replace(shard, partial / shard.name)
        for part in [*parts, partial / "all"]:
            shutil.rmtree(part)
