"""A training that goes on from a finished one (`init.optimizer_state`, what the loop's continued rounds use):
the source's last checkpoint's optimizer state (momentum, step count) is in the trainer when fit starts, across
a fixed rate and a schedule (Keras gives only the first a learning-rate variable and would skip the state
whole), the schedule counts from that step (`train.lr.start_step`, `optim.FromStep`), and a step that does not
match is refused. The loop's round config asks for it from the second round on, per `loop.schedule`."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from conftest import TINY_MODEL, tiny_tree

from shared import optim, runs
from shared.config import load_config
from shared.errors import UserError

STEPS = 2 * 64 // 8  # the source: 2 epochs of 64 images, batch 8


class OptimizerAt(keras.callbacks.Callback):
    """The optimizer's variables (by position) and its rate when fit begins or ends."""

    def __init__(self, when: str):
        super().__init__()
        self.when, self.variables, self.rate = when, None, None

    def _take(self):
        optimizer = self.model.optimizer
        self.variables = [(v.name, np.array(keras.ops.convert_to_numpy(v))) for v in optimizer.variables]
        self.rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))

    def on_train_begin(self, logs=None):
        if self.when == "begin":
            self._take()

    def on_train_end(self, logs=None):
        if self.when == "end":
            self._take()


# Every run here trains with draw=False: what is checked is the optimizer and the weights, no test looks at a figure.
def tree_of(base, **train) -> dict:
    (base / "tiny").mkdir(exist_ok=True)
    (base / "tiny" / "model.py").write_text(TINY_MODEL)
    tree = tiny_tree(base / "runs", data={"synthetic_train": 64, "synthetic_test": 16},
                     train={"epochs": 2, "batch_size": 8, **train})
    tree["model"] = {"name": "tiny", "path": str(base / "tiny")}
    return tree


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished tiny run with a fixed rate (an optimizer with a learning-rate variable), and its optimizer
    at the end of training."""
    from shared.lifecycle import train

    base = tmp_path_factory.mktemp("carried")
    tree = tree_of(base, steps_per_epoch=8, lr={"base": 0.05, "schedule": "constant"})  # as a loop round says
    at_end = OptimizerAt("end")
    run = train(load_config(tree=tree), argv=["pytest"], draw=False, callbacks=[at_end])
    return run, tree, at_end


def slots(variables) -> list:
    """The optimizer's step count and slots: what is carried (a learning-rate variable is not)."""
    return [value for name, value in variables if name != "learning_rate"]


@pytest.mark.slow  # trains runs (the module's source, and more)
def test_the_optimizer_state_goes_on_from_the_source_across_a_fixed_rate_and_a_schedule(source):
    from shared.lifecycle import train

    run, tree, at_end = source
    assert int(slots(at_end.variables)[0]) == STEPS
    tree = {**tree, "init": {"from_run": str(run.path), "optimizer_state": True},
            "train": {**tree["train"], "epochs": 1, "lr": {"base": 0.02, "schedule": "cosine", "start_step": STEPS}}}
    at_begin = OptimizerAt("begin")
    continued = train(load_config(tree=tree), argv=["pytest"], draw=False, callbacks=[at_begin])
    assert len(at_begin.variables) == len(at_end.variables) - 1  # a schedule: no learning-rate variable
    for carried, saved in zip(slots(at_begin.variables), slots(at_end.variables)):
        np.testing.assert_array_equal(carried, saved)
    assert at_begin.rate == pytest.approx(0.02)  # the schedule's first step, not its step STEPS
    assert continued.status()["optimizer_from"] == {"checkpoint": str(run.last_checkpoint()), "step": STEPS}

    # and back: a schedule's state into an optimizer with a fixed rate (it keeps its own rate)
    back = {**tree, "init": {"from_run": str(continued.path), "optimizer_state": True},
            "train": {**tree["train"], "lr": {"base": 0.01, "schedule": "constant", "start_step": STEPS + 8}}}
    again = OptimizerAt("begin")
    train(load_config(tree=back), argv=["pytest"], draw=False, callbacks=[again])
    assert int(slots(again.variables)[0]) == STEPS + 8 and again.rate == pytest.approx(0.01)


@pytest.mark.slow  # trains runs (the module's source, and more)
def test_a_start_step_other_than_the_checkpoints_is_refused(source):
    from shared.lifecycle import train

    run, tree, _ = source
    tree = {**tree, "init": {"from_run": str(run.path), "optimizer_state": True},
            "train": {**tree["train"], "epochs": 1, "lr": {"base": 0.02, "start_step": 3}}}
    with pytest.raises(UserError, match=f"step {STEPS} but train.lr.start_step is 3; set train.lr.start_step: "
                                        f"{STEPS}"):
        train(load_config(tree=tree), argv=["pytest"])


