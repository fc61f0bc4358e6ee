"""scripts/fit_on_jax.py: the Fashion-MNIST recipes on any Keras backend (JAX on a GPU machine without
TensorFlow). Here its main() runs in the test process, on the TensorFlow backend, the only one installed."""

import json
import os

import numpy as np
import pytest

from shared.errors import UserError

from conftest import REPO, load_script
from test_data import fake_fashion_dir

SCRIPT = REPO / "scripts" / "fit_on_jax.py"



def run_script(*args, capsys=None) -> tuple[int, str]:
    """main() in this process (TensorFlow backend, already imported): the exit code and stderr."""
    code = load_script("fit_on_jax").main([str(arg) for arg in args])
    return code, capsys.readouterr().err if capsys else ""


def test_importing_the_script_leaves_the_backend_alone():
    before = os.environ.get("KERAS_BACKEND")
    load_script("fit_on_jax")
    assert os.environ.get("KERAS_BACKEND") == before


def test_random_crop_picks_a_place_per_image():
    script = load_script("fit_on_jax")
    images = np.random.default_rng(0).integers(1, 256, (64, 28, 28, 1)).astype(np.uint8)
    cropped = script.augmenter([{"random_crop": {"padding": 2}}], np.random.default_rng(1))(images)
    assert cropped.shape == images.shape
    padded = np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)])
    offsets = set()
    for original, out in zip(padded, cropped):
        found = [(r, c) for r in range(5) for c in range(5) if np.array_equal(original[r:r + 28, c:c + 28], out)]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 10  # keras.layers.RandomCrop would give one place for the whole batch


def test_horizontal_flip_flips_about_half():
    script = load_script("fit_on_jax")
    images = np.random.default_rng(0).integers(0, 256, (200, 28, 28, 1)).astype(np.uint8)
    out = script.augmenter(["horizontal_flip"], np.random.default_rng(2))(images)
    flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)])
    unchanged = np.array([np.array_equal(o, i) for o, i in zip(out, images)])
    assert np.all(flipped ^ unchanged)
    assert 60 < flipped.sum() < 140


def test_unsupported_augmentation_is_a_user_error():
    with pytest.raises(UserError, match="'random_erasing' is not supported here"):
        load_script("fit_on_jax").augmenter(["random_erasing"], np.random.default_rng(0))


@pytest.mark.slow
def test_trains_googlenet_with_aux_heads_and_label_smoothing(tmp_path, monkeypatch, capsys):
    import keras

    data = fake_fashion_dir(tmp_path / "fm", train=32, test=20)
    monkeypatch.chdir(REPO)
    traced = []  # Python runs train_step only while TensorFlow traces it
    monkeypatch.setattr(keras.Model, "train_step", lambda self, data, step=keras.Model.train_step: traced.append(1)
                        or step(self, data))
    code, stderr = run_script("models/googlenet/fashion.yaml", "model.width=0.0625", "train.epochs=2",
                              "train.batch_size=8", "train.steps_per_epoch=2", "--data", data, "--out",
                              tmp_path / "out", capsys=capsys)
    assert code == 0, stderr[-2000:]
    assert traced == [1]  # the aux heads' losses built before fit: one trace, not a second for their variables
    history = (tmp_path / "out" / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,loss,train_top1,test_top1,seconds" and len(history) == 3
    summary = json.loads((tmp_path / "out" / "result.json").read_text())
    assert summary["epochs"] == 2 and summary["backend"] == "tensorflow"
    assert summary["hparams"]["aux_heads"] is True and summary["hparams"]["width"] == 0.0625
    assert 0.0 <= summary["test_top1"] <= summary["test_top5"] <= 1.0


def test_other_data_sources_are_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code, stderr = run_script("models/resnet/run.yaml", "--out", tmp_path / "out", capsys=capsys)
    assert code == 2
    assert stderr.strip().splitlines() == [
        "error: models/resnet/run.yaml: data.source is 'tfds'; this script reads Fashion-MNIST only"]
    assert not (tmp_path / "out").exists()


def test_a_folder_without_the_idx_files_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code, stderr = run_script("models/resnet/quick.yaml", "--data", tmp_path, "--out", tmp_path / "out",
                              capsys=capsys)
    assert code == 2
    assert stderr.strip().splitlines() == [(
        f"error: {tmp_path} has no train-images-idx3-ubyte.gz; pass --data with the folder of the four "
        "Fashion-MNIST IDX files")]
    assert not (tmp_path / "out").exists()


def test_a_label_outside_the_ten_classes_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from test_labels import write_labels_idx

    folder = fake_fashion_dir(tmp_path / "fm")
    write_labels_idx(folder / "train-labels-idx1-ubyte.gz", [12] + [0] * 39)
    monkeypatch.chdir(REPO)
    code, stderr = run_script("models/resnet/quick.yaml", "--data", folder, "--out", tmp_path / "out", capsys=capsys)
    assert code == 2
    assert stderr.strip().splitlines() == [(
        f"error: {folder / 'train-labels-idx1-ubyte.gz'} holds label 12 at example 0, outside 0-9 for 10 classes; "
        "re-download or reinstall the file")]


def test_the_modules_it_uses_import_no_tensorflow():
    """The script runs where TensorFlow is absent: the package modules it imports, and everything those
    import from the package, must not import TensorFlow (read from their source, at any depth)."""
    import ast

    free = {"shared", "shared.config", "shared.errors", "shared.fashion_mnist", "shared.modelzoo", "shared.optim",
            "shared.config_schema", "shared.config_validation", "shared.config_yaml", "shared.frozen",
            "shared.callbacks", "shared.durable", "shared.names", "shared.source_facts", "shared.runs", "shared.locks",
            "shared.mlflow_log", "shared.keras_saving"}
    for name in sorted(free - {"shared"}):
        path = REPO / (name.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for module in modules:
                assert not module.startswith("tensorflow"), f"{path.name} imports {module}"
                if module.startswith("shared.") and module.count(".") == 1:
                    assert module in free, f"{path.name} imports {module}, which is not free of TensorFlow"
