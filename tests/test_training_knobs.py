"""Recipe knobs from the config: optimizers, schedules, weight decay (L2 and decoupled), clipping,
EMA, label smoothing, mixed precision, layer freezing; and the finetune / finetune-all commands."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from conftest import tiny_backbone_model, tiny_tree
from shared import optim, runner
from shared.config import load_config
from shared.errors import UserError


def train_config(**train):
    return load_config(tree={"train": {"epochs": 10, **train}}).train


@pytest.mark.parametrize("name, cls", [("sgd", keras.optimizers.SGD), ("rmsprop", keras.optimizers.RMSprop),
                                       ("adam", keras.optimizers.Adam), ("adamw", keras.optimizers.AdamW)])
def test_optimizers_and_their_options(name, cls):
    train = train_config(optimizer={"name": name, "clip_global_norm": 1.0}, ema_momentum=0.999,
                         weight_decay=1e-4, weight_decay_mode="decoupled")
    opt = optim.make_optimizer(train, steps_per_epoch=10)
    assert type(opt) is cls
    assert opt.global_clipnorm == 1.0 and opt.use_ema and opt.ema_momentum == 0.999
    assert opt.weight_decay == pytest.approx(1e-4)


def test_rmsprop_is_the_tf_recipe_form():
    opt = optim.make_optimizer(train_config(optimizer={"name": "rmsprop", "momentum": 0.9}), 10)
    assert opt.rho == 0.9 and opt.momentum == 0.9 and opt.epsilon == pytest.approx(1e-3)


def test_l2_and_decoupled_weight_decay_are_exclusive():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    optim.apply_weight_decay(model, train_config(weight_decay=1e-2, weight_decay_mode="decoupled"))
    assert model.layers[0].kernel.regularizer is None  # the optimizer decays instead
    optim.apply_weight_decay(model, train_config(weight_decay=1e-2))
    assert model.layers[0].kernel.regularizer is not None
    assert optim.make_optimizer(train_config(weight_decay=1e-2), 10).weight_decay is None


def test_polynomial_schedule_with_warmup():
    train = train_config(lr={"base": 1.0, "schedule": "polynomial", "power": 2.0, "end": 0.0, "warmup_epochs": 1})
    schedule = optim.learning_rate(train, steps_per_epoch=10)
    values = [float(schedule(step)) for step in (0, 9, 10, 55, 100)]
    assert values[0] == pytest.approx(0.1) and values[1] == pytest.approx(1.0)  # linear warmup
    assert values[2] == pytest.approx(1.0)
    assert values[3] == pytest.approx((1 - 45 / 90) ** 2)
    assert values[4] == pytest.approx(0.0)


def test_global_batch_scales_the_rate():
    train = train_config(batch_size=64, lr={"base": 0.1, "base_batch_size": 256})
    assert optim.base_learning_rate(train, replicas=4) == pytest.approx(0.1)
    assert optim.base_learning_rate(train, replicas=1) == pytest.approx(0.025)


@pytest.mark.parametrize("change, fragment", [
    ({"label_smoothing": 1.0}, "train.label_smoothing"),
    ({"ema_momentum": 1.5}, "train.ema_momentum"),
    ({"optimizer": {"clip_norm": -1.0}}, "clip_norm is -1.0; it must be > 0"),
    ({"precision": "float8"}, "choose one of float32, mixed_float16, mixed_bfloat16"),
])
def test_bad_knobs(change, fragment):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        load_config(tree={"train": change})


def tiny_run(tmp_path, model: dict | None = None, **train):
    """One epoch of 2 batches: these runs check plumbing, not learning. `model`: another model section (the
    tiny ResNet's by default)."""
    from shared.lifecycle import train as run_training

    tree = tiny_tree(tmp_path / "runs", data={"synthetic_train": 64, "synthetic_test": 32},
                     train={"epochs": 1, "verbose": 0, "lr": {"base": 0.05}, **train})
    if model is not None:
        tree["model"] = model
    return run_training(load_config(tree=tree))


@pytest.mark.slow
def test_label_smoothing_and_ema_train_and_retest_the_same(tmp_path, one_conv_model):
    from shared.lifecycle import test as evaluate

    run = tiny_run(tmp_path, one_conv_model, label_smoothing=0.1, ema_momentum=0.9,
                   optimizer={"name": "sgd", "nesterov": True})
    recorded = run.test_metrics()
    assert recorded["weights"] == "ema"
    assert evaluate(run)["top1"] == recorded["top1"]  # the checkpoint holds the averaged weights
    assert (run.path / "curves.png").is_file() and (run.path / "confusion.png").is_file()


@pytest.mark.slow
def test_mixed_bfloat16_keeps_float32_probabilities(tmp_path, one_conv_model):
    from shared.modelzoo import build_model, load_model_module, model_dir

    run = tiny_run(tmp_path, one_conv_model, precision="mixed_bfloat16")  # the ResNet is built in bfloat16 below
    assert run.status()["status"] == "finished"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    module = load_model_module(model_dir("resnet"))
    from shared.lifecycle import precision_policy

    with precision_policy("mixed_bfloat16"):
        model = build_model(module, 4, (16, 16, 3), {"depth": 18, "width": 4, "small_input": True})
    assert model.get_layer("conv1_conv").compute_dtype == "bfloat16"
    assert model(np.zeros((1, 16, 16, 3), "float32")).dtype == "float32"


@pytest.mark.slow
def test_freeze_by_pattern_keeps_those_weights(tmp_path):
    from shared.modelzoo import build_model, load_model_module

    model = tiny_backbone_model(tmp_path)
    run = tiny_run(tmp_path, model=model, freeze=["conv2*"], seed=3)
    trained = keras.saving.load_model(run.last_checkpoint(), compile=False)
    keras.utils.set_random_seed(3)
    fresh = build_model(load_model_module(Path(model["path"])), 4, (16, 16, 3), {"width": 4})
    frozen = trained.get_layer("conv2").kernel.numpy()
    assert np.array_equal(frozen, fresh.get_layer("conv2").kernel.numpy())
    assert not np.array_equal(trained.get_layer("conv3").kernel.numpy(), fresh.get_layer("conv3").kernel.numpy())


@pytest.mark.slow
def test_finetune_and_finetune_all_from_a_run(tmp_path, capsys):
    model = tiny_backbone_model(tmp_path)  # what is checked is the commands' plumbing, on any backbone
    source = tiny_run(tmp_path / "source", model=model, epochs=2)
    tree = tiny_tree(tmp_path / "runs", data={"num_classes": 3, "synthetic_train": 64, "synthetic_test": 32},
                     train={"epochs": 2, "verbose": 0, "lr": {"base": 0.05}})
    tree["model"] = model
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump(tree))

    assert runner.main(["finetune", "--config", str(config), "--from", str(source.path)]) == 0
    assert runner.main(["finetune-all", "--config", str(config), "--from", str(source.path),
                        "--set", "init.head_epochs=1", "--set", "init.lr_scale=0.5"]) == 0
    capsys.readouterr()
    head_only, all_layers = sorted((tmp_path / "runs" / "tiny_backbone").iterdir())
    recorded = yaml.safe_load((head_only / "config.yaml").read_text())
    assert recorded["init"]["from_run"] == str(source.path) and recorded["train"]["freeze"] == ["backbone"]
    assert f"Starting weights: weights from {source.path}" in (head_only / "notes.md").read_text()
    # the frozen backbone kept the source's weights; the new 3-class head trained
    before = keras.saving.load_model(source.last_checkpoint(), compile=False)
    after = keras.saving.load_model(sorted((head_only / "checkpoints").glob("epoch-*.keras"))[-1], compile=False)
    for layer in ("conv1", "conv3"):
        assert np.array_equal(before.get_layer(layer).kernel.numpy(), after.get_layer(layer).kernel.numpy())
    assert after.get_layer("predictions").kernel.shape[-1] == 3
    # finetune-all: one head-only epoch, then every layer at half the rate; epochs counted through
    rows = (all_layers / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1"]
    lrs = [float(row.split(",")[rows[0].split(",").index("lr")]) for row in rows[1:]]
    assert lrs[1] == pytest.approx(0.025)
    final = keras.saving.load_model(all_layers / "checkpoints" / "epoch-0002.keras", compile=False)
    assert not np.array_equal(before.get_layer("conv1").kernel.numpy(), final.get_layer("conv1").kernel.numpy())


def test_finetune_mismatch_is_one_line(tmp_path, trained_run, capsys):
    source, _ = trained_run
    tree = tiny_tree(tmp_path / "runs")
    tree["model"]["width"] = 8  # the source run was built at width 4
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump(tree))
    code = runner.main(["finetune", "--config", str(config), "--from", str(source.path)])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit" in err and "model.width" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "resnet").exists()


