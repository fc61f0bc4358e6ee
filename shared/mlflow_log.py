"""Experiment tracking in MLflow, fed from the run folder: `log_run(RUN)` reads a run folder (finished or still
training) and logs it to an MLflow tracking URI, so the folder stays the source of truth and MLflow a view of it.

    parameters   the resolved config.yaml, flattened (`train.epochs`, `train.lr.base`, `model.width`)
    metrics      each row of metrics.csv (step = its epoch), and test_metrics.json's numbers as `test.<key>`
    artifacts    config.yaml, model.py, augment.py, notes.md, labels.txt, environment.json, metrics.csv,
                 test_metrics.json and the run's figures (*.png)
    run          experiment: the model's name; run name: <model>/<version>; tag `ilsvrc_canon.run_folder`: the
                 folder's absolute path, by which a second log finds and updates the same MLflow run

A tune trial's run (its notes begin `tune study <name> trial <n>:`, `shared.tuning.storage.trial_tag`) is logged
as a child of its study's run (`mlflow.parentRunId`), which the first of its trials creates and `track_study`
completes at the study's end. `track: mlflow` logs each run as it trains (`epoch_tracker`: each epoch's row, then
the whole run when training ends); `python -m shared.runs log-to-mlflow RUN` logs one after the fact.
MLflow is an optional extra (`.[mlflow]`), imported only here and only when asked for.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Iterator

from shared.config_schema import Config
from shared.config_yaml import read_yaml_file
from shared.errors import UserError, first_line

RUN_FOLDER_TAG = "ilsvrc_canon.run_folder"
STUDY_TAG = "ilsvrc_canon.tune_study"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under this one
ARTIFACTS = ("config.yaml", "model.py", "augment.py", "notes.md", "labels.txt", "environment.json", "metrics.csv",
             "test_metrics.json")
DATABASE = "mlflow.db"  # the default store: <runs root>/mlflow.db (MLflow 3 refuses its old file store)
ARTIFACT_ROOT = "mlartifacts"  # beside it, what the default store's runs hold (MLflow's own default is ./mlruns)
TRIAL_NOTE = re.compile(r"^tune study (\S+) trial (\d+):")  # shared.tuning.storage.trial_tag, then ": values"
# MLflow's names: letters, digits, _ - . space / and :; anything else in a key is a mapping logged as JSON.
VALID_NAME = re.compile(r"^[/\w.\- :]+$")
STATUSES = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "pruned": "KILLED"}
# A tracking server that does not answer must not hold a finished run up: one retry, seconds not minutes. The
# environment's own MLFLOW_HTTP_REQUEST_* settings win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
PARAM_BATCH, METRIC_BATCH, MAX_PARAM_LENGTH = 100, 1000, 6000  # MLflow's limits per call and per value


def import_mlflow():
    """The mlflow module, or a one-line UserError naming the extra that installs it."""
    try:
        import mlflow
        import mlflow.entities
    except ImportError:
        raise UserError("experiment tracking with MLflow needs the mlflow extra: pip install -e '.[mlflow]' "
                        "(mlflow-skinny)") from None
    # Its "Creating initial MLflow database tables" lines would land in the middle of the first epoch's output.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return mlflow


def default_uri(runs_root: str | Path) -> str:
    return f"sqlite:///{(Path(runs_root) / DATABASE).resolve()}"


def resolve_uri(run_folder: str | Path, uri: str | None = None) -> str:
    """Where a run is logged: `uri`, else the run's `track_uri`, else MLflow's MLFLOW_TRACKING_URI, else the
    SQLite store in the run's runs root."""
    if uri:
        return uri
    folder = Path(run_folder).resolve()
    recorded = _config(folder).get("track_uri")
    return recorded or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(folder.parent.parent)


