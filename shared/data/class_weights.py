"""`train.class_weight`: a loss weight per class against class imbalance, resolved once from the
training split (`auto`: inverse class frequency) or the config's {class name: weight}, and applied as
per-example sample weights, which Keras weighs into every output's loss (auxiliary heads too, where
fit's own `class_weight` refuses multi-output models). Validation and test metrics stay unweighted."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from shared.errors import UserError

AUTO = "auto"


def resolve(setting, class_names: list[str], train_labels: list[int] | None, source: str) -> list[float] | None:
    """One weight per class (index order), or None without train.class_weight. `auto`: n / (k * count_c)
    over the training split's labels (a class without training images gets 1.0); a mapping names classes,
    and those it does not name get 1.0."""
    if setting is None:
        return None
    if isinstance(setting, str):
        if setting != AUTO:
            raise UserError(f"train.class_weight is {setting!r}; set it to auto or to {{class name: weight}}")
        if train_labels is None:
            raise UserError(f"train.class_weight: auto needs the training split's class counts, which the "
                            f"{source} source does not list without reading every image; give the weights as "
                            f"{{class name: weight}}")
        counts = Counter(train_labels)
        return auto([counts[i] for i in range(len(class_names))])
    known = {name: i for i, name in enumerate(class_names)}
    weights = [1.0] * len(class_names)
    for key, value in setting.items():
        name = str(key)  # YAML reads a class folder named 0 as the number 0
        if name not in known:
            shown = ", ".join(class_names[:20]) + (" ..." if len(class_names) > 20 else "")
            raise UserError(f"train.class_weight names {name!r}, which is not a class of this data; "
                            f"the classes are {shown}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UserError(f"train.class_weight.{name} is {value!r}; a class weight must be a positive number")
        weights[known[name]] = float(value)
    return weights


def auto(counts: Sequence[int]) -> list[float]:
    """`auto` from the examples of each class (index order): n / (k * count_c), 1.0 for a class without any.
    For a source that does not list its labels but whose writer counted them (the loop's shard sets)."""
    total, k = sum(counts), len(counts)
    return [round_weight(total / (k * count)) if count else 1.0 for count in counts]


def round_weight(weight: float) -> float:
    """Six significant digits: the weights config.yaml records are exactly the ones training uses."""
    return float(f"{weight:.6g}")


def as_config(weights: list[float], class_names: list[str]) -> dict[str, float]:
    """The resolved weights as the run's config records them: every class by name."""
    return {name: weight for name, weight in zip(class_names, weights)}


def with_sample_weights(dataset, weights: list[float], soft_labels: bool):
    """(images, labels) -> (images, labels, per-example weights): a class index's weight, or for the mixed
    one-hot labels of MixUp / CutMix the mixture of the classes' weights in the same proportions."""
    import tensorflow as tf

    table = tf.constant(weights, tf.float32)

    def weigh(images, labels):
        if soft_labels:
            return images, labels, tf.reduce_sum(tf.cast(labels, tf.float32) * table, axis=-1)
        return images, labels, tf.gather(table, labels)
    return dataset.map(weigh)
