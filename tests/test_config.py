import copy
import dataclasses
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from shared import modelzoo
from shared.config import from_dict, load_config
from shared.config_schema import DataConfig, with_changes
from shared.config_validation import RANGES
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
    assert config.train.lr.milestones == (2, 4)
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
    ("train.batch_size=0", "train.batch_size (from --set) is 0; it must be >= 1"),
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
                                           "deblur", "distill", "tune", "loop", "run", "track", "track_uri"]


def test_model_hparams_are_checked_against_build_signature():
    module = modelzoo.load_model_module(modelzoo.model_dir("resnet"))
    resolved = modelzoo.resolve_hparams(module, {"depth": 18})
    assert resolved == {"depth": 18, "width": 64, "small_input": False, "conv_bias": False, "padding": "same",
                        "stride_in_3x3": False, "bn_epsilon": 1.001e-5}  # defaults filled in
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


# ---------------------------------------------------------------- ranges


def _numeric_fields(section=None, prefix=""):
    """Dotted names of every number (or list of numbers) in the schema, keys with choices aside."""
    from shared.config_schema import Config, resolve_type, section_type

    out = []
    for f in dataclasses.fields(section or Config):
        if f.metadata.get("internal") or f.name == "hparams":
            continue
        sub = section_type(f.type)
        if sub:
            out += _numeric_fields(sub, f"{prefix}{f.name}.")
        elif not f.metadata.get("choices") and re.search(r"\b(int|float)\b", str(resolve_type(f.type))):
            out.append(f"{prefix}{f.name}")
    return out


def test_every_number_of_the_schema_has_a_range_and_its_default_is_in_it():
    numeric = _numeric_fields()
    assert sorted(numeric) == sorted(RANGES)  # no number left unchecked, no range for a key that is gone
    defaults = load_config(tree={})
    for key, allowed in RANGES.items():
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        assert all(v in allowed for v in (value if isinstance(value, tuple) else [value]) if v is not None), key


def _nested_yaml(dotted: str, value: str) -> str:
    keys = dotted.split(".")
    return "".join(f"{'  ' * depth}{key}:\n" for depth, key in enumerate(keys[:-1])) + \
        f"{'  ' * (len(keys) - 1)}{keys[-1]}: {value}\n"


@pytest.mark.parametrize("key, value, shown, allowed", [
    ("train.lr.base", ".nan", "nan", "> 0"),  # NaN <= 0 is false: it used to pass
    ("train.lr.base", ".NaN", "nan", "> 0"),
    ("train.lr.base", "0", "0.0", "> 0"),
    ("train.lr.base", "-1e-3", "-0.001", "> 0"),  # an exponent without a dot is a number too
    ("init.lr_scale", ".inf", "inf", "> 0"),
    ("distill.temperature", "-.inf", "-inf", "> 0"),
    ("data.std", "[58.0, .inf, 57.0]", "[58.0, inf, 57.0]", "each item must be > 0"),
    ("data.mean", "[-1, 0, 0]", "[-1.0, 0.0, 0.0]", "each item must be in [0, 255]"),
    ("train.weight_decay", "-0.0001", "-0.0001", ">= 0"),
    ("data.shuffle_buffer", "0", "0", ">= 1"),
    ("train.epochs", "0", "0", ">= 1"),
    ("train.batch_size", "-8", "-8", ">= 1"),
    ("data.image_size", "0", "0", ">= 1"),
    ("data.val_fraction", "1", "1.0", "in [0, 1)"),
    ("data.crop_fraction", "0", "0.0", "in (0, 1]"),
    ("distill.alpha", "1.5", "1.5", "in [0, 1]"),
    ("train.optimizer.clip_global_norm", "0", "0.0", "> 0"),
    ("train.optimizer.clip_norm", ".nan", "nan", "> 0"),
    ("train.optimizer.momentum", "1", "1.0", "in [0, 1)"),
    ("train.label_smoothing", ".nan", "nan", "in [0, 1)"),
    ("train.ema_momentum", "1.0", "1.0", "in (0, 1)"),
    ("train.lr.milestones", "[30, 0]", "[30, 0]", "each item must be >= 1"),
    ("detection.nms_iou", "0", "0.0", "in (0, 1]"),
    ("detection.anchor_scales", "[1.0, -1.0]", "[1.0, -1.0]", "each item must be > 0"),
    ("detection.strides", "[8, 0]", "[8, 0]", "each item must be >= 1"),
    ("detection.focal_gamma", "-.inf", "-inf", ">= 0"),
    ("tune.trials", "0", "0", ">= 1"),
    ("tune.seed", "-1", "-1", ">= 0"),
    ("tune.constraints.latency_ms", ".inf", "inf", "finite"),  # free-form values: finite
    ("model.dropout", ".nan", "nan", "finite"),  # model hyperparameters too
])
def test_numbers_out_of_range_name_key_value_range_and_file(tmp_path, key, value, shown, allowed):
    path = tmp_path / "recipe.yaml"
    path.write_text(_nested_yaml(key, value), encoding="utf-8")
    with pytest.raises(UserError) as error:
        load_config(path)
    message = str(error.value)
    assert f"config key {key} (from {path}) is {shown}; " in message and message.endswith(allowed), message
    assert "\n" not in message


