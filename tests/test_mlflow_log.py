"""Experiment tracking in MLflow (shared/mlflow_log.py): a run folder logged to a local store and read back with
MLflow's own client; the same run logged twice is one MLflow run; tune trials are children of their study's run;
a tracking server that does not answer is a warning, never a failed run; the extra missing is one line."""

from __future__ import annotations

import builtins
import importlib.util
import shutil
import time
from pathlib import Path

import keras
import pytest

from conftest import TINY_MODEL, free_ports, tiny_tree
from shared import mlflow_log, runs
from shared.config import load_config
from shared.errors import UserError
from shared.lifecycle import train
from shared.tuning.storage import trial_tag

# Skipped without the extra; imported only where a test reads MLflow back (its import takes seconds, and every
# xdist worker collects this file, while one runs it).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow (the extra) not installed")


def mlflow_client(uri: str):
    return mlflow_log.import_mlflow().MlflowClient(uri)

EPOCHS = 2


def tiny_config(tmp_path: Path, epochs: int = EPOCHS, **top):
    """A one-convolution model on 64 synthetic images: a run in a few seconds. `top`: top-level keys and sections."""
    model = tmp_path / "tiny_model"
    model.mkdir(exist_ok=True)
    (model / "model.py").write_text(TINY_MODEL)
    tree = tiny_tree(tmp_path / "runs", train={"epochs": epochs}, data={"synthetic_train": 64, "synthetic_test": 32})
    tree["model"] = {"name": "tiny", "path": str(model), "width": 4}
    return load_config(tree={**tree, **top})


class MlflowProbe(keras.callbacks.Callback):
    """What MLflow holds of the run at each epoch's end (after the run's own callbacks): (loss points, status)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root, self.seen = root, []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        client = mlflow_client(mlflow_log.default_uri(self.root))
        (run,) = logged_runs(client)
        self.seen.append((len(client.get_metric_history(run.info.run_id, "loss")), run.info.status))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> tuple[runs.Run, MlflowProbe]:
    """One run trained with `track: mlflow` into the default store under its runs root, and what MLflow held of
    it at each epoch's end."""
    folder = tmp_path_factory.mktemp("tracked")
    probe = MlflowProbe(folder / "runs")
    return train(tiny_config(folder, track="mlflow"), argv=["pytest"], callbacks=[probe]), probe


@pytest.fixture(scope="module")
def tracked_run(tracked) -> runs.Run:
    return tracked[0]


def client_of(run: runs.Run):
    return mlflow_client(mlflow_log.default_uri(run.path.parent.parent))


def logged_runs(client, experiment: str = "tiny") -> list:
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def runs_of(client, folder: Path) -> list:
    """The MLflow runs of a run folder (by its tag): one, however often it was logged."""
    return [run for run in logged_runs(client, folder.parent.name)
            if run.data.tags.get(mlflow_log.RUN_FOLDER_TAG) == str(folder.resolve())]


@pytest.mark.slow
def test_each_epoch_is_logged_at_its_end(tracked):
    _, probe = tracked
    assert probe.seen == [(1, "RUNNING"), (2, "RUNNING")]


@pytest.mark.slow
def test_a_tracked_run_says_where_it_was_logged(tmp_path, tracked_run, capsys):
    uri = mlflow_log.default_uri(tracked_run.path.parent.parent)
    train(tiny_config(tmp_path, epochs=1, track="mlflow", track_uri=uri), argv=["pytest"])
    (logged,) = runs_of(mlflow_client(uri), tmp_path / "runs" / "tiny" / "v0001")
    assert f"logged to MLflow at {uri}: run {logged.info.run_id}" in capsys.readouterr().out


@pytest.mark.slow
def test_a_tracked_run_is_logged_at_its_end(tracked_run):
    assert (tracked_run.path.parent.parent / "mlflow.db").is_file()  # the default: a store in the runs root
    client = client_of(tracked_run)
    (logged,) = runs_of(client, tracked_run.path)
    assert logged.info.run_name == f"tiny/{tracked_run.version}" and logged.info.status == "FINISHED"
    assert logged.data.tags[mlflow_log.RUN_FOLDER_TAG] == str(tracked_run.path.resolve())

    config = tracked_run.config_dict()  # the parameters are the resolved config's values
    params = logged.data.params
    assert params["train.epochs"] == str(EPOCHS) and params["model.name"] == "tiny" and params["track"] == "mlflow"
    assert float(params["train.lr.base"]) == config["train"]["lr"]["base"]
    assert params["data.source"] == "synthetic" and params["data.augment"] == "[]" and params["track_uri"] == "null"
    assert params["run.dir"] == config["run"]["dir"]

    for name in ("loss", "top1"):  # one point per epoch, as metrics.csv has them
        history = client.get_metric_history(logged.info.run_id, name)
        assert sorted(point.step for point in history) == list(range(EPOCHS))
    figures = tracked_run.test_metrics()
    assert logged.data.metrics["test.top1"] == figures["top1"] and logged.data.metrics["test.loss"] == figures["loss"]

    files = {item.path for item in client.list_artifacts(logged.info.run_id)}
    assert {"config.yaml", "model.py", "notes.md", "test_metrics.json", "metrics.csv", "curves.png"} <= files
    # beside the store, not in MLflow's default ./mlruns of whatever folder the command ran in
    assert logged.info.artifact_uri.startswith((tracked_run.path.parent.parent / "mlartifacts" / "tiny").as_uri())


