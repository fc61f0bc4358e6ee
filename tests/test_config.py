from pathlib import Path

import pytest
import yaml

from shared import modelzoo
from shared.config import load_config
from shared.errors import UserError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_merges_parent_relative_to_the_file(tmp_path):
    write(tmp_path / "base" / "run.yaml", "train:\n  epochs: 90\n  batch_size: 256\n  lr: {base: 0.1, gamma: 0.5}\n")
    child = write(tmp_path / "child" / "quick.yaml",
                  "extends: ../base/run.yaml\ntrain:\n  epochs: 3\n  lr: {base: 0.01}\n")
    config = load_config(child)
    assert config.train.epochs == 3  # child wins
    assert config.train.batch_size == 256  # inherited
    assert config.train.lr.base == 0.01 and config.train.lr.gamma == 0.5  # nested sections merge key by key


def test_set_overrides_parse_values_as_yaml(tmp_path):
    path = write(tmp_path / "c.yaml", "train: {epochs: 5}\n")
    config = load_config(path, ["train.epochs=7", "train.lr.milestones=[2, 4]", "data.normalize=false",
                                "model.depth=34", "run.notes=hello: world"])
    assert config.train.epochs == 7
    assert config.train.lr.milestones == [2, 4]
    assert config.data.normalize is False
    assert config.model.hparams == {"depth": 34}
    assert config.run.notes == "hello: world"


def test_unknown_key_names_key_file_and_closest_key(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  batchsize: 64\n")
    with pytest.raises(UserError) as error:
        load_config(path)
    message = str(error.value)
    assert "train.batchsize" in message and str(path) in message and "did you mean train.batch_size" in message


def test_unknown_key_from_set_is_attributed_to_set():
    with pytest.raises(UserError, match=r"data\.imgsize \(from --set\); did you mean data\.image_size"):
        load_config(tree={}, overrides=["data.imgsize=32"])


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs=ten", "train.epochs (from --set) must be int"),
    ("train.epochs=2.5", "must be int"),
    ("data.normalize=3", "must be bool"),
    ("data.source=imagenet", "choose one of fashion_mnist, synthetic, folder, ilsvrc, tfrecord, tfds"),
    ("train.batch_size=0", "must be positive"),
    ("data.mean=[1, 2]", "has 2 values but data.channels is 3"),
    ("train.lr.schedule=step", "milestones is empty"),
    ("train", "not key=value"),
])
def test_bad_values_are_rejected_with_the_reason(override, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(tree={}, overrides=[override])


def test_ints_are_accepted_for_float_keys_and_stored_as_floats():
    config = load_config(tree={"train": {"lr": {"base": 1}}})
    assert config.train.lr.base == 1.0 and isinstance(config.train.lr.base, float)


def test_missing_file_cycle_and_invalid_yaml(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(UserError, match="loop"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "broken.yaml", "train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_dump_is_stable_and_in_schema_order():
    first = load_config(tree={"train": {"epochs": 3}, "model": {"depth": 18}}).dump()
    second = load_config(tree={"model": {"depth": 18}, "train": {"epochs": 3}}).dump()
    assert first == second
    assert list(yaml.safe_load(first)) == ["task", "model", "data", "train", "init", "distribute", "detection",
                                           "distill", "tune", "run"]


def test_model_hparams_are_checked_against_build_signature():
    module = modelzoo.load_model_module(modelzoo.model_dir("resnet"))
    resolved = modelzoo.resolve_hparams(module, {"depth": 18})
    assert resolved == {"depth": 18, "width": 64, "small_input": False, "conv_bias": False}  # defaults filled in
    with pytest.raises(UserError, match="model.dpeth.*did you mean model.depth"):
        modelzoo.resolve_hparams(module, {"dpeth": 18})
    with pytest.raises(UserError, match="model.small_input must be bool"):
        modelzoo.resolve_hparams(module, {"small_input": "yes"})


def test_unknown_model_suggests_the_closest():
    with pytest.raises(UserError, match="unknown model 'resnt'.*did you mean resnet"):
        modelzoo.model_dir("resnt")


def test_repository_recipes_load():
    root = Path(__file__).resolve().parent.parent / "models"
    for recipe in sorted(root.glob("*/*.yaml")):
        config = load_config(recipe)
        module = modelzoo.load_model_module(modelzoo.model_dir(config.model.name, config.model.path))
        modelzoo.resolve_hparams(module, config.model.hparams)
