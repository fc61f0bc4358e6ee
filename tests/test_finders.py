"""The learning-rate range test (shared.lr_finder) and the batch-size search (shared.batch_finder)."""

from __future__ import annotations

import math

import pytest
import tensorflow as tf
from PIL import Image

from shared.batch_finder import TrainStepProbe, find_batch_size
from shared.batch_finder import format_report as batch_report
from shared.config import load_config
from shared.errors import UserError
from shared.lr_finder import LRRangeTest, lr_range_test, suggest
from shared.lr_finder import format_report as lr_report

from conftest import tiny_tree


@pytest.mark.slow
def test_lr_range_test_sweeps_exponentially_and_plots(tmp_path, one_conv_model):
    # Label smoothing: the labels must reach the loss one-hot, as training feeds them.
    tree = tiny_tree(tmp_path / "runs", train={"batch_size": 16, "label_smoothing": 0.1})
    tree["model"] = {**one_conv_model, "width": 4}  # the sweep is checked, not the model
    config = load_config(tree=tree)
    out = tmp_path / "plots" / "lr.png"
    result = lr_range_test(config, min_lr=1e-4, max_lr=10.0, steps=20, out_png=out)
    lrs, losses = result["lrs"], result["losses"]
    assert 2 <= len(lrs) == len(losses) <= 20
    assert all(b > a for a, b in zip(lrs, lrs[1:]))
    assert lrs[0] == pytest.approx(1e-4)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]  # one constant factor: (max/min)^(1/(steps-1))
    assert ratios == pytest.approx([1e5 ** (1 / 19)] * len(ratios))
    assert all(math.isfinite(loss) for loss in losses)
    assert 1e-4 <= result["suggested_lr"] <= 10.0 and result["suggested_lr"] in lrs
    assert result["min_loss_lr"] == pytest.approx(lrs[losses.index(min(losses))] / 10)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 100
    assert [p.name for p in out.parent.iterdir()] == ["lr.png"]  # no temporary file left behind
    assert config.train.lr.base == 0.05 and config.model.hparams == {"width": 4}  # the config is left as it was
    report = lr_report(result)
    assert "suggested lr" in report and "train.lr.base=" in report and str(out) in report


def test_lr_range_test_stops_when_the_loss_diverges():
    class Stub:  # what the callback touches of a Keras model
        stop_training = False
        resets = 0

        class optimizer:
            learning_rate = 0.0

        def reset_metrics(self):
            self.resets += 1

    callback = LRRangeTest(1e-3, 1.0, steps=50)
    callback.set_model(Stub())
    for batch, loss in enumerate([2.0, 1.5, 1.0, 0.5, 0.4, 50.0, 50.0, 50.0]):
        callback.on_train_batch_begin(batch)
        callback.on_train_batch_end(batch, {"loss": loss})
        if callback.model.stop_training:
            break
    # Bias-corrected smoothing: the first value is the raw loss; the jump to 50 passes 4x the minimum.
    assert callback.losses[0] == pytest.approx(2.0)
    assert callback.stopped_because == "diverged" and len(callback.losses) < 8
    assert callback.losses[-1] > 4 * min(callback.losses)
    # Per-batch losses, not Keras' running mean over the epoch: the metrics are reset before every batch.
    assert callback.model.resets == len(callback.losses)
    assert callback.model.optimizer.learning_rate == callback.lrs[-1] == pytest.approx(1e-3 * 1000 ** (5 / 49))

    callback = LRRangeTest(1e-3, 1.0, steps=50)
    callback.set_model(Stub())
    callback.on_train_batch_begin(0)
    callback.on_train_batch_end(0, {"loss": float("nan")})
    assert callback.stopped_because == "nan" and callback.losses == [] and callback.model.stop_training


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = [10 ** (-5 + i / 2) for i in range(11)]
    # The minimum is at index 7. Steeper falls must not count: from the first point (the smoothing still
    # settling) and from 4.0 back to 0.75 after the minimum (noise on the way to divergence).
    losses = [5.0, 2.3, 2.29, 2.2, 1.6, 1.0, 0.8, 0.7, 4.0, 0.75, 0.72]
    steepest, tenth = suggest(lrs, losses)
    assert steepest == lrs[4] and tenth == pytest.approx(lrs[7] / 10)
    assert suggest(lrs[:3], [1.0, 2.0, 3.0]) == (lrs[0], pytest.approx(lrs[0] / 10))  # never fell


@pytest.mark.parametrize("kwargs, words", [
    ({"min_lr": 0.0}, "0 < min_lr < max_lr"),
    ({"min_lr": 1.0, "max_lr": 0.1}, "0 < min_lr < max_lr"),
    ({"max_lr": float("inf")}, "finite"),
    ({"steps": 5}, "at least 10"),
    ({"steps": 10.5}, "at least 10"),
])
def test_lr_range_test_rejects_bad_arguments_before_building(tmp_path, kwargs, words):
    config = load_config(tree=tiny_tree(tmp_path / "runs"))
    with pytest.raises(UserError, match=words):
        lr_range_test(config, **kwargs)


