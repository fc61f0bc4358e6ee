"""A loop's garbage collection, after each round. It keeps every current example (training uses all examples
so far): beyond `loop.keep` shard sets the oldest are merged into one (records copied); export versions beyond
the newest `loop.keep` are pruned by the export itself; of the runs this loop trained (each records the attempt
id state.json lists in its `loop.attempt`), those beyond the newest `loop.keep` rounds and those of killed
attempts are removed. The `--from` run and any run the loop did not train are never removed."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from shared import runs
from shared.loop.folder import Loop
from shared.loop.shards import merge_old_sets


def collect_garbage(loop: Loop, state: dict) -> None:
    """Merge old shard sets; remove the runs this loop trained (their loop.attempt among the state's
    attempts) beyond the newest loop.keep rounds, and those of attempts a kill cut short. Never the --from
    run, the current round's run (the next round's start), or a run the loop did not train."""
    keep = loop.config.loop.keep
    merged = merge_old_sets(loop.dir, state, keep)
    rounds = [entry["run"] for entry in state["history"] if entry["round"] > 0 and entry.get("run")]
    kept = {*rounds[-keep:], state["from_run"], state["current"]["run"]}
    attempts = set(state.get("attempts", []))
    model_folder = Path(rounds[-1]).parent  # <run.dir>/<model>: where this loop's runs are
    removed = []
    for run in runs.all_runs(model_folder.parent, model_folder.name):
        if str(run.path.resolve()) in kept:
            continue
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if (run.config_dict().get("loop") or {}).get("attempt") in attempts and remove_run(run.path):
                removed.append(run.path.name)
    if merged or removed:
        print(f"round {state['current']['round']}: garbage collected: "
              + ", ".join(what for what in (f"{merged} shard sets merged into one" if merged else "",
                                            f"runs {', '.join(removed)} removed" if removed else "") if what),
              flush=True)


def remove_run(path: Path) -> bool:
    """A run folder gone in one step (renamed hidden, then deleted), unless a process holds it."""
    if not path.is_dir() or runs.lock_holder(runs.Run(path)) is not None:
        return False
    hidden = path.parent / f".deleting-{path.name}-{os.getpid()}"
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return False
    shutil.rmtree(hidden, ignore_errors=True)
    return True
