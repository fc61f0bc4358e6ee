"""Fine-tuning (shared/finetune.py): starting weights from a run or a weight file, copied by layer name into a
new model with another class count, and freezing by pattern or "backbone". Tiny models; the run is the shared
tiny trained run of conftest.py."""

import shutil
from types import SimpleNamespace

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from shared.config_schema import InitConfig
from shared.errors import UserError
from shared.finetune import freeze_layers, head_layer_names, initialize_from, unfreeze_all
from shared.lifecycle import starting_run
from shared.modelzoo import MODELS_DIR, load_model_module, load_weight_file, resolve_hparams

resnet = load_model_module(MODELS_DIR / "resnet")
mobilenet_v2 = load_model_module(MODELS_DIR / "mobilenet_v2")
googlenet = load_model_module(MODELS_DIR / "googlenet")

TINY_RESNET = {"depth": 18, "width": 4, "small_input": True}  # conftest.tiny_tree's model
SHAPE = (16, 16, 3)


def initialize(init: InitConfig, model, module, hparams: dict, shape: tuple, where: str = "") -> str:
    """initialize_from with init's source run rebuilt first, as a run's lifecycle hands it down."""
    return initialize_from(init, model, module, hparams, shape, where, starting_run(init, where))


def tiny_resnet(num_classes: int, **changes):
    hparams = resolve_hparams(resnet, {**TINY_RESNET, **changes})
    return resnet.build(num_classes, SHAPE, **hparams), hparams


def randomize(model, seed: int = 0) -> None:
    """Every weight moved off its initial value (variances kept positive), so a weight that is not copied,
    or copied into the wrong place, shows."""
    rng = np.random.default_rng(seed)
    model.set_weights([w * rng.uniform(0.5, 1.5, w.shape) + (0 if "variance" in v.path else rng.normal(0, 0.1, w.shape))
                       for w, v in zip(model.get_weights(), model.weights)])


def assert_backbone_copied(model, source, head: set) -> None:
    layers = [layer for layer in model.layers if layer.weights and layer.name not in head]
    assert len(layers) > 20
    for layer in layers:
        for ours, theirs in zip(layer.get_weights(), source.get_layer(layer.name).get_weights(), strict=True):
            np.testing.assert_array_equal(ours, theirs, err_msg=layer.name)


@pytest.mark.slow
def test_run_weights_fill_the_backbone_and_the_new_head_keeps_its_initialization(trained_run):
    run, _ = trained_run
    source = resnet.build(4, SHAPE, **TINY_RESNET)
    load_weight_file(source, run.last_checkpoint())
    model, hparams = tiny_resnet(7)
    fresh_kernel = model.get_layer("predictions").kernel.numpy()

    note = initialize(InitConfig(from_run=str(run.path)), model, resnet, hparams, SHAPE)

    head = head_layer_names(resnet, model, hparams, SHAPE)
    assert head == {"avg_pool", "predictions"}
    assert_backbone_copied(model, source, head)
    np.testing.assert_array_equal(model.get_layer("predictions").kernel.numpy(), fresh_kernel)
    assert fresh_kernel.shape == (32, 7)
    assert "checkpoints/epoch-0002.keras" in note and "snapshotted model.py" in note
    assert "head predictions re-initialized for 7 classes (was 4)" in note


def test_same_class_count_copies_the_head_too_and_a_run_checkpoint_file_is_read_as_its_run(trained_run,
                                                                                             monkeypatch):
    run, _ = trained_run
    source = resnet.build(4, SHAPE, **TINY_RESNET)
    load_weight_file(source, run.checkpoints()[0])
    model, hparams = tiny_resnet(4)
    monkeypatch.chdir(run.path)  # a relative path, as a recipe would give it
    note = initialize(InitConfig(weights="checkpoints/epoch-0001.keras"), model, resnet, hparams, SHAPE)
    assert_backbone_copied(model, source, head=set())
    assert "epoch-0001.keras, model built from its snapshotted model.py" in note and "head copied too" in note


def test_a_backbone_that_does_not_fit_is_an_error_naming_layers_and_hyperparameters(trained_run):
    run, _ = trained_run
    model, hparams = tiny_resnet(7, width=8)
    with pytest.raises(UserError, match=r"init.from_run .* \(in x.yaml\) does not fit this model outside its "
                                        r"classifier head: conv1_conv kernel is \(3, 3, 3, 4\) in the source, "
                                        r"\(3, 3, 3, 8\) here, conv1_bn gamma .* and \d+ more; .*model.width 4 "
                                        r"there, 8 here"):
        initialize(InitConfig(from_run=str(run.path)), model, resnet, hparams, SHAPE, where=" (in x.yaml)")


def test_runs_without_checkpoints_and_missing_runs_are_user_errors(trained_run, tmp_path):
    run, _ = trained_run
    untrained = tmp_path / "resnet" / "v0001"
    shutil.copytree(run.path, untrained, ignore=shutil.ignore_patterns("*.keras"))
    model, hparams = tiny_resnet(7)
    with pytest.raises(UserError, match=r"init.from_run .*v0001 \(in x.yaml\): run .* has no checkpoint"):
        initialize(InitConfig(from_run=str(untrained)), model, resnet, hparams, SHAPE, where=" (in x.yaml)")
    with pytest.raises(UserError, match="no run at"):
        initialize(InitConfig(from_run=str(tmp_path / "nowhere")), model, resnet, hparams, SHAPE)
    with pytest.raises(UserError, match="weight file not found"):
        initialize(InitConfig(weights=str(tmp_path / "none.h5")), model, resnet, hparams, SHAPE)


