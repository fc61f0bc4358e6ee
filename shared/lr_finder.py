"""The learning-rate range test: train briefly while the rate grows exponentially, and read a good
rate off the loss curve.

Smith 2017, "Cyclical Learning Rates for Training Neural Networks", Sec. 3.3 ("LR range test"), in
the form fastai's `lr_find` popularised: one rate per batch from `min_lr` to `max_lr` on a log scale,
the loss smoothed exponentially (beta 0.98, bias-corrected like Adam's moments), the test stopped
once the smoothed loss passes 4x its minimum. The suggestion is the rate where the smoothed loss
falls fastest per decade of learning rate; the minimum's rate / 10 is the older rule of thumb.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import keras
import numpy as np

from shared.callbacks import built_before_fit
from shared.config_schema import Config, with_changes
from shared.data import ends_promptly
from shared.errors import UserError
from shared.progress import keras_verbosity

BETA = 0.98  # smoothing of the per-batch loss
DIVERGENCE = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum


class LRRangeTest(keras.callbacks.Callback):
    """Sets the optimizer's learning rate before every batch, from `min_lr` to `max_lr` exponentially over
    `steps` batches, and records (rate, smoothed loss) after it; stops training when the loss diverges."""

    def __init__(self, min_lr: float, max_lr: float, steps: int, beta: float = BETA, divergence: float = DIVERGENCE):
        super().__init__()
        self.schedule = min_lr * (max_lr / min_lr) ** (np.arange(steps) / (steps - 1))
        self.beta = beta
        self.divergence = divergence
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.stopped_because: str | None = None  # "diverged", "nan", or None when every step ran
        self._average = 0.0
        self._best = math.inf

    def on_train_batch_begin(self, batch, logs=None):
        # Keras' batch logs hold the running mean over the epoch; resetting makes them this batch's loss.
        self.model.reset_metrics()
        self.model.optimizer.learning_rate = float(self.schedule[min(batch, len(self.schedule) - 1)])

    def on_train_batch_end(self, batch, logs=None):
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            self.stopped_because = "nan"
            self.model.stop_training = True
            return
        self._average = self.beta * self._average + (1 - self.beta) * loss
        smoothed = self._average / (1 - self.beta ** (len(self.losses) + 1))  # bias correction
        self.lrs.append(float(self.schedule[min(batch, len(self.schedule) - 1)]))
        self.losses.append(smoothed)
        self._best = min(self._best, smoothed)
        if smoothed > self.divergence * self._best:
            self.stopped_because = "diverged"
            self.model.stop_training = True


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(steepest-descent rate, minimum-loss rate / 10). The slope is taken per decade of learning rate,
    skipping the first tenth of the points (fastai's skip_start: the smoothed loss is still settling
    there), and only up to the minimum: after it the loss rises, and a fall there is noise on the way
    to divergence."""
    best = int(np.argmin(losses))
    skip = len(losses) // 10
    if best - skip < 2:  # too few points before the minimum for a slope
        return lrs[best], lrs[best] / 10
    segment = slice(skip, best + 1)
    slopes = np.gradient(np.asarray(losses[segment]), np.log10(lrs[segment]))
    return lrs[skip + int(np.argmin(slopes))], lrs[best] / 10


def _check_arguments(min_lr: float, max_lr: float, steps: int) -> None:
    for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value!r}; e.g. --{name.replace('_', '-')} 1e-6")
    if not 0 < min_lr < max_lr:
        raise UserError(f"the learning-rate range must satisfy 0 < min_lr < max_lr, got min_lr={min_lr}, "
                        f"max_lr={max_lr}; e.g. min_lr 1e-6 and max_lr 1")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 10:
        raise UserError(f"steps must be an integer of at least 10, got {steps!r}; 100 is usual")


def _verbosity(config: Config) -> int:
    # One epoch: a progress bar on a terminal is useful, a one-line summary in a log is not.
    return keras_verbosity(1 if config.train.verbose else 0, instead=0)


