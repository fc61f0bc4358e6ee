"""Two real processes at once: tune workers sharing a new study, exports into one folder, shard writers
into one output folder. Each test starts both processes before either can finish."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import REPO, tiny_tree

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}

TINY_MODEL = '''
import keras
from keras import layers


def build(num_classes: int = 10, input_shape: tuple = (16, 16, 3), width: int = 4) -> keras.Model:
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(width, 3, strides=2, activation="relu", name="conv")(inputs)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(num_classes, activation="softmax", name="predictions")(x))
'''


def together(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Start every command, then wait for all: they race from the first line."""
    started = [subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for command in commands]
    results = []
    for process, command in zip(started, commands):
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return results


@pytest.mark.parametrize("sampler, trials", [("random", 4), ("grid", 3)])
def test_two_tune_workers_share_a_new_study(tmp_path, sampler, trials):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "model.py").write_text(TINY_MODEL)
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 1}, data={"synthetic_train": 64, "synthetic_test": 32})
    tree["model"] = {"name": "tiny", "path": str(tmp_path / "tiny"), "width": 4}
    # Random: three values, four trials, so the workers meet values another one has or is training.
    # Grid: the workers must agree on which point each stored grid id is.
    tree["tune"] = {"study": "shared", "sampler": sampler, "trials": trials,
                    "space": {"train.lr.base": {"choice": [0.01, 0.05, 0.1]}}}
    recipe = tmp_path / "tune.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    command = [sys.executable, "-m", "shared.runner", "tune", "--config", str(recipe)]

    first, second = together(command, command)  # a new database: both create the tables and the study
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]

    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'runs' / 'tuning.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * trials  # no more than asked in all
    assert study.user_attrs["workers"] == 2
    trained = [t for t in study.trials if "same_as" not in t.user_attrs]
    values = [t.params["train.lr.base"] for t in trained]
    assert len(values) == len(set(values))  # no values trained twice
    if sampler == "grid":
        assert sorted(values) == [0.01, 0.05, 0.1]
    runs = sorted((tmp_path / "runs" / "tiny").iterdir())
    assert sorted(str(r) for r in runs) == sorted(t.user_attrs["run"] for t in trained)
    for trial in study.trials:
        if "same_as" in trial.user_attrs:
            assert trial.params == study.trials[trial.user_attrs["same_as"]].params
