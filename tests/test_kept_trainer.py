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
@pytest.mark.parametrize("schedule", ["cosine", "restart"])
def test_a_second_round_trains_the_kept_model_without_a_new_trace_and_ends_where_a_new_one_does(tmp_path, source,
                                                                                                schedule):
    ends = {}
    for how in ("kept", "none"):
        folder = tmp_path / how
        folder.mkdir()
        loop, tasks = annotated_loop(folder, source, 8, schedule=schedule)
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
        if how == "kept":
            assert loop.kept.reused == 1 and loop.kept.model is model
            assert model.train_function is step and traced == []  # round 1's trace, not a new one
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
