"""Generic evaluation helpers every task's test uses: the check that test data has the classes a run was trained
on, in the same order."""

from __future__ import annotations

from shared.errors import UserError
from shared.runs import Run


def class_difference(ours: list[str], theirs: list[str]) -> str | None:
    """Where two class lists (in index order) first differ, in words; None when they are equal."""
    if list(ours) == list(theirs):
        return None
    index = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    mine = repr(ours[index]) if index < len(ours) else "nothing"
    other = repr(theirs[index]) if index < len(theirs) else "nothing"
    return f"first difference at index {index}: {mine} vs {other}"


def _shown(names: list[str], limit: int = 12) -> str:
    more = f", ... {len(names)} in all" if len(names) > limit else ""
    return "[" + ", ".join(map(repr, names[:limit])) + more + "]"


def check_class_names(data_classes: list[str], run: Run) -> None:
    """Refuse to test `run` on data whose classes (names in index order) are not the ones it was trained on
    (labels.txt): its figures would silently compare other classes. Runs without labels.txt (older ones)
    are checked by class count only."""
    recorded = run.class_names()
    if recorded is None:
        trained = run.config_dict().get("data", {}).get("num_classes")
        if trained is not None and trained != len(data_classes):
            raise UserError(f"the test data has {len(data_classes)} classes where run {run.path} was trained on "
                            f"{trained}; test it on the data it was trained on")
        return
    difference = class_difference(data_classes, recorded)
    if difference:
        raise UserError(f"the test data has classes {_shown(data_classes)} where run {run.path} was trained on "
                        f"{_shown(recorded)} ({run.path / 'labels.txt'}): {difference}; test it on data with the "
                        f"run's classes in the same order")