def lr_range_test(config: Config, min_lr: float = 1e-6, max_lr: float = 1.0, steps: int = 100,
                  out_png: Path | None = None) -> dict:
    """Train the config's model (on its training data, at its batch size) for at most `steps` batches
    while the learning rate grows exponentially from `min_lr` to `max_lr`. The config is not changed.

    Returns {"lrs", "losses" (smoothed), "suggested_lr" (steepest descent), "min_loss_lr" (the
    minimum's rate / 10), "stopped" ("diverged", "nan" or None), "steps" (requested), "batch_size",
    "base_batch_size"}; with `out_png`, also writes the loss-vs-rate plot there and adds "plot"."""
    from shared import optim
    from shared.lifecycle import compile_phase, precision_policy, prepare
    from shared.tasks import task_for

    _check_arguments(min_lr, max_lr, steps)
    if out_png is not None:
        out_png = Path(out_png)
        out_png.parent.mkdir(parents=True, exist_ok=True)  # fail before training, not after
    base_batch_size = config.train.lr.base_batch_size
    # A constant rate without warmup or batch scaling: the optimizer then holds a plain variable
    # the callback can set (a schedule object would refuse it).
    config = with_changes(config, {"train.lr.schedule": "constant", "train.lr.warmup_epochs": 0.0,
                                   "train.lr.base_batch_size": None, "train.lr.base": float(min_lr)})
    with precision_policy(config.train.precision):  # as training builds it: mixed precision changes the loss
        _, module, model, data, task = prepare(task_for(config))
        config = task.config
        optim.apply_weight_decay(model, config.train)
        compile_phase(task, model, model, module, data, config.train.epochs, 1.0, 1)
    train, _ = task.fit_data(model, module, data)  # the labels as training's loss wants them
    train = ends_promptly(train)  # as the runner's fit: no wait for tf.data's autotuning thread at the end
    built_before_fit(model, train)  # as the runner's fit: one trace of the step
    finder = LRRangeTest(min_lr, max_lr, steps)
    # The training set repeats forever, so one "epoch" of `steps` batches never runs short.
    model.fit(train, epochs=1, steps_per_epoch=steps, callbacks=[finder], verbose=_verbosity(config), shuffle=False)
    if not finder.lrs:
        raise UserError(f"the loss was not finite from the first batch at learning rate {min_lr:g}; "
                        f"lower min_lr, or check the data and the model")
    suggested, min_loss = suggest(finder.lrs, finder.losses)
    result = {"lrs": finder.lrs, "losses": finder.losses, "suggested_lr": float(suggested),
              "min_loss_lr": float(min_loss), "stopped": finder.stopped_because, "steps": steps,
              "batch_size": config.train.batch_size, "base_batch_size": base_batch_size}
    if out_png is not None:
        plot(result, out_png)
        result["plot"] = str(out_png)
    return result


def plot(result: dict, out_png: Path) -> None:
    """Smoothed loss against learning rate (log axis) with the suggestion marked, written atomically:
    a temporary file in the same folder, renamed over `out_png`, so a reader never sees half a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_png = Path(out_png)
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)  # off-screen rendering: no pyplot, no window, no global state
    axes = figure.add_subplot()
    axes.plot(result["lrs"], result["losses"], color="tab:blue", label="smoothed training loss")
    suggested = result["suggested_lr"]
    at = result["losses"][result["lrs"].index(suggested)] if suggested in result["lrs"] else None
    axes.axvline(suggested, color="tab:red", linestyle="--", label=f"suggested {suggested:.2e} (steepest descent)")
    if at is not None:
        axes.plot([suggested], [at], "o", color="tab:red")
    axes.axvline(result["min_loss_lr"], color="tab:gray", linestyle=":",
                 label=f"minimum / 10: {result['min_loss_lr']:.2e}")
    # Zoom on the useful part: up to the highest loss before the minimum; the divergence runs off the top.
    best = int(np.argmin(result["losses"]))
    low, high = result["losses"][best], max(result["losses"][:best + 1])
    pad = 0.1 * (high - low) or 0.1 * abs(high) or 0.1
    axes.set_ylim(low - pad, high + 2 * pad)
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("loss (smoothed)")
    axes.set_title("learning-rate range test")
    axes.legend(loc="best", fontsize="small")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    # Same folder, so the rename is atomic; opened normally, so the file gets the usual permissions.
    temporary = out_png.with_name(f".{out_png.name}.{os.getpid()}.partial")
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, out_png)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def format_report(result: dict) -> str:
    """A few lines for the terminal: the range covered, why it stopped, and the suggestions."""
    lrs, losses = result["lrs"], result["losses"]
    best = int(np.argmin(losses))
    stopped = {"diverged": f"stopped: the loss passed {DIVERGENCE:g}x its minimum",
               "nan": "stopped: the loss became NaN"}.get(result.get("stopped"), "ran every step")
    lines = [
        f"learning-rate range test: {len(lrs)} of {result.get('steps', len(lrs))} steps, "
        f"lr {lrs[0]:.2e} .. {lrs[-1]:.2e} ({stopped})",
        f"lowest smoothed loss {losses[best]:.4f} at lr {lrs[best]:.2e}",
        f"suggested lr: {result['suggested_lr']:.2e} (steepest descent); "
        f"minimum / 10: {result['min_loss_lr']:.2e}",
    ]
    if best == 0:
        lines.append("note: the loss never fell; lower min_lr")
    elif best == len(losses) - 1 and not result.get("stopped"):
        lines.append("note: the loss was still falling at max_lr; raise max_lr to see where it diverges")
    if result.get("plot"):
        lines.append(f"plot: {result['plot']}")
    base_batch_size, batch_size = result.get("base_batch_size"), result.get("batch_size")
    if base_batch_size and batch_size:  # the config scales lr.base by batch_size / base_batch_size
        base = result["suggested_lr"] * base_batch_size / batch_size
        lines.append(f"set it with --set train.lr.base={base:.2g} (the rate for batch {base_batch_size}; "
                     f"train.lr.base_batch_size scales it to batch {batch_size})")
    else:
        lines.append(f"set it with --set train.lr.base={result['suggested_lr']:.2g}")
    return "\n".join(lines)