def log_run(run_folder: str | Path, tracking_uri: str | None = None, parent: str | None = None,
            files: bool = True) -> str:
    """Log the run folder to MLflow (`tracking_uri`, or as `resolve_uri` decides) and return the MLflow run's
    id. Logging the same folder again updates that MLflow run: new epochs' metrics, changed test figures, the
    files as they are now, the status. `parent`: an MLflow run id to nest it under; None: its study's run when
    it is a tune trial. `files`: False leaves the files out (an epoch's end adds only its metrics row)."""
    mlflow = import_mlflow()
    folder = Path(run_folder).resolve()
    uri = resolve_uri(folder, tracking_uri)
    config = _config(folder)
    with _http_limits():
        client = mlflow.MlflowClient(uri)
        experiment = experiment_id(client, folder.parent.name, uri)
        run = _find_run(client, experiment, {RUN_FOLDER_TAG: str(folder)})
        if run is None:
            run = client.create_run(experiment, run_name=f"{folder.parent.name}/{folder.name}",
                                    start_time=_millis(_status(folder).get("started")),
                                    tags={RUN_FOLDER_TAG: str(folder)})
        run_id = run.info.run_id
        study = _study_of(config)
        if parent is None and study is not None:
            parent = study_run(client, experiment, study)
        if parent is not None and run.data.tags.get(PARENT_TAG) != parent:
            client.set_tag(run_id, PARENT_TAG, parent)
        _log_params(client, run, _params(config))
        _log_metrics(client, run, folder)
        for path in _artifacts(folder) if files else ():
            client.log_artifact(run_id, str(path))
        _log_status(client, run, folder)
    return run_id


def track(run_folder: str | Path, tracking_uri: str | None = None) -> str | None:
    """`log_run` for a run that has just trained (`track: mlflow`): a tracking server that fails or does not
    answer is one warning line, and the run stays as it is (its folder holds everything; `runs log-to-mlflow`
    logs it later). Returns the MLflow run id, or None when it could not be logged."""
    started = time.monotonic()
    try:
        return log_run(run_folder, tracking_uri)
    except Exception as error:  # noqa: BLE001 - the run is trained and kept, whatever MLflow says
        uri = resolve_uri(run_folder, tracking_uri)
        print(f"warning: the run was not logged to MLflow at {uri} ({first_line(error)[:300]}, after "
              f"{time.monotonic() - started:.0f} s); it is kept in {run_folder}, log it later with: python -m "
              f"shared.runs log-to-mlflow {run_folder}", flush=True)
        return None


def epoch_tracker(run_folder: str | Path, tracking_uri: str | None = None):
    """A Keras callback that logs the run at each epoch's end, after its metrics row is on disk (the metrics and
    the parameters), and whose `finish()` logs it whole once it is finished (`track`). A tracking server that
    fails is one warning line for the whole run: nothing more is sent to it."""
    import keras

    class EpochTracker(keras.callbacks.Callback):
        failed = False

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if self.failed:
                return
            try:
                log_run(run_folder, tracking_uri, files=False)
            except Exception as error:  # noqa: BLE001 - training goes on, whatever MLflow says
                self.failed = True
                print(f"warning: epoch {epoch + 1} was not logged to MLflow at {resolve_uri(run_folder, tracking_uri)}"
                      f" ({first_line(error)[:300]}); training goes on without it, log the run later with: python -m "
                      f"shared.runs log-to-mlflow {run_folder}", flush=True)

        def finish(self) -> None:
            if self.failed:
                return
            run_id = track(run_folder, tracking_uri)
            self.failed = run_id is None
            if run_id is not None:
                print(f"logged to MLflow at {resolve_uri(run_folder, tracking_uri)}: run {run_id}", flush=True)

    return EpochTracker()


@contextlib.contextmanager
def logged_at_end(trackers: list) -> Iterator[None]:
    """The `epoch_tracker`s' runs logged whole when training ends, however it ends: finished, or failed or
    interrupted (after the lifecycle has marked the folder so), so MLflow never shows a run that is over as
    running."""
    try:
        yield
    finally:
        for tracker in trackers:
            tracker.finish()


def log_command(run_folder: str | Path, tracking_uri: str | None = None) -> str:
    """`runs log-to-mlflow RUN [--uri URI]`: log the run and say where; a tracking server that fails is one
    UserError line."""
    uri = resolve_uri(run_folder, tracking_uri)
    try:
        run_id = log_run(run_folder, uri)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - MLflow's and the HTTP client's errors alike
        raise UserError(f"MLflow at {uri} did not take run {run_folder}: {first_line(error)[:300]}; check that "
                        f"the tracking server runs there, or give --uri") from None
    return f"{run_folder}: MLflow run {run_id} in {uri}"


