"""One trial of a study: the sampled values applied to the recipe, an ordinary training run (pruned per epoch
when the study prunes), its figures measured; a point sampled again reuses the earlier trial's figures."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import keras
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from shared import mlflow_log
from shared.config_schema import Config
from shared.errors import UserError
from shared.lifecycle import train
from shared.locks import FileLock
from shared.runs import all_runs
from shared.tuning.metrics import Objective, TrialFailed, measure
from shared.tuning.space import describe_values, format_value, suggest, trial_config
from shared.tuning.storage import quiet_experimental, trial_tag

CLAIM = "trains_values"  # user attribute of a trial that trains its values (no other trial had them)
WAIT_S = 2.0  # how often a trial waiting for another worker's trial of the same values looks again


def pruning_callback(trial: optuna.Trial, names: tuple[str, ...]):
    """A Keras callback that reports the first of `names` found in each epoch's logs to the trial and
    raises optuna.TrialPruned when the pruner gives up on it.

    Our own ten lines rather than optuna-integration's KerasPruningCallback (which does work with
    Keras 3): that one watches one fixed log name and silently never prunes when it is missing, and
    the name differs for models with auxiliary heads (val_predictions_top1); it would also be one
    more dependency for the same report / should_prune / raise."""

    class PruningCallback(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            name = next((n for n in names if n in logs), None)
            if name is None:
                return
            value = float(logs[name])
            trial.report(value, step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: {name} {value:.4g}")

    return PruningCallback()


def find_run(config: Config, tag: str):
    """The run folder a trial created, found by its notes (training raised, so no Run came back)."""
    for run in reversed(all_runs(Path(config.run.dir), config.model.name)):  # by version number: newest first
        notes = run.path / "notes.md"
        if notes.is_file() and f"{tag}:" in notes.read_text(encoding="utf-8"):
            return run
    return None


def make_objective(base_config: Config, study: str, space: dict[str, BaseDistribution],
                   objectives: list[Objective], constraints: dict[str, float], monitor: tuple[str, ...] | None,
                   argv: list[str] | None, lock: FileLock):
    """The function Optuna calls for each trial: sample, train a run, measure, return the values."""
    needed = list(dict.fromkeys([*(o.metric for o in objectives), *constraints]))  # objectives first

    def objective(trial: optuna.Trial) -> float | tuple[float, ...]:
        values = {key: suggest(trial, key, distribution) for key, distribution in space.items()}
        earlier = same_values(trial, values)
        if earlier is not None:
            # NSGA-II on a small space often proposes a point again, and workers sampling at once may
            # too; training is seeded, so the figures would be the same: reuse them.
            metrics = earlier.user_attrs["metrics"]
            trial.set_user_attr("run", earlier.user_attrs.get("run"))
            trial.set_user_attr("metrics", metrics)
            trial.set_user_attr("same_as", earlier.number)
            print(f"trial {trial.number}: the values of trial {earlier.number}; its figures reused", flush=True)
            return finish(trial, metrics)
        tag = trial_tag(study, trial.number)
        notes = f"{tag}: {describe_values(values)}"
        if base_config.run.notes.strip():
            notes += "\n\n" + base_config.run.notes.strip()
        config = trial_config(base_config, values, notes)
        keras.backend.clear_session()  # a long study in one process: drop the previous trials' graphs
        callbacks = [pruning_callback(trial, monitor)] if monitor else []
        try:
            run = train(config, argv=argv, callbacks=callbacks)
        except optuna.TrialPruned as pruned:
            # shared.lifecycle has marked the run failed and re-raised; say what really happened.
            run = find_run(config, tag)
            if run is not None:
                trial.set_user_attr("run", str(run.path))
                run.set_status("pruned", ended=time.strftime("%Y-%m-%dT%H:%M:%S"), reason=str(pruned))
                if config.track:  # the lifecycle logged it failed; now it is pruned
                    mlflow_log.track(run.path, config.track_uri)
            print(f"trial {trial.number}: {run.path if run else 'no run'} {pruned}", flush=True)
            raise
        except Exception as error:
            run = find_run(config, tag)
            if run is None:
                raise  # nothing was trained: a config or data problem that every trial would hit
            # The run started and broke (diverged, out of memory at this width): the study goes on.
            trial.set_user_attr("run", str(run.path))
            raise TrialFailed(f"run {run.path}: {type(error).__name__}: {error}") from None
        trial.set_user_attr("run", str(run.path))
        try:
            metrics = measure(run, needed)
        except UserError as error:  # e.g. an architecture the TFLite converter refuses
            raise TrialFailed(f"run {run.path}: {error}") from None
        trial.set_user_attr("metrics", metrics)
        feasible = all(metrics[m] <= b for m, b in constraints.items())
        print(f"trial {trial.number}: {run.path} " + " ".join(f"{m}={format_value(v)}" for m, v in metrics.items())
              + ("" if feasible else "  (infeasible)"), flush=True)
        return finish(trial, metrics)

    def same_values(trial: optuna.Trial, values: dict[str, Any]) -> FrozenTrial | None:
        """A complete trial with these values, waiting for one another worker is training; else None,
        and this trial claims the values (under the lock, so two workers never both train them)."""
        told = False
        while True:
            with lock:
                others = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                                    TrialState.RUNNING))
                          if t.number != trial.number and t.params == values]
                done = next((t for t in others if t.state == TrialState.COMPLETE and "metrics" in t.user_attrs),
                            None)
                training = next((t for t in others if t.state == TrialState.RUNNING and t.user_attrs.get(CLAIM)),
                                None)
                if done is not None or training is None:
                    if done is None:
                        trial.set_user_attr(CLAIM, True)
                    return done
            if not told:
                print(f"trial {trial.number}: trial {training.number} is training the same values; waiting "
                      f"for its figures", flush=True)
                told = True
            time.sleep(WAIT_S)
            with quiet_experimental():  # a worker that died: its trial fails once stale, we train instead
                optuna.storages.fail_stale_trials(trial.study)

    def finish(trial: optuna.Trial, metrics: dict[str, float]) -> float | tuple[float, ...]:
        for metric, bound in constraints.items():  # Optuna 5: set_constraint replaces constraints_func
            trial.set_constraint(metric, metrics[metric] - bound)
        result = tuple(metrics[o.metric] for o in objectives)
        return result[0] if len(result) == 1 else result

    return objective
