"""import-weights --from torchvision: a state dict file becomes a run every command takes, each file that does not
fit is one line, and (with the .[torch] extra) the imported models compute torchvision's function: its own
models, built here with random weights, against ours on the same images, eval mode.

The run and error-path tests write `.safetensors` files with the safetensors package's NumPy API and need no
torch; the parity tests need torch and torchvision (`pip install -e '.[torch]'`) and skip without them."""

import hashlib
import re
import sys
import json
from pathlib import Path

import numpy as np
import pytest

from shared import modelzoo, runner
from shared.class_names import imagenet_names
from shared.classification import torchvision_weights as tvw
from shared.runs import IMPORTED_FILE, open_run

IMAGE_SIZE = 64  # every layer of ResNet-18 still sees a map larger than 1x1 (2x2 after conv5_x)
TOLERANCE = 1e-4  # max abs logit difference, float32
FLOAT64_TOLERANCE = 1e-9  # both models in float64 from the same weights: round-off only

# variant -> the smallest input its parity test runs at while every layer still does what it does at 224 px:
# AlexNet's pool5 3x3 (the adaptive pool repeats it to 6x6, fc6's rows are reordered over 3x3 positions);
# GoogLeNet's 4a at 5x5 (the adaptive auxiliary pool and the 2x2 ceil_mode pool on an odd map).
PARITY_SIZES = {"alexnet": 127, "googlenet": 80, "resnet18": 64, "resnet34": 64, "resnet50": 64, "resnet101": 64,
                "resnet152": 64, "mobilenet_v2": 64}
QUICK = {"mobilenet_v2"}  # under 2 s; the others build larger models (pytest -m slow)


def resnet18_shapes() -> dict[str, tuple]:
    module = modelzoo.load_model_module(modelzoo.model_dir("resnet"))
    hparams = modelzoo.resolve_hparams(module, {**tvw.TORCHVISION_FORM["resnet"], "depth": 18})
    model = modelzoo.build_model(module, 1000, (IMAGE_SIZE, IMAGE_SIZE, 3), hparams)
    return tvw.expected_tensors(model, "resnet", hparams)


def random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.uniform(0.5, 1.5, shape) if name.endswith("running_var") else
                   rng.normal(0, 0.05, shape)).astype(np.float32) for name, shape in shapes.items()}


def save_safetensors(state: dict[str, np.ndarray], path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, np.ndarray]:
    pytest.importorskip("safetensors")
    return random_state(resnet18_shapes())


def import_command(path: Path, runs_dir: Path, *sets: str, model: str = "resnet") -> list[str]:
    return ["import-weights", "--from", "torchvision", str(path), "--model", model, "--set", "model.depth=18",
            "--set", f"data.image_size={IMAGE_SIZE}", "--set", f"run.dir={runs_dir}",
            *(part for key in sets for part in ("--set", key))]


def refused(argv: list[str], capsys) -> str:
    """The one error line of a refused command."""
    assert runner.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ---------------------------------------------------------------- the imported run


@pytest.fixture(scope="module")
def imported(resnet18_state, tmp_path_factory):
    folder = tmp_path_factory.mktemp("imported")
    path = save_safetensors(resnet18_state, folder / "resnet18.safetensors")
    assert runner.main(import_command(path, folder / "runs")) == 0
    return open_run(folder / "runs" / "resnet" / "v0001"), path


def test_imported_run_is_finished_and_records_its_source(imported):
    run, path = imported
    assert run.status()["status"] == "finished" and run.status()["imported"] == "torchvision"
    record = json.loads((run.path / IMPORTED_FILE).read_text())
    assert record["file"] == str(path.resolve()) and record["model"] == "resnet18"
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {row["torch"] for row in record["tensors"]} == set(resnet18_shapes())  # every tensor, once
    assert "sha256" in (run.path / "notes.md").read_text()
    config = run.config_dict()
    assert {key: config["model"][key] for key in tvw.TORCHVISION_FORM["resnet"]} == tvw.TORCHVISION_FORM["resnet"]
    assert config["data"]["mean"] == [123.675, 116.28, 103.53] and config["data"]["std"] == [58.395, 57.12, 57.375]
    assert config["data"]["crop_fraction"] == 0.875 and config["data"]["num_classes"] == 1000
    assert [path.name for path in run.checkpoints()] == ["epoch-0000.keras"]