class FakeMemory:
    """A probe with a memory limit: batches above `limit` raise TensorFlow's OOM error."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.calls: list[int] = []

    def __call__(self, batch_size: int) -> None:
        self.calls.append(batch_size)
        if self.limit is not None and batch_size > self.limit:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")


@pytest.mark.parametrize("limit", [300, 1, 8, 9, 4095])
def test_batch_search_finds_the_exact_limit_in_logarithmic_tries(limit):
    probe = FakeMemory(limit)
    result = find_batch_size(None, start=8, max_batch=4096, probe=probe)
    assert result["batch_size"] == limit and result["limit_reached"] is False
    assert [size for size, _ in result["tried"]] == probe.calls
    assert all(fits == (size <= limit) for size, fits in result["tried"])
    assert len(probe.calls) <= 2 * math.ceil(math.log2(4096)) + 1  # doubling then bisection, not a scan
    assert "OOM" in batch_report(result) and f"train.batch_size={limit // 8 * 8 if limit >= 8 else limit}" \
        in batch_report(result)


def test_batch_search_limit_300_probes():
    probe = FakeMemory(300)
    result = find_batch_size(None, start=8, max_batch=4096, probe=probe)
    assert probe.calls[:7] == [8, 16, 32, 64, 128, 256, 512]  # doubles until the first failure
    assert len(probe.calls) == 7 + 8  # then log2(512 - 256) = 8 bisection steps
    assert "train.batch_size=296" in batch_report(result)


def test_batch_search_stops_at_the_cap_when_memory_never_runs_out():
    probe = FakeMemory(None)
    result = find_batch_size(None, start=8, max_batch=100, probe=probe)
    assert result["batch_size"] == 100 and result["limit_reached"] is True
    assert probe.calls == [8, 16, 32, 64, 100]
    assert "max_batch cap, not the memory limit" in batch_report(result)


def test_batch_search_lets_other_errors_through_and_checks_arguments():
    def broken(batch_size):
        raise tf.errors.InvalidArgumentError(None, None, "incompatible shapes")

    with pytest.raises(tf.errors.InvalidArgumentError):
        find_batch_size(None, probe=broken)
    with pytest.raises(UserError, match="not even a batch of 1"):
        find_batch_size(None, probe=FakeMemory(0))
    with pytest.raises(UserError, match="above max_batch"):
        find_batch_size(None, start=64, max_batch=32, probe=FakeMemory(None))
    with pytest.raises(UserError, match="positive integer"):
        find_batch_size(None, steps=0, probe=FakeMemory(None))


@pytest.mark.slow
def test_default_probe_trains_the_config_model(tmp_path, one_conv_model):
    tree = tiny_tree(tmp_path / "runs")
    tree["model"] = one_conv_model  # the one-convolution model: four batch sizes, four tracings
    config = load_config(tree=tree)
    probe = TrainStepProbe(config, steps=2)
    result = find_batch_size(config, max_batch=64, probe=probe)
    assert result["batch_size"] == 64 and result["limit_reached"] is True
    assert result["tried"] == [(8, True), (16, True), (32, True), (64, True)]
    assert probe.steps_run == 8 and int(probe.model.optimizer.iterations.numpy()) == 8  # 2 steps per size
    assert result["device"]


AUX_MODEL = '''
import keras
from keras import layers

AUX_LOSS_WEIGHTS = {"aux": 0.3}


def build(num_classes=10, input_shape=(16, 16, 3)):
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(4, 3, activation="relu")(inputs)
    side = layers.Dense(num_classes, activation="softmax", name="aux")(layers.GlobalAveragePooling2D()(x))
    main = layers.Dense(num_classes, activation="softmax", name="predictions")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, {"predictions": main, "aux": side})
'''


@pytest.mark.slow
def test_default_probe_gives_every_output_a_label_and_rebuilds_after_oom(tmp_path):
    folder = tmp_path / "auxnet"
    folder.mkdir()
    (folder / "model.py").write_text(AUX_MODEL)
    tree = tiny_tree(tmp_path / "runs")
    tree["model"] = {"name": "auxnet", "path": str(folder)}
    tree["train"]["label_smoothing"] = 0.1  # one-hot labels for every head
    probe = TrainStepProbe(load_config(tree=tree), steps=1)
    probe(4)
    assert probe.steps_run == 1

    real_call = probe.model.train_on_batch

    def out_of_memory(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating")

    probe.model.train_on_batch = out_of_memory
    with pytest.raises(tf.errors.ResourceExhaustedError):
        probe(4)
    assert probe.model is None  # released; the next try builds a fresh model
    probe(4)
    assert probe.steps_run == 2 and probe.model.train_on_batch is not real_call
