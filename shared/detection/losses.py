"""The detector's training losses: sigmoid focal loss on the class logits and Huber (smooth L1) on the box
deltas, as RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection", Sec. 3.3 and 4) trains them;
SSD (Liu et al. 2016) uses the same smooth-L1 box term on variance-scaled deltas.

Both are Keras losses for the detector's two outputs, compiled as `model.compile(loss=detection_losses(
config))`, on targets from `shared.detection.anchors.training_targets`:

* "classes": y_true [B, A] int class targets (class id, -1 background, -2 ignore), y_pred [B, A, C]
  logits. Focal loss summed over every class of every non-ignored anchor; a background anchor's target is
  all zeros (one sigmoid per class, no background class).
* "boxes": y_true [B, A, 5] = 4 encoded deltas + the class target (so this loss knows which anchors are
  positive), y_pred [B, A, 4] deltas. Huber summed over the 4 deltas of positive anchors only.

Each is divided by the number of positive anchors in the batch (at least 1), RetinaNet's normalization: the
loss per object stays the same whatever the number of anchors. The per-image values they return are scaled
so that Keras' default mean over the batch gives exactly that sum / positives.

Why not `keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, from_logits=True)`: it has the
same alpha / gamma terms, but turns logits into probabilities first and takes the cross-entropy of the
clipped probabilities (no gradient past |logit| ~ 16) and averages over classes; here the cross-entropy comes
straight from the logits (tf.nn.sigmoid_cross_entropy_with_logits, stable) and classes are summed.
"""

from __future__ import annotations

import keras
from keras import ops

from shared.detection.anchors import IGNORE


def _normalizer(positive, batch_size):
    """Per-image scale: mean over the batch of (per-image sum * B / positives) = total sum / positives.

    Under a tf.distribute strategy each replica sees B of the global batch and Keras averages the
    replicas' losses (it scales each by 1 / replicas and sums the gradients); the positives are then
    summed over every replica and the scale is B * replicas / global positives, so the loss is the global
    batch's sum / its positives, as on one device, not a mean of per-replica ratios."""
    positives = ops.sum(ops.cast(positive, "float32"))
    replicas = 1
    context = _replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        import tensorflow as tf

        positives = context.all_reduce(tf.distribute.ReduceOp.SUM, positives)
        replicas = context.num_replicas_in_sync
    return ops.cast(batch_size, "float32") * replicas / ops.maximum(positives, 1.0)


def _replica_context():
    """The tf.distribute replica context the loss runs in (None outside one, or on another backend)."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf.distribute.get_replica_context()


def focal_loss_terms(labels, logits, alpha: float = 0.25, gamma: float = 2.0):
    """Elementwise sigmoid focal loss [B, A, C] (Lin et al. 2017, eq. 5): -alpha_t (1 - p_t)^gamma log p_t,
    one-hot targets from `labels` [B, A] (negative labels: all zeros)."""
    labels = ops.cast(labels, "int32")
    num_classes = ops.shape(logits)[-1]
    targets = ops.one_hot(ops.maximum(labels, 0), num_classes, dtype=logits.dtype)
    targets = targets * ops.cast(labels >= 0, logits.dtype)[..., None]  # background / ignore: all zeros
    cross_entropy = ops.binary_crossentropy(targets, logits, from_logits=True)  # stable, from the logits
    probabilities = ops.sigmoid(logits)
    p_t = targets * probabilities + (1.0 - targets) * (1.0 - probabilities)
    alpha_t = targets * alpha + (1.0 - targets) * (1.0 - alpha)
    return alpha_t * ops.power(1.0 - p_t, gamma) * cross_entropy


@keras.saving.register_keras_serializable(package="detection")
class FocalLoss(keras.losses.Loss):
    """Sigmoid focal loss over classes, ignoring anchors labelled -2, divided by the positive anchors.
    y_true: [B, A] class targets; y_pred: [B, A, C] logits."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, name: str = "focal_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.alpha, self.gamma = float(alpha), float(gamma)

    def call(self, y_true, y_pred):
        labels = ops.cast(y_true, "int32")
        terms = ops.sum(focal_loss_terms(labels, y_pred, self.alpha, self.gamma), axis=-1)  # [B, A]
        terms = ops.where(labels == IGNORE, 0.0, terms)
        return ops.sum(terms, axis=-1) * _normalizer(labels >= 0, ops.shape(labels)[0])

    def get_config(self) -> dict:
        return {**super().get_config(), "alpha": self.alpha, "gamma": self.gamma}


@keras.saving.register_keras_serializable(package="detection")
class BoxLoss(keras.losses.Loss):
    """Huber (smooth L1) on the deltas of positive anchors, summed over the 4 deltas, times `weight`,
    divided by the positive anchors. y_true: [B, A, 5] (deltas + class target); y_pred: [B, A, 4]."""

    def __init__(self, delta: float = 1.0, weight: float = 1.0, name: str = "box_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.delta, self.weight = float(delta), float(weight)
        # keras' Huber averages over the last axis; times 4 below makes it the sum over the deltas.
        self._huber = keras.losses.Huber(delta=self.delta, reduction=None)

    def call(self, y_true, y_pred):
        if y_true.shape[-1] != 5:
            raise ValueError(f"BoxLoss expects targets [B, A, 5] (4 deltas + class target, from "
                             f"anchors.training_targets), got shape {tuple(y_true.shape)}")
        positive = y_true[..., 4] >= 0
        huber = self._huber(y_true[..., :4], y_pred) * 4.0  # [B, A]
        huber = ops.where(positive, huber, 0.0)
        return self.weight * ops.sum(huber, axis=-1) * _normalizer(positive, ops.shape(y_pred)[0])

    def get_config(self) -> dict:
        return {**super().get_config(), "delta": self.delta, "weight": self.weight}


def detection_losses(config) -> dict[str, keras.losses.Loss]:
    """{"boxes": BoxLoss, "classes": FocalLoss} from a DetectionConfig (focal_alpha, focal_gamma,
    box_loss_weight), for `model.compile(loss=...)` of `build_detector`'s model."""
    return {"boxes": BoxLoss(weight=config.box_loss_weight),
            "classes": FocalLoss(alpha=config.focal_alpha, gamma=config.focal_gamma)}