@pytest.mark.parametrize("override, fragment", [
    ("train.lr.base=true", "train.lr.base (from --set) must be float, got True"),  # YAML's true is an int
    ("train.epochs=yes", "train.epochs (from --set) must be int, got True"),
    ("data.std=[true, 1, 1]", "data.std (from --set) must be list of float or null"),
    ("train.lr.base=nan", "must be float, got 'nan'"),  # plain nan is text in YAML; .nan is the float
])
def test_booleans_and_words_are_not_numbers(override, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_config(tree={}, overrides=[override])


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  lr: {base: 1e-3}\n  weight_decay: 4E-5\nrun: {notes: 1e-3 to 2e-3}\n")
    config = load_config(path, ["train.optimizer.epsilon=1e-7"])
    assert (config.train.lr.base, config.train.weight_decay, config.train.optimizer.epsilon) == (1e-3, 4e-5, 1e-7)
    assert config.run.notes == "1e-3 to 2e-3"


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run: {notes: café}\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_config(path)


def test_a_loaded_config_is_frozen_and_resolving_makes_a_new_one():
    config = load_config(tree={"train": {"epochs": 2}})
    for section, key, value in ((config, "task", "deblur"), (config.train, "epochs", 3),
                                (config.model, "hparams", {}), (config.data, "num_classes", 5)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, key, value)
    resolved = with_changes(config, {"train.epochs": 3, "data.num_classes": 5, "train.lr.base": 0.5})
    assert (resolved.train.epochs, resolved.data.num_classes, resolved.train.lr.base) == (3, 5, 0.5)
    assert (config.train.epochs, config.data.num_classes, config.train.lr.base) == (2, None, 0.1)  # untouched
    assert resolved.distill is config.distill  # sections without changes are shared, never copied
    with pytest.raises(TypeError):
        with_changes(config, {"train.epoch": 3})


DEEP_TREE = {"model": {"depth": 18, "blocks": [1, {"kind": "basic", "widths": [8, 16]}]},
             "data": {"augment": [{"random_crop": {"padding": 2}}, "horizontal_flip"], "mean": [1, 2, 3]},
             "train": {"freeze": ["backbone"], "class_weight": {"cat": 2.0}, "lr": {"milestones": [2, 4]}},
             "tune": {"space": {"train.lr.base": {"float": [0.01, 0.3], "log": True}}}}


def _mutations(config):
    """Every way to change a value inside the config, at every depth of its lists and mappings."""
    return [lambda: config.model.hparams.__setitem__("depth", 50),
            lambda: config.model.hparams.pop("depth"),
            lambda: config.model.hparams["blocks"].append(2),
            lambda: config.model.hparams["blocks"][1].update(kind="bottleneck"),
            lambda: config.model.hparams["blocks"][1]["widths"].__setitem__(0, 4),
            lambda: config.data.augment.append("vertical_flip"),
            lambda: config.data.augment[0]["random_crop"].__setitem__("padding", 3),
            lambda: config.data.mean.__setitem__(0, 0.0),
            lambda: config.train.freeze.clear(),
            lambda: config.train.class_weight.__setitem__("dog", 1.0),
            lambda: config.train.lr.milestones.append(6),
            lambda: config.tune.space["train.lr.base"]["float"].append(1.0),
            lambda: config.tune.objectives[0].__setitem__("metric", "loss"),
            lambda: config.provenance.__setitem__("data", "elsewhere"),
            lambda: setattr(config.model.hparams, "_items", {})]


def test_a_config_is_frozen_at_every_depth_however_it_is_made():
    loaded = load_config(tree=DEEP_TREE)
    changed = with_changes(loaded, {"data.augment": [{"random_crop": {"padding": 2}}, "horizontal_flip"],
                                    "model.hparams": {"depth": 18, "blocks": [1, {"kind": "basic", "widths": [8]}]}})
    replaced = dataclasses.replace(loaded, data=DataConfig(augment=[{"random_crop": {"padding": 2}}], mean=[1, 2, 3]))
    for config in (loaded, from_dict(DEEP_TREE, {"data": "a.yaml"}), changed, replaced):
        for mutate in _mutations(config):
            with pytest.raises((TypeError, AttributeError)):
                mutate()
    assert load_config(tree=DEEP_TREE) == loaded  # and nothing above changed it


def test_a_frozen_config_copies_pickles_and_compares_and_writes_plain_lists_and_mappings():
    config = load_config(tree=DEEP_TREE)
    assert copy.deepcopy(config) == config and pickle.loads(pickle.dumps(config)) == config
    assert pickle.loads(pickle.dumps(config)).model.hparams["blocks"][1]["widths"] == (8, 16)
    assert config != with_changes(config, {"data.mean": [1.0, 2.0, 4.0]})
    assert config.data.augment[0] == {"random_crop": {"padding": 2}}  # a read-only mapping equals its dict
    tree = config.to_dict()

    def plain(value):
        if isinstance(value, dict):
            return all(type(v) is not tuple and plain(v) for v in value.values()) and type(value) is dict
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return not isinstance(value, (tuple, Mapping))

    assert plain(tree)
    assert tree["model"]["blocks"] == [1, {"kind": "basic", "widths": [8, 16]}]
    assert tree["data"]["augment"] == [{"random_crop": {"padding": 2}}, "horizontal_flip"]
    assert json.loads(json.dumps(tree)) == tree and yaml.safe_load(config.dump()) == tree
    tree["data"]["augment"].append("vertical_flip")  # to_dict is the caller's copy
    assert config.data.augment == ({"random_crop": {"padding": 2}}, "horizontal_flip")
    assert from_dict(config.to_dict()) == dataclasses.replace(config, provenance={})


@pytest.mark.parametrize("source, key", [("folder", "path"), ("ilsvrc", "path"), ("tfrecord", "path"),
                                         ("tfds", "name")])
def test_a_source_without_the_key_its_row_requires_is_refused_when_the_config_loads(source, key):
    with pytest.raises(UserError, match=f"data.source is {source} but data.{key} is empty; set "):
        load_config(tree={"data": {"source": source}})
    load_config(tree={"data": {"source": source, key: "somewhere"}})


def test_every_source_is_one_row_of_the_table_that_the_config_and_the_export_read():
    from shared.config_schema import DataConfig
    from shared.data import sources
    from shared.eval_view import resizes_pixels
    from shared.source_facts import SOURCES

    choices = next(f for f in dataclasses.fields(DataConfig) if f.name == "source").metadata["choices"]
    assert choices == tuple(SOURCES) == ("fashion_mnist", "synthetic", "folder", "ilsvrc", "tfrecord", "tfds")
    assert all(callable(getattr(sources, facts.loader)) for facts in SOURCES.values())
    # the eval view from the row alone: no data is read (the folder does not exist)
    assert resizes_pixels(load_config(tree={"data": {"source": "synthetic"}}))
    assert not resizes_pixels(load_config(tree={"data": {"source": "folder", "path": "/no/such/folder"}}))
