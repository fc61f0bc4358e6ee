"""A loop's record of its rounds: `<loop>/rounds.csv` (one row a round, round 0 the --from run) and
`<loop>/rounds.png`, rewritten from the committed state after each round."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from shared import durable, plots
from shared.loop.folder import ROUNDS_CSV, ROUNDS_PNG

CSV_COLUMNS = ("round", "new", "examples", "metric", "exported_version", "seconds", "run")


def write_rounds(folder: Path, history: list[dict], metric: str) -> None:
    """rounds.csv (rewritten atomically from the committed state) and rounds.png."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for entry in history:
        writer.writerow(["" if entry.get(key) is None else entry.get(key) for key in CSV_COLUMNS])
    durable.atomic_write(folder / ROUNDS_CSV, out.getvalue())
    with durable.disk_space_checked(folder / ROUNDS_PNG):
        plot_rounds(history, folder / ROUNDS_PNG, metric)


def plot_rounds(history: list[dict], out_png: Path, metric: str = "metric") -> Path:
    """The held-out metric per round (round 0: the --from run, a dashed floor; exported rounds filled), with
    the examples so far on a second axis."""
    figure = Figure(figsize=(5.0, 3.2), dpi=plots.DPI)
    axes = figure.subplots()
    numbers = [entry["round"] for entry in history]
    metrics = [entry.get("metric") if entry.get("metric") is not None else float("nan") for entry in history]
    axes.plot(numbers, metrics, color="tab:blue", marker="o", markerfacecolor="white", label="held-out")
    exported = [(n, m) for n, m, entry in zip(numbers, metrics, history) if entry.get("exported_version")]
    if exported:
        axes.plot(*zip(*exported), linestyle="none", marker="o", color="tab:blue", label="exported")
    zero = [entry.get("metric") for entry in history if entry["round"] == 0 and entry.get("metric") is not None]
    if zero:
        axes.axhline(zero[0], color="tab:gray", linestyle="--", linewidth=0.8, label="round 0 (--from)")
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(f"held-out {metric}")
    axes.legend(loc="lower right", fontsize=7)
    second = axes.twinx()
    second.bar(numbers, [entry.get("examples", 0) for entry in history], alpha=0.15, color="tab:gray")
    second.set_ylabel("examples so far")
    axes.set_zorder(second.get_zorder() + 1)
    axes.patch.set_visible(False)
    plots.place_axes(figure, axes, second)  # margins by arithmetic (constrained layout drew ticks for them)
    return plots.save_figure(figure, out_png)