def save_keras2_h5(model, path) -> None:
    """The Keras 2 HDF5 layout of Keras Applications' downloads (Keras 3 writes only `.weights.h5`)."""
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)


@pytest.mark.parametrize("file_name", ["legacy.h5", "source.weights.h5", "source.keras"])
def test_weight_files_of_every_format_load_into_a_model_with_another_class_count(tmp_path, file_name):
    source, _ = tiny_resnet(4)
    randomize(source)
    path = tmp_path / file_name
    if file_name == "legacy.h5":
        save_keras2_h5(source, path)
    elif file_name.endswith(".weights.h5"):
        source.save_weights(path)
    else:
        source.save(path)
    model, hparams = tiny_resnet(7)
    note = initialize(InitConfig(weights=str(path)), model, resnet, hparams, SHAPE)
    assert_backbone_copied(model, source, head_layer_names(resnet, model, hparams, SHAPE))
    assert model.get_layer("predictions").kernel.shape == (32, 7)
    assert "built for 4 classes" in note and "re-initialized for 7 classes (was 4)" in note


@pytest.mark.slow
def test_keras_applications_mobilenet_v2_files_with_and_without_top_give_identical_features(tmp_path):
    shape = (32, 32, 3)
    app = keras.applications.MobileNetV2(weights=None, input_shape=shape, alpha=0.35)
    randomize(app)
    save_keras2_h5(app, tmp_path / "top.h5")
    save_keras2_h5(keras.Model(app.input, app.get_layer("out_relu").output), tmp_path / "no_top.h5")
    images = np.random.default_rng(1).uniform(-1, 1, (2, *shape)).astype("float32")
    expected = keras.Model(app.input, app.get_layer("out_relu").output)(images, training=False).numpy()

    hparams = resolve_hparams(mobilenet_v2, {"alpha": 0.35})
    for file_name, why in [("top.h5", "for 10 classes (was 1000)"), ("no_top.h5", "(the source has no classifier)")]:
        model = mobilenet_v2.build(10, shape, **hparams)
        note = initialize(InitConfig(weights=str(tmp_path / file_name)), model, mobilenet_v2, hparams, shape)
        features = keras.Model(model.input, model.get_layer("out_relu").output)(images, training=False).numpy()
        assert np.abs(features - expected).max() < 1e-4
        assert f"head predictions re-initialized {why}" in note and "Keras 2 HDF5" in note


def test_freezing_the_backbone_leaves_only_the_head_trainable():
    model, hparams = tiny_resnet(7)
    head = head_layer_names(resnet, model, hparams, SHAPE)
    all_trainable = len(model.trainable_weights)
    frozen = freeze_layers(model, ["backbone"], head)
    assert "image" not in frozen and "conv1_conv" in frozen and "predictions" not in frozen
    assert [layer.name for layer in model.layers if layer.trainable_weights] == ["predictions"]
    unfreeze_all(model)
    assert len(model.trainable_weights) == all_trainable


def test_freezing_by_pattern_freezes_exactly_the_matching_layers():
    model, hparams = tiny_resnet(7)
    frozen = freeze_layers(model, ["conv2_*", "conv1_bn"], head_layer_names(resnet, model, hparams, SHAPE))
    expected = [layer.name for layer in model.layers if layer.name.startswith("conv2_") or layer.name == "conv1_bn"]
    assert frozen == expected and len(expected) > 10
    assert {layer.name for layer in model.layers if not layer.trainable} == set(expected)


def test_patterns_that_match_nothing_or_everything_are_user_errors():
    model, hparams = tiny_resnet(7)
    head = head_layer_names(resnet, model, hparams, SHAPE)
    with pytest.raises(UserError, match=r"pattern 'conv9_\*' matches no layer; did you mean conv"):
        freeze_layers(model, ["conv9_*"], head)
    with pytest.raises(UserError, match="pattern 'stem' matches no layer; layers are named like conv1_conv, "):
        freeze_layers(model, ["stem"], head)
    with pytest.raises(UserError, match="freezes every layer with weights.*leave the classifier head"):
        freeze_layers(model, ["backbone", "pred*"], head)
    assert all(layer.trainable for layer in model.layers)  # a refused freeze changes nothing


def test_googlenet_auxiliary_classifiers_are_head():
    hparams = resolve_hparams(googlenet, {"aux_heads": True, "small_input": True, "width": 0.05})
    model = googlenet.build(7, SHAPE, **hparams)
    head = head_layer_names(googlenet, model, hparams, SHAPE)
    assert {"predictions", "aux1", "aux1_fc", "aux1_1x1_conv", "aux2", "aux2_fc"} <= head
    assert not any(name.startswith(("inception_", "conv1")) or name == "image" for name in head)
    # A model file without backbone(): the output layers are the head.
    assert head_layer_names(SimpleNamespace(), model, hparams, SHAPE) == {"predictions", "aux1", "aux2"}
