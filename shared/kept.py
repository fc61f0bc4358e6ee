"""A trainer kept between runs of one process (the loop's rounds under `--watch`): the built model, its compiled
train step and its optimizer, reused by the next run whose graph is the same, so that run pays neither the build
nor Keras' trace and XLA's compile of its first step.

What may differ between two runs that share a kept trainer is what the train step reads at run time: the data
(a new pipeline of the same element structure; another one makes TensorFlow trace again, correctly), the starting
weights and optimizer state (loaded into the kept variables), and the learning rate, which a kept trainer takes
from a variable set before every batch (`optim.StepSchedule`) instead of a schedule built into the traced step.
Everything the trace builds in (the model, losses, metrics, optimizer kind and settings, weight decay, precision,
XLA, the frozen layers) is `graph_key`, and a run whose key differs builds and compiles anew.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.config_schema import Config
from shared.frozen import thaw

if TYPE_CHECKING:  # a loop folder holds one without importing Keras (shared.loop.folder)
    import keras

# train keys a run may change without changing its traced train step (the schedule, the length, the data's
# weighting, the callbacks' settings)
RUNTIME_TRAIN_KEYS = ("lr", "epochs", "steps", "steps_per_epoch", "seed", "verbose", "keep_checkpoints", "best",
                      "early_stopping", "class_weight")
MODEL_DATA_KEYS = ("image_size", "channels", "num_classes", "normalize", "mean", "std")  # what a build sees


def graph_key(config: Config, input_shape: tuple) -> str:
    """What a kept trainer must agree on with a run to be reused by it (module docstring), as one string."""
    tree = config.to_dict()
    train = {key: value for key, value in tree["train"].items() if key not in RUNTIME_TRAIN_KEYS}
    data = {key: tree["data"].get(key) for key in MODEL_DATA_KEYS}
    fixed = {key: value for key, value in tree.items() if key not in ("run", "init", "loop", "tune", "data", "train")}
    return json.dumps({**fixed, "train": train, "data": data, "init_mode": tree["init"]["mode"],
                       "input_shape": list(input_shape)}, sort_keys=True, default=str)


@dataclass
class KeptTrainer:
    """The trainer of the last finished run of this process that asked to keep it (`shared.lifecycle.train`'s
    `keep`), or nothing yet. `model` is also what its checkpoints hold; `trainer` is what fit() trained."""
    key: str | None = None
    model: keras.Model | None = None
    trainer: keras.Model | None = None
    reused: int = 0  # runs that reused it (for reports and tests)
    inference: tuple | None = None  # (a model, its task's inference model): `inference_model`
    last_checkpoint: Path | None = None  # the checkpoint `model` holds the weights of, when they are a run's last

    def model_for(self, config: Config, input_shape: tuple) -> keras.Model | None:
        """The kept model when a run of `config` may train it, else None (the run builds its own)."""
        if self.model is None or self.key != graph_key(config, thaw(input_shape)):
            return None
        return self.model

    def holds(self, model: keras.Model) -> bool:
        """Whether `model` is the kept one, compiled already (the run skips its compile)."""
        return self.model is not None and model is self.model and self.trainer is not None

    def inference_model(self, task, model: keras.Model) -> keras.Model:
        """`task.inference_model(model)`, made once per kept model: the same object round after round, whose
        test and export traces are then reused."""
        made_for, inference = self.inference if self.inference is not None else (None, None)
        if made_for is not model:
            inference = task.inference_model(model)
            self.inference = (model, inference)
        return inference

    def holds_weights_of(self, model: keras.Model, checkpoint: Path | None) -> bool:
        """Whether `model` is the kept one and its weights are `checkpoint`'s (a file of a run whose model it
        was at its end), so a run starting from that checkpoint need not load it."""
        return (self.holds(model) and checkpoint is not None and self.last_checkpoint is not None
                and Path(checkpoint).resolve() == self.last_checkpoint)

    def keep(self, config: Config, input_shape: tuple, model: keras.Model, trainer: keras.Model,
             last_checkpoint: Path | None = None) -> None:
        """Keep a finished run's trainer; `last_checkpoint`: its last checkpoint when `model` holds its weights."""
        self.key, self.model, self.trainer = graph_key(config, thaw(input_shape)), model, trainer
        self.last_checkpoint = Path(last_checkpoint).resolve() if last_checkpoint is not None else None

    def forget(self) -> None:
        """After a run that did not finish: its state is not what a next run may start from."""
        self.key = self.model = self.trainer = self.inference = self.last_checkpoint = None


def reset_optimizer(optimizer: keras.optimizers.Optimizer) -> None:
    """The optimizer as freshly built: its step count and slots (momentum, moments) zero. A kept trainer's
    optimizer for a run that starts a new optimizer rather than carrying one in."""
    import keras

    for variable in optimizer.variables:  # the rate too: a StepSchedule sets it before every batch
        variable.assign(keras.ops.zeros(variable.shape, variable.dtype))


def set_random_seed(seed: int) -> None:
    """`keras.utils.set_random_seed(seed)` for a run in a process that keeps trainers, less one side effect:
    TensorFlow's global seed clears its eager kernel cache (to restart stateful random kernels), which holds every
    traced function as instantiated and optimized by Grappler, so the kept train step, the kept test's forward
    pass and their like would each pay that again at their next call (about a second for the loop's ResNet-18).
    What a run's randomness comes from is reset all the same: Python's, NumPy's and Keras' generators, and the
    seeds tf.data and TensorFlow's ops draw from the global seed when they are built; Keras' own random ops are
    stateless (their state is in variables, not kernels)."""
    import keras
    from tensorflow.python.eager import context

    eager = context.context()
    handle = eager._context_handle  # TensorFlow clears the cache only through the handle it holds then
    eager._context_handle = None
    try:
        keras.utils.set_random_seed(seed)
    finally:
        eager._context_handle = handle