def test_imported_classes_are_the_sorted_wnids_torchvision_indexes_by(imported):
    run, _ = imported
    wnids = list(imagenet_names())
    assert len(wnids) == 1000 and wnids == sorted(wnids)  # torchvision's ImageNet folders are read in sorted order
    assert run.class_names() == wnids


def test_rebuilt_imported_run_holds_the_files_tensors_in_keras_layouts(imported, resnet18_state):
    from shared.tasks import rebuild

    model, _ = rebuild(imported[0])
    np.testing.assert_array_equal(model.get_layer("conv1_conv").get_weights()[0],
                                  resnet18_state["conv1.weight"].transpose(2, 3, 1, 0))  # OIHW -> HWIO
    np.testing.assert_array_equal(model.get_layer("predictions").get_weights()[0], resnet18_state["fc.weight"].T)
    gamma, beta, mean, variance = model.get_layer("conv5_block2_2_bn").get_weights()
    np.testing.assert_array_equal(variance, resnet18_state["layer4.1.bn2.running_var"])
    np.testing.assert_array_equal(beta, resnet18_state["layer4.1.bn2.bias"])
    assert model.get_layer("conv5_block2_2_bn").epsilon == 1e-5


@pytest.mark.slow
def test_predict_export_and_finetune_from_take_an_imported_run(imported, tmp_path, capsys):
    from PIL import Image

    run, _ = imported
    for index in range(2):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(
            tmp_path / f"{index}.png")
    assert runner.main(["predict", "--run", str(run.path), str(tmp_path), "--top-k", "2"]) == 0
    shown = capsys.readouterr().out.strip().splitlines()
    assert len(shown) == 2 and all(line.count(" 0.") == 2 for line in shown), shown  # two classes with scores
    assert runner.main(["export", "--run", str(run.path), "--format", "saved_model", "--export-dir",
                        str(tmp_path / "exports")]) == 0
    finetune = ["finetune", "--config", str(modelzoo.model_dir("resnet") / "quick.yaml"), "--from", str(run.path),
                *(part for key, value in {**tvw.TORCHVISION_FORM["resnet"], "depth": 18}.items()
                  for part in ("--set", f"model.{key}={json.dumps(value)}")),
                "--set", "data.channels=3", "--set", f"data.image_size={IMAGE_SIZE}", "--set", "data.limit_train=32",
                "--set", "data.limit_test=16", "--set", "train.epochs=1", "--set", "train.batch_size=16",
                "--set", "train.jit_compile=false", "--set", f"run.dir={tmp_path / 'runs'}"]
    assert runner.main(finetune) == 0
    finetuned = open_run(tmp_path / "runs" / "resnet" / "v0001")
    assert finetuned.status()["status"] == "finished" and str(run.path) in (finetuned.path / "notes.md").read_text()
    assert "compute another function" not in capsys.readouterr().out  # it kept torchvision's form
    # the paper's padding instead: the weights fit by shape, but compute another function there, said once
    assert runner.main([*finetune, "--set", "model.padding=same"]) == 0
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "padding torch (here: same)" in warned[0] and "another function" in warned[0]
    assert "padding torch (here: same)" in (tmp_path / "runs" / "resnet" / "v0002" / "notes.md").read_text()


def test_only_the_options_an_import_was_made_for_are_compared(imported):
    from shared.finetune import imported_form_changes

    run, _ = imported
    form = dict(tvw.TORCHVISION_FORM["resnet"])
    assert imported_form_changes(run, {**form, "depth": 18, "dropout": 0.3}) == ""
    assert imported_form_changes(run, {**form, "stride_in_3x3": False}) == "stride_in_3x3 True (here: False)"
    assert imported_form_changes(None, {}) == ""  # a weight file of no run


