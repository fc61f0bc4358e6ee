"""shared.tune: search-space parsing, grid / NSGA-II studies of tiny runs, resuming, pruning."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from shared import tune as tune_module
from shared.classification.task import ClassificationTask
from shared.tuning import trial as tune_trial
from shared.tuning.metrics import (Objective, TrialFailed, check_metric_needs, monitored_names, parse_constraints,
                                   parse_objectives)
from shared.tuning.space import grid_values, parse_space
from shared.tuning.storage import open_storage, storage_url, study_name
from shared.config import load_config
from shared.errors import UserError
from shared.runs import Run, all_runs
from shared.task import Measure

from conftest import REPO, tiny_tree

# One convolution: a trial trains in about two seconds, where the tiny ResNet takes ten.
TINY_MODEL = '''
import keras
from keras import layers


def build(num_classes: int = 10, input_shape: tuple = (16, 16, 3), width: int = 4) -> keras.Model:
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(width, 3, strides=2, activation="relu", name="conv")(inputs)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="tiny")
'''


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_model")
    (folder / "model.py").write_text(TINY_MODEL)
    return folder


def study_config(tmp_path: Path, tiny_model: Path, **tune):
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 1},
                     data={"synthetic_train": 64, "synthetic_test": 32})
    tree["model"] = {"name": "tiny", "path": str(tiny_model), "width": 4}
    tree["tune"] = tune
    return load_config(tree=tree)


def stored_study(config, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage_url(config))


# ---------------------------------------------------------------- parsing


def test_space_entries_become_distributions(tmp_path, tiny_model):
    config = study_config(tmp_path, tiny_model)
    space = parse_space({
        "model.width": {"choice": [2, 4, 8]},
        "train.batch_size": {"int": [16, 64], "step": 16},
        "train.lr.base": {"float": [1e-3, 0.3], "log": True},
        "train": {"label_smoothing": {"float": [0, 0.2]}},  # nested, as --set tune.space.train... writes it
    }, config)
    assert list(space) == ["model.width", "train.batch_size", "train.lr.base", "train.label_smoothing"]
    assert space["model.width"] == CategoricalDistribution([2, 4, 8])
    assert space["train.batch_size"] == IntDistribution(16, 64, step=16)
    assert space["train.lr.base"] == FloatDistribution(1e-3, 0.3, log=True)
    assert grid_values(space["train.batch_size"]) == [16, 32, 48, 64]
    assert grid_values(space["train.lr.base"]) is None


def test_the_example_search_space_parses():
    config = load_config(REPO / "models" / "resnet" / "tune.yaml")
    space = parse_space(config.tune.space, config)
    assert {"train.lr.base", "model.width", "train.weight_decay"} <= set(space)
    assert [o.metric for o in parse_objectives(config)] == ["top1", "params"]
    assert config.tune.sampler == "nsga2" and study_name(config) == "resnet-tune"
    quick = load_config(REPO / "models" / "resnet" / "tune_quick.yaml")  # the main job's own study
    assert "train.epochs" in parse_space(quick.tune.space, quick)
    assert [o.metric for o in parse_objectives(quick)] == ["top1", "train_seconds"]
    assert parse_constraints(quick) == {"train_seconds": 300.0}
    kernels = load_config(REPO / "models" / "resnet" / "tune_quick_kernels.yaml")  # the study behind quick.yaml
    space = parse_space(kernels.tune.space, kernels)
    assert {key: grid_values(value) for key, value in space.items()} == {"train.jit_compile": [True, False],
                                                                        "train.epochs": [6, 7]}
    assert kernels.tune.sampler == "grid" and kernels.tune.trials == 4
    base = load_config(REPO / "models" / "resnet" / "quick.yaml")  # its pick, trial 1, is the main job
    assert (base.train.epochs, base.train.jit_compile) == (7, False)
    assert (kernels.train.lr.base, kernels.train.label_smoothing, kernels.train.weight_decay) == \
        (base.train.lr.base, base.train.label_smoothing, base.train.weight_decay)


@pytest.mark.parametrize("space, message", [
    ({"train.lr.bsae": {"float": [0.01, 0.1]}}, "did you mean train.lr.base?"),
    ({"model.widht": {"choice": [2, 4]}}, "did you mean model.width?"),
    ({"train.batch_size": {"choice": [32, "big"]}}, "train.batch_size"),  # a value of the wrong type
    ({"data.val_fraction": {"float": [0.1, 1.5]}}, "data.val_fraction"),  # an end out of range
    ({"model.width": {"choice": []}}, "non-empty list"),
    ({"train.lr.base": {"float": [0.1, 0.01]}}, "low < high"),
    ({"train.epochs": {"int": [3, 3]}}, "low < high"),
    ({"train.lr.base": {"float": [0.0, 0.1], "log": True}}, "log range must start above 0"),
    ({"train.lr.base": {"chioce": [0.1]}}, "did you mean choice?"),
    ({"train.lr.base": {"float": [0.01, 0.1], "lg": True}}, "'lg' does not go with float"),
    ({"train.lr.base": 0.1}, "write a spec"),
    ({"tune.trials": {"choice": [1, 2]}}, "cannot be searched"),
    ({}, "tune.space is empty"),
])
def test_bad_spaces_are_one_line_user_errors(tmp_path, tiny_model, space, message):
    config = study_config(tmp_path, tiny_model)
    with pytest.raises(UserError, match=message.replace("?", r"\?").replace("(", r"\(")) as caught:
        parse_space(space, config)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("tune, message", [
    ({"sampler": "grid", "space": {"train.lr.base": {"float": [0.01, 0.1]}}}, "grid needs finite values"),
    ({"objectives": [{"metric": "val_loss", "direction": "minimize"}]}, "needs a validation split"),
    ({"objectives": [{"metric": "top-1", "direction": "maximize"}]}, "did you mean top1?"),
    ({"objectives": [{"metric": "top1", "direction": "maximise"}]}, "did you mean maximize?"),
    ({"constraints": {"latency": 5.0}}, "did you mean latency_ms?"),
])
def test_bad_studies_fail_before_anything_runs(tmp_path, tiny_model, tune, message):
    config = study_config(tmp_path, tiny_model, **{"space": {"train.lr.base": {"choice": [0.01, 0.1]}}, **tune})
    with pytest.raises(UserError, match=message.replace("?", r"\?")):
        tune_module.tune(config)
    assert not (tmp_path / "runs").exists()  # no database, no run folder


def test_a_study_optimizes_what_its_task_measures_in_the_measures_sense(tmp_path, tiny_model, monkeypatch):
    config = study_config(tmp_path, tiny_model, objectives=["top1", "loss", "params"])
    assert [o.direction for o in parse_objectives(config)] == ["maximize", "minimize", "minimize"]
    # the direction and the metrics on offer come from the task's declared measures, not a table of their own
    measures = {"top1": Measure("top1", False), "loss": Measure("loss", False)}
    monkeypatch.setattr(ClassificationTask, "measures", measures)
    assert parse_objectives(config)[0] == Objective("top1", "minimize")
    config = study_config(tmp_path, tiny_model, objectives=["map"], space={"train.lr.base": {"choice": [0.01, 0.1]}})
    with pytest.raises(UserError, match="metric map is not measured for task: classification; choose from top1, loss, "
                                        "params"):
        tune_module.tune(config)


def test_a_test_view_and_the_runs_time_are_metrics_a_study_may_optimize(tmp_path, tiny_model):
    config = study_config(tmp_path, tiny_model, objectives=["top1@10crop", "loss@flip", "train_seconds"])
    assert parse_objectives(config) == [Objective("top1@10crop", "maximize"), Objective("loss@flip", "minimize"),
                                        Objective("train_seconds", "minimize")]
    space = {"space": {"train.lr.base": {"choice": [0.01, 0.1]}}}
    for objectives, message in ((["top1@flp"], r"did you mean top1@flip\?"),
                                (["val_loss@flip"], r"did you mean loss@flip\?"),  # views apply to test figures
                                (["train_second"], r"did you mean train_seconds\?")):
        with pytest.raises(UserError, match=message):
            tune_module.tune(study_config(tmp_path, tiny_model, objectives=objectives, **space))
    # a task without test views refuses a figure through one, naming what it measures
    detection = load_config(tree={**tiny_tree(tmp_path / "runs"), "task": "detection",
                                  "tune": {"objectives": ["map"]}})
    with pytest.raises(UserError, match="metric top1@flip is not measured for task: detection"):
        check_metric_needs(detection, {"top1@flip"}, {})
    # a figure through a view follows its single-view figure from epoch to epoch
    measures = {"top1": Measure("top1", True)}
    assert monitored_names("top1@10crop", measures, validating=False) == ("top1", "predictions_top1")
    assert monitored_names("train_seconds", measures, validating=False) is None


@pytest.mark.slow
def test_a_trial_is_judged_by_its_run_tested_through_a_view_and_by_its_time(tmp_path, tiny_model):
    config = study_config(tmp_path, tiny_model, sampler="random", trials=1, objectives=["top1@flip", "train_seconds"],
                          space={"train.lr.base": {"choice": [0.05]}})
    tune_module.tune(config)
    (trial,) = stored_study(config, "tiny-tune").get_trials(states=(TrialState.COMPLETE,))
    recorded = Run(Path(trial.user_attrs["run"])).test_metrics()
    assert trial.values == [recorded["by_view"]["flip"]["top1"], recorded["train_seconds"]]
    assert recorded["views"] == "center" and recorded["train_seconds"] > 0  # the run's own figures stay


@pytest.mark.slow
def test_the_tune_command_prints_the_best_trial_once(tmp_path, tiny_model, capsys):
    from shared import runner

    tree = tiny_tree(tmp_path / "runs", train={"epochs": 1}, data={"synthetic_train": 64, "synthetic_test": 32})
    tree["model"] = {"name": "tiny", "path": str(tiny_model), "width": 4}
    tree["tune"] = {"sampler": "random", "trials": 1, "objectives": ["top1"],
                    "space": {"train.lr.base": {"choice": [0.05]}}}
    recipe = tmp_path / "study.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    assert runner.main(["tune", "--config", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert out.count("best trial:") == 1 and out.count("plot: ") == 1 and out.count("trial 0 config: ") == 1


def test_a_measure_is_pruned_on_under_its_own_name():
    measures = {"map": Measure("mAP", True), "val_loss": Measure(None, False)}
    assert monitored_names("map", measures, validating=True) == ("val_map", "val_predictions_map")
    assert monitored_names("map", measures, validating=False) == ("map", "predictions_map")
    assert monitored_names("val_loss", measures, validating=False) == ("val_loss", "val_predictions_loss")
    assert monitored_names("latency_ms", measures, validating=True) is None


def test_pruning_callback_reports_and_prunes():
    class FakeTrial:
        def __init__(self):
            self.reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return len(self.reported) == 2

    trial = FakeTrial()
    callback = tune_trial.pruning_callback(trial, monitored_names("top1", ClassificationTask.measures, validating=True))
    callback.on_epoch_end(0, {"loss": 1.0, "val_predictions_top1": 0.5})  # a model with auxiliary heads
    with pytest.raises(optuna.TrialPruned, match="after epoch 2"):
        callback.on_epoch_end(1, {"val_top1": 0.25})
    assert trial.reported == [(0, 0.5), (1, 0.25)]
    assert monitored_names("params", ClassificationTask.measures, validating=True) is None  # no per-epoch value


# ---------------------------------------------------------------- studies


@pytest.mark.slow
def test_grid_study_runs_every_point_and_resumes(tmp_path, tiny_model, capsys):
    space = {"train.lr.base": {"choice": [0.01, 0.05, 0.2]}}
    config = study_config(tmp_path, tiny_model, study="grid", sampler="grid", trials=2, space=space)
    first = tune_module.tune(config, argv=["pytest"])
    assert first["trials"]["complete"] == 2
    # The same command with more trials resumes: only the missing one runs, capped at the grid's 3.
    config = study_config(tmp_path, tiny_model, study="grid", sampler="grid", trials=5, space=space)
    tune_module.tune(config, argv=["pytest"])
    assert "the grid has 3 points; running 3" in capsys.readouterr().out
    result = tune_module.tune(config, argv=["pytest"])  # finished: runs nothing, reports again
    assert "3 of 3 trials done or running, running 0 more" in capsys.readouterr().out

    study = stored_study(config, "grid")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(study.trials) == len(complete) == 3
    assert sorted(t.params["train.lr.base"] for t in complete) == [0.01, 0.05, 0.2]
    runs = all_runs(tmp_path / "runs", "tiny")
    assert len(runs) == 3 and all(r.status()["status"] == "finished" for r in runs)
    assert sorted(t.user_attrs["run"] for t in complete) == sorted(str(r.path) for r in runs)
    for trial in complete:
        run = Run(Path(trial.user_attrs["run"]))
        note = f"tune study grid trial {trial.number}: train.lr.base={trial.params['train.lr.base']}"
        assert note in (run.path / "notes.md").read_text()
        recorded = run.config_dict()
        assert note in recorded["run"]["notes"] and recorded["train"]["lr"]["base"] == trial.params["train.lr.base"]
        assert trial.values[0] == run.test_metrics()["top1"]

    assert [b["trial"] for b in result["best"]] == [study.best_trial.number]
    assert (tmp_path / "runs" / "grid-history.png").read_bytes()[:4] == b"\x89PNG"
    best = load_config(result["best"][0]["config"])
    assert best.train.lr.base == study.best_trial.params["train.lr.base"] and best.tune.space == {}


@pytest.mark.slow
def test_nsga2_study_gives_a_pareto_front(tmp_path, tiny_model, capsys):
    bound = 100.0  # 3x3x3xw+w (conv) + wx4+4 (4 classes) = 32w+4: widths 1 (36) and 2 (68) fit, 4 (132) not
    config = study_config(
        tmp_path, tiny_model, sampler="nsga2", trials=4,
        objectives=[{"metric": "top1", "direction": "maximize"}, {"metric": "params", "direction": "minimize"}],
        constraints={"params": bound},
        space={"model.width": {"choice": [1, 2, 4]}, "train.lr.base": {"float": [0.01, 0.3], "log": True}})
    result = tune_module.tune(config, argv=["pytest"])
    out = capsys.readouterr().out
    assert "Pareto front" in out and "top1 (max)" in out and "params (min)" in out
    assert result["study"] == "tiny-tune"  # <model>-tune for a config built in code

    study = stored_study(config, "tiny-tune")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len([t for t in complete if "same_as" not in t.user_attrs]) == 4  # a proposal again does not count
    for trial in complete:
        params = 32 * trial.params["model.width"] + 4
        assert trial.values[1] == params
        assert trial.constraints == {"params": params - bound}
    # NSGA-II may propose a point again: its figures are reused, not trained a second time.
    repeats = [t for t in complete if "same_as" in t.user_attrs]
    for trial in repeats:
        earlier = study.trials[trial.user_attrs["same_as"]]
        assert earlier.params == trial.params and earlier.user_attrs["run"] == trial.user_attrs["run"]
    assert len(all_runs(tmp_path / "runs", "tiny")) == 4
    front = {t.number for t in study.best_trials if "same_as" not in t.user_attrs}
    assert front and {b["trial"] for b in result["best"]} == front
    assert all(t.values[1] <= bound for t in study.best_trials)  # infeasible trials are never best
    assert result["plot"] == tmp_path / "runs" / "tiny-tune-pareto.png"
    assert result["plot"].read_bytes()[:4] == b"\x89PNG"
    for best in result["best"]:
        assert best["config"] == tmp_path / "runs" / "tune" / "tiny-tune" / f"trial-{best['trial']}.yaml"
        recipe = load_config(best["config"])
        assert recipe.model.hparams["width"] == best["params"]["model.width"]
        assert recipe.train.lr.base == pytest.approx(best["params"]["train.lr.base"])
        assert f"trial {best['trial']}" in recipe.run.notes
        assert "tune" not in yaml.safe_load(best["config"].read_text())
        assert str(best["run"]) in out


@pytest.mark.slow  # a study of five proposals in SQLite, with its locks
def test_proposals_of_measured_values_do_not_count_and_a_sampler_stuck_on_them_ends_the_study(
        tmp_path, monkeypatch, capsys):
    """run_trials' count (shared.tuning.trial's objective marks a reused trial `same_as`, as this one does)."""
    from shared.locks import FileLock

    monkeypatch.setattr(tune_module, "REPEATS_IN_A_ROW", 5)
    sampler = optuna.samplers.PartialFixedSampler({"x": 1}, optuna.samplers.RandomSampler(seed=0))  # stuck on 1
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'studies.db'}", study_name="s", sampler=sampler)
    for x in (1, 1, 1, 2, 3):  # as a small NSGA-II population proposes its best parent again and again
        study.enqueue_trial({"x": x})

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_categorical("x", [1, 2, 3])
        earlier = next((t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                        if t.params == {"x": x}), None)
        if earlier is not None:
            trial.set_user_attr("same_as", earlier.number)
            return earlier.value
        return float(x)

    lock = FileLock(tmp_path / "studies.lock")
    tune_module.run_trials(study, objective, wanted=3, most_failed=3, lock=lock)
    assert [t.params["x"] for t in study.trials] == [1, 1, 1, 2, 3]  # three trained: two reuses did not count
    assert tune_module._counted_trials(study) == 3
    assert "ending" not in capsys.readouterr().out

    tune_module.run_trials(study, objective, wanted=4, most_failed=1, lock=lock)  # only 1 is proposed now
    assert [t.params["x"] for t in study.trials] == [1, 1, 1, 2, 3] + [1] * 5
    assert capsys.readouterr().out == ("study s: the last 5 trials proposed values already measured; ending with "
                                       "3 of 4 trials trained\n")


@pytest.mark.slow
def test_a_space_of_fewer_points_than_trials_trains_each_point_once(tmp_path, tiny_model, capsys):
    config = study_config(tmp_path, tiny_model, study="few", sampler="random", trials=5,
                          space={"train.lr.base": {"choice": [0.05]}, "train.epochs": {"int": [1, 2]}})
    result = tune_module.tune(config)
    assert "note: tune.trials is 5 but the space has 2 points; running 2" in capsys.readouterr().out
    trained = [t for t in stored_study(config, "few").trials if "same_as" not in t.user_attrs]
    assert sorted(t.params["train.epochs"] for t in trained) == [1, 2]
    assert len(all_runs(tmp_path / "runs", "tiny")) == 2 and result["best"]


@pytest.mark.slow
def test_a_pruned_trial_marks_its_run(tmp_path, tiny_model, monkeypatch):
    # Any loss is above -1: the trial is pruned after its first epoch.
    monkeypatch.setattr(tune_module, "_make_pruner", lambda monitor: optuna.pruners.ThresholdPruner(upper=-1.0))
    config = study_config(tmp_path, tiny_model, study="pruned", sampler="random", trials=1,
                          objectives=[{"metric": "loss", "direction": "minimize"}],
                          space={"train.lr.base": {"float": [0.01, 0.1]}})
    result = tune_module.tune(config)
    assert result["best"] == [] and result["trials"]["pruned"] == 1 and result["plot"] is None
    (trial,) = stored_study(config, "pruned").trials
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]
    status = Run(Path(trial.user_attrs["run"])).status()
    assert status["status"] == "pruned" and "pruned after epoch 1" in status["reason"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask, standing in for a dead worker
def test_a_trial_left_running_by_a_killed_process_is_run_again(tmp_path, tiny_model):
    config = study_config(tmp_path, tiny_model, study="killed", sampler="random", trials=1,
                          space={"train.lr.base": {"choice": [0.01, 0.05]}},
                          heartbeat_seconds=1)  # stale after 2 s instead of 2 minutes
    # What a process killed mid-trial leaves behind: a RUNNING trial whose heartbeat stopped.
    storage = open_storage(storage_url(config), heartbeat_seconds=1)
    study = optuna.create_study(storage=storage, study_name="killed", direction="maximize")
    dead = study.ask({"train.lr.base": CategoricalDistribution([0.01, 0.05])})
    storage.record_heartbeat(dead._trial_id)
    time.sleep(3.5)  # SQLite's clock has whole seconds

    result = tune_module.tune(config)
    trials = stored_study(config, "killed").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == dead.params and trials[1].system_attrs["failed_trial"] == 0
    assert result["trials"]["complete"] == 1 and len(all_runs(tmp_path / "runs", "tiny")) == 1


def test_a_resumed_study_must_keep_its_objectives(tmp_path, tiny_model):
    config = study_config(tmp_path, tiny_model, study="mixed", space={"train.lr.base": {"choice": [0.01, 0.1]}})
    url = storage_url(config)
    study = optuna.create_study(storage=open_storage(url), study_name="mixed", direction="minimize")
    with pytest.raises(UserError, match=r"optimizes minimize, not top1 \(max\); set tune.study"):
        tune_module.tune(config)
    assert not (tmp_path / "runs" / "tiny").exists()
    # Same direction, another metric: the study remembers what it was created for.
    tune_module._check_same_objectives(study, [Objective("loss", "minimize")], url)
    with pytest.raises(UserError, match=r"optimizes loss \(min\), not val_loss \(min\)"):
        tune_module._check_same_objectives(study, [Objective("val_loss", "minimize")], url)


@pytest.mark.slow
def test_tflite_size_and_latency_objectives(tmp_path, tiny_model):
    config = study_config(tmp_path, tiny_model, study="lite", sampler="random", trials=1,
                          objectives=[{"metric": "tflite_int8_mb", "direction": "minimize"}],
                          constraints={"latency_ms": 1000.0},
                          space={"model.width": {"choice": [2, 4]}})
    result = tune_module.tune(config)
    (trial,) = stored_study(config, "lite").trials
    metrics = trial.user_attrs["metrics"]
    tflite_file = Path(trial.user_attrs["run"]) / "export" / "model_int8.tflite"
    assert metrics["tflite_int8_mb"] == pytest.approx(tflite_file.stat().st_size / 1e6)
    assert 0 < metrics["latency_ms"] < 1000 and trial.constraints == {"latency_ms": metrics["latency_ms"] - 1000}
    assert result["best"][0]["values"] == {"tflite_int8_mb": metrics["tflite_int8_mb"]}


@pytest.mark.slow
def test_values_another_worker_is_training_are_waited_for_and_reused(tmp_path, tiny_model, monkeypatch):
    import threading

    monkeypatch.setattr(tune_trial, "WAIT_S", 0.1)
    config = study_config(tmp_path, tiny_model, study="twins", sampler="random", trials=2,
                          space={"train.lr.base": {"choice": [0.05, 0.01]}})
    # Another worker's trial, training 0.05: RUNNING, its values claimed; our first trial proposes them too.
    storage = open_storage(storage_url(config))
    study = optuna.create_study(storage=storage, study_name="twins", direction="maximize")
    tune_module._check_same_objectives(study, parse_objectives(config), storage_url(config))
    study.enqueue_trial({"train.lr.base": 0.05})  # what `ask` takes: the value is not drawn
    other = study.ask({"train.lr.base": CategoricalDistribution([0.05, 0.01])})
    other.set_user_attr(tune_trial.CLAIM, True)
    assert other.params == {"train.lr.base": 0.05}
    storage.record_heartbeat(other._trial_id)
    study.enqueue_trial({"train.lr.base": 0.05})

    def other_worker_finishes():
        time.sleep(3.0)  # long after our trial has started waiting
        other.set_user_attr("run", "runs/tiny/v0042")
        other.set_user_attr("metrics", {"top1": 0.5})
        study.tell(other, 0.5)

    finishing = threading.Thread(target=other_worker_finishes)
    finishing.start()
    result = tune_module.tune(config)
    finishing.join()
    trials = stored_study(config, "twins").trials
    assert {t.state for t in trials} == {TrialState.COMPLETE} and result["trials"]["complete"] == len(trials)
    assert trials[1].user_attrs["same_as"] == 0 and trials[1].user_attrs["run"] == "runs/tiny/v0042"
    assert trials[1].values == [0.5]
    # the reuse counted for nothing: the study went on to train the other value, and nothing twice
    trained = [t for t in trials if "same_as" not in t.user_attrs]
    assert [t.params["train.lr.base"] for t in trained] == [0.05, 0.01]
    assert [str(run.path) for run in all_runs(tmp_path / "runs", "tiny")] == [trained[1].user_attrs["run"]]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask, standing in for a worker that dies
def test_a_trial_waiting_for_a_worker_that_died_trains_the_values_itself(tmp_path, tiny_model, monkeypatch,
                                                                       capsys):
    monkeypatch.setattr(tune_trial, "WAIT_S", 0.2)
    config = study_config(tmp_path, tiny_model, study="orphan", sampler="random", trials=2,
                          space={"train.lr.base": {"choice": [0.05, 0.01]}},
                          heartbeat_seconds=1)  # stale after 2 s instead of 2 minutes
    storage = open_storage(storage_url(config), heartbeat_seconds=1)
    study = optuna.create_study(storage=storage, study_name="orphan", direction="maximize")
    study.enqueue_trial({"train.lr.base": 0.05})  # what `ask` takes: the value is not drawn
    dead = study.ask({"train.lr.base": CategoricalDistribution([0.05, 0.01])})
    dead.set_user_attr(tune_trial.CLAIM, True)
    assert dead.params == {"train.lr.base": 0.05}
    storage.record_heartbeat(dead._trial_id)  # its last beat: the worker dies now, mid-training
    study.enqueue_trial({"train.lr.base": 0.05})  # our first trial proposes the dead one's values

    result = tune_module.tune(config)
    assert "trial 1: trial 0 is training the same values; waiting for its figures" in capsys.readouterr().out
    trials = stored_study(config, "orphan").trials
    # Ours waited, saw the dead trial fail, trained the values; the dead one's retry reused ours.
    assert trials[0].state == TrialState.FAIL and {t.state for t in trials[1:]} == {TrialState.COMPLETE}
    assert "same_as" not in trials[1].user_attrs and trials[2].user_attrs["same_as"] == 1
    trained = [t for t in trials[1:] if "same_as" not in t.user_attrs]
    assert sorted(t.params["train.lr.base"] for t in trained) == [0.01, 0.05]
    assert result["trials"]["complete"] == len(trials) - 1 and len(all_runs(tmp_path / "runs", "tiny")) == 2


@pytest.mark.slow
def test_a_study_whose_trials_all_fail_stops(tmp_path, tiny_model, monkeypatch):
    def broken(run, wanted):
        raise TrialFailed(f"run {run.path}: diverged")

    monkeypatch.setattr(tune_trial, "measure", broken)
    config = study_config(tmp_path, tiny_model, study="failing", sampler="random", trials=2,
                          space={"train.lr.base": {"choice": [0.01, 0.05]}})
    result = tune_module.tune(config)  # failed trials do not count towards tune.trials, nor run forever
    assert [t.state for t in stored_study(config, "failing").trials] == [TrialState.FAIL, TrialState.FAIL]
    assert result["best"] == [] and result["trials"]["fail"] == 2