def experiment_id(client, name: str, uri: str) -> str:
    """The id of the experiment `name`, created if new; in the default SQLite store its runs' files go to
    `mlartifacts/<name>` beside the database rather than MLflow's ./mlruns in the working folder."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    database = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    location = (Path(database).parent / ARTIFACT_ROOT / name).as_uri() if database else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        found = client.get_experiment_by_name(name)  # another process created it meanwhile
        if found is None:
            raise
        return found.experiment_id


def track_study(config: Config, summary: dict) -> str | None:
    """A study's own run at the study's end (`track: mlflow`, `shared.tune.tune`'s `summary`): its tune section as
    parameters, each best trial's figures as `best.<metric>` (step: the trial's number), its plot and the best
    trials' recipes as files, and finished. Returns its id; a tracking server that fails is one warning line."""
    uri = config.track_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(config.run.dir)
    try:
        mlflow = import_mlflow()
        with _http_limits():
            client = mlflow.MlflowClient(uri)
            run_id = study_run(client, experiment_id(client, config.model.name, uri), summary["study"])
            _log_params(client, client.get_run(run_id), _params({"tune": config.to_dict()["tune"]}))
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[mlflow.entities.Metric(f"best.{metric}", float(value), now, best["trial"])
                                              for best in summary["best"] for metric, value in best["values"].items()
                                              if VALID_NAME.match(metric)])
            for path in [summary.get("plot"), *(best.get("config") for best in summary["best"])]:
                if path and Path(path).is_file():
                    client.log_artifact(run_id, str(path))
            client.set_terminated(run_id, "FINISHED")
        return run_id
    except Exception as error:  # noqa: BLE001 - the study is done and stored, whatever MLflow says
        print(f"warning: study {summary['study']} was not logged to MLflow at {uri} ({first_line(error)[:300]})",
              flush=True)
        return None


def study_run(client, experiment: str, study: str) -> str:
    """The id of a study's parent run (run name: the study), created by the first of its trials logged. A
    study's workers log at once and may each create one: every worker then keeps the earliest created (start
    time, then id), and a creator whose run is not it deletes its own."""
    found = _study_runs(client, experiment, study)
    if found:
        return found[0].info.run_id
    own = client.create_run(experiment, run_name=study, tags={STUDY_TAG: study}).info.run_id
    first = _study_runs(client, experiment, study)[0].info.run_id
    if first != own:
        client.delete_run(own)
    return first


def _study_runs(client, experiment: str, study: str) -> list:
    """A study's runs, the earliest created first."""
    found = client.search_runs([experiment], filter_string=f"tags.`{STUDY_TAG}` = {_quoted(study)}")
    return sorted(found, key=lambda run: (run.info.start_time, run.info.run_id))


# ---------------------------------------------------------------- reading the run folder


def _config(folder: Path) -> dict:
    path = folder / "config.yaml"
    if not path.is_file():
        raise UserError(f"no run at {folder} (a run folder holds config.yaml); `python -m shared.runs list` shows "
                        f"the runs there are")
    tree = read_yaml_file(path)
    return tree if isinstance(tree, dict) else {}


def _status(folder: Path) -> dict:
    return _json(folder / "status.json") or {}


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _study_of(config: dict) -> str | None:
    """The study a tune trial's run belongs to, from the notes its trial wrote first; None for other runs."""
    notes = str((config.get("run") or {}).get("notes") or "")
    match = TRIAL_NOTE.match(notes)
    return match.group(1) if match else None


def _flatten(tree: dict, prefix: str = "") -> dict:
    """Dotted keys; a mapping whose keys are not MLflow names (a glob, a class name) stays one JSON value."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(VALID_NAME.match(str(k)) for k in value):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _params(config: dict) -> dict[str, str]:
    """The config's values as MLflow parameters (text): strings as they are, the rest as JSON (null, true,
    [1, 2]), so each reads as config.yaml writes it."""
    params = {}
    for key, value in _flatten(config).items():
        text = value if isinstance(value, str) else json.dumps(value)
        params[key] = text if len(text) <= MAX_PARAM_LENGTH else text[:MAX_PARAM_LENGTH - 3] + "..."
    return params


def _epoch_rows(folder: Path) -> list[tuple[int, dict[str, float]]]:
    """metrics.csv's rows as (epoch, {name: value}); cells that are not numbers are left out."""
    path = folder / "metrics.csv"
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8", newline="") as file:
        for row in csv.DictReader(file):
            try:
                epoch = int(row.pop("epoch"))
            except (KeyError, TypeError, ValueError):
                continue  # a row cut off by a crash
            rows.append((epoch, {name: number for name, cell in row.items()
                                 if name and (number := _number(cell)) is not None}))
    return rows