def test_an_import_that_fails_part_way_leaves_a_failed_run_without_a_checkpoint(imported, tmp_path, monkeypatch):
    import keras

    def broken_writer(model, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise RuntimeError("the writer broke")

    monkeypatch.setattr(keras.Model, "save", broken_writer)
    with pytest.raises(RuntimeError):
        runner.main(import_command(imported[1], tmp_path / "runs"))
    run = open_run(tmp_path / "runs" / "resnet" / "v0001")
    assert run.status()["status"] == "failed" and "the writer broke" in run.status()["error"]
    assert list(run.checkpoint_dir.iterdir()) == []  # the partial file is removed, no epoch-0000.keras


# ---------------------------------------------------------------- files that do not fit: one line each


def test_a_file_of_another_depth_names_the_first_missing_tensor(imported, tmp_path, capsys):
    _, path = imported
    line = refused(import_command(path, tmp_path / "runs", "model.depth=34"), capsys)
    assert "tensor layer1.2.conv1.weight is missing" in line and "model.depth=18|34|50|101|152" in line
    assert not (tmp_path / "runs").exists()  # refused before a run folder exists


def test_a_tensor_of_another_shape_is_named_with_both_shapes(resnet18_state, tmp_path, capsys):
    state = {**resnet18_state, "fc.weight": np.zeros((10, 512), np.float32), "fc.bias": np.zeros(10, np.float32)}
    line = refused(import_command(save_safetensors(state, tmp_path / "ten.safetensors"), tmp_path / "runs"), capsys)
    assert "tensor fc.weight has shape (10, 512), layer predictions needs (1000, 512)" in line


def test_a_tensor_the_model_does_not_have_is_named(resnet18_state, tmp_path, capsys):
    state = {**resnet18_state, "head.extra.weight": np.zeros((3, 3), np.float32)}
    line = refused(import_command(save_safetensors(state, tmp_path / "more.safetensors"), tmp_path / "runs"), capsys)
    assert "it has tensor head.extra.weight (shape (3, 3)) that the model does not" in line


def test_a_truncated_file_is_one_line(imported, tmp_path, capsys):
    data = imported[1].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    line = refused(import_command(tmp_path / "cut.safetensors", tmp_path / "runs"), capsys)
    assert "is not a readable .safetensors file (truncated or damaged?)" in line


def test_a_file_that_is_no_state_dict_is_one_line(tmp_path, capsys):
    (tmp_path / "photo.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    assert "not a readable .safetensors file" in refused(import_command(tmp_path / "photo.safetensors",
                                                                        tmp_path / "runs"), capsys)
    (tmp_path / "weights.h5").write_bytes(b"")
    assert "give a torchvision state dict as .pth" in refused(import_command(tmp_path / "weights.h5",
                                                                             tmp_path / "runs"), capsys)
    assert "weight file not found" in refused(import_command(tmp_path / "none.pth", tmp_path / "runs"), capsys)


def test_the_form_that_computes_torchvisions_function_may_not_be_changed(imported, tmp_path, capsys):
    line = refused(import_command(imported[1], tmp_path / "runs", "model.padding=same"), capsys)
    assert "model.padding is 'same'" in line and "leave model.padding out" in line


def test_a_model_without_a_mapping_is_refused(imported, tmp_path, capsys):
    line = refused(["import-weights", "--from", "torchvision", str(imported[1]), "--model", "vgg"], capsys)
    assert "vgg" in line


def test_pth_files_that_are_not_state_dicts_are_one_line(resnet18_state, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    assert "holds a list, not a state dict" in refused(import_command(tmp_path / "list.pth", tmp_path / "runs"),
                                                       capsys)
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, tmp_path / "checkpoint.pth")
    assert "'model' holds a dict, not a tensor" in refused(import_command(tmp_path / "checkpoint.pth",
                                                                          tmp_path / "runs"), capsys)
    torch.save({name: torch.from_numpy(value) for name, value in resnet18_state.items()}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 3])
    assert "truncated, damaged or not saved by torch.save" in refused(import_command(tmp_path / "cut.pth",
                                                                                     tmp_path / "runs"), capsys)


# ---------------------------------------------------------------- the same function as torchvision (.[torch])


@pytest.fixture(scope="module")
def parity():
    from importlib.util import find_spec

    pytest.importorskip("torch")
    if find_spec("torchvision") is None:  # not importorskip: torchvision_models imports it past a known breakage
        pytest.skip("torchvision is not installed (pip install -e '.[torch]')")
    from shared.classification import torchvision_parity

    torchvision_parity.torchvision_models()  # a broken torchvision is an error here, not a skip
    return torchvision_parity


def parity_batches(parity, size: int) -> dict[str, np.ndarray]:
    fashion = Path("/usr/share/datasets/fashion-mnist")
    batches = {"random images": parity.random_images(3, size, seed=2)}
    if fashion.is_dir():
        batches["Fashion-MNIST photographs"] = parity.fashion_photographs(fashion, 3, size)
    return batches


