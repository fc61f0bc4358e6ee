"""A trainer kept between the loop's rounds in one process (`shared.kept`): the second round trains the first
round's model and compiled train step (no new build, no new trace), and ends exactly where a round that builds
and compiles its own (its rate scheduled inside the step) ends: the same weights, held-out figure and rates."""

from __future__ import annotations

import csv
import dataclasses

import keras
import numpy as np
import pytest

import test_loop
from test_loop import annotated_loop, append, classification_lines

from shared.loop import rounds as loop_module

source = test_loop.source  # the loops' source run (a module fixture)


def last_weights(run_path) -> list[np.ndarray]:
    from shared import runs
    from shared.tasks import rebuild

    return [np.asarray(w) for w in rebuild(runs.open_run(run_path))[0].get_weights()]


@pytest.mark.slow  # trains six tiny rounds
@pytest.mark.parametrize("schedule, shrink", [("cosine", 1.0), ("restart", 1.0), ("restart", 0.5)])
def test_a_second_round_trains_the_kept_model_without_a_new_trace_and_ends_where_a_new_one_does(tmp_path, source,
                                                                                                schedule, shrink):
    ends = {}
    for how in ("kept", "none"):
        folder = tmp_path / how
        folder.mkdir()
        loop, tasks = annotated_loop(folder, source, 8, schedule=schedule, shrink=shrink)
        if how == "none":  # as rounds in separate processes: each builds and compiles its own, rate scheduled inside
            loop = dataclasses.replace(loop, kept=None)
        first = loop_module.run_round(loop)
        append(tasks, classification_lines(folder, 8, 8))
        if how == "kept":
            model, step = loop.kept.model, loop.kept.model.train_function
            assert model is not None and loop.kept.reused == 0
            traced = []  # Python runs train_step only while TensorFlow traces it
            model.train_step = lambda data, step=model.train_step, traced=traced: traced.append(1) or step(data)
        second = loop_module.run_round(loop)
        notes = (second.run / "notes.md").read_text(encoding="utf-8")
        if how == "kept":
            assert loop.kept.reused == 1 and loop.kept.model is model
            assert model.train_function is step and traced == []  # round 1's trace, not a new one
        if schedule == "restart" and how == "kept":  # round 1's last checkpoint is the kept model's: not loaded again
            assert f"Starting weights: weights from {first.run} (epoch-0001.keras, in memory since" in notes
        elif schedule == "restart":
            assert "model built from its snapshotted model.py" in notes
        ends[how] = first, second
    (kept_first, kept_second), (new_first, new_second) = ends["kept"], ends["none"]
    assert kept_first.metric == new_first.metric and kept_second.metric == new_second.metric
    for kept_weight, new_weight in zip(last_weights(kept_second.run), last_weights(new_second.run)):
        np.testing.assert_allclose(kept_weight, new_weight, rtol=1e-5, atol=1e-6)
    rates = {how: [float(row["lr"]) for row in csv.DictReader((second.run / "metrics.csv").open(encoding="utf-8"))]
             for how, (_, second) in ends.items()}  # the rate at the round's end
    assert rates["kept"] == pytest.approx(rates["none"])


def test_a_kept_rate_follows_the_schedule_step_by_step():
    from shared.optim import StepSchedule

    schedule = keras.optimizers.schedules.CosineDecay(0.1, 10)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss="mse")
    seen = []

    class Rate(keras.callbacks.Callback):  # after StepSchedule: the rate the batch trains at
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))

    model.fit(np.zeros((40, 2)), np.zeros((40, 1)), batch_size=4, epochs=1, verbose=0,
              callbacks=[StepSchedule(schedule), Rate()])
    assert seen == pytest.approx([float(schedule(step)) for step in range(10)])


def test_an_archive_kept_for_its_model_is_written_again_with_the_weights_of_the_moment(tmp_path):
    import tensorflow as tf

    from shared.export import write_archive

    model = keras.Sequential([keras.Input((1, 1, 2)), keras.layers.Flatten(), keras.layers.Dense(1, use_bias=False)])
    traced = []  # Python runs an endpoint's function only while TensorFlow traces it

    def endpoints():
        def bytes_fn(image_bytes):
            traced.append("bytes")
            return {"y": model(tf.ones((tf.shape(image_bytes)[0], 1, 1, 2)))}

        def images_fn(images):
            traced.append("images")
            return {"y": model(images)}

        return bytes_fn, images_fn

    def served(folder) -> float:
        return float(tf.saved_model.load(str(folder)).signatures["predict_images"](
            images=tf.ones((1, 1, 1, 2)))["y"].numpy()[0, 0])

    model.set_weights([np.array([[1.0], [2.0]], np.float32)])
    write_archive(model, *endpoints(), (1, 1, 2), tmp_path / "first", same_as="preprocessing A")
    assert set(traced) == {"bytes", "images"}
    model.set_weights([np.array([[10.0], [20.0]], np.float32)])
    traced.clear()
    write_archive(model, *endpoints(), (1, 1, 2), tmp_path / "second", same_as="preprocessing A")
    assert traced == []  # the kept archive, not new endpoints
    assert served(tmp_path / "first") == pytest.approx(3.0) and served(tmp_path / "second") == pytest.approx(30.0)
    write_archive(model, *endpoints(), (1, 1, 2), tmp_path / "third", same_as="preprocessing B")
    assert set(traced) == {"bytes", "images"}  # another key: traced anew


def test_seeding_a_kept_run_resets_its_randomness_and_keeps_the_instantiated_traces(monkeypatch):
    import random

    import tensorflow as tf
    from tensorflow.python.eager import context

    from shared.kept import set_random_seed

    context.ensure_initialized()  # before, there is no cache to clear
    cleared = []
    clear = context.pywrap_tfe.TFE_ContextClearCaches
    monkeypatch.setattr(context.pywrap_tfe, "TFE_ContextClearCaches", lambda handle: cleared.append(1) or clear(handle))

    def draws() -> tuple:
        order = [int(x) for x in tf.data.Dataset.range(8).shuffle(8).as_numpy_iterator()]  # its seed: the global one
        layer = keras.layers.Dense(2)
        layer.build((None, 3))  # a fresh initialization (Keras' global seed generator)
        return (order, random.random(), float(np.random.rand()), float(keras.random.uniform(())),
                keras.ops.convert_to_numpy(layer.kernel).tolist())

    keras.utils.set_random_seed(5)
    assert cleared == [1]  # Keras' own: TensorFlow's seed clears the kernel cache (the test would see it)
    expected = draws()
    set_random_seed(5)
    assert cleared == [1]  # not again
    assert draws() == expected
    set_random_seed(6)
    assert draws() != expected