@pytest.mark.slow
def test_logging_into_a_new_store_says_one_line(tracked_run, tmp_path, capfd):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    assert runs.main(["log-to-mlflow", str(tracked_run.path), "--uri", uri]) == 0
    said = capfd.readouterr()
    lines = [line for line in (said.out + said.err).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].endswith(f" in {uri}"), lines  # not MLflow's table-creation lines too


@pytest.mark.slow
def test_logging_again_updates_the_same_mlflow_run(tracked_run, capsys):
    client = client_of(tracked_run)
    (before,) = runs_of(client, tracked_run.path)
    figures = tracked_run.test_metrics()
    tracked_run.write_json("test_metrics.json", {**figures, "by_view": {"flip": {"top1": 0.5}}})  # a later test
    assert runs.main(["log-to-mlflow", str(tracked_run.path)]) == 0
    assert before.info.run_id in capsys.readouterr().out
    (after,) = runs_of(client, tracked_run.path)
    assert after.info.run_id == before.info.run_id
    assert len(client.get_metric_history(after.info.run_id, "loss")) == EPOCHS  # no epoch twice
    assert after.data.metrics["test.by_view.flip.top1"] == 0.5


@pytest.mark.slow
def test_a_tune_trial_is_a_child_of_its_study_run(tracked_run, tmp_path):
    """A trial's run (its notes begin with the trial tag) nests under the study's run, one per study."""
    uri = mlflow_log.default_uri(tracked_run.path.parent.parent)  # the store exists: no new database to set up
    trials = []
    for number in (0, 1):
        folder = tmp_path / "studied" / f"v{900 + number}"  # experiment "studied"
        shutil.copytree(tracked_run.path, folder)
        config = (folder / "config.yaml").read_text()
        (folder / "config.yaml").write_text(config.replace("notes: a tiny test run",
                                                           f"notes: '{trial_tag('lr-study', number)}: lr=0.1'"))
        trials.append(mlflow_log.log_run(folder, uri))
    client = mlflow_client(uri)
    (study,) = [run for run in logged_runs(client, "studied") if run.info.run_name == "lr-study"]
    assert study.data.tags[mlflow_log.STUDY_TAG] == "lr-study"
    for run_id in trials:
        assert client.get_run(run_id).data.tags[mlflow_log.PARENT_TAG] == study.info.run_id
    assert len(logged_runs(client, "studied")) == 1 + 2  # the study and its two trials


@pytest.mark.slow
def test_the_mlflow_status_follows_the_folders(tracked_run, tmp_path):
    """Interrupted: KILLED; resumed: RUNNING again; finished: FINISHED."""
    folder = tmp_path / "followed" / "v0001"
    shutil.copytree(tracked_run.path, folder)
    uri = mlflow_log.default_uri(tracked_run.path.parent.parent)
    client = mlflow_client(uri)
    for status, expected in (("interrupted", "KILLED"), ("running", "RUNNING"), ("finished", "FINISHED")):
        runs.Run(folder).set_status(status)
        assert client.get_run(mlflow_log.log_run(folder, uri, files=False)).info.status == expected


@pytest.mark.slow
def test_workers_that_create_a_study_run_at_once_keep_one(tracked_run, monkeypatch):
    """Another worker's study run, not yet found when this one looked: this one's is deleted, the earlier kept."""
    client = client_of(tracked_run)
    experiment = mlflow_log.experiment_id(client, "raced", mlflow_log.default_uri(tracked_run.path.parent.parent))
    other = client.create_run(experiment, run_name="s", start_time=int(time.time() * 1000) - 1000,
                              tags={mlflow_log.STUDY_TAG: "s"}).info.run_id  # a second before this one's
    real_search, searches = client.search_runs, []

    def first_search_finds_nothing(*args, **kwargs):
        searches.append(args)
        return [] if len(searches) == 1 else real_search(*args, **kwargs)

    monkeypatch.setattr(client, "search_runs", first_search_finds_nothing)
    assert mlflow_log.study_run(client, experiment, "s") == other
    assert [run.info.run_id for run in real_search([experiment])] == [other]  # its own deleted
    assert mlflow_log.study_run(client, experiment, "s") == other


