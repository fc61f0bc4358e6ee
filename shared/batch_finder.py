"""The largest training batch that fits in device memory, found by trying: double the batch until a
training step runs out of memory, then binary-search between the last size that fitted and the first
that did not (the search of PyTorch Lightning's `scale_batch_size(mode="binsearch")`). Each try runs
real training steps (forward, backward, optimizer update) on random tensors, so activations, gradients
and optimizer state are all counted, without reading any data.

The answer is for one device and this process: memory other programs hold, or fragmentation later in a
long run, can lower it, hence the suggestion rounds down.
"""

from __future__ import annotations

import gc
from typing import Callable

import tensorflow as tf

from shared.config_schema import Config
from shared.errors import UserError

Probe = Callable[[int], None]  # runs training at a batch size; raises when memory runs out


def is_out_of_memory(error: BaseException) -> bool:
    """TensorFlow's OOM (ResourceExhaustedError), or another error saying so (XLA and the allocators
    sometimes report it as an internal error), or Python's MemoryError on the host."""
    if isinstance(error, (tf.errors.ResourceExhaustedError, MemoryError)):
        return True
    text = str(error)
    return "OOM" in text or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def has_gpu() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def describe_device() -> str:
    """What the default probe runs on: the first GPU, named when TensorFlow knows its model, else the CPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU (no GPU visible; host memory)"
    try:
        name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "")
    except (ValueError, RuntimeError):
        name = ""
    more = f", 1 of {len(gpus)} GPUs" if len(gpus) > 1 else ""
    return f"GPU:0{f' ({name})' if name else ''}{more}"


class TrainStepProbe:
    """The default probe: the config's model, built and compiled once as `shared.lifecycle` does, trained
    for `steps` steps on random images and labels of the batch size asked for."""

    def __init__(self, config: Config, steps: int = 2):
        from shared import modelzoo
        from shared.lifecycle import precision_policy, prepare
        from shared.tasks import task_for

        self.steps = steps
        with precision_policy(config.train.precision):  # half-precision activations halve the memory
            _, self.module, model, self.data, self.task = prepare(task_for(config))
        self.config = self.task.config
        datasets = self.data.details
        self.input_shape = tuple(datasets.input_shape)
        self.num_classes = datasets.num_classes
        # MixUp / CutMix or label smoothing: one-hot targets, as the compiled loss wants
        self.one_hot = datasets.soft_labels or bool(self.config.train.label_smoothing)
        self.aux_weights = modelzoo.auxiliary_loss_weights(self.module, model)
        self.steps_run = 0  # successful training steps, over every try
        self.model = None
        self._compile(model)

    def _compile(self, model) -> None:
        from shared import optim
        from shared.lifecycle import compile_phase, precision_policy

        with precision_policy(self.config.train.precision):  # as training compiles it
            optim.apply_weight_decay(model, self.config.train)
            compile_phase(self.task, model, model, self.module, self.data, self.config.train.epochs, 1.0, 1)
        self.model = model

    def _rebuild(self) -> None:
        from shared.lifecycle import precision_policy

        with precision_policy(self.config.train.precision):
            model = self.task.build(self.module, self.input_shape)
        self._compile(model)

    def release(self) -> None:
        """Drop the model, its traced steps and optimizer state, so a failed try leaves nothing
        allocated; the next try rebuilds it. (Not keras.backend.clear_session(): that would also reset
        the process's global Keras settings, such as a dtype policy the caller set.)"""
        self.model = None
        gc.collect()

    def __call__(self, batch_size: int) -> None:
        if self.model is None:
            self._rebuild()
        try:
            images = tf.random.normal((batch_size, *self.input_shape))
            labels = tf.random.uniform((batch_size,), 0, self.num_classes, dtype=tf.int32)
            if self.one_hot:
                labels = tf.one_hot(labels, self.num_classes)
            if self.aux_weights:  # every head learns the classifier's label, as in training
                from shared.modelzoo import MAIN_OUTPUT

                labels = {name: labels for name in (MAIN_OUTPUT, *self.aux_weights)}
            for _ in range(self.steps):
                self.model.train_on_batch(images, labels)
                self.steps_run += 1
        except BaseException as error:
            if is_out_of_memory(error):
                self.release()
            raise
        finally:
            # A raised error's traceback keeps this frame alive: drop the batch before the next try.
            images = labels = None  # noqa: F841
            gc.collect()


def _check_arguments(start: int, max_batch: int, steps: int) -> None:
    for name, value in (("start", start), ("max_batch", max_batch), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if start > max_batch:
        raise UserError(f"start ({start}) is above max_batch ({max_batch}); lower start or raise max_batch")


def find_batch_size(config: Config, start: int = 8, max_batch: int = 4096, steps: int = 2,
                    probe: Probe | None = None) -> dict:
    """The largest batch size in [1, max_batch] whose training steps fit in memory.

    `probe(batch_size)` runs training at that size and raises on out-of-memory; by default a
    `TrainStepProbe` on the config's model (`steps` steps per try). Any other error propagates.
    Returns {"batch_size", "tried": [(batch, fits), ...] in order, "limit_reached" (max_batch fitted:
    memory never ran out), "device"}."""
    _check_arguments(start, max_batch, steps)
    if probe is None:
        probe = TrainStepProbe(config, steps)
    tried: list[tuple[int, bool]] = []

    def fits(batch: int) -> bool:
        try:
            probe(batch)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            tried.append((batch, False))
            return False
        tried.append((batch, True))
        return True

    # Doubling: O(log(limit / start)) tries to bracket the limit.
    batch, good, bad = start, 0, None
    while True:
        if not fits(batch):
            bad = batch
            break
        good = batch
        if batch >= max_batch:
            break
        batch = min(batch * 2, max_batch)
    # Bisection between the last fit and the first failure (0 "fits" when even `start` failed).
    if bad is not None:
        while bad - good > 1:
            middle = (good + bad) // 2
            if fits(middle):
                good = middle
            else:
                bad = middle
    if good == 0:
        raise UserError(f"not even a batch of 1 fits in memory on {describe_device()}; use a smaller model "
                        f"or data.image_size, or train.precision mixed_float16")
    return {"batch_size": good, "tried": tried, "limit_reached": bad is None, "device": describe_device()}


def suggested_batch_size(batch_size: int) -> int:
    """Rounded down to a multiple of 8 (tensor cores and most kernels prefer it, and it leaves headroom
    for fragmentation); sizes under 8 stay as they are."""
    return batch_size // 8 * 8 if batch_size >= 8 else batch_size


def format_report(result: dict) -> str:
    """A few lines for the terminal: what was tried, the limit found (or that the cap was hit), the
    setting to use."""
    batch = result["batch_size"]
    tries = ", ".join(f"{size}{'' if ok else ' (OOM)'}" for size, ok in result["tried"])
    lines = [f"device: {result['device']}", f"tried {len(result['tried'])} batch sizes: {tries}"]
    if result["limit_reached"]:
        lines.append(f"batch {batch} fitted: that is the max_batch cap, not the memory limit (memory never ran "
                     f"out); raise max_batch to look further")
    else:
        lines.append(f"largest batch that fits: {batch} (batch {batch + 1} ran out of memory)"
                     if (batch + 1, False) in result["tried"] else f"largest batch that fits: {batch}")
    suggestion = suggested_batch_size(batch)
    lines.append(f"suggested: --set train.batch_size={suggestion}"
                 + (" (rounded down to a multiple of 8)" if suggestion != batch else "")
                 + ("; it is per replica, so each GPU takes this many" if "GPUs" in result["device"] else ""))
    return "\n".join(lines)
