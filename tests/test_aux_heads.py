"""Models with auxiliary classifiers (GoogLeNet's kind): trained with weighted auxiliary losses,
tested and exported without them."""

import json

import pytest

from shared.config import load_config
from shared.lifecycle import test as evaluate
from shared.lifecycle import train

from conftest import tiny_tree

AUX_MODEL = '''
import keras
from keras import layers

AUX_LOSS_WEIGHTS = {"aux": 0.3}


def build(num_classes=10, input_shape=(16, 16, 3), aux_heads: bool = True):
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(8, 3, activation="relu")(inputs)
    side = layers.Dense(num_classes, activation="softmax", name="aux")(layers.GlobalAveragePooling2D()(x))
    x = layers.Conv2D(8, 3, activation="relu")(x)
    main = layers.Dense(num_classes, activation="softmax", name="predictions")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, {"predictions": main, "aux": side} if aux_heads else main)
'''


@pytest.mark.slow
def test_aux_heads_are_trained_with_their_weight_and_dropped_for_testing(tmp_path):
    folder = tmp_path / "auxnet"
    folder.mkdir()
    (folder / "model.py").write_text(AUX_MODEL)
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 1})
    tree["model"] = {"name": "auxnet", "path": str(folder)}
    run = train(load_config(tree=tree), draw=False)  # the figures are drawn by evaluate (test --run) below
    header = (run.path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "aux_loss" in header and "predictions_top1" in header  # both heads trained, classifier scored
    recorded = json.loads((run.path / "test_metrics.json").read_text())
    assert evaluate(run)["top1"] == recorded["top1"]