@pytest.mark.slow
def test_preview_lr_sweep_and_find_batch_commands(tmp_path, capsys, one_conv_model):
    config = tmp_path / "tiny.yaml"
    tree = tiny_tree(tmp_path / "runs", data={"augment": ["horizontal_flip"]})
    tree["model"] = one_conv_model  # the commands' plumbing is checked, not the model
    config.write_text(yaml.safe_dump(tree))
    assert runner.main(["preview", "--config", str(config), "--count", "8", "--out", str(tmp_path / "p.png")]) == 0
    assert runner.main(["lr-sweep", "--config", str(config), "--steps", "12", "--out", str(tmp_path / "lr.png")]) == 0
    assert runner.main(["find-batch", "--config", str(config), "--max-batch", "32"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "p.png").is_file() and (tmp_path / "lr.png").is_file()
    assert "suggested lr" in out and "32" in out
    assert runner.main(["preview", "--config", str(config), "--count", "0"]) == 2


@pytest.mark.slow
def test_distill_command_trains_a_student_that_retests_alone(tmp_path, trained_run, capsys, one_conv_model):
    teacher, _ = trained_run
    tree = tiny_tree(tmp_path / "runs", data={"synthetic_train": 64, "synthetic_test": 32},
                     train={"epochs": 1, "verbose": 0, "lr": {"base": 0.05}})
    tree["model"] = one_conv_model  # a smaller student (the command is checked; the losses: tests/test_distill.py)
    config = tmp_path / "student.yaml"
    config.write_text(yaml.safe_dump(tree))
    assert runner.main(["distill", "--config", str(config), "--teacher", str(teacher.path),
                        "--set", "distill.temperature=2.0"]) == 0
    (student_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    recorded = yaml.safe_load((student_dir / "config.yaml").read_text())
    assert recorded["distill"] == {"teacher": str(teacher.path.resolve()), "temperature": 2.0, "alpha": 0.9}
    metrics = json.loads((student_dir / "test_metrics.json").read_text())
    capsys.readouterr()
    assert runner.main(["test", "--run", str(student_dir)]) == 0  # the checkpoint is the student alone
    assert f"top-1 {metrics['top1']:.4f}" in capsys.readouterr().out
    assert runner.main(["distill", "--config", str(config), "--teacher", str(tmp_path / "nope")]) == 2


# TINY_MODEL with an auxiliary head, the shape of GoogLeNet's outputs (a dict naming the classifier "predictions")
AUX_MODEL = '''
import keras

AUX_LOSS_WEIGHTS = {"aux": 0.3}


def build(num_classes: int = 10, input_shape: tuple = (16, 16, 3), aux_heads: bool = True):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 255.0)(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = {"predictions": keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)}
    if aux_heads:
        outputs["aux"] = keras.layers.Dense(num_classes, activation="softmax", name="aux")(x)
    return keras.Model(inputs, outputs, name="tiny_aux")
'''


def test_a_model_with_auxiliary_heads_traces_its_train_step_once(tmp_path, monkeypatch):
    """Each output's loss tracker is a variable: made in the first traced step (Keras' way without an explicit
    strategy), it makes TensorFlow trace the whole step again; the lifecycle builds them before fit."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    traces = []
    step = TensorFlowTrainer.train_step
    monkeypatch.setattr(TensorFlowTrainer, "train_step", lambda self, data: traces.append(1) or step(self, data))
    (tmp_path / "aux_model").mkdir()
    (tmp_path / "aux_model" / "model.py").write_text(AUX_MODEL)
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 2})
    tree["model"] = {"name": "tiny_aux", "path": str(tmp_path / "aux_model")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tree))
    assert runner.main(["--config", str(tmp_path / "recipe.yaml")]) == 0
    assert len(traces) == 1
    (run,) = (tmp_path / "runs" / "tiny_aux").iterdir()
    assert "aux_loss" in (run / "metrics.csv").read_text().splitlines()[0]  # the trackers are there, built early
