"""`size` and `tune` on detection runs: the size report of a tiny detector (parameters, multiply-adds, the
TFLite file the detection export writes and its LiteRT latency), and a two-trial study with mAP@.5 and
LiteRT latency as objectives."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from shared import runner, runs
from shared import tune as tune_module
from shared.tuning.storage import storage_url
from shared.config import load_config
from shared.errors import UserError
from shared.fashion_mnist import FASHION_MNIST_DIRS
import test_detection_runner
from conftest import tiny_backbone
from test_detection_runner import SIZE

REPO = Path(__file__).resolve().parent.parent
generated = test_detection_runner.generated  # the tiny canvas set fixture, shared with the runner tests
TINY = ["model.width=4", "detection.fpn_channels=8", "detection.head_depth=1", "train.batch_size=8",
        "train.epochs=1", f"data.image_size={SIZE}", "detection.score_threshold=0.0", "train.verbose=0"]

pytestmark = pytest.mark.skipif(not (Path(FASHION_MNIST_DIRS[0]) / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST IDX files not installed")


def overrides(generated: Path, runs_dir: Path) -> list[str]:
    return [*TINY, tiny_backbone(runs_dir.parent), f"run.dir={runs_dir}", f"data.path={generated / 'images'}",
            f"detection.train_annotations={generated / 'annotations' / 'train.json'}",
            f"detection.test_annotations={generated / 'annotations' / 'test.json'}"]


def detection_config(generated: Path, runs_dir: Path, **tune):
    """The tiny detection recipe with `tune` keys given as --set overrides (YAML values)."""
    return load_config(REPO / "models" / "resnet" / "detect.yaml",
                       [*overrides(generated, runs_dir), *(f"tune.{key}={value}" for key, value in tune.items())])


@pytest.fixture(scope="module")
def study(generated, tmp_path_factory):
    """The two-trial detection study (model.width 2 and 4 of the tiny recipe), run once: its config and result.
    Its trials are the tiny detection runs the size report measures too (a copy: `size` writes into the run)."""
    config = detection_config(generated, tmp_path_factory.mktemp("study") / "runs", study="det", sampler="grid",
                              trials=2, objectives="[{metric: map50, direction: maximize}, {metric: latency_ms}]",
                              constraints="{latency_ms: 1000.0}", space="{model.width: {choice: [2, 4]}}")
    return config, tune_module.tune(config)


@pytest.mark.slow
def test_size_of_a_detection_run(study, tmp_path, capsys):
    import shutil

    config, _ = study
    trials = optuna.load_study(study_name="det", storage=storage_url(config)).trials
    (trained,) = [Path(t.user_attrs["run"]) for t in trials if t.params["model.width"] == 4]
    run_dir = tmp_path / "tiny_backbone" / "v0001"
    shutil.copytree(trained, run_dir)
    assert runs.Run(run_dir).status()["status"] == "finished"
    capsys.readouterr()
    assert runner.main(["size", "--run", str(run_dir)]) == 0
    assert "| tflite float32 |" in capsys.readouterr().out
    report = json.loads((run_dir / "size.json").read_text())
    assert report["task"] == "detection" and report["input_shape"] == [SIZE, SIZE, 1]
    assert report["multiply_adds"] > report["trainable_parameters"] > 0
    assert report["formats"]["keras"]["latency_ms"] > 0
    for name in ("tflite float32", "tflite float16", "tflite dynamic"):
        entry = report["formats"][name]
        path = run_dir / entry["path"]
        assert path.name.startswith("detector_") and entry["bytes"] == path.stat().st_size > 0, name
        assert entry["latency_ms"] > 0, name
    assert report["formats"]["tflite float16"]["bytes"] < report["formats"]["tflite float32"]["bytes"]
    assert (run_dir / "size.md").read_text().startswith("# Size of tiny_backbone")


def test_classification_metrics_are_refused_for_detection_before_training(generated, tmp_path):
    config = detection_config(generated, tmp_path / "runs", objectives="[{metric: top1, direction: maximize}]",
                              space="{model.width: {choice: [2, 4]}}")
    with pytest.raises(UserError, match="metric top1 is not measured for task: detection; choose from map, map50"):
        tune_module.tune(config)
    assert not (tmp_path / "runs" / "tiny_backbone").exists()


@pytest.mark.slow
def test_a_detection_study_with_map50_and_latency(study):
    config, result = study
    study = optuna.load_study(study_name="det", storage=storage_url(config))
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 2 and {t.params["model.width"] for t in complete} == {2, 4}
    for trial in complete:
        run = runs.Run(Path(trial.user_attrs["run"]))
        metrics = trial.user_attrs["metrics"]
        assert metrics["map50"] == run.test_metrics()["mAP50"]
        assert 0 < metrics["latency_ms"] < 1000
        assert trial.values == [metrics["map50"], metrics["latency_ms"]]
    assert result["best"] and {b["trial"] for b in result["best"]} == {t.number for t in study.best_trials}
