from pathlib import Path

import keras
import numpy as np
import pytest

from shared.errors import UserError
from shared.modelzoo import MODELS_DIR, load_model_module, load_weight_file

resnet = load_model_module(MODELS_DIR / "resnet")


def trainable(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


@pytest.mark.slow
@pytest.mark.parametrize("depth, torchvision_count", [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032),
                                                     (101, 44_549_160), (152, 60_192_808)])
def test_resnet_parameter_counts_match_torchvision(depth, torchvision_count):
    # torchvision counts trainable parameters only (BN running statistics are buffers there).
    assert trainable(resnet.build(1000, (224, 224, 3), depth=depth)) == torchvision_count


def test_resnet_backbone_features_by_stride():
    features = resnet.backbone((64, 64, 3), depth=18, width=8)
    shapes = {name: tuple(t.shape[1:]) for name, t in features.output.items()}
    assert shapes == {"stride_4": (16, 16, 8), "stride_8": (8, 8, 16), "stride_16": (4, 4, 32),
                      "stride_32": (2, 2, 64)}


def test_resnet_small_input_keeps_resolution():
    model = resnet.build(10, (28, 28, 1), depth=18, width=8, small_input=True)
    assert model.get_layer("conv2_block2_out").output.shape[1:3] == (28, 28)
    assert model.predict(np.zeros((2, 28, 28, 1), "float32"), verbose=0).shape == (2, 10)


def test_resnet_rejects_depths_not_in_table_1():
    with pytest.raises(ValueError, match="not in Table 1"):
        resnet.build(10, (32, 32, 3), depth=20)


def keras_applications_resnet(depth: int, size: int):
    return {50: keras.applications.ResNet50, 101: keras.applications.ResNet101,
            152: keras.applications.ResNet152}[depth](weights=None, input_shape=(size, size, 3))


def test_resnet50_with_conv_bias_has_keras_applications_count():
    assert resnet.build(1000, (224, 224, 3), depth=50, conv_bias=True).count_params() == 25_636_712


@pytest.mark.slow
def test_keras_applications_weight_files_load_with_identical_outputs(tmp_path, depth=50):
    """The ImageNet files Keras publishes are Keras 2 `.h5`; Keras 3 writes `.weights.h5`. Both load."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    reference = keras_applications_resnet(depth, 64)
    legacy, modern = tmp_path / "legacy.h5", tmp_path / "modern.weights.h5"
    with h5py.File(legacy, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, reference)
    reference.save_weights(modern)
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    # called eagerly, not predict(): two images need no traced ResNet-50 (three tracings of seconds each)
    expected = reference(images, training=False).numpy()
    for path in (legacy, modern):
        ours = resnet.build(1000, (64, 64, 3), depth=depth, conv_bias=True)
        load_weight_file(ours, path)
        assert np.abs(ours(images, training=False).numpy() - expected).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("depth", [101, 152])
def test_deeper_resnets_have_keras_applications_weight_layout(depth):
    """Loading by layer order needs the same weights in the same order with the same shapes."""
    ours = resnet.build(1000, (32, 32, 3), depth=depth, conv_bias=True)
    reference = keras_applications_resnet(depth, 32)
    assert [tuple(w.shape) for w in ours.weights] == [tuple(w.shape) for w in reference.weights]


@pytest.mark.slow
def test_weight_file_that_does_not_fit_is_a_clear_error(tmp_path):
    reference = keras_applications_resnet(50, 32)
    path = tmp_path / "resnet50.weights.h5"
    reference.save_weights(path)
    with pytest.raises(UserError, match="does not fit the model.*hyperparameters the file was saved with"):
        load_weight_file(resnet.build(1000, (32, 32, 3), depth=50), path)  # no conv biases
    with pytest.raises(UserError, match="weight file not found"):
        load_weight_file(resnet.build(10, (32, 32, 3), depth=18), tmp_path / "missing.h5")


def test_a_keras_archive_loads_unpacked_or_in_place_and_a_file_that_is_no_archive_is_one_line(tmp_path, monkeypatch):
    """A .keras checkpoint's variables are read from a temporary copy (zipfile seeks slowly before Python 3.13);
    with no room for the copy they are read in the archive; either way the model ends with the saved weights."""
    import tempfile

    def tiny(seed: int) -> keras.Model:
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])

    saved = tiny(0)
    saved.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    saved.optimizer.build(saved.trainable_variables)  # a run's checkpoint holds the optimizer's slots too
    path = tmp_path / "epoch-0001.keras"
    saved.save(path)
    expected = [w.numpy() for w in saved.weights]

    import zipfile

    extracted = []
    extract = zipfile.ZipFile.extract

    def recorded(self, *args, **kwargs):
        extracted.append(extract(self, *args, **kwargs))
        return extracted[-1]

    monkeypatch.setattr(zipfile.ZipFile, "extract", recorded)
    unpacked = tiny(1)
    load_weight_file(unpacked, path)
    assert [Path(p).name for p in extracted] == ["model.weights.h5"] and not Path(extracted[0]).exists()
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(expected, unpacked.weights))

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", no_room)
    in_place = tiny(2)
    load_weight_file(in_place, path)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(expected, in_place.weights))

    (tmp_path / "notes.keras").write_text("not an archive")
    with pytest.raises(UserError, match=r"notes\.keras is damaged or not a Keras archive \(File is not a zip file\)"):
        load_weight_file(tiny(3), tmp_path / "notes.keras")
    # a zip, but not of Keras' h5 layout (here Keras' own npz one, which model.load_weights cannot read either)
    from keras.src.saving import saving_lib

    saving_lib.save_model(saved, tmp_path / "npz.keras", weights_format="npz")
    with pytest.raises(UserError, match=r"npz\.keras holds no model\.weights\.h5 \(it holds config\.json, "
                                        r"metadata\.json, model\.weights\.npz\): give a \.keras file"):
        load_weight_file(tiny(4), tmp_path / "npz.keras")