@pytest.mark.slow
def test_a_study_with_tracking_logs_its_trials_as_children(tmp_path):
    from shared.tune import tune

    summary = tune(tiny_config(tmp_path, epochs=1, track="mlflow", tune={
        "study": "s", "sampler": "random", "trials": 2, "prune": False,
        "space": {"train.lr.base": {"float": [0.01, 0.1]}}}), argv=["pytest"])
    client = mlflow_client(mlflow_log.default_uri(tmp_path / "runs"))
    logged = logged_runs(client)
    (study,) = [run for run in logged if run.info.run_name == "s"]
    children = [run for run in logged if run.data.tags.get(mlflow_log.PARENT_TAG) == study.info.run_id]
    assert sorted(run.info.run_name for run in children) == ["tiny/v0001", "tiny/v0002"]
    assert all(run.info.status == "FINISHED" for run in logged)  # the study's run too, at the study's end
    assert study.data.params["tune.trials"] == "2" and study.data.params["tune.sampler"] == "random"
    (best,) = summary["best"]
    assert study.data.metrics["best.top1"] == best["values"]["top1"]
    assert {item.path for item in client.list_artifacts(study.info.run_id)} == {
        Path(summary["plot"]).name, Path(best["config"]).name}


@pytest.mark.slow
def test_a_pruned_trial_ends_killed_in_mlflow(tmp_path, monkeypatch):
    import optuna

    from shared import tune as tune_module

    # Any loss is above -1: the trial is pruned after its first epoch (as tests/test_tune.py prunes one).
    monkeypatch.setattr(tune_module, "_make_pruner", lambda monitor: optuna.pruners.ThresholdPruner(upper=-1.0))
    tune_module.tune(tiny_config(tmp_path, track="mlflow", tune={
        "study": "p", "sampler": "random", "trials": 1, "objectives": [{"metric": "loss", "direction": "minimize"}],
        "space": {"train.lr.base": {"float": [0.01, 0.1]}}}))
    logged = logged_runs(mlflow_client(mlflow_log.default_uri(tmp_path / "runs")))
    (trial,) = [run for run in logged if run.info.run_name == "tiny/v0001"]
    assert trial.info.status == "KILLED" and len(trial.data.metrics) > 0


@pytest.mark.slow
def test_a_tracking_server_that_does_not_answer_is_one_warning(tracked_run, tmp_path, capsys):
    folder = tmp_path / "tiny" / "v0001"
    shutil.copytree(tracked_run.path, folder)
    (port,) = free_ports(1)
    started = time.monotonic()
    assert mlflow_log.track(folder, f"http://127.0.0.1:{port}") is None
    assert time.monotonic() - started < 20
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: the run was not logged to MLflow")
    assert f"log-to-mlflow {folder}" in lines[0]
    with pytest.raises(UserError, match=f"MLflow at http://127.0.0.1:{port} did not take run"):
        mlflow_log.log_command(folder, f"http://127.0.0.1:{port}")


def test_a_run_whose_tracking_fails_still_finishes(tmp_path, capsys):
    (port,) = free_ports(1)
    run = train(tiny_config(tmp_path, track="mlflow", track_uri=f"http://127.0.0.1:{port}"), argv=["pytest"])
    assert run.status()["status"] == "finished" and run.test_metrics()["top1"] >= 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "MLflow" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: epoch 1 was not logged to MLflow")  # once a run


class FailAtSecondEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if epoch == 1:
            raise RuntimeError("a failure in the second epoch")


@pytest.mark.slow
def test_a_run_that_fails_ends_failed_in_mlflow(tracked_run, tmp_path):
    uri = mlflow_log.default_uri(tracked_run.path.parent.parent)  # the store exists: no new database to set up
    with pytest.raises(RuntimeError, match="second epoch"):
        train(tiny_config(tmp_path, track="mlflow", track_uri=uri), argv=["pytest"], callbacks=[FailAtSecondEpoch()])
    folder = (tmp_path / "runs" / "tiny" / "v0001").resolve()
    (logged,) = runs_of(mlflow_client(uri), folder)
    assert logged.info.status == "FAILED" and logged.data.metrics["loss"] > 0  # its first epoch logged


@pytest.mark.slow
def test_without_the_extra_tracking_is_refused_in_one_line(tmp_path, tracked_run, monkeypatch):
    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(UserError, match=r"pip install -e '\.\[mlflow\]'") as error:
        mlflow_log.log_run(tracked_run.path)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"\.\[mlflow\]"):  # before any run folder exists
        train(tiny_config(tmp_path, track="mlflow"), argv=["pytest"])
    assert not (tmp_path / "runs" / "tiny").exists()


def test_track_is_mlflow_or_null(tmp_path):
    assert tiny_config(tmp_path).track is None and tiny_config(tmp_path, track=None).track is None  # `track: null`
    with pytest.raises(UserError, match="config key track is 'wandb'; choose one of mlflow"):
        tiny_config(tmp_path, track="wandb")


def test_the_trial_note_is_read_as_the_tuner_writes_it():
    assert mlflow_log._study_of({"run": {"notes": f"{trial_tag('resnet-tune', 12)}: lr=0.1\n\nwhy"}}) == "resnet-tune"
    assert mlflow_log._study_of({"run": {"notes": "a run that mentions tune study x trial 1: later"}}) is None