def test_optimizer_state_needs_a_run_to_carry_it_from(tmp_path):
    with pytest.raises(UserError, match="init.optimizer_state is true but init.from_run is not set"):
        load_config(tree=tree_of(tmp_path, epochs=1) | {"init": {"optimizer_state": True}})


def test_a_schedule_from_a_step_counts_from_there_and_saves_its_start():
    schedule = optim.FromStep(keras.optimizers.schedules.CosineDecay(1.0, 10), 5)
    rates = [float(schedule(step)) for step in (0, 5, 10, 15, 20)]
    assert rates == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert again.start == 5 and float(again(10)) == pytest.approx(0.5)


@pytest.mark.slow  # trains runs (the module's source, and more)
def test_rounds_after_the_first_continue_the_previous_rounds_training(source):
    from shared.loop.rounds import continued_schedule

    run, tree, _ = source
    config = load_config(tree={**tree, "loop": {"lr_scale": 0.5, "schedule": "cosine"}})
    assert continued_schedule(config, None) == {}  # the first round: the recipe's own schedule from --from
    assert continued_schedule(load_config(tree=tree), str(run.path)) == {}  # restart, the default: none either
    changes = continued_schedule(config, str(run.path))
    assert changes == {"init.optimizer_state": True, "train.lr.start_step": STEPS, "train.lr.schedule": "cosine",
                       "train.lr.base": pytest.approx(0.025), "train.lr.base_batch_size": None,
                       "train.lr.warmup_epochs": 0.0}
    assert runs.Run(run.path).last_checkpoint().name == "epoch-0002.keras"


class WeightsAt(keras.callbacks.Callback):
    """The model's weights (by path) when fit begins."""

    def on_train_begin(self, logs=None):
        self.values = {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in self.model.weights}


@pytest.mark.slow  # trains runs (the module's source, and more)
@pytest.mark.parametrize("carried", [False, True], ids=["weights", "weights-and-optimizer"])
def test_shrink_and_perturb_starts_from_shrunk_weights_plus_a_fresh_initialization(source, carried):
    from shared.lifecycle import train
    from shared.tasks import rebuild

    run, tree, _ = source
    loaded = {v.path: np.array(keras.ops.convert_to_numpy(v)) for v in rebuild(run)[0].weights}
    fresh_run = WeightsAt()  # the same seed builds the same fresh initialization
    train(load_config(tree={**tree, "train": {**tree["train"], "epochs": 1}}), argv=["pytest"], draw=False,
          callbacks=[fresh_run])
    init = {"from_run": str(run.path), "shrink": 0.4, "perturb": 0.1}
    train_section = {**tree["train"], "epochs": 1}
    if carried:
        init["optimizer_state"] = True
        train_section["lr"] = {"base": 0.02, "start_step": STEPS}
    started = WeightsAt()
    shrunk = train(load_config(tree={**tree, "init": init, "train": train_section}), argv=["pytest"], draw=False,
                   callbacks=[started])
    assert set(started.values) == set(loaded)
    for path, value in started.values.items():
        np.testing.assert_allclose(value, 0.4 * loaded[path] + 0.1 * fresh_run.values[path], rtol=1e-5, atol=1e-7)
    kernel = next(path for path in loaded if path.endswith("conv/kernel"))
    assert not np.allclose(started.values[kernel], 0.4 * loaded[kernel])  # perturbed, not only shrunk
    assert "shrunk x0.4 and perturbed x0.1" in (shrunk.path / "notes.md").read_text(encoding="utf-8")


def test_shrink_and_perturb_needs_weights_to_act_on(tmp_path):
    with pytest.raises(UserError, match="init.shrink 0.5 / init.perturb 0 act on loaded weights"):
        load_config(tree=tree_of(tmp_path, epochs=1) | {"init": {"shrink": 0.5}})


def test_rounds_after_the_first_shrink_and_perturb_the_previous_rounds_weights(tmp_path):
    from shared.loop.rounds import shrunk_start

    config = load_config(tree=tree_of(tmp_path, epochs=1) | {"loop": {"shrink": 0.6, "perturb": 0.01}})
    assert shrunk_start(config, None) == {}
    assert shrunk_start(config, "runs/tiny/v0001") == {"init.shrink": 0.6, "init.perturb": 0.01}
