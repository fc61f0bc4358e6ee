"""The outcome of a study: the best trial or the Pareto front as a table, drawn next to the database, and each
best trial's config written as a recipe that trains as it is."""

from __future__ import annotations

from pathlib import Path

import optuna
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState

from shared import plots
from shared.config_schema import Config
from shared.durable import atomic_write
from shared.tuning.metrics import Objective
from shared.tuning.space import describe_values, format_value, trial_config
from shared.tuning.storage import study_file, trial_tag


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial, or the feasible Pareto front (by trial number); [] when none."""
    if len(study.directions) > 1:  # a trial that repeated an earlier one's values is that one again
        return sorted((t for t in study.best_trials if "same_as" not in t.user_attrs), key=lambda t: t.number)
    try:
        return [study.best_trial]
    except ValueError:  # no complete (or no feasible) trial
        return []


def report(study: optuna.Study, config: Config, objectives: list[Objective], constraints: dict[str, float],
           keys: list[str], url: str) -> dict:
    """Print the best trial(s), draw the study, write each best trial's recipe."""
    name = study.study_name
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    best = best_trials(study)
    title = "best trial" if len(objectives) == 1 else f"Pareto front ({len(best)} trials)"
    summary = ", ".join(f"{count} {state}" for state, count in counts.items() if count)
    lines = [f"study {name}: {summary or 'no trials'}"]
    if best:
        lines += [f"{title}:", format_table(best, objectives, keys)]
    else:
        lines.append("no complete" + (" feasible" if constraints else "") + " trial yet")
    out_dir = _output_dir(config, url)
    plot = plot_study(study, objectives, out_dir / f"{name}-{'history' if len(objectives) == 1 else 'pareto'}.png")
    configs = []
    for trial in best:
        path = write_trial_config(config, name, trial, objectives, Path(config.run.dir) / "tune" / name)
        configs.append(path)
        lines.append(f"trial {trial.number} config: {path}")
    if plot:
        lines.append(f"plot: {plot}")
    table = "\n".join(lines)
    print(table, flush=True)
    return {
        "study": name, "storage": url, "trials": counts, "plot": plot, "table": table,
        "best": [{"trial": t.number, "run": t.user_attrs.get("run"),
                  "values": dict(zip((o.metric for o in objectives), t.values)), "params": dict(t.params),
                  "config": path} for t, path in zip(best, configs)],
    }


def _output_dir(config: Config, url: str) -> Path:
    """Next to the SQLite or journal file; for a server database, <run.dir>/tune."""
    database = study_file(url)
    return database.parent if database is not None else Path(config.run.dir) / "tune"


def format_table(trials: list[FrozenTrial], objectives: list[Objective], keys: list[str]) -> str:
    header = ["trial", "run", *(o.label for o in objectives), *keys]
    rows = [[str(t.number), t.user_attrs.get("run", "-"), *map(format_value, t.values),
             *(format_value(t.params.get(key, "-")) for key in keys)] for t in trials]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def write_trial_config(config: Config, study: str, trial: FrozenTrial, objectives: list[Objective],
                       folder: Path) -> Path:
    """The base recipe with the trial's values, as a YAML recipe that trains as it is (no tune section)."""
    values = {key: trial.params[key] for key in trial.params}
    results = ", ".join(f"{o.metric} {format_value(v)}" for o, v in zip(objectives, trial.values))
    notes = f"from {trial_tag(study, trial.number)} ({results}): {describe_values(values)}"
    trial_cfg = trial_config(config, values, notes)
    tree = trial_cfg.to_dict()
    tree.pop("tune", None)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"trial-{trial.number}.yaml"
    header = (f"# {trial_tag(study, trial.number)} ({results}); its run: {trial.user_attrs.get('run', '-')}\n"
              f"# Train it again: python -m shared.runner --config {path}\n")
    atomic_write(path, header + yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, width=100))
    return path


def plot_study(study: optuna.Study, objectives: list[Objective], out_png: Path) -> Path | None:
    """Two objectives: every trial, the Pareto front joined up; one objective: each trial's value and
    the best so far. Other counts of objectives, or no complete trial: no plot (None)."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete or len(objectives) > 2:
        return None
    feasible = [t for t in complete if all(v <= 0 for v in t.constraints.values())]
    infeasible = [t for t in complete if t not in feasible]
    figure = Figure(figsize=(6.0, 4.5), dpi=plots.DPI)
    axes = figure.subplots()
    beside = 0.0  # inches of labels beside the points that may stick out of the axes on the right
    if len(objectives) == 2:
        front = sorted(best_trials(study), key=lambda t: t.values[0])
        others = [t for t in feasible if t not in front]
        for group, style, label in ((others, dict(color="0.6", marker="o"), "trial"),
                                    (infeasible, dict(color="tab:red", marker="x"), "infeasible"),
                                    (front, dict(color="tab:blue", marker="o"), "Pareto front")):
            if group:
                axes.scatter([t.values[0] for t in group], [t.values[1] for t in group], label=label, **style)
        if front:
            # The front as a staircase: ordered as if both were minimized, each point's level held
            # until the next (the edge of what the front dominates).
            signs = [1 if o.direction == "minimize" else -1 for o in objectives]
            ordered = sorted(front, key=lambda t: (signs[0] * t.values[0], signs[1] * t.values[1]))
            axes.plot([t.values[0] for t in ordered], [t.values[1] for t in ordered], color="tab:blue",
                      alpha=0.5, drawstyle="steps-post")
        labels: dict[tuple, list[str]] = {}  # trials with the same values share one label
        for trial in complete:
            labels.setdefault(tuple(trial.values), []).append(str(trial.number))
        for (x, y), numbers in labels.items():
            axes.annotate(",".join(numbers), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        beside = max(plots.text_width(",".join(numbers), 8) for numbers in labels.values()) + 4 / 72
        axes.set_xlabel(objectives[0].label)
        axes.set_ylabel(objectives[1].label)
        axes.set_title(f"{study.study_name}: Pareto front")
    else:
        better = max if objectives[0].direction == "maximize" else min
        numbers = [t.number for t in feasible]
        values = [t.value for t in feasible]
        axes.scatter(numbers, values, color="tab:blue", label="trial")
        if infeasible:
            axes.scatter([t.number for t in infeasible], [t.value for t in infeasible], color="tab:red",
                         marker="x", label="infeasible")
        if values:
            running = [better(values[:i + 1]) for i in range(len(values))]
            axes.step(numbers, running, where="post", color="tab:orange", label="best so far")
        axes.set_xlabel("trial")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(objectives[0].label)
        axes.set_title(f"{study.study_name}: optimization history")
    axes.grid(alpha=0.3)
    axes.legend()
    plots.place_axes(figure, axes, right=beside)  # margins by arithmetic (constrained layout drew ticks for them)
    return plots.save_figure(figure, out_png)
