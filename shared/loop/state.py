"""A loop folder's commit point and ledger.

`<loop>/state.json` is replaced atomically (`commit`) after each ingested chunk and each stage of a round
(ingested -> trained -> exported -> done). It lists the live shard sets and the ledger's committed length:
whatever a kill left beyond them (a published set, ledger lines, a set a rewrite replaced) is removed when the
loop next starts (`reconcile`), so a chunk cut short is read again. `<loop>/answers.jsonl`, the ledger, holds
the fingerprint, input, question, answer and example number of every answer taken; replayed (`replay`) it is
the `AnswerTable`: which example each input has now (and `answered_inputs`: which inputs have any answer).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from shared import durable
from shared.annotations import AnswerTable, Batch
from shared.errors import UserError
from shared.loop.folder import DATA, EVAL, IDS_FILE, LEDGER_FILE, STATE_FILE, Loop

STATE_VERSION = 2  # 2: shard sets listed in the state, the answers ledger
STAGES = ("ingested", "trained", "exported", "done")
TOTALS = ("accepted", "rejected", "ignored", "malformed", "duplicates", "replaced", "withdrawn")


def read_state(folder: Path) -> dict | None:
    """The loop folder's committed state, None for a new folder."""
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


def commit(folder: Path, state: dict) -> None:
    """The state replaced atomically: what it lists is what the loop folder holds from now on."""
    durable.atomic_write(folder / STATE_FILE, json.dumps(state, indent=1) + "\n")


def first_state(loop: Loop, task_facts: dict) -> dict:
    """The state of a loop folder that has its classes and held-out set, before any answer is read;
    `task_facts`: what its task keeps about the examples (`LoopSupport.ingested_facts`)."""
    state = {"version": STATE_VERSION, "annotations": str(loop.annotations), "from_run": str(loop.from_run),
             "task": loop.task.name, "offset": 0, "lines": 0, "consumed_sha256": hashlib.sha256().hexdigest(),
             "stamp": None, "ledger_bytes": 0, "sets": [], "next_set": 1, "next_id": 1, "examples": 0,
             "pending": 0, "class_counts": None, "round": 0, "stage": "done", "totals": {key: 0 for key in TOTALS},
             "attempts": [], "previous_run": None, "served": None, "current": None, "history": []}
    state.update(task_facts)
    return state


def check_same_loop(loop: Loop, state: dict) -> None:
    """A loop folder follows one annotations file from one starting run."""
    for key, given, flag in (("annotations", loop.annotations, "--annotations"), ("from_run", loop.from_run, "--from")):
        if state[key] != str(given):
            raise UserError(f"loop {loop.dir} follows {key.replace('_', ' ')} {state[key]}, not {given}; give "
                            f"{flag} {state[key]} to continue it, or set loop.dir to start another loop")


def add_counts(state: dict, batch: Batch) -> None:
    """A read's counts added to the state's totals."""
    totals = state["totals"]
    for key in TOTALS:
        count = len(batch.malformed) if key == "malformed" else getattr(batch, key)
        totals[key] = totals.get(key, 0) + count


def reconcile(folder: Path, state: dict) -> None:
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


def replay(folder: Path, state: dict) -> AnswerTable:
    """The committed ledger replayed into an AnswerTable."""
    table = AnswerTable()
    for entry in _ledger(folder, state):
        entry.pop("image", None)  # the image's own identity, beside an annotation tool's _input_hash
        table.take(**entry)
    return table


def answered_inputs(folder: Path, state: dict) -> set[str]:
    """Every input the committed ledger has an answer for (accept, reject or ignore), as the annotation
    reader identifies it (`shared.annotations.identity`), and its image's own identity where an annotation
    tool's `_input_hash` stood for it (ledgers from before that was recorded: the input alone)."""
    answered = set()
    for entry in _ledger(folder, state):
        answered.update(key for key in (entry["input"], entry.get("image")) if key is not None)
    return answered


def _ledger(folder: Path, state: dict) -> Iterator[dict]:
    """The committed ledger's entries, in order."""
    if state["ledger_bytes"]:
        with open(folder / LEDGER_FILE, "rb") as handle:
            for raw in handle.read(state["ledger_bytes"]).splitlines():
                yield json.loads(raw)


def append_ledger(folder: Path, committed: int, entries: list[dict]) -> int:
    """The entries appended to the ledger (durably, before the state that counts them); its new length."""
    ledger = folder / LEDGER_FILE
    if not entries:
        return committed
    created = not ledger.exists()
    with open(ledger, "ab") as handle:
        if handle.tell() != committed:  # reconcile truncates to the committed length first
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