def _test_figures(folder: Path) -> dict[str, float]:
    """test_metrics.json's numbers, dotted (`test.top1`, `test.by_view.10crop.top1`); lists and text left out."""
    figures = _flatten({"test": _json(folder / "test_metrics.json") or {}})
    return {key: float(value) for key, value in figures.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and VALID_NAME.match(key)}


def _number(cell) -> float | None:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return None


def _artifacts(folder: Path) -> list[Path]:
    return [folder / name for name in ARTIFACTS if (folder / name).is_file()] + sorted(folder.glob("*.png"))


def _millis(stamp: str | None) -> int | None:
    """status.json's local time stamp as MLflow's milliseconds since the epoch."""
    if not stamp:
        return None
    try:
        return int(time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) * 1000)
    except ValueError:
        return None


# ---------------------------------------------------------------- writing to MLflow


def _find_run(client, experiment: str, tags: dict[str, str]):
    """The first run of the experiment with these tag values, or None."""
    condition = " and ".join(f"tags.`{key}` = {_quoted(value)}" for key, value in tags.items())
    found = client.search_runs([experiment], filter_string=condition, max_results=1)
    return found[0] if found else None


def _quoted(value: str) -> str:
    quote = "'" if "'" not in value else '"'
    if quote in value:
        raise UserError(f"{value!r} holds both kinds of quote, which an MLflow search cannot name; rename it")
    return f"{quote}{value}{quote}"


def _log_params(client, run, params: dict[str, str]) -> None:
    """The parameters not yet logged (MLflow's are written once: a value never changes)."""
    new = [import_mlflow().entities.Param(key, value) for key, value in params.items() if key not in run.data.params]
    for start in range(0, len(new), PARAM_BATCH):
        client.log_batch(run.info.run_id, params=new[start:start + PARAM_BATCH])


def _log_metrics(client, run, folder: Path) -> None:
    """The epochs not yet logged (by step, each name's history read once), and the test figures that are new or
    changed (a later `test --views` adds figures)."""
    Metric = import_mlflow().entities.Metric  # noqa: N806 - MLflow's class
    now = int(time.time() * 1000)
    rows = _epoch_rows(folder)
    logged = {name: {point.step for point in client.get_metric_history(run.info.run_id, name)}
              for name in sorted({name for _, values in rows for name in values}) if name in run.data.metrics}
    new = [Metric(name, value, now, epoch) for epoch, values in rows for name, value in values.items()
           if epoch not in logged.get(name, ()) and VALID_NAME.match(name)]
    new += [Metric(name, value, now, 0) for name, value in _test_figures(folder).items()
            if not _same(run.data.metrics.get(name), value)]
    for start in range(0, len(new), METRIC_BATCH):
        client.log_batch(run.info.run_id, metrics=new[start:start + METRIC_BATCH])


def _same(logged: float | None, value: float) -> bool:
    return logged is not None and (logged == value or (math.isnan(logged) and math.isnan(value)))


def _log_status(client, run, folder: Path) -> None:
    """The MLflow run ends as the folder's did (finished, failed, or killed for interrupted and pruned runs); a
    run still training stays RUNNING."""
    status = _status(folder)
    ended = STATUSES.get(status.get("status"))
    if ended is not None and (run.info.status != ended or run.info.end_time is None):
        client.set_terminated(run.info.run_id, ended, end_time=_millis(status.get("ended") or status.get("updated")))
    elif status.get("status") == "running" and run.info.status != "RUNNING":  # resumed
        client.update_run(run.info.run_id, status="RUNNING")


@contextlib.contextmanager
def _http_limits() -> Iterator[None]:
    """HTTP_LIMITS for the calls inside, unless the environment sets them."""
    added = {key: value for key, value in HTTP_LIMITS.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