def parity_check(parity, variant: str, size: int, folder: Path):
    """torchvision's variant against ours on random images and photographs; batch-norm statistics from those
    images and 8 more random ones (torchvision_parity.reference_model)."""
    batches = parity_batches(parity, size)
    calibration = np.concatenate([parity.random_images(8, size, seed=1), *batches.values()])
    return parity.check(variant, batches, folder, calibration)


def assert_same_function(result) -> None:
    """float64: the mapping alone, round-off. float32: within TOLERANCE, or within twice the rounding torchvision's
    own float32 logits show against its float64 ones where deep networks amplify that past TOLERANCE."""
    assert result.worst("float64") <= FLOAT64_TOLERANCE, result
    assert result.worst("float32") <= max(TOLERANCE, 2 * result.worst("torch_rounding")), result


@pytest.mark.parametrize("variant", [pytest.param(name, marks=() if name in QUICK else pytest.mark.slow)
                                     for name in PARITY_SIZES])
def test_imported_model_computes_torchvisions_function(parity, variant, tmp_path):
    result = parity_check(parity, variant, PARITY_SIZES[variant], tmp_path)
    assert_same_function(result)
    assert all(scale > 0.1 for scale in result.logit_scale.values()), result  # not a degenerate network
    if variant == "googlenet":  # the auxiliary heads too, though torchvision's eval mode returns only the main logits
        assert {"random images aux1", "random images aux2"} <= set(result.float32)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["alexnet", "googlenet", "resnet50", "mobilenet_v2"])
def test_imported_model_computes_torchvisions_function_at_224_px(parity, variant, tmp_path):
    result = parity_check(parity, variant, 224, tmp_path)
    assert_same_function(result)
    assert result.worst("float32") <= TOLERANCE, result


def test_the_papers_padding_does_not_compute_torchvisions_function(parity, tmp_path):
    """What padding="torch" is for: the same weights in the default form give other logits."""
    images = parity.random_images(3, IMAGE_SIZE, seed=2)
    reference = parity.reference_model("mobilenet_v2", parity.random_images(8, IMAGE_SIZE, seed=1))
    state_file = parity.save_state_dict(reference, tmp_path / "mobilenet_v2.safetensors")
    module = modelzoo.load_model_module(modelzoo.model_dir("mobilenet_v2"))
    theirs = parity.torch_logits(reference, images)["predictions"]
    for padding, close in (("torch", True), ("same", False)):
        hparams = modelzoo.resolve_hparams(module, {**tvw.TORCHVISION_FORM["mobilenet_v2"], "padding": padding})
        model = modelzoo.build_model(module, 1000, (IMAGE_SIZE, IMAGE_SIZE, 3), hparams)
        tvw.load_into(model, "mobilenet_v2", hparams, tvw.read_state_dict(state_file))
        difference = np.abs(parity.keras_logits(model, images)["predictions"] - theirs).max()
        assert (difference <= TOLERANCE) == close, (padding, difference)


@pytest.mark.slow
def test_the_import_command_gives_torchvisions_logits(parity, tmp_path):
    """Through the command and the run store: the run's rebuilt model (softmax) equals torchvision's softmax."""
    import torch

    from shared.tasks import rebuild

    images = parity.random_images(3, IMAGE_SIZE, seed=2)
    reference = parity.reference_model("resnet18", parity.random_images(8, IMAGE_SIZE, seed=1))
    path = parity.save_state_dict(reference, tmp_path / "resnet18.pth")
    assert runner.main(import_command(path, tmp_path / "runs")) == 0
    model, _ = rebuild(open_run(tmp_path / "runs" / "resnet" / "v0001"))
    theirs = torch.softmax(torch.from_numpy(parity.torch_logits(reference, images)["predictions"]), -1).numpy()
    np.testing.assert_allclose(np.asarray(model([images], training=False)), theirs, atol=1e-6)


def test_reading_without_the_extra_names_it(monkeypatch, tmp_path):
    from shared.errors import UserError

    (tmp_path / "a.safetensors").write_bytes(b"not read")
    (tmp_path / "a.pth").write_bytes(b"not read")
    for module in ("safetensors", "safetensors.numpy", "torch"):
        monkeypatch.setitem(sys.modules, module, None)  # its import raises ImportError
    for name in ("a.safetensors", "a.pth"):
        with pytest.raises(UserError, match=re.escape('pip install -e ".[torch]"')) as caught:
            tvw.read_state_dict(tmp_path / name)
        assert "\n" not in str(caught.value)
